"""Planning replay over days: forecasts, the planner, a coarse fast loop and the plant, no sockets.

The 1 kHz replay in :mod:`hil.sil` cannot cover a week. This replay steps
the plant (:class:`hil.plant.Plant`) at the scenario's ``planner.step_s``
(1 s by default). Once a minute it runs what the daemon's supervisory task
runs: the load forecast with the scheduler's hints, the wind forecast, and
:func:`gateway.plan.planner.plan_step`.

The fast loop is :class:`CoarseLaw`. It applies the numpy law's grid
target, demand, SoC derating and recharge (steps 3 to 7 in
:mod:`gateway.control.law`) once per step, because ``law.step`` is built
for 100 Hz and more. It leaves out the per-unit slew, the deadband and the
interlocks: no fault is injected here, and at a 1 s step the slew limit
never binds.

The site: the job-scheduled cluster of :mod:`hil.cluster` on the scenario's
racks, the facility baseline and the wind farm from :mod:`hil.traces`. The
warm-up before the run only feeds the forecasts and the planner's history;
the battery, the billing period and every score start at run time 0.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass

import numpy as np

from gateway.forecast import ForecastConfig, Forecaster, HintBook, parse_hint
from gateway.plan.battery import BatterySpec
from gateway.plan.events import DemandResponseEvent
from gateway.plan.optimum import interval_means_kw, optimal_peak
from gateway.plan.planner import (
    Plan,
    PlannerConfig,
    PlannerInputs,
    PlannerState,
    plan_step,
    seed_history,
)
from hil import metrics, traces
from hil.cluster import ClusterSpec, NodeShape, cluster_power_kw, generate_jobs, hint_events
from hil.plan_scenario import Planner
from hil.plant import BatteryParams, PcsParams, Plant
from hil.scenario import Scenario

PLAN_PERIOD_S = 60.0
#: Demand-response events are passed to the planner this long before they start.
EVENT_LOOKAHEAD_S = 4 * 3600.0


class ReplayError(ValueError):
    """The scenario cannot be replayed; the message names the table or key to fix."""


@dataclass(frozen=True)
class SiteInputs:
    """Site power from the start of the warm-up, every ``step_s``. Powers in kW."""

    step_s: float
    #: UTC epoch seconds of the first sample, and of run time 0.
    first_utc: float
    run_utc: float
    load_kw: np.ndarray
    wind_kw: np.ndarray
    #: (seconds from the first sample, hint) pairs.
    hints: list[tuple[float, dict]]

    @property
    def warmup_samples(self) -> int:
        return round((self.run_utc - self.first_utc) / self.step_s)


class CoarseLaw:
    """The fast control law's power decisions at a coarse step (see the module docstring).

    Per step, recharge latches on below the band's lower edge and off
    ``recharge_hysteresis_pct`` above it. The grid target is a first-order
    low-pass of the net load plus recharge, clamped to [floor, cap] and
    ramp-limited. The battery is asked for net load minus target, within the
    PCS rating and BMS limits, derated linearly between the soft and hard SoC
    edges.
    """

    def __init__(
        self,
        *,
        rated_kw: float,
        step_s: float,
        smoothing_tau_s: float,
        soc_hard_min_pct: float,
        soc_hard_max_pct: float,
        recharge_kw: float,
        recharge_hysteresis_pct: float = 5.0,
    ) -> None:
        self.rated_kw = rated_kw
        self.step_s = step_s
        self.alpha = 1.0 if smoothing_tau_s <= 0 else 1.0 - math.exp(-step_s / smoothing_tau_s)
        self.soc_hard_min_pct = soc_hard_min_pct
        self.soc_hard_max_pct = soc_hard_max_pct
        self.recharge_kw = recharge_kw
        self.recharge_hysteresis_pct = recharge_hysteresis_pct
        self.filtered_kw: float | None = None
        self.target_kw: float | None = None
        self.recharging = False

    def step(
        self,
        net_kw: float,
        soc_pct: float,
        discharge_limit_kw: float,
        charge_limit_kw: float,
        plan: Plan,
    ) -> float:
        """Return the battery setpoint in kW (positive = discharge) for this step."""
        soft_min, soft_max = plan.soc_target_band
        if soc_pct < soft_min:
            self.recharging = True
        elif soc_pct >= soft_min + self.recharge_hysteresis_pct:
            self.recharging = False
        wanted = net_kw + (self.recharge_kw if self.recharging else 0.0)
        if self.filtered_kw is None:
            self.filtered_kw = wanted
        self.filtered_kw += self.alpha * (wanted - self.filtered_kw)
        clamped = min(max(self.filtered_kw, plan.floor_kw), plan.cap_kw)
        if self.target_kw is None:
            self.target_kw = clamped
        limit = plan.ramp_limit_kw_per_s * self.step_s
        self.target_kw += min(max(clamped - self.target_kw, -limit), limit)
        demand = net_kw - self.target_kw

        discharge = min(self.rated_kw, discharge_limit_kw) * _ramp01(
            soc_pct, self.soc_hard_min_pct, soft_min
        )
        charge = min(self.rated_kw, charge_limit_kw) * _ramp01(
            self.soc_hard_max_pct - soc_pct, 0.0, self.soc_hard_max_pct - soft_max
        )
        return min(max(demand, -charge), discharge)


def _ramp01(x: float, zero_at: float, one_at: float) -> float:
    """Return 0 at ``zero_at``, 1 at ``one_at`` and the straight line between, clamped."""
    if one_at <= zero_at:
        return 1.0 if x >= one_at else 0.0
    return min(max((x - zero_at) / (one_at - zero_at), 0.0), 1.0)


def _utc_seconds(iso: str) -> float:
    return float(np.datetime64(iso.removesuffix("Z"), "s").astype(np.int64))


def _iso(t_utc: float) -> str:
    return dt.datetime.fromtimestamp(t_utc, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cluster_spec(scenario: Scenario) -> ClusterSpec:
    cluster = scenario.cluster
    if cluster is None:
        raise ReplayError(
            f"scenario {scenario.run.name!r} has no [cluster] table; a planning replay needs "
            "a job stream (see hil/scenarios/nordic-week.toml)"
        )
    nodes = scenario.racks.count * cluster.nodes_per_rack
    sizes = tuple(n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max(nodes // 4, 1))
    weights = (0.25, 0.2, 0.2, 0.17, 0.12, 0.06, 0.03)[: len(sizes)]
    return ClusterSpec(
        nodes=nodes,
        node_peak_kw=scenario.racks.peak_kw / cluster.nodes_per_rack,
        arrivals_per_hour=cluster.arrivals_per_hour,
        sizes_nodes=sizes,
        size_weights=weights,
        chunked_fraction=cluster.chunked_fraction,
        reserved_min_nodes=cluster.reserved_min_nodes,
        scheduled_fraction=cluster.scheduled_fraction,
        hint_fraction=cluster.hint_fraction,
    )


def planner_settings(scenario: Scenario) -> Planner:
    return scenario.planner if scenario.planner is not None else Planner()


def build_site(scenario: Scenario, duration_s: float) -> SiteInputs:
    """Render the site's load, wind and the scheduler's hints from the warm-up to the end."""
    settings = planner_settings(scenario)
    step_s = settings.step_s
    run_utc = _utc_seconds(scenario.run.start_utc)
    warmup_s = settings.warmup_days * 86400.0
    first_utc = run_utc - warmup_s
    total_s = warmup_s + duration_s
    count = round(total_s / step_s)
    t_s = np.arange(count) * step_s

    spec = cluster_spec(scenario)
    shape = NodeShape(traces.load_h100_training())
    jobs = generate_jobs(spec, scenario.run.seed, first_utc, total_s, shape.period_s)
    load = cluster_power_kw(spec, jobs, t_s, shape)
    if scenario.facility.mean_kw > 0:
        facility = traces.FacilityBaseline(
            traces.load_commercial_profile(scenario.facility.profile),
            scenario.facility.mean_kw,
            traces.profile_start_s(_iso(first_utc)),
        )
        load = load + facility.power_kw(t_s)
    wind = np.zeros(count)
    if scenario.wind.rated_kw > 0:
        profile = traces.WindProfile(
            traces.load_wind_plant(),
            _iso(first_utc),
            total_s,
            scenario.wind.rated_kw,
            method=scenario.wind.interpolation,
            seed=scenario.run.seed,
        )
        wind = np.asarray(profile.power_kw(t_s), dtype=float)
    return SiteInputs(step_s, first_utc, run_utc, load, wind, hint_events(jobs, first_utc))


def battery_spec(scenario: Scenario) -> BatterySpec:
    """Build the planner's battery: AC-side limits, PCS and cell losses, the usable SoC band."""
    settings = planner_settings(scenario)
    pcs_efficiency = PcsParams(rated_kw=scenario.pcs.rated_kw).efficiency
    rated = scenario.pcs.rated_kw * scenario.pcs.units
    return BatterySpec(
        energy_kwh=scenario.battery.energy_kwh,
        discharge_kw=rated,
        charge_kw=rated,
        charge_efficiency=scenario.battery.charge_efficiency * pcs_efficiency,
        discharge_efficiency=scenario.battery.discharge_efficiency * pcs_efficiency,
        soc_min_pct=settings.reserve_soc_pct,
        soc_max_pct=settings.soc_max_pct,
    )


def planner_config(scenario: Scenario) -> PlannerConfig:
    settings = planner_settings(scenario)
    tariff = scenario.tariff
    return PlannerConfig(
        battery=battery_spec(scenario),
        initial_cap_kw=scenario.control.grid_cap_kw,
        floor_kw=scenario.control.grid_floor_kw,
        ramp_limit_kw_per_s=scenario.control.ramp_limit_kw_per_s,
        interval_s=tariff.demand_interval_min * 60.0,
        history_s=settings.history_days * 86400.0,
        min_history_s=min(86400.0, settings.history_days * 86400.0),
        cap_margin_kw=settings.cap_margin_kw,
        energy_price_per_kwh=tuple(tariff.energy_price_per_kwh),
        daily_cycle_budget=tariff.daily_cycle_budget,
        self_consumption=settings.self_consumption,
        drain_s=settings.drain_min * 60.0,
        recharge_kw=settings.recharge_kw,
    )


def _forecasters(scenario: Scenario, book: HintBook) -> tuple[Forecaster, Forecaster | None]:
    scale = scenario.racks.count * scenario.racks.peak_kw + scenario.facility.mean_kw * 1.5
    load = Forecaster(ForecastConfig(name="load", scale_kw=scale, use_hints=True), book)
    wind = None
    if scenario.wind.rated_kw > 0:
        rated = scenario.wind.rated_kw
        wind = Forecaster(ForecastConfig(name="wind", scale_kw=rated, upper_kw=rated))
    return load, wind


def _events(scenario: Scenario, run_utc: float) -> list[DemandResponseEvent]:
    return [
        DemandResponseEvent(f"dr-{i}", run_utc + e.start_s, run_utc + e.end_s, e.reduce_kw)
        for i, e in enumerate(scenario.demand_response)
    ]


def run_plan_replay(
    scenario: Scenario, duration_s: float | None = None, *, config: PlannerConfig | None = None
) -> dict:
    """Replay ``scenario`` (or its first ``duration_s``) and return the scores.

    The result has the keys the ``bessgw plan replay --json`` output
    documents, and the run's 15-minute series under ``series``. ``config``
    replaces the planner settings that :func:`planner_config` builds from
    the scenario, for experiments with the planner.
    """
    started = time.perf_counter()
    duration_s = scenario.run.duration_s if duration_s is None else duration_s
    settings = planner_settings(scenario)
    step_s = settings.step_s
    site = build_site(scenario, duration_s)
    config = planner_config(scenario) if config is None else config
    book = HintBook()
    load_fc, wind_fc = _forecasters(scenario, book)
    events = _events(scenario, site.run_utc)

    per_minute = round(PLAN_PERIOD_S / step_s)
    warm = site.warmup_samples
    next_hint = 0
    state = PlannerState()

    def feed_hints(until_s: float) -> None:
        nonlocal next_hint
        while next_hint < len(site.hints) and site.hints[next_hint][0] <= until_s:
            book.add(parse_hint(site.hints[next_hint][1]), "api")
            next_hint += 1

    # Warm-up: forecasts and the planner's history, without a battery.
    warm_minutes = warm // per_minute
    load_minutes = site.load_kw[: warm_minutes * per_minute].reshape(-1, per_minute).mean(axis=1)
    wind_minutes = site.wind_kw[: warm_minutes * per_minute].reshape(-1, per_minute).mean(axis=1)
    for minute in range(warm_minutes):
        end_s = (minute + 1) * PLAN_PERIOD_S
        feed_hints(end_s)
        load_fc.record(site.first_utc + end_s, load_minutes[minute])
        if wind_fc is not None:
            wind_fc.record(site.first_utc + end_s, wind_minutes[minute])
        if minute % 1440 == 0:
            book.prune(site.first_utc + end_s)
    net_warm = site.load_kw[:warm] - site.wind_kw[:warm]
    per_interval = round(config.interval_s / step_s)
    whole = warm // per_interval * per_interval
    if whole:
        state = seed_history(
            config,
            state,
            interval_means_kw(net_warm[:whole], step_s, config.interval_s),
            interval_means_kw(site.wind_kw[:whole], step_s, config.interval_s),
            last_index=int((site.first_utc + whole * step_s) // config.interval_s) - 1,
        )

    # The run.
    n = round(duration_s / step_s)
    load = site.load_kw[warm : warm + n]
    wind = site.wind_kw[warm : warm + n]
    battery = scenario.battery
    plant = Plant(
        PcsParams(
            rated_kw=scenario.pcs.rated_kw,
            time_constant_s=scenario.pcs.time_constant_ms / 1000.0,
            dead_time_s=scenario.pcs.dead_time_ms / 1000.0,
            revert_s=max(scenario.pcs.revert_s, 2 * step_s),
        ),
        BatteryParams(
            energy_kwh=battery.energy_kwh,
            soc_initial_pct=battery.soc_initial_pct,
            charge_efficiency=battery.charge_efficiency,
            discharge_efficiency=battery.discharge_efficiency,
            cells_in_series=battery.cells_in_series,
            max_current_a=battery.max_current_a,
        ),
        scenario.pcs.units,
        step_s,
    )
    units = scenario.pcs.units
    law = CoarseLaw(
        rated_kw=scenario.pcs.rated_kw * units,
        step_s=step_s,
        smoothing_tau_s=scenario.control.smoothing_tau_s,
        soc_hard_min_pct=config.battery.soc_min_pct,
        soc_hard_max_pct=min(config.battery.soc_max_pct + 2.0, 100.0),
        recharge_kw=settings.recharge_kw,
    )
    grid = np.empty(n)
    power = np.empty(n)
    soc = np.empty(n)
    minutes = n // per_minute + 1
    cap_series = np.empty(minutes)
    billing_series = np.empty(minutes)
    headroom_series = np.empty(minutes)
    plan = None
    plans = 0
    minute_grid = minute_net = minute_battery = minute_wind = 0.0
    for i in range(n):
        t_s = i * step_s
        if i % per_minute == 0:
            now = site.run_utc + t_s
            feed_hints(warm * step_s + t_s)
            load_forecast = renewable_forecast = None
            if i > 0:
                last = slice(i - per_minute, i)
                load_forecast = load_fc.update(now, float(load[last].mean()))
                if wind_fc is not None:
                    renewable_forecast = wind_fc.update(now, float(wind[last].mean()))
            state_soc = plant.battery.state.soc_pct
            inputs = PlannerInputs(
                now_utc=now,
                period_s=PLAN_PERIOD_S,
                grid_kw=minute_grid / per_minute if i > 0 else None,
                net_load_kw=minute_net / per_minute if i > 0 else float(load[0] - wind[0]),
                battery_kw=minute_battery / per_minute if i > 0 else None,
                soc_pct=state_soc,
                renewable_kw=minute_wind / per_minute if i > 0 else float(wind[0]),
                load_forecast=load_forecast,
                renewable_forecast=renewable_forecast,
                events=tuple(
                    e for e in events if e.end_utc > now and e.start_utc < now + EVENT_LOOKAHEAD_S
                ),
            )
            plan, state = plan_step(config, state, inputs)
            cap_series[plans] = plan.cap_kw
            billing_series[plans] = plan.billing_cap_kw
            headroom_series[plans] = plan.headroom_kw
            plans += 1
            minute_grid = minute_net = minute_battery = minute_wind = 0.0

        net = float(load[i] - wind[i])
        battery_state = plant.battery.state
        limits = plant.battery.bms_limits()
        volts = battery_state.voltage_v / 1000.0
        setpoint = law.step(
            net,
            battery_state.soc_pct,
            limits.discharge_current_a * volts,
            limits.charge_current_a * volts,
            plan,
        )
        plant.pcs.command(t_s, setpoint / units)
        sample = plant.step(float(load[i]), float(wind[i]))
        grid[i] = sample.grid_kw
        power[i] = sample.battery_kw
        soc[i] = plant.battery.state.soc_pct
        minute_grid += sample.grid_kw
        minute_net += net
        minute_battery += sample.battery_kw
        minute_wind += float(wind[i])

    return _score(
        scenario,
        config=config,
        step_s=step_s,
        load=load,
        wind=wind,
        grid=grid,
        power=power,
        soc=soc,
        billing_cap_per_minute=billing_series[:plans],
        cap_per_minute=cap_series[:plans],
        headroom_per_minute=headroom_series[:plans],
        wall_s=time.perf_counter() - started,
    )


def _score(
    scenario: Scenario,
    *,
    config: PlannerConfig,
    step_s: float,
    load: np.ndarray,
    wind: np.ndarray,
    grid: np.ndarray,
    power: np.ndarray,
    soc: np.ndarray,
    billing_cap_per_minute: np.ndarray,
    cap_per_minute: np.ndarray,
    headroom_per_minute: np.ndarray,
    wall_s: float,
) -> dict:
    interval_s = config.interval_s
    net = load - wind
    without = metrics.max_demand_kw(net, step_s, interval_s)
    with_bessgw = metrics.max_demand_kw(grid, step_s, interval_s)
    optimum = optimal_peak(
        net, step_s, config.battery, scenario.battery.soc_initial_pct, interval_s=interval_s
    )
    reduction_possible = without - optimum.peak_kw
    capture = (without - with_bessgw) / reduction_possible if reduction_possible > 0 else 1.0

    grid_means = interval_means_kw(grid, step_s, interval_s)
    per_interval = round(interval_s / PLAN_PERIOD_S)

    def per_interval_values(minutes: np.ndarray) -> np.ndarray:
        values = minutes[: grid_means.size * per_interval]
        values = np.pad(values, (0, grid_means.size * per_interval - values.size), mode="edge")
        return values.reshape(grid_means.size, per_interval)

    interval_caps = per_interval_values(billing_cap_per_minute).max(axis=1)
    breaks = int(np.sum(grid_means > interval_caps + 1.0))
    soc_means = interval_means_kw(soc, step_s, interval_s)
    before = metrics.renewable_self_consumption(wind, net)
    after = metrics.renewable_self_consumption(wind, grid)
    ceiling, ceiling_in_budget = _self_consumption_ceilings(
        scenario, wind=wind, net=net, step_s=step_s
    )
    return {
        "scenario": scenario.run.name,
        "duration_s": float(load.size * step_s),
        "step_s": step_s,
        "capture_ratio": float(capture),
        "peak_kw_without_battery": float(without),
        "peak_kw_with_bessgw": float(with_bessgw),
        "peak_kw_optimum": float(optimum.peak_kw),
        "renewable_self_consumption_before": float(before),
        "renewable_self_consumption_after": float(after),
        "self_consumption_gain": float(after / before) if before > 0 else math.inf,
        "renewable_self_consumption_ceiling": ceiling,
        "renewable_self_consumption_ceiling_in_budget": ceiling_in_budget,
        "equivalent_full_cycles": metrics.equivalent_full_cycles(
            power, step_s, scenario.battery.energy_kwh
        ),
        "cap_breaks": breaks,
        "intervals": int(grid_means.size),
        "ride_through_short_intervals": int(np.sum(soc_means < config.battery.soc_min_pct - 0.5)),
        "soc_min_pct": float(soc.min()),
        "soc_max_pct": float(soc.max()),
        "wall_s": wall_s,
        "series": {
            "interval_s": interval_s,
            "net_kw": interval_means_kw(net, step_s, interval_s).round(2).tolist(),
            "grid_kw": grid_means.round(2).tolist(),
            "billing_cap_kw": interval_caps.round(2).tolist(),
            "lowest_cap_kw": per_interval_values(cap_per_minute).min(axis=1).round(2).tolist(),
            "headroom_kw": per_interval_values(headroom_per_minute).min(axis=1).round(2).tolist(),
            "soc_pct": soc_means.round(2).tolist(),
        },
    }


def _self_consumption_ceilings(
    scenario: Scenario, *, wind: np.ndarray, net: np.ndarray, step_s: float
) -> tuple[float, float]:
    """Return upper bounds on the self-consumption any battery could reach on this trace.

    Without a battery, the renewable energy exported (``net`` < 0, at most the
    renewable output) is lost to the site. A battery can only take energy
    from that export and give it back when the site imports, so it adds at
    most the smaller of the two energies, even lossless and unlimited in
    size. Within the daily cycle budget it also moves at most
    ``daily_cycle_budget`` capacities a day. The first bound ignores the
    budget, the second applies it.
    """
    hours = step_s / 3600.0
    produced_kwh = float(np.clip(wind, 0.0, None).sum() * hours)
    if produced_kwh == 0:
        return 1.0, 1.0
    exported_kwh = float(np.minimum(np.clip(-net, 0.0, None), np.clip(wind, 0.0, None)).sum())
    exported_kwh *= hours
    imported_kwh = float(np.clip(net, 0.0, None).sum() * hours)
    used_kwh = produced_kwh - exported_kwh
    movable_kwh = min(exported_kwh, imported_kwh)
    days = net.size * step_s / 86400.0
    budget_kwh = scenario.tariff.daily_cycle_budget * scenario.battery.energy_kwh * days
    return (
        (used_kwh + movable_kwh) / produced_kwh,
        (used_kwh + min(movable_kwh, budget_kwh)) / produced_kwh,
    )


def optimum_for(scenario: Scenario, duration_s: float | None = None) -> dict:
    """Return the perfect-foresight optimum of the scenario's first ``duration_s``.

    A scenario with a ``[cluster]`` table uses the same site as the replay.
    Any other uses the HIL rig's traces (:func:`hil.site.build_traces`) at a
    1 s step.
    """
    duration_s = scenario.run.duration_s if duration_s is None else duration_s
    config = planner_config(scenario)
    if scenario.cluster is not None:
        site = build_site(scenario, duration_s)
        step_s = site.step_s
        warm = site.warmup_samples
        net = site.load_kw[warm:] - site.wind_kw[warm:]
    else:
        from hil.site import build_traces  # noqa: PLC0415 - only for rig scenarios

        step_s = 1.0
        rig = build_traces(scenario.with_duration(duration_s), step_s)
        net = rig.load_kw - rig.wind_kw
    result = optimal_peak(
        net, step_s, config.battery, scenario.battery.soc_initial_pct, interval_s=config.interval_s
    )
    battery = config.battery
    return {
        "scenario": scenario.run.name,
        "duration_s": float(net.size * step_s),
        "interval_s": config.interval_s,
        "soc_initial_pct": scenario.battery.soc_initial_pct,
        "battery": {
            "energy_kwh": battery.energy_kwh,
            "discharge_kw": battery.discharge_kw,
            "charge_kw": battery.charge_kw,
            "charge_efficiency": battery.charge_efficiency,
            "discharge_efficiency": battery.discharge_efficiency,
            "soc_min_pct": battery.soc_min_pct,
            "soc_max_pct": battery.soc_max_pct,
        },
        "peak_kw_without_battery": result.peak_kw_without_battery,
        "peak_kw_optimum": result.peak_kw,
        "reduction_kw": result.reduction_kw,
    }


def judge(scenario: Scenario, result: dict) -> list[dict]:
    """Check the replay's result against the scenario's planning criteria."""
    criteria = scenario.criteria
    checks = [
        ("min_capture_ratio", criteria.min_capture_ratio, result["capture_ratio"]),
        ("min_self_consumption_gain", criteria.min_self_consumption_gain,
         result["self_consumption_gain"]),
    ]
    return [
        {"name": name, "limit": limit, "value": value, "passed": bool(value >= limit)}
        for name, limit, value in checks
        if limit is not None
    ]
