"""The supervisory planner: once a minute, the parameters the fast loop runs with.

:func:`plan_step` is a pure function of its configuration, the previous
:class:`PlannerState` and this minute's :class:`PlannerInputs` (measured
means, SoC, forecasts, demand-response events). It returns a :class:`Plan`
and the next state. The daemon and the SIL replay call it the same way.

How the grid import cap is chosen. The bill charges the largest 15-minute
mean import of the billing period (a calendar month, UTC), so:

1. The cap never goes below the billing peak already measured this period:
   a lower cap would cost battery energy and save nothing.
2. Otherwise it is the *forecast need*: the lowest cap the battery, at its
   present SoC, could hold through the outlook. The outlook
   (:mod:`gateway.plan.outlook`) reaches a day ahead as one net-load
   scenario per past day of history, so the need is found per scenario
   (:func:`~gateway.plan.optimum.optimal_peaks`) and the cap takes their
   ``need_quantile``. Recomputed every minute with the SoC measured then, the
   cap rises step by step when the battery drains faster than the outlook
   expected, instead of holding until the reserve and then jumping.
3. With ``history_floor`` it also never goes below the *history optimum*:
   the lowest peak the battery could have held over the last days of
   measured load, with perfect hindsight. Until a day of history exists,
   ``initial_cap_kw`` replaces the outlook's past days.

The SoC band sets where the fast loop recharges and where it derates.
Its lower edge is the reserve plus the energy that holding the cap through
the outlook needs (:func:`~gateway.plan.optimum.required_energy_kwh`, the
``energy_quantile`` across scenarios), less the renewable surplus expected
in the hour, so the battery is charged from surplus before the grid. That
energy counts no recharge later on: the battery refills while there is room
under the paid peak, instead of counting on room that a rising load may
take. While the load is at the
cap the lower edge drops to the reserve, because the fast loop derates
discharge below it.

Energy above what the cap needs may be discharged into the load by
lowering the cap for the next minute. For self-consumption only as much is
discharged as the renewable surplus forecast for the next hour would not
find room for; energy kept in the battery is used on site later anyway. In
expensive hours all of it may go, against the time-of-use spread. Cheap
hours may charge to the top of the band. Draining and time-of-use charging
stop for the day once the day's discharge reaches the daily cycle budget.
A demand-response event lowers the cap to its baseline minus the requested
reduction, and the energy it needs is charged ahead.

Powers are in kW, energies in kWh, times in UNIX seconds (UTC).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, replace

import numpy as np
import structlog

from gateway.forecast.model import Forecast
from gateway.plan.battery import BatterySpec
from gateway.plan.events import DemandResponseEvent
from gateway.plan.optimum import (
    DEMAND_INTERVAL_S,
    hold_cap,
    optimal_peak,
    optimal_peaks,
    required_energy_kwh,
)
from gateway.plan.outlook import build_outlook, history_capacity

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PlannerConfig:
    """Site, battery and tariff settings of the planner. Powers in kW, times in seconds."""

    #: ``soc_min_pct`` is the ride-through reserve the planner never plans to use.
    battery: BatterySpec
    #: Cap used until a day of history exists.
    initial_cap_kw: float
    floor_kw: float = 0.0
    ramp_limit_kw_per_s: float = 50.0
    interval_s: float = DEMAND_INTERVAL_S
    #: Net-load history kept for the history optimum.
    history_s: float = 7 * 86400.0
    #: Minimum history before the history optimum replaces ``initial_cap_kw``.
    min_history_s: float = 86400.0
    prior_refresh_s: float = 3600.0
    #: Compute the history optimum on the load alone, as if the renewables had produced
    #: nothing. The billing peak usually falls in a calm spell, and the past days' wind
    #: predicts nothing about this period's, so the net history would promise a cap that a
    #: calm day cannot keep.
    prior_without_renewables: bool = True
    #: Keep the cap at or above the history optimum. Off by default: on the nordic-week
    #: replay the floor held the cap below what the spell of that week needed.
    history_floor: bool = False
    #: How far the outlook reaches (at most a day): the forecast's hour, then past days.
    outlook_s: float = 24 * 3600.0
    #: Quantile, across the outlook's scenarios, of the cap each scenario needs.
    need_quantile: float = 0.75
    #: Quantile, across the scenarios, of the stored energy that holding the billing cap
    #: needs. The SoC band recharges toward it and draining keeps it, so the default keeps
    #: what the most demanding past day would need: a drain for arbitrage that leaves less
    #: costs far more in demand charge than it earns.
    energy_quantile: float = 1.0
    #: Time constant with which today's load anomaly against each past day fades.
    anomaly_tau_s: float = 4 * 3600.0
    #: Time constant with which the outlook lets the renewable output fade after the hour.
    renewable_fade_s: float = 6 * 3600.0
    #: Without a day of history, the outlook keeps the forecast's median at 1 h this long.
    fallback_hold_s: float = 2 * 3600.0
    #: Kept between the planned cap and the fast loop's, for meter error and 1-minute lag.
    cap_margin_kw: float = 0.0
    #: Hourly energy prices, UTC hours 0-23; empty means a flat price.
    energy_price_per_kwh: tuple[float, ...] = ()
    #: Discharged energy per UTC day, in battery capacities, allowed for self-consumption
    #: and arbitrage. Peak shaving and demand response are never limited by it.
    daily_cycle_budget: float = 1.0
    self_consumption: bool = True
    #: Width of the SoC band's upper part: derating starts this far below ``soc_max_pct``.
    soc_band_top_pct: float = 5.0
    #: Time over which energy above the cap's need is discharged.
    drain_s: float = 3600.0
    #: Grid import the fast loop adds while recharging below the SoC band (its recharge_kw).
    recharge_kw: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not self.initial_cap_kw > self.floor_kw:
            problems.append(
                f"initial_cap_kw={self.initial_cap_kw} must be above floor_kw={self.floor_kw}"
            )
        if self.energy_price_per_kwh and len(self.energy_price_per_kwh) != 24:
            problems.append(
                f"energy_price_per_kwh has {len(self.energy_price_per_kwh)} values; "
                "give 24 (one per UTC hour) or none"
            )
        if not self.daily_cycle_budget >= 0:
            problems.append(f"daily_cycle_budget={self.daily_cycle_budget} must be >= 0")
        if self.min_history_s > self.history_s:
            problems.append(
                f"min_history_s={self.min_history_s} exceeds history_s={self.history_s}"
            )
        for name in (
            "interval_s",
            "prior_refresh_s",
            "drain_s",
            "ramp_limit_kw_per_s",
            "anomaly_tau_s",
            "renewable_fade_s",
        ):
            if not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)} must be > 0")
        if not 4 * self.interval_s <= self.outlook_s <= 86400.0:
            problems.append(
                f"outlook_s={self.outlook_s} must cover the forecast's hour and at most a day"
            )
        for name in ("need_quantile", "energy_quantile"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1]")
        if problems:
            raise ValueError("invalid planner configuration: " + "; ".join(problems))


@dataclass(frozen=True)
class Plan:
    """The fast loop's parameters until the next plan, the headroom, and the reason."""

    cap_kw: float
    floor_kw: float
    ramp_limit_kw_per_s: float
    #: (soft minimum, soft maximum) SoC in %: recharge below the first, derate past both.
    soc_target_band: tuple[float, float]
    #: The billing cap that headroom counts against; ``cap_kw`` is lower while draining.
    billing_cap_kw: float
    #: Load the site can add for the next hour without breaking the billing cap.
    headroom_kw: float
    #: Short name of the term that set the cap, then details.
    reason: str


@dataclass(frozen=True)
class PlannerInputs:
    """This minute's measurements and forecasts. Means are over the last ``period_s``."""

    now_utc: float
    period_s: float
    grid_kw: float | None
    #: Load minus renewable output.
    net_load_kw: float | None
    #: Battery AC power, positive = discharge.
    battery_kw: float | None
    soc_pct: float | None
    #: Renewable output; None when the site has none or it is not measured.
    renewable_kw: float | None = None
    load_forecast: Forecast | None = None
    renewable_forecast: Forecast | None = None
    events: tuple[DemandResponseEvent, ...] = ()


@dataclass(frozen=True)
class PlannerState:
    """Everything :func:`plan_step` carries from one minute to the next."""

    billing_month: tuple[int, int] | None = None
    #: Largest 15-minute mean grid import measured this billing period.
    billing_peak_kw: float = 0.0
    interval_index: int | None = None
    interval_grid_kw_s: float = 0.0
    interval_net_kw_s: float = 0.0
    interval_renewable_kw_s: float = 0.0
    interval_seconds: float = 0.0
    #: Net-load and renewable means of completed intervals, oldest first.
    history_net_kw: tuple[float, ...] = ()
    history_renewable_kw: tuple[float, ...] = ()
    prior_cap_kw: float | None = None
    prior_at_utc: float = -math.inf
    day: int | None = None
    discharged_kwh_today: float = 0.0
    #: The cap each outlook scenario needed at the last plan, the next search's starting guess.
    scenario_needs_kw: tuple[float, ...] = ()
    #: Baseline fixed at each demand-response event's start, by event id.
    dr_baselines: dict[str, float] = field(default_factory=dict)
    last_plan: Plan | None = None


def _accumulate(config: PlannerConfig, state: PlannerState, inputs: PlannerInputs) -> PlannerState:
    """Add this minute's means to the current interval; close the interval when it ends."""
    now = inputs.now_utc
    when = dt.datetime.fromtimestamp(now - 1e-6, tz=dt.timezone.utc)
    month = (when.year, when.month)
    peak = state.billing_peak_kw if state.billing_month == month else 0.0
    if state.billing_month is not None and state.billing_month != month:
        log.info("billing_period_started", month=f"{month[0]}-{month[1]:02d}")
    day = int(now // 86400)
    discharged = state.discharged_kwh_today if state.day == day else 0.0
    if inputs.battery_kw is not None and inputs.battery_kw > 0:
        discharged += inputs.battery_kw * inputs.period_s / 3600.0

    # The minute that ends at `now` belongs to the interval that contains now - 1 us.
    index = int((now - 1e-6) // config.interval_s)
    grid_s, net_s = state.interval_grid_kw_s, state.interval_net_kw_s
    renewable_s, seconds = state.interval_renewable_kw_s, state.interval_seconds
    history, renewables = state.history_net_kw, state.history_renewable_kw
    if state.interval_index is not None and index != state.interval_index and seconds > 0:
        if state.billing_month == month or state.billing_month is None:
            peak = max(peak, grid_s / seconds)
        keep = history_capacity(config)
        history = (*history, net_s / seconds)[-keep:]
        renewables = (*renewables, renewable_s / seconds)[-keep:]
        grid_s = net_s = renewable_s = seconds = 0.0
    if inputs.grid_kw is not None and inputs.net_load_kw is not None:
        grid_s += inputs.grid_kw * inputs.period_s
        net_s += inputs.net_load_kw * inputs.period_s
        renewable_s += (inputs.renewable_kw or 0.0) * inputs.period_s
        seconds += inputs.period_s
    return replace(
        state,
        billing_month=month,
        billing_peak_kw=peak,
        interval_index=index,
        interval_grid_kw_s=grid_s,
        interval_net_kw_s=net_s,
        interval_renewable_kw_s=renewable_s,
        interval_seconds=seconds,
        history_net_kw=history,
        history_renewable_kw=renewables,
        day=day,
        discharged_kwh_today=discharged,
    )


def _refresh_prior(config: PlannerConfig, state: PlannerState, now: float) -> PlannerState:
    """Recompute the history optimum once per ``prior_refresh_s``."""
    if now - state.prior_at_utc < config.prior_refresh_s:
        return state
    needed = round(config.min_history_s / config.interval_s)
    if len(state.history_net_kw) < needed:
        return replace(state, prior_cap_kw=None, prior_at_utc=now)
    history = np.asarray(state.history_net_kw)
    if config.prior_without_renewables:
        history = history + np.asarray(state.history_renewable_kw)
    result = optimal_peak(
        history,
        config.interval_s,
        config.battery,
        config.battery.soc_max_pct,
        interval_s=config.interval_s,
        tolerance_kw=0.5,
    )
    if state.prior_cap_kw is None:
        log.info("planner_history_optimum", cap_kw=round(result.peak_kw, 1), intervals=history.size)
    return replace(state, prior_cap_kw=result.peak_kw, prior_at_utc=now)


def seed_history(
    config: PlannerConfig,
    state: PlannerState,
    net_kw_means: np.ndarray,
    renewable_kw_means: np.ndarray | None = None,
    last_index: int | None = None,
) -> PlannerState:
    """Return ``state`` with past interval means (oldest first) as its history.

    The daemon calls this at start-up with the means from its store, so that
    the history optimum and the outlook work before a day has passed.
    ``last_index`` is the interval index (UTC seconds // ``interval_s``) of
    the last mean. The outlook needs it to line the history up with the time
    of day.
    """
    keep = history_capacity(config)
    net = np.asarray(net_kw_means, dtype=float)[-keep:]
    renewable = (
        np.zeros(net.size)
        if renewable_kw_means is None
        else np.asarray(renewable_kw_means, dtype=float)[-keep:]
    )
    if net.shape != renewable.shape:
        raise ValueError(
            f"net_kw_means and renewable_kw_means differ in length ({net.size} vs {renewable.size})"
        )
    if not (np.all(np.isfinite(net)) and np.all(np.isfinite(renewable))):
        raise ValueError("the history contains a non-finite value; drop the missing intervals")
    index = state.interval_index if last_index is None else last_index + 1
    return replace(
        state,
        history_net_kw=tuple(net.tolist()),
        history_renewable_kw=tuple(renewable.tolist()),
        interval_index=index,
        prior_at_utc=-math.inf,
    )


def _headroom_kw(
    config: PlannerConfig, upper_kw: np.ndarray, cap_kw: float, soc_pct: float | None
) -> float:
    """Find the largest constant load the site can add for the hour without breaking ``cap_kw``."""
    hour = upper_kw[:4]
    if soc_pct is None:
        return max(0.0, float(cap_kw - hour.max()))
    low, high = 0.0, max(cap_kw - float(hour.min()), 0.0) + config.battery.discharge_kw
    if not hold_cap(hour, cap_kw, config.battery, soc_pct, config.interval_s).feasible:
        return 0.0
    while high - low > 1.0:
        middle = (low + high) / 2.0
        if hold_cap(hour + middle, cap_kw, config.battery, soc_pct, config.interval_s).feasible:
            low = middle
        else:
            high = middle
    return low


def _price_mode(config: PlannerConfig, now: float) -> str:
    """Classify this hour as ``cheap``, ``expensive`` or ``flat`` for time-of-use arbitrage.

    A spread is used only when the dearest hour pays back the round trip's
    losses on the cheapest one. Hours in the lowest quarter of the day's price
    range count as cheap, those in the highest quarter as expensive.
    """
    prices = config.energy_price_per_kwh
    if not prices:
        return "flat"
    low, high = min(prices), max(prices)
    battery = config.battery
    if high * battery.charge_efficiency * battery.discharge_efficiency <= low:
        return "flat"
    price = prices[int(now % 86400 // 3600)]
    if price <= low + 0.25 * (high - low):
        return "cheap"
    if price >= high - 0.25 * (high - low):
        return "expensive"
    return "flat"


def plan_step(
    config: PlannerConfig, state: PlannerState, inputs: PlannerInputs
) -> tuple[Plan, PlannerState]:
    """Make this minute's plan; return it and the state for the next call."""
    battery = config.battery
    now = inputs.now_utc
    state = _accumulate(config, state, inputs)
    state = _refresh_prior(config, state, now)
    outlook = build_outlook(config, state, inputs)
    soc = inputs.soc_pct
    if soc is not None and not (0.0 <= soc <= 100.0 and math.isfinite(soc)):
        soc = None

    # 1-3: the billing cap.
    terms = {"billing peak so far": state.billing_peak_kw}
    if state.prior_cap_kw is None:
        terms["initial cap"] = config.initial_cap_kw
    elif config.history_floor or (soc is None and state.last_plan is None):
        terms["history optimum"] = state.prior_cap_kw
    # Recharging from the grid may only use room under the peak already paid for (or the
    # history optimum): a recharge that rises to a cap raised for the outlook sets a new peak.
    # So the needs count recharge at the fast loop's recharge_kw, and only where the outlook
    # leaves that much room under the paid peak or the cap being tried, which a scenario
    # that needs that cap pays anyway.
    paid_kw = max(state.billing_peak_kw, state.prior_cap_kw or config.initial_cap_kw)
    needs = state.scenario_needs_kw
    if soc is not None:
        guess = np.asarray(needs) if len(needs) == outlook.scenarios_kw.shape[0] else None
        needs = optimal_peaks(
            outlook.scenarios_kw,
            battery,
            max(soc, battery.soc_min_pct),
            interval_s=config.interval_s,
            tolerance_kw=0.5,
            guess_kw=guess,
            recharge_limit_kw=config.recharge_kw,
            recharge_ceiling_kw=paid_kw,
        )
        terms["forecast need"] = float(np.quantile(needs, config.need_quantile))
        needs = tuple(needs.tolist())
    elif state.last_plan is not None:
        terms["SoC unavailable, last cap"] = state.last_plan.billing_cap_kw
    reason_key = max(terms, key=terms.get)
    billing_cap = max(terms.values()) + config.cap_margin_kw
    billing_cap = max(billing_cap, config.floor_kw + 1.0)
    cap = billing_cap
    details = [f"{name} {value:.0f} kW" for name, value in terms.items()]

    # Demand response: a fixed baseline per event, the cap below it by the reduction.
    baselines = dict(state.dr_baselines)
    dr_energy_kwh = 0.0
    for event in inputs.events:
        if event.active_at(now):
            if event.event_id not in baselines:
                recent = state.history_net_kw[-4:]
                baselines[event.event_id] = (
                    float(np.mean(recent)) if recent else float(outlook.hour_point_kw[0])
                )
            event_cap = max(baselines[event.event_id] - event.reduce_kw, config.floor_kw + 1.0)
            if event_cap < cap:
                cap = event_cap
                reason_key = f"demand response {event.event_id}"
            remaining_h = (event.end_utc - now) / 3600.0
        else:
            remaining_h = event.duration_s / 3600.0
        dr_energy_kwh += event.reduce_kw * remaining_h / battery.discharge_efficiency
    baselines = {k: v for k, v in baselines.items() if any(e.event_id == k for e in inputs.events)}

    # SoC band: recharge toward what the cap and the events need, surplus first.
    # No recharge later on is counted here, so that the battery refills as soon as it can.
    scenario_kwh = required_energy_kwh(
        outlook.scenarios_kw, billing_cap, battery, 0.0, config.interval_s
    )
    needed_kwh = float(np.quantile(scenario_kwh, config.energy_quantile)) + dr_energy_kwh
    top = battery.soc_max_pct
    band_max = top
    recharge_kwh = max(needed_kwh - outlook.surplus_kwh * battery.charge_efficiency, 0.0)
    band_min = battery.soc_min_pct + 100.0 * recharge_kwh / battery.energy_kwh
    # While the load is at the cap the battery discharges, and the fast loop derates that
    # below the band's lower edge, so the edge drops to the reserve.
    at_cap = inputs.net_load_kw is not None and inputs.net_load_kw >= cap - 1.0
    budget_left = state.discharged_kwh_today < config.daily_cycle_budget * battery.energy_kwh
    mode = _price_mode(config, now)
    if mode == "cheap" and budget_left and soc is not None:
        band_min = top - config.soc_band_top_pct
        reason_key += "; time-of-use charge"
    band_min = min(band_min, top - config.soc_band_top_pct)
    no_room = outlook.hour_point_kw[0] + config.recharge_kw > paid_kw
    if at_cap or no_room:
        band_min = battery.soc_min_pct
    band_min = max(band_min, battery.soc_min_pct)

    # Drain energy the cap does not need into the load: room for surplus, or arbitrage.
    if soc is not None and budget_left and inputs.net_load_kw is not None and mode != "cheap":
        stored_kwh = (soc - battery.soc_min_pct) / 100.0 * battery.energy_kwh
        spare_kwh = stored_kwh - needed_kwh
        if mode != "expensive":
            room_kwh = (battery.soc_max_pct - soc) / 100.0 * battery.energy_kwh
            missing_room_kwh = outlook.surplus_kwh * battery.charge_efficiency - room_kwh
            spare_kwh = min(spare_kwh, missing_room_kwh if config.self_consumption else 0.0)
        if spare_kwh > 0 and inputs.net_load_kw > config.floor_kw:
            drain_kw = min(
                battery.discharge_kw,
                spare_kwh * battery.discharge_efficiency * 3600.0 / config.drain_s,
            )
            drain_cap = max(inputs.net_load_kw - drain_kw, config.floor_kw + 1.0)
            if drain_cap < cap - 1.0:
                cap = drain_cap
                reason_key = "expensive hour" if mode == "expensive" else "self-consumption"
                details.append(f"spare {spare_kwh:.0f} kWh")
    elif not budget_left:
        details.append("daily cycle budget used")

    headroom = _headroom_kw(config, outlook.hour_upper_kw, billing_cap, soc)
    plan = Plan(
        cap_kw=round(cap, 3),
        floor_kw=config.floor_kw,
        ramp_limit_kw_per_s=config.ramp_limit_kw_per_s,
        soc_target_band=(round(band_min, 3), round(band_max, 3)),
        billing_cap_kw=round(billing_cap, 3),
        headroom_kw=round(headroom, 3),
        reason=f"{reason_key} ({', '.join(details)})",
    )
    _log_change(state.last_plan, plan, reason_key)
    return plan, replace(
        state, scenario_needs_kw=needs, dr_baselines=baselines, last_plan=plan
    )


def _log_change(previous: Plan | None, plan: Plan, reason_key: str) -> None:
    """Log a plan when its reason changes or its billing cap moves by more than 2 %.

    The draining cap follows the load minute by minute, so its moves are not logged.
    """
    if previous is not None:
        old_key = previous.reason.split(" (", 1)[0]
        old_cap = previous.billing_cap_kw
        moved = abs(plan.billing_cap_kw - old_cap) > 0.02 * max(abs(old_cap), 1.0)
        if old_key == reason_key and not moved:
            return
    log.info(
        "plan_changed",
        cap_kw=plan.cap_kw,
        billing_cap_kw=plan.billing_cap_kw,
        soc_band_pct=plan.soc_target_band,
        headroom_kw=plan.headroom_kw,
        reason=plan.reason,
    )
