"""Turn drained tick records into aggregates, fault rows, disturbance records and metrics.

:class:`Telemetry.process` runs on the event loop once per drain (every
100 ms or so) with a few hundred records. It does the numpy work there and
hands every database write to the store's worker thread through
``submit``, which keeps them in order.

Fault bookkeeping follows the loop's two bit sets. A bit rising in the
latched ``fault_bits`` raises a fault row and triggers a disturbance
record. The site's ``active_fault_bits`` falling marks the cause cleared.
A latched bit falling (which needs an operator reset in the loop) marks the
fault cleared, if not yet, and reset by the operator of the last reset
request. Unit records have latched bits only, so a unit fault is cleared
and reset together.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import structlog

from gateway.control.layout import Fault
from gateway.service.comtrade import AnalogChannel, DigitalChannel, write_comtrade
from gateway.service.metrics import Metrics
from gateway.service.recording import Capture, DisturbanceRecorder, SecondAggregator
from gateway.service.store import Store

log = structlog.get_logger(__name__)

#: Seconds of 1 kHz ticks kept before a fault, and collected after it, for a disturbance record.
DISTURBANCE_PRE_S = 10.0
DISTURBANCE_POST_S = 2.0

Submit = Callable[..., Any]

_SITE_SIGNALS = ("grid_kw", "load_kw", "target_kw", "demand_kw", "uncovered_kw")
_UNIT_SIGNALS = ("setpoint_kw", "pcs_p_kw", "soc_pct")


def fault_code(bit: int) -> str:
    """Name of one fault bit, ``grid_stale`` for ``Fault.GRID_STALE``; unnamed bits ``bit_N``."""
    try:
        return Fault(bit).name.lower()
    except ValueError:
        return f"bit_{bit.bit_length() - 1}"


class Telemetry:
    """Per-drain processing of tick records; see the module docstring."""

    def __init__(
        self,
        *,
        store: Store,
        submit: Submit,
        metrics: Metrics | None,
        unit_names: Sequence[str],
        record_dtype: np.dtype,
        rate_hz: float,
        station: str,
    ) -> None:
        self.store = store
        self.submit = submit
        self.metrics = metrics
        self.unit_names = tuple(unit_names)
        self.station = station
        self.rate_hz = rate_hz
        signals = list(_SITE_SIGNALS)
        signals += [f"{name}.{s}" for name in self.unit_names for s in _UNIT_SIGNALS]
        self.aggregator = SecondAggregator(signals)
        self.recorder = DisturbanceRecorder(
            record_dtype,
            pre_ticks=round(DISTURBANCE_PRE_S * rate_hz),
            post_ticks=round(DISTURBANCE_POST_S * rate_hz),
        )
        self._site_latched = 0
        self._site_active = 0
        self._unit_latched = np.zeros(len(self.unit_names), np.uint32)
        #: (source, bit) -> one-element lists that the store thread fills with the fault id.
        self._open: dict[tuple[str, int], list[list[int]]] = {}
        self.reset_operator = "unknown"
        self.last_record: np.ndarray | None = None

    @property
    def open_faults(self) -> int:
        """Faults raised and not yet reset, as the tick records show them."""
        return sum(len(boxes) for boxes in self._open.values())

    def process(self, records: np.ndarray, mono_to_utc_s: float) -> None:
        """Handle one drained batch; ``mono_to_utc_s`` is ``time.time() - monotonic`` now."""
        if len(records) == 0:
            return
        self.last_record = records[-1].copy()
        t_utc = records["t_ns"] / 1e9 + mono_to_utc_s
        self._aggregate(records, t_utc)
        self._faults(records, t_utc)
        for capture in self.recorder.feed(records):
            self.submit(self._write_capture, capture, mono_to_utc_s)
        if self.metrics is not None:
            self._metrics(records)

    def flush(self, mono_to_utc_s: float) -> None:
        """Write the open second and any disturbance still collecting (at shutdown)."""
        rows = self.aggregator.flush()
        if rows:
            self.submit(self.store.add_aggregates, rows)
        for capture in self.recorder.flush():
            self.submit(self._write_capture, capture, mono_to_utc_s)

    # -- aggregates -------------------------------------------------------

    def _aggregate(self, records: np.ndarray, t_utc: np.ndarray) -> None:
        values = {name: records[name].astype(np.float64) for name in _SITE_SIGNALS}
        units = records["units"]
        for i, name in enumerate(self.unit_names):
            for signal in _UNIT_SIGNALS:
                values[f"{name}.{signal}"] = units[signal][:, i].astype(np.float64)
        rows = self.aggregator.add(t_utc, values)
        if rows:
            self.submit(self.store.add_aggregates, rows)

    # -- faults -----------------------------------------------------------

    def _faults(self, records: np.ndarray, t_utc: np.ndarray) -> None:
        latched = records["fault_bits"].astype(np.int64)
        active = records["active_fault_bits"].astype(np.int64)
        # Bits 0-7 are site-wide; bits 8-15 repeat the units' own bits, handled below.
        latched &= 0xFF
        active &= 0xFF
        changes = np.flatnonzero(
            np.r_[
                latched[0] != self._site_latched or active[0] != self._site_active,
                (latched[1:] != latched[:-1]) | (active[1:] != active[:-1]),
            ]
        )
        for k in changes.tolist():
            self._site_edges(int(latched[k]), int(active[k]), t_utc[k], k)
        unit_bits = records["units"]["fault_bits"]
        for i, name in enumerate(self.unit_names):
            column = unit_bits[:, i]
            changes = np.flatnonzero(
                np.r_[column[0] != self._unit_latched[i], column[1:] != column[:-1]]
            )
            for k in changes.tolist():
                self._edges(
                    name, int(self._unit_latched[i]), int(column[k]), t_utc[k], k, clear_too=True
                )
                self._unit_latched[i] = column[k]

    def _site_edges(self, latched: int, active: int, t: float, k: int) -> None:
        if latched != self._site_latched:
            self._edges("site", self._site_latched, latched, t, k, clear_too=False)
            self._site_latched = latched
        cleared = self._site_active & ~active
        for bit in _bits(cleared):
            for box in self._open.get(("site", bit), []):
                self.submit(self._clear, box, t)
        self._site_active = active

    def _edges(self, source: str, old: int, new: int, t: float, k: int, *, clear_too: bool) -> None:
        """Record the bits that rose and fell at tick ``k`` of the batch being processed."""
        for bit in _bits(new & ~old):
            code = fault_code(bit)
            log.error("fault_raised", code=code, source=source)
            box: list[int] = []
            self._open.setdefault((source, bit), []).append(box)
            self.submit(self._raise, box, code, source, t)
            self.recorder.trigger(code if source == "site" else f"{code}@{source}", k)
            if self.metrics is not None:
                self.metrics.faults.labels(code=code).inc()
        for bit in _bits(old & ~new):
            code = fault_code(bit)
            log.info("fault_reset", code=code, source=source, operator=self.reset_operator)
            for box in self._open.pop((source, bit), []):
                if clear_too:
                    self.submit(self._clear, box, t)
                self.submit(self._reset, box, self.reset_operator, t)

    def _raise(self, box: list[int], code: str, source: str, t: float) -> None:
        message = f"{code} raised by the fast loop" + ("" if source == "site" else f" on {source}")
        box.append(self.store.raise_fault(code, message, source=source, latched=True, t_utc=t))

    def _clear(self, box: list[int], t: float) -> None:
        if box:
            self.store.clear_fault(box[0], t_utc=t)

    def _reset(self, box: list[int], operator: str, t: float) -> None:
        if box:
            self.store.reset_fault(box[0], operator, t_utc=t)

    # -- disturbance records ----------------------------------------------

    def _write_capture(self, capture: Capture, mono_to_utc_s: float) -> None:
        ticks = capture.ticks
        start = dt.datetime.fromtimestamp(ticks["t_ns"][0] / 1e9 + mono_to_utc_s, dt.timezone.utc)
        analog = [AnalogChannel(name, "kW", ticks[name]) for name in _SITE_SIGNALS]
        for i, name in enumerate(self.unit_names):
            analog.append(
                AnalogChannel(f"{name} setpoint", "kW", ticks["units"]["setpoint_kw"][:, i])
            )
            analog.append(AnalogChannel(f"{name} P", "kW", ticks["units"]["pcs_p_kw"][:, i]))
            analog.append(AnalogChannel(f"{name} SoC", "%", ticks["units"]["soc_pct"][:, i]))
        analog.append(AnalogChannel("wake lateness", "us", ticks["wake_late_ns"] / 1000.0))
        digital = [
            DigitalChannel(fault_code(bit), (ticks["fault_bits"] & bit) != 0)
            for bit in (int(f) for f in Fault)
        ]
        stamp = start.strftime("%Y%m%dT%H%M%S_%fZ")
        safe_code = capture.fault_code.replace("@", "_at_").replace("+", "_and_")
        stem = self.store.disturbance_dir / f"{stamp}_{safe_code}"
        cfg, dat = write_comtrade(
            stem,
            station=self.station,
            device="bessgw",
            start_utc=start,
            rate_hz=self.rate_hz,
            trigger_index=capture.trigger_index,
            analog=analog,
            digital=digital,
        )
        self.store.add_disturbance(capture.fault_code, cfg, dat, len(ticks), t_utc=time.time())
        log.info("disturbance_recorded", fault=capture.fault_code, cfg=str(cfg), samples=len(ticks))

    # -- metrics ----------------------------------------------------------

    def _metrics(self, records: np.ndarray) -> None:
        m = self.metrics
        assert m is not None
        last = records[-1]
        m.loop_lateness_p99.set(float(np.percentile(records["wake_late_ns"], 99)) / 1e9)
        m.loop_compute_p99.set(float(np.percentile(records["compute_ns"], 99)) / 1e9)
        _set_finite(m.grid_kw, last["grid_kw"])
        _set_finite(m.load_kw, last["load_kw"])
        _set_finite(m.uncovered_kw, last["uncovered_kw"])
        for i, name in enumerate(self.unit_names):
            unit = last["units"][i]
            _set_finite(m.pcs_setpoint_kw.labels(device=name), unit["setpoint_kw"])
            _set_finite(m.pcs_kw.labels(device=name), unit["pcs_p_kw"])
            _set_finite(m.soc_pct.labels(device=name), unit["soc_pct"])


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(32) if mask & (1 << i)]


def _set_finite(gauge: Any, value: float) -> None:
    gauge.set(float(value) if np.isfinite(value) else float("nan"))
