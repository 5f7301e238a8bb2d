"""The fast control law and its safety interlocks, as a numpy reference.

This is the reference of the C tick in ``fl_law.c``: both perform the same
floating-point operations in the same order, and the equivalence tests replay
input sequences through both. Change both together.

Use::

    params = LawParams.from_config(config)
    state = LawState.initial(params.n_units)
    site, units = layout.empty_inputs(params.n_units)   # fill from the measurement store
    state, result = step(params, state, site, units, now_ns)

Everything is vectorised over PCS units (the last axis) and over any leading
batch axes: give a parameter an array of shape ``(P,)`` and start from
``LawState.initial(n_units, (P,))`` to sweep P parameter sets in one call.

Units are in the names. Signs: grid power positive = import, load positive =
consumption, battery and PCS power positive = discharge into the site.

One tick, in order:

1. Validity. A reading is used only when its quality is GOOD, its value is
   finite and its age ``now_ns - t_ns`` lies in ``[-period_ns, stale_ns]``.
2. Interlocks. Each condition sets a :class:`~gateway.control.layout.Fault`
   bit. Bits latch; a change of the input ``reset_count`` (the operator reset)
   clears the latched bits whose condition is gone. Each bit has a configured
   :class:`~gateway.control.layout.Reaction`; a unit applies the strongest
   reaction among its own and the site's latched bits.
3. Recharge. When the mean SoC of the units with a good BMS falls below
   ``soc_soft_min_pct``, the grid target is raised by ``recharge_kw`` until the
   mean reaches ``soc_soft_min_pct + recharge_hysteresis_pct``.
4. Grid target. A first-order low-pass of the load (plus recharge), clamped
   to ``[floor_kw, cap_kw]``, moved by at most ``ramp_kw_per_s * dt_s`` a tick.
   Recharge therefore only uses headroom under the cap.

   The law itself is reactive. The periodic feed-forward runs before it, on
   the load input: :mod:`gateway.control.predictor` turns the measured load
   into the predicted load that the caller writes as ``load_kw``.
5. Demand. The battery is asked for ``load_kw - target_kw``.
6. Capability. Per unit, ``min(rated_kw, BMS limit in kW)`` with the BMS
   limit ``voltage * current limit / 1000``. Discharge is derated linearly
   from 1 at ``soc_soft_min_pct`` to 0 at ``soc_hard_min_pct``. Charge is
   derated from 1 at ``soc_soft_max_pct`` to 0 at ``soc_hard_max_pct``.
7. Allocation. Every unit without a reaction gets the same fraction of its
   capability; demand beyond the total capability is ``uncovered_kw``.
8. Setpoint. Per-unit slew limit, then clamp to capability (limits win over
   slew). A unit with a reaction instead holds (clamped to its limits), ramps
   to 0 at ``safe_ramp_kw_per_s``, or goes to 0 disabled.
9. Deadband. The published setpoint follows only when the change reaches
   ``deadband_kw``, when the setpoint is exactly 0, or when the old value lies
   outside the unit's limits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from gateway.control.layout import (
    FAULT_BITS,
    FAULT_REACTION_KEY,
    RECORD_UNIT_DTYPE,
    SITE_PARAM_DTYPE,
    UNIT_PARAM_DTYPE,
    Fault,
    Limit,
    Reaction,
    record_dtype,
)

#: Reaction configuration keys and their defaults, as in :class:`gateway.config.Safety`.
DEFAULT_REACTIONS: Mapping[str, Reaction] = {
    "on_meter_stale": Reaction.RAMP_TO_ZERO,
    "on_bms_fault": Reaction.RAMP_TO_ZERO,
    "on_soc_hard_limit": Reaction.RAMP_TO_ZERO,
    "on_limit_breach": Reaction.RAMP_TO_ZERO,
    "on_pcs_fault": Reaction.DISABLE,
    "on_estop": Reaction.DISABLE,
}

_GOOD = 0  # drivers.quality.Quality.GOOD


@dataclass(frozen=True)
class LawParams:
    """Parameters of the law. Scalars may be arrays of shape ``(P,)`` for a sweep.

    ``rated_kw`` and ``unit_slew_kw_per_s`` have one value per unit (last axis).
    """

    rated_kw: Any
    cap_kw: Any
    floor_kw: Any = 0.0
    rate_hz: float = 1000.0
    ramp_kw_per_s: Any = 50.0
    #: Time constant of the low-pass that defines the grid target; 0 follows the load.
    smoothing_tau_s: Any = 5.0
    soc_hard_min_pct: Any = 5.0
    soc_soft_min_pct: Any = 15.0
    soc_soft_max_pct: Any = 90.0
    soc_hard_max_pct: Any = 97.0
    deadband_kw: Any = 1.0
    unit_slew_kw_per_s: Any = 1000.0
    safe_ramp_kw_per_s: Any = 500.0
    #: Grid import added to the target while recharging; 0 disables recharge.
    recharge_kw: Any = 0.0
    recharge_hysteresis_pct: Any = 5.0
    #: Measured PCS power may exceed its limit by this much before it counts as a breach.
    breach_margin_kw: Any = 10.0
    #: A breach must last this long to latch LIMIT_BREACH.
    breach_ms: float = 500.0
    meter_stale_ms: float = 500.0
    bms_stale_ms: float = 5000.0
    pcs_stale_ms: float = 500.0
    #: Reaction per :class:`gateway.config.Safety` key (``on_meter_stale`` ...).
    reactions: Mapping[str, Reaction] = field(default_factory=lambda: dict(DEFAULT_REACTIONS))

    def __post_init__(self) -> None:
        problems = []
        if not 100 <= self.rate_hz <= 2000:
            problems.append(f"rate_hz is {self.rate_hz}; it must be between 100 and 2000")
        rated = np.asarray(self.rated_kw, dtype=float)
        if rated.ndim == 0 or rated.shape[-1] < 1 or not np.all(rated > 0):
            problems.append(f"rated_kw is {self.rated_kw!r}; give one positive rating per unit")
        band = [np.asarray(getattr(self, n), float) for n in _SOC_BAND]
        if not all(np.all(a < b) for a, b in itertools.pairwise(band)):
            problems.append("SoC band must satisfy hard_min < soft_min < soft_max < hard_max")
        if not np.all(np.asarray(self.floor_kw, float) < np.asarray(self.cap_kw, float)):
            problems.append(f"floor_kw ({self.floor_kw}) must be below cap_kw ({self.cap_kw})")
        for name in ("ramp_kw_per_s", "unit_slew_kw_per_s", "safe_ramp_kw_per_s"):
            if not np.all(np.asarray(getattr(self, name), float) > 0):
                problems.append(f"{name} is {getattr(self, name)!r}; it must be positive")
        for name in ("smoothing_tau_s", "deadband_kw", "recharge_kw", "breach_margin_kw"):
            if not np.all(np.asarray(getattr(self, name), float) >= 0):
                problems.append(f"{name} is {getattr(self, name)!r}; it must be 0 or more")
        unknown = set(self.reactions) - set(DEFAULT_REACTIONS)
        if unknown:
            problems.append(
                f"unknown reaction keys {sorted(unknown)}; use {sorted(DEFAULT_REACTIONS)}"
            )
        if problems:
            raise ValueError("invalid control law parameters: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Any, n_units: int | None = None) -> LawParams:
        """Build the parameters from a :class:`gateway.config.SiteConfig`.

        Units are the configured PCS devices, in file order. ``n_units``, when
        given, must match their number.
        """
        pcs = [d for d in config.devices if d.role == "pcs"]
        if n_units is not None and n_units != len(pcs):
            raise ValueError(
                f"n_units is {n_units} but the configuration has {len(pcs)} PCS devices; "
                "add or remove [[devices]] entries with role = 'pcs'"
            )
        control, safety = config.control, config.safety
        return cls(
            rated_kw=np.array([d.rated_kw for d in pcs], dtype=float),
            cap_kw=control.grid_cap_kw,
            floor_kw=control.grid_floor_kw,
            rate_hz=float(control.rate_hz),
            ramp_kw_per_s=control.ramp_limit_kw_per_s,
            smoothing_tau_s=control.smoothing_tau_s,
            soc_hard_min_pct=control.soc_hard_min_pct,
            soc_soft_min_pct=control.soc_soft_min_pct,
            soc_soft_max_pct=control.soc_soft_max_pct,
            soc_hard_max_pct=control.soc_hard_max_pct,
            deadband_kw=control.deadband_kw,
            unit_slew_kw_per_s=np.full(len(pcs), control.unit_slew_kw_per_s),
            safe_ramp_kw_per_s=safety.safe_ramp_kw_per_s,
            recharge_kw=control.recharge_kw,
            recharge_hysteresis_pct=control.recharge_hysteresis_pct,
            breach_margin_kw=safety.limit_breach_margin_kw,
            breach_ms=float(safety.limit_breach_ms),
            meter_stale_ms=float(safety.meter_stale_ms),
            bms_stale_ms=float(safety.bms_stale_ms),
            pcs_stale_ms=float(max(d.effective_stale_ms for d in pcs)),
            reactions={key: Reaction[getattr(safety, key).upper()] for key in DEFAULT_REACTIONS},
        )

    def replace(self, **changes: Any) -> LawParams:
        """Return a copy with some fields changed, validated again."""
        return replace(self, **changes)

    @property
    def n_units(self) -> int:
        return int(np.asarray(self.rated_kw).shape[-1])

    @cached_property
    def derived(self) -> _Derived:
        """The numbers a tick uses, computed once; the C loop receives the same values."""
        return _Derived.of(self)

    def to_structs(self) -> tuple[np.ndarray, np.ndarray]:
        """Pack one parameter set into the site and unit records the C loop reads."""
        d = self.derived
        site = np.zeros((), SITE_PARAM_DTYPE)
        for name in SITE_PARAM_DTYPE.names:
            if name == "pad":
                continue
            value = np.asarray(getattr(d, name))
            if name != "reaction" and value.ndim != 0:
                raise ValueError(
                    f"{name} is a sweep of {value.shape}; the C loop takes one parameter set"
                )
            site[name] = value
        units = np.zeros(self.n_units, UNIT_PARAM_DTYPE)
        units["rated_kw"] = d.rated_kw
        units["slew_kw_per_s"] = d.slew_kw_per_s
        return site, units


_SOC_BAND = ("soc_hard_min_pct", "soc_soft_min_pct", "soc_soft_max_pct", "soc_hard_max_pct")

#: Fields of :class:`LawParams` that a tick uses as they are.
_PASSED_THROUGH = (
    "cap_kw",
    "floor_kw",
    "ramp_kw_per_s",
    *_SOC_BAND,
    "deadband_kw",
    "safe_ramp_kw_per_s",
    "recharge_kw",
    "recharge_hysteresis_pct",
    "breach_margin_kw",
)


@dataclass(frozen=True)
class _Derived:
    dt_s: float
    period_ns: int
    lp_alpha: np.ndarray
    cap_kw: np.ndarray
    floor_kw: np.ndarray
    ramp_kw_per_s: np.ndarray
    soc_hard_min_pct: np.ndarray
    soc_soft_min_pct: np.ndarray
    soc_soft_max_pct: np.ndarray
    soc_hard_max_pct: np.ndarray
    deadband_kw: np.ndarray
    safe_ramp_kw_per_s: np.ndarray
    recharge_kw: np.ndarray
    recharge_hysteresis_pct: np.ndarray
    breach_margin_kw: np.ndarray
    meter_stale_ns: int
    bms_stale_ns: int
    pcs_stale_ns: int
    breach_ticks: int
    reaction: np.ndarray
    rated_kw: np.ndarray
    slew_kw_per_s: np.ndarray

    @classmethod
    def of(cls, p: LawParams) -> _Derived:
        dt_s = 1.0 / p.rate_hz
        tau = np.asarray(p.smoothing_tau_s, dtype=float)
        with np.errstate(divide="ignore"):
            alpha = np.where(tau > 0, -np.expm1(-dt_s / np.where(tau > 0, tau, 1.0)), 1.0)
        reaction = np.zeros(FAULT_BITS, np.int32)
        reactions = {**DEFAULT_REACTIONS, **p.reactions}
        for fault, key in FAULT_REACTION_KEY.items():
            reaction[fault.bit_length() - 1] = int(reactions[key])
        rated = np.asarray(p.rated_kw, dtype=float)
        scalars = {name: np.asarray(getattr(p, name), dtype=float) for name in _PASSED_THROUGH}
        return cls(
            dt_s=dt_s,
            period_ns=round(1e9 / p.rate_hz),
            lp_alpha=alpha,
            meter_stale_ns=round(p.meter_stale_ms * 1e6),
            bms_stale_ns=round(p.bms_stale_ms * 1e6),
            pcs_stale_ns=round(p.pcs_stale_ms * 1e6),
            breach_ticks=max(1, math.ceil(p.breach_ms * p.rate_hz / 1000.0 - 1e-9)),
            reaction=reaction,
            rated_kw=rated,
            slew_kw_per_s=np.broadcast_to(
                np.asarray(p.unit_slew_kw_per_s, float), rated.shape
            ).copy(),
            **scalars,
        )


@dataclass(frozen=True)
class LawState:
    """State carried from one tick to the next. Arrays have the batch shape, plus units last."""

    initialised: np.ndarray
    recharging: np.ndarray
    load_filt_kw: np.ndarray
    target_kw: np.ndarray
    site_latched: np.ndarray
    last_reset_count: np.ndarray
    #: Setpoint after slew and limits, before the deadband.
    sp_kw: np.ndarray
    #: Published setpoint, after the deadband.
    out_kw: np.ndarray
    unit_latched: np.ndarray
    breach_count: np.ndarray

    @classmethod
    def initial(cls, n_units: int, batch_shape: tuple[int, ...] = ()) -> LawState:
        unit_shape = (*batch_shape, n_units)
        return cls(
            initialised=np.zeros(batch_shape, bool),
            recharging=np.zeros(batch_shape, bool),
            load_filt_kw=np.zeros(batch_shape),
            target_kw=np.zeros(batch_shape),
            site_latched=np.zeros(batch_shape, np.uint32),
            last_reset_count=np.zeros(batch_shape, np.uint32),
            sp_kw=np.zeros(unit_shape),
            out_kw=np.zeros(unit_shape),
            unit_latched=np.zeros(unit_shape, np.uint32),
            breach_count=np.zeros(unit_shape, np.int32),
        )


@dataclass(frozen=True)
class StepResult:
    """Outputs of one tick. Per-unit arrays have the units on the last axis."""

    #: Published setpoint per unit, positive = discharge.
    setpoint_kw: np.ndarray
    #: False where the reaction is disable: the PCS writer turns that unit off.
    enabled: np.ndarray
    target_kw: np.ndarray
    #: ``load_kw - target_kw``: what the battery is asked for; 0 while the load is not usable.
    demand_kw: np.ndarray
    #: Demand beyond the total capability, signed like the demand.
    uncovered_kw: np.ndarray
    #: Latched fault bits of the site and all units.
    fault_bits: np.ndarray
    active_fault_bits: np.ndarray
    limit_bits: np.ndarray
    unit_fault_bits: np.ndarray
    unit_limit_bits: np.ndarray
    reaction: np.ndarray
    discharge_cap_kw: np.ndarray
    charge_cap_kw: np.ndarray

    def to_record(self, site: np.ndarray, units: np.ndarray, tick: int, t_ns: int) -> np.ndarray:
        """Fill a tick record (one parameter set) with the fields the C loop also writes."""
        n = units.shape[-1]
        record = np.zeros((), record_dtype(n))
        record["tick"] = tick
        record["t_ns"] = t_ns
        record["generation"] = site["generation"]
        record["grid_kw"] = site["grid_kw"]
        record["load_kw"] = site["load_kw"]
        record["target_kw"] = self.target_kw
        record["demand_kw"] = self.demand_kw
        record["uncovered_kw"] = self.uncovered_kw
        record["fault_bits"] = self.fault_bits
        record["active_fault_bits"] = self.active_fault_bits
        record["limit_bits"] = self.limit_bits
        unit = np.zeros(n, RECORD_UNIT_DTYPE)
        unit["setpoint_kw"] = self.setpoint_kw
        unit["pcs_p_kw"] = units["pcs_p_kw"]
        unit["soc_pct"] = units["soc_pct"]
        unit["discharge_cap_kw"] = self.discharge_cap_kw
        unit["charge_cap_kw"] = self.charge_cap_kw
        unit["fault_bits"] = self.unit_fault_bits
        unit["limit_bits"] = self.unit_limit_bits
        unit["reaction"] = self.reaction
        unit["enabled"] = self.enabled
        record["units"] = unit
        return record


def _clamp(x: Any, lo: Any, hi: Any) -> np.ndarray:
    return np.fmin(np.fmax(x, lo), hi)


def _col(x: Any) -> np.ndarray:
    """Give a per-site array a units axis so that it broadcasts against per-unit arrays."""
    return np.asarray(x)[..., None]


def _fresh(quality: Any, t_ns: Any, now_ns: Any, stale_ns: int, future_ns: int) -> np.ndarray:
    age_ns = np.asarray(now_ns, np.int64) - np.asarray(t_ns, np.int64)
    return (np.asarray(quality) == _GOOD) & (age_ns <= stale_ns) & (age_ns >= -future_ns)


def _bit(condition: Any, bit: int) -> np.ndarray:
    return np.where(condition, np.uint32(bit), np.uint32(0))


def _strongest_reaction(reaction: np.ndarray, bits: np.ndarray) -> np.ndarray:
    result = np.zeros(bits.shape, np.int32)
    for b in range(FAULT_BITS):
        if reaction[b] > 0:
            result = np.where(bits & np.uint32(1 << b), np.maximum(result, reaction[b]), result)
    return result


def _sum_units(x: np.ndarray) -> np.ndarray:
    """Sum over units left to right, as the C loop does, so both round alike."""
    total = np.zeros(x.shape[:-1])
    for i in range(x.shape[-1]):
        total = total + x[..., i]
    return total


def _or_units(x: np.ndarray) -> np.ndarray:
    return np.bitwise_or.reduce(x.astype(np.uint32), axis=-1)


def step(
    params: LawParams, state: LawState, site: np.ndarray, units: np.ndarray, now_ns: Any
) -> tuple[LawState, StepResult]:
    """Run one tick at monotonic time ``now_ns``; return the new state and the outputs.

    ``site`` is a record (or array of records) of
    :data:`~gateway.control.layout.SITE_INPUT_DTYPE`, ``units`` an array of
    :data:`~gateway.control.layout.UNIT_INPUT_DTYPE` with the units last.
    ``state`` is not modified.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _step(params.derived, state, site, units, now_ns)


def _step(p: _Derived, st: LawState, site: np.ndarray, units: np.ndarray, now_ns: Any):
    dt = p.dt_s
    now = np.asarray(now_ns, np.int64)
    now_u = _col(now)

    # 1. Input validity and the interlock conditions of this tick.
    grid_kw, load_kw = site["grid_kw"], site["load_kw"]
    grid_ok = _fresh(site["grid_quality"], site["grid_t_ns"], now, p.meter_stale_ns, p.period_ns)
    grid_ok = grid_ok & np.isfinite(grid_kw)
    load_ok = _fresh(site["load_quality"], site["load_t_ns"], now, p.meter_stale_ns, p.period_ns)
    load_ok = load_ok & np.isfinite(load_kw)
    site_active = (
        _bit(~grid_ok, Fault.GRID_STALE)
        | _bit(~load_ok, Fault.LOAD_STALE)
        | _bit(site["estop"] != 0, Fault.ESTOP)
    )

    pcs_p, soc = units["pcs_p_kw"], units["soc_pct"]
    rated = p.rated_kw
    pcs_ok = _fresh(units["pcs_quality"], units["pcs_t_ns"], now_u, p.pcs_stale_ns, p.period_ns)
    pcs_ok = pcs_ok & np.isfinite(pcs_p)
    bms_ok = _fresh(units["bms_quality"], units["bms_t_ns"], now_u, p.bms_stale_ns, p.period_ns)
    for name in ("soc_pct", "bms_voltage_v", "bms_charge_limit_a", "bms_discharge_limit_a"):
        bms_ok = bms_ok & np.isfinite(units[name])
    volts = units["bms_voltage_v"]
    dis_hw = np.where(
        bms_ok, np.fmin(rated, np.fmax(0.0, volts * units["bms_discharge_limit_a"] * 1e-3)), rated
    )
    chg_hw = np.where(
        bms_ok, np.fmin(rated, np.fmax(0.0, volts * units["bms_charge_limit_a"] * 1e-3)), rated
    )
    soc_outside = (soc < _col(p.soc_hard_min_pct)) | (soc > _col(p.soc_hard_max_pct))
    unit_active = (
        _bit(~bms_ok, Fault.BMS_SILENT)
        | _bit(bms_ok & (units["bms_protection"] != 0), Fault.BMS_PROTECTION)
        | _bit(bms_ok & soc_outside, Fault.SOC_HARD)
    )
    limit = np.where(pcs_p >= 0.0, dis_hw, chg_hw)
    over = np.abs(pcs_p) > limit + _col(p.breach_margin_kw)
    breach_count = np.where(pcs_ok & over, st.breach_count + 1, 0).astype(np.int32)
    unit_active = unit_active | (
        _bit(pcs_ok & (breach_count >= p.breach_ticks), Fault.LIMIT_BREACH)
        | _bit(pcs_ok & (units["pcs_fault"] != 0), Fault.PCS_FAULT)
        | _bit(~pcs_ok, Fault.PCS_LOST)
    )

    # 2. Latch. A changed reset_count clears every latched bit whose cause is gone.
    reset_count = np.asarray(site["reset_count"], np.uint32)
    reset = reset_count != st.last_reset_count
    site_latched = np.where(reset, site_active, st.site_latched | site_active).astype(np.uint32)
    unit_latched = np.where(_col(reset), unit_active, st.unit_latched | unit_active).astype(
        np.uint32
    )
    site_reaction = _strongest_reaction(p.reaction, site_latched)
    reaction = np.maximum(_strongest_reaction(p.reaction, unit_latched), _col(site_reaction))

    # 3. Recharge below the cap when the mean SoC of the units with a good BMS is low.
    soc_sum = _sum_units(np.where(bms_ok, soc, 0.0))
    soc_count = np.sum(bms_ok, axis=-1)
    soc_mean = soc_sum / np.maximum(soc_count, 1)
    start = ~st.recharging & (soc_mean < p.soc_soft_min_pct)
    stop = st.recharging & (soc_mean >= p.soc_soft_min_pct + p.recharge_hysteresis_pct)
    recharging = np.where(start, True, np.where(stop, False, st.recharging))
    recharging = recharging & (soc_count > 0) & (p.recharge_kw > 0.0)
    site_limits = _bit(recharging, Limit.RECHARGE)

    # 4. Grid target: low-pass of the load (plus recharge), clamped, ramp-limited.
    first = load_ok & ~st.initialised
    running = load_ok & st.initialised
    filt = st.load_filt_kw + p.lp_alpha * (load_kw - st.load_filt_kw)
    desired = filt + np.where(recharging, p.recharge_kw, 0.0)
    site_limits = site_limits | _bit(running & (desired > p.cap_kw), Limit.CAP)
    site_limits = site_limits | _bit(running & (desired < p.floor_kw), Limit.FLOOR)
    target_step = _clamp(desired, p.floor_kw, p.cap_kw) - st.target_kw
    max_step = p.ramp_kw_per_s * dt
    site_limits = site_limits | _bit(
        running & ((target_step > max_step) | (target_step < -max_step)), Limit.RAMP
    )
    target_step = np.where(
        target_step > max_step, max_step, np.where(target_step < -max_step, -max_step, target_step)
    )
    load_filt_kw = np.where(first, load_kw, np.where(running, filt, st.load_filt_kw))
    target_kw = np.where(
        first,
        _clamp(load_kw, p.floor_kw, p.cap_kw),
        np.where(running, st.target_kw + target_step, st.target_kw),
    )
    demand = np.where(load_ok, load_kw - target_kw, 0.0)
    site_limits = site_limits | _bit(grid_ok & (grid_kw > p.cap_kw), Limit.GRID_OVER_CAP)

    # 5. Capability of each unit that runs normally.
    usable = reaction == int(Reaction.NONE)
    f_dis = _clamp(
        (soc - _col(p.soc_hard_min_pct)) / _col(p.soc_soft_min_pct - p.soc_hard_min_pct), 0.0, 1.0
    )
    f_chg = _clamp(
        (_col(p.soc_hard_max_pct) - soc) / _col(p.soc_hard_max_pct - p.soc_soft_max_pct), 0.0, 1.0
    )
    dis_cap = np.where(usable, dis_hw * f_dis, 0.0)
    chg_cap = np.where(usable, chg_hw * f_chg, 0.0)
    unit_limits = _bit(usable & ((dis_hw < rated) | (chg_hw < rated)), Limit.BMS_LIMIT)
    unit_limits = unit_limits | _bit(usable & ((f_dis < 1.0) | (f_chg < 1.0)), Limit.SOC_DERATE)
    dis_total = _sum_units(dis_cap)
    chg_total = _sum_units(chg_cap)

    # 6. Allocation in proportion to capability; what is left is uncovered.
    discharging = demand >= 0.0
    need = np.where(
        discharging,
        np.where(dis_total > 0.0, demand / dis_total, np.inf),
        np.where(chg_total > 0.0, -demand / chg_total, np.inf),
    )
    short = need > 1.0
    share = np.where(short, 1.0, need)
    uncovered = np.where(short, np.where(discharging, demand - dis_total, demand + chg_total), 0.0)
    site_limits = site_limits | _bit(uncovered != 0.0, Limit.UNCOVERED)

    # 7. Per unit: slew, clamp, safe action, deadband.
    prev = st.sp_kw
    alloc = np.where(_col(discharging), dis_cap * _col(share), -(chg_cap * _col(share)))
    slew_step = p.slew_kw_per_s * dt
    unit_step = alloc - prev
    slewed = (unit_step > slew_step) | (unit_step < -slew_step)
    unit_step = np.where(
        unit_step > slew_step, slew_step, np.where(unit_step < -slew_step, -slew_step, unit_step)
    )
    normal = prev + unit_step
    unit_limits = unit_limits | _bit(usable & slewed, Limit.SLEW)
    unit_limits = unit_limits | _bit(
        usable & ((normal > dis_cap) | (normal < -chg_cap)), Limit.UNIT_CAP
    )
    normal = _clamp(normal, -chg_cap, dis_cap)
    hold = _clamp(prev, -chg_hw, dis_hw)
    safe_step = _col(p.safe_ramp_kw_per_s * dt)
    ramp = _clamp(prev - _clamp(prev, -safe_step, safe_step), -chg_hw, dis_hw)
    sp_kw = np.select(
        [usable, reaction == int(Reaction.HOLD), reaction == int(Reaction.RAMP_TO_ZERO)],
        [normal, hold, ramp],
        0.0,
    )
    lim_dis = np.where(usable, dis_cap, dis_hw)
    lim_chg = np.where(usable, chg_cap, chg_hw)
    out = st.out_kw
    follow = (
        (sp_kw == 0.0)
        | (np.abs(sp_kw - out) >= _col(p.deadband_kw))
        | (out > lim_dis)
        | (out < -lim_chg)
    )
    unit_limits = unit_limits | _bit(~follow & (sp_kw != out), Limit.DEADBAND)
    out_kw = np.where(follow, sp_kw, out)

    new_state = LawState(
        initialised=st.initialised | load_ok,
        recharging=recharging,
        load_filt_kw=load_filt_kw,
        target_kw=target_kw,
        site_latched=site_latched,
        last_reset_count=reset_count,
        sp_kw=sp_kw,
        out_kw=out_kw,
        unit_latched=unit_latched,
        breach_count=breach_count,
    )
    result = StepResult(
        setpoint_kw=out_kw,
        enabled=reaction != int(Reaction.DISABLE),
        target_kw=target_kw,
        demand_kw=demand,
        uncovered_kw=uncovered,
        fault_bits=site_latched | _or_units(unit_latched),
        active_fault_bits=site_active | _or_units(unit_active),
        limit_bits=site_limits | _or_units(unit_limits),
        unit_fault_bits=unit_latched,
        unit_limit_bits=unit_limits,
        reaction=reaction,
        discharge_cap_kw=dis_cap,
        charge_cap_kw=chg_cap,
    )
    return new_state, result
