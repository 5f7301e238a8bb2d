"""Inputs, parameters and a tick runner shared by the control-law tests.

:class:`Runner` drives either the numpy reference (``"numpy"``) or the C
kernel in its deterministic step mode (``"c"``) through the same interface,
so every cycle table checks both implementations.
"""

from __future__ import annotations

import numpy as np
import pytest

from gateway.config import validate_config
from gateway.control import law
from gateway.control.layout import empty_inputs, record_dtype
from gateway.control.loop import FastLoop, load_extension

#: A monotonic time far from 0, so that ages are never computed near the origin.
T0_NS = 1_000_000_000_000

IMPLEMENTATIONS = ["numpy", "c"]


def make_params(n_units: int = 2, **changes) -> law.LawParams:
    """Parameters with round numbers: 100 Hz, 500 kW units, no smoothing, no slew, no deadband."""
    base = {
        "rated_kw": np.full(n_units, 500.0),
        "cap_kw": 600.0,
        "floor_kw": 0.0,
        "rate_hz": 100.0,
        "ramp_kw_per_s": 1e6,
        "smoothing_tau_s": 0.0,
        "deadband_kw": 0.0,
        "unit_slew_kw_per_s": 1e6,
        "safe_ramp_kw_per_s": 100.0,
        "breach_margin_kw": 10.0,
        "breach_ms": 30.0,
        "meter_stale_ms": 500.0,
        "bms_stale_ms": 5000.0,
        "pcs_stale_ms": 500.0,
    }
    base.update(changes)
    return law.LawParams(**base)


def healthy_inputs(
    n_units: int,
    now_ns: int,
    load_kw: float = 0.0,
    grid_kw: float | None = None,
    soc_pct: float = 50.0,
    voltage_v: float = 800.0,
    charge_a: float = 1000.0,
    discharge_a: float = 1000.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return inputs where every reading is GOOD and received at ``now_ns``.

    At 800 V and 1000 A the BMS limits are 800 kW, above the 500 kW rating.
    """
    site, units = empty_inputs(n_units)
    refresh(site, units, now_ns)
    site["load_kw"] = load_kw
    site["grid_kw"] = load_kw if grid_kw is None else grid_kw
    units["pcs_p_kw"] = 0.0
    units["soc_pct"] = soc_pct
    units["bms_voltage_v"] = voltage_v
    units["bms_charge_limit_a"] = charge_a
    units["bms_discharge_limit_a"] = discharge_a
    units["pcs_fault"] = 0
    units["bms_protection"] = 0
    return site, units


def refresh(site: np.ndarray, units: np.ndarray, now_ns: int) -> None:
    """Mark every reading GOOD and received at ``now_ns``."""
    for name in ("grid", "load"):
        site[f"{name}_quality"] = 0
        site[f"{name}_t_ns"] = now_ns
    for name in ("pcs", "bms"):
        units[f"{name}_quality"] = 0
        units[f"{name}_t_ns"] = now_ns


class Runner:
    """One implementation of the law, stepped tick by tick."""

    def __init__(self, kind: str, params: law.LawParams) -> None:
        self.kind = kind
        self.params = params
        self.n_units = params.n_units
        self.tick_ns = params.derived.period_ns
        self._reset_count = 0
        if kind == "c":
            if load_extension() is None:
                pytest.fail("the C extension is not built; run `pip install -e .`")
            self._loop = FastLoop(None, params=params)
        else:
            self._state = law.LawState.initial(self.n_units)
            self._ticks = 0

    def set_params(self, params: law.LawParams) -> None:
        self.params = params
        if self.kind == "c":
            self._loop.set_params(params)

    def reset_faults(self) -> None:
        self._reset_count += 1
        if self.kind == "c":
            self._loop.reset_faults()

    def tick(self, site: np.ndarray, units: np.ndarray, now_ns: int) -> np.ndarray:
        """Run one tick and return its record (dtype ``record_dtype(n_units)``)."""
        if self.kind == "c":
            generation = self._loop.write_inputs(site, units)
            record = self._loop.step(now_ns)
            assert record["generation"] == generation
            return record
        site = site.copy()
        site["reset_count"] = self._reset_count
        self._state, result = law.step(self.params, self._state, site, units, now_ns)
        record = result.to_record(site, units, self._ticks, now_ns)
        self._ticks += 1
        assert record.dtype == record_dtype(self.n_units)
        return record


def site_config(n_units: int = 2, rated_kw: float = 500.0, **control):
    """Return a validated SiteConfig with one grid meter and ``n_units`` PCS units on 127.0.0.1."""
    devices = [
        {
            "name": "grid",
            "role": "grid_meter",
            "profile": "meter-3ph",
            "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1502},
            "poll_period_ms": 100,
        }
    ]
    for i in range(n_units):
        devices.append(
            {
                "name": f"pcs-{i + 1}",
                "role": "pcs",
                "profile": "pcs-sunspec",
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1503 + i},
                "poll_period_ms": 100,
                "rated_kw": rated_kw,
            }
        )
    data = {
        "site": {"name": "test", "grid_connection_kw": 2000.0},
        "devices": devices,
        "control": {"grid_cap_kw": 600.0, "lock_memory": False, "rt_priority": 0, **control},
    }
    return validate_config(data)
