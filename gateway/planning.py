"""The daemon's supervisory planner: period means and forecasts in, a :class:`Plan` out.

Once per ``planner.period_s`` (a minute in service) the daemon hands this
module the means of the period's sampled readings, the demand-response
events ahead and the job hints, and gets a plan back:

1. :func:`check_inputs` rejects an implausible mean, such as a power read
   in W instead of kW;
2. the load forecaster (with the job hints) and the renewable forecaster
   record the period's mean and forecast from it;
3. :func:`gateway.plan.planner.plan_step` turns the means, the forecasts and
   the events into a :class:`~gateway.plan.planner.Plan`;
4. :func:`check_plan` and the caller's check reject a plan with a number
   the fast loop must not receive.

Steps 1 to 3 run on the planner's own thread, because a forecast refit
takes tens of milliseconds. A failure at any step leaves the previous plan
in force; the daemon decides what to log and apply.

The planner's billing peak, daily discharge and interval history survive a
restart in :data:`STATE_FILE` in the state directory, written once per
demand interval and at shutdown. The forecasters start again empty.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from drivers.quality import Reading
from gateway.config import SiteConfig
from gateway.forecast import Forecast, ForecastConfig, Forecaster, HintBook, JobHint
from gateway.plan.battery import BatterySpec
from gateway.plan.events import DemandResponseEvent
from gateway.plan.planner import Plan, PlannerConfig, PlannerInputs, PlannerState, plan_step
from gateway.plant_io import SiteReadings

log = structlog.get_logger(__name__)

#: Readings are sampled this often (or ten times per period, when that is shorter).
SAMPLE_PERIOD_S = 1.0
#: A mean needs at least this share of the period's samples to be GOOD, else it is missing.
MIN_GOOD_SHARE = 0.5
#: Demand-response events are passed to the planner this long before they start, so that
#: it can charge the energy they need.
EVENT_LOOKAHEAD_S = 4 * 3600.0
#: The forecasters keep this many steps of history, whatever the period.
FORECAST_HISTORY_STEPS = 8 * 1440
#: A measured power beyond this many times ``site.grid_connection_kw`` is a broken input, such
#: as a meter profile that reads W as kW, and the planner does not plan on it.
PLAUSIBLE_POWER_FACTOR = 10.0

#: File in ``service.state_dir`` with the planner state that survives a restart.
STATE_FILE = "planner_state.json"
_STATE_VERSION = 1
#: Fields of :class:`PlannerState` that are saved. The rest (history optimum, last plan)
#: is recomputed within a period.
_SAVED_FIELDS = (
    "billing_month",
    "billing_peak_kw",
    "day",
    "discharged_kwh_today",
    "interval_index",
    "interval_grid_kw_s",
    "interval_net_kw_s",
    "interval_renewable_kw_s",
    "interval_seconds",
    "history_net_kw",
    "history_renewable_kw",
)
#: Saved fields that stay true across any downtime within the billing month and the day.
_BILLING_FIELDS = ("billing_month", "billing_peak_kw", "day", "discharged_kwh_today")

_SIGNALS = ("grid", "net_load", "battery", "renewable", "soc")


class PlanError(ValueError):
    """The planner could not make a usable plan; the previous plan stays in force."""


class PlannerStateError(ValueError):
    """The saved planner state cannot be used; the message names the file and the reason."""


class PlannerBusyError(TimeoutError):
    """The planner thread is still working on an earlier period."""


@dataclass(frozen=True, slots=True)
class PeriodMeans:
    """Means of one planner period; a signal without enough GOOD samples is None."""

    grid_kw: float | None
    net_load_kw: float | None
    battery_kw: float | None
    renewable_kw: float | None
    soc_pct: float | None
    #: Seconds the means cover (monotonic), from the previous :meth:`MeanAccumulator.take`.
    period_s: float


class MeanAccumulator:
    """Sums of sampled :class:`SiteReadings` over one planner period, GOOD values only."""

    def __init__(self, now_mono_s: float) -> None:
        self._restart(now_mono_s)

    def _restart(self, now_mono_s: float) -> None:
        self._started_mono_s = now_mono_s
        self._sums = dict.fromkeys(_SIGNALS, 0.0)
        self._counts = dict.fromkeys(_SIGNALS, 0)
        self._samples = 0

    def add(self, readings: SiteReadings) -> None:
        self._samples += 1
        for name in _SIGNALS:
            reading: Reading = getattr(readings, name)
            if reading.good and math.isfinite(float(reading.value)):
                self._sums[name] += float(reading.value)
                self._counts[name] += 1

    def take(self, now_mono_s: float) -> PeriodMeans:
        """Return the period's means and start the next period at ``now_mono_s``."""
        needed = max(1, math.ceil(MIN_GOOD_SHARE * self._samples))

        def mean(name: str) -> float | None:
            count = self._counts[name]
            return self._sums[name] / count if self._samples and count >= needed else None

        means = PeriodMeans(
            grid_kw=mean("grid"),
            net_load_kw=mean("net_load"),
            battery_kw=mean("battery"),
            renewable_kw=mean("renewable"),
            soc_pct=mean("soc"),
            period_s=now_mono_s - self._started_mono_s,
        )
        self._restart(now_mono_s)
        return means


def planner_config(site: SiteConfig) -> PlannerConfig:
    """Build the planner's settings from the site configuration's ``[planner]`` table.

    Raises ``ValueError`` (from :class:`PlannerConfig` or :class:`BatterySpec`)
    when the combination is invalid.
    """
    settings, control = site.planner, site.control
    if settings.energy_kwh is None:
        raise ValueError("planner.energy_kwh is missing; set the battery's stored energy in kWh")
    # NOTE: the battery's power is the PCS ratings only. A BMS that limits the current
    # below them (cold or nearly empty cells) makes the plan promise more than the loop can
    # deliver. The loop then keeps the grid import as low as the BMS window allows.
    rated_kw = sum(d.rated_kw or 0.0 for d in site.devices if d.role == "pcs")
    battery = BatterySpec(
        energy_kwh=settings.energy_kwh,
        discharge_kw=rated_kw,
        charge_kw=rated_kw,
        charge_efficiency=settings.charge_efficiency,
        discharge_efficiency=settings.discharge_efficiency,
        soc_min_pct=settings.reserve_soc_pct,
        soc_max_pct=site.planner_soc_max_pct,
    )
    history_s = settings.history_days * 86400.0
    return PlannerConfig(
        battery=battery,
        initial_cap_kw=control.grid_cap_kw,
        floor_kw=control.grid_floor_kw,
        ramp_limit_kw_per_s=control.ramp_limit_kw_per_s,
        interval_s=settings.demand_interval_min * 60.0,
        history_s=history_s,
        min_history_s=min(86400.0, history_s),
        cap_margin_kw=settings.cap_margin_kw,
        energy_price_per_kwh=tuple(settings.energy_price_per_kwh),
        daily_cycle_budget=settings.daily_cycle_budget,
        self_consumption=settings.self_consumption,
        drain_s=settings.drain_min * 60.0,
        recharge_kw=control.recharge_kw,
    )


def forecast_config(name: str, scale_kw: float, period_s: float, **options: Any) -> ForecastConfig:
    """Return the forecast settings of one signal, stepped once per planner period.

    The forecasters always keep :data:`FORECAST_HISTORY_STEPS` steps (eight
    days at one step a minute). A period shorter than a minute therefore
    covers less time, and the first fit comes after 1440 steps, not a day.
    """
    base = ForecastConfig(name=name, scale_kw=scale_kw, **options)
    factor = period_s / base.step_s
    return replace(
        base,
        step_s=period_s,
        history_s=FORECAST_HISTORY_STEPS * period_s,
        min_fit_s=base.min_fit_s * factor,
        refit_every_s=base.refit_every_s * factor,
    )


def save_state(path: Path, config: PlannerConfig, state: PlannerState, now_utc: float) -> None:
    """Write the saved fields of ``state`` to ``path``, atomically by a rename."""
    data: dict[str, Any] = {
        "version": _STATE_VERSION,
        "saved_utc": now_utc,
        "interval_s": config.interval_s,
    }
    data.update({name: getattr(state, name) for name in _SAVED_FIELDS})
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as file:
        json.dump(data, file, separators=(",", ":"))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_state(path: Path, config: PlannerConfig, now_utc: float) -> PlannerState | None:
    """Return the state saved in ``path``; None when there is no file.

    The history is restored only when at most one interval boundary passed
    since the save, because the planner lines the history up with the time
    of day by counting intervals back from now. After a longer downtime
    only the billing peak and the day's discharge are restored, and
    :func:`gateway.plan.planner.plan_step` drops them itself once the month
    or the day has changed. Raises :class:`PlannerStateError` when the file
    is unreadable or was saved with another demand interval.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PlannerStateError(f"{path}: cannot be read: {err}") from err
    if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
        raise PlannerStateError(f"{path}: not a planner state of version {_STATE_VERSION}")
    if data.get("interval_s") != config.interval_s:
        raise PlannerStateError(
            f"{path}: saved with a demand interval of {data.get('interval_s')} s, but the "
            f"configured one is {config.interval_s:g} s"
        )
    index = data.get("interval_index")
    now_index = int((now_utc - 1e-6) // config.interval_s)
    keep = _SAVED_FIELDS
    if not isinstance(index, int) or now_index > index + 1:
        keep = _BILLING_FIELDS
    fields = {name: _saved_value(path, name, data[name]) for name in keep if name in data}
    net, renewable = fields.get("history_net_kw", ()), fields.get("history_renewable_kw", ())
    if len(net) != len(renewable):
        raise PlannerStateError(
            f"{path}: history_net_kw and history_renewable_kw differ in length "
            f"({len(net)} vs {len(renewable)})"
        )
    try:
        return replace(PlannerState(), **fields)
    except TypeError as err:
        raise PlannerStateError(f"{path}: does not match the planner's state: {err}") from err


def _saved_value(path: Path, name: str, value: object) -> Any:
    """Check one saved field's type and return it in the type :class:`PlannerState` uses."""

    def number(x: object) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

    if name in ("day", "interval_index"):
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    elif name == "billing_month":
        ok = value is None or (
            isinstance(value, list) and len(value) == 2 and all(isinstance(x, int) for x in value)
        )
    elif name.startswith("history_"):
        ok = isinstance(value, list) and all(number(x) for x in value)
    else:
        ok = number(value)
    if not ok:
        raise PlannerStateError(f"{path}: {name}={value!r} is not a valid saved value")
    if isinstance(value, list):
        return tuple(float(x) for x in value) if name.startswith("history_") else tuple(value)
    return float(value) if name not in ("day", "interval_index") else value


def check_inputs(inputs: PlannerInputs, limit_kw: float) -> None:
    """Raise :class:`PlanError` if a measured input is implausible.

    Powers must lie within ``limit_kw`` of zero and the SoC within 0-100 %.
    A missing input (None) passes; the planner handles it.
    """
    powers = {
        "grid_kw": inputs.grid_kw,
        "net_load_kw": inputs.net_load_kw,
        "battery_kw": inputs.battery_kw,
        "renewable_kw": inputs.renewable_kw,
    }
    for name, value in powers.items():
        if value is not None and not abs(value) <= limit_kw:
            raise PlanError(
                f"input {name}={value:g} is not within +-{limit_kw:g} kW "
                f"({PLAUSIBLE_POWER_FACTOR:g} x site.grid_connection_kw); check the meter "
                "profile's unit and scale"
            )
    soc = inputs.soc_pct
    if soc is not None and not 0.0 <= soc <= 100.0:
        raise PlanError(f"input soc_pct={soc:g} is not within 0-100 %; check the BMS decoding")


def check_plan(plan: Plan) -> None:
    """Raise :class:`PlanError` unless every number of ``plan`` is finite and in order."""
    numbers = {
        "cap_kw": plan.cap_kw,
        "floor_kw": plan.floor_kw,
        "ramp_limit_kw_per_s": plan.ramp_limit_kw_per_s,
        "soc band low": plan.soc_target_band[0],
        "soc band high": plan.soc_target_band[1],
        "billing_cap_kw": plan.billing_cap_kw,
        "headroom_kw": plan.headroom_kw,
    }
    bad = [f"{name}={value!r}" for name, value in numbers.items() if not math.isfinite(value)]
    if bad:
        raise PlanError(f"the plan has non-finite values: {', '.join(bad)}")
    if not plan.cap_kw > plan.floor_kw:
        raise PlanError(
            f"the plan's cap {plan.cap_kw} kW is not above its floor {plan.floor_kw} kW"
        )
    low, high = plan.soc_target_band
    if not 0.0 <= low < high <= 100.0:
        raise PlanError(f"the plan's SoC band {low}-{high} % is not an interval within 0-100 %")


class SupervisoryPlanner:
    """Forecasters, planner state and the last good plan of one daemon.

    :meth:`sample` and :meth:`run` are called from the event loop. ``run``
    hands the forecast and the planning to ``executor``, and starts no new
    period while the thread is still busy with an earlier one.
    """

    def __init__(
        self,
        site: SiteConfig,
        executor: concurrent.futures.Executor,
        now_mono_s: float,
        state_path: Path | None = None,
        now_utc: float | None = None,
    ) -> None:
        settings = site.planner
        self.period_s = settings.period_s
        self.config = planner_config(site)
        self.state_path = state_path
        self.state = self._restore(now_utc)
        self._saved_index = self.state.interval_index
        self._save_failing = False
        self._executor = executor
        # The planner thread reads this copy of the daemon's hints. run() refreshes it only
        # while the thread is idle, because a HintBook is not thread-safe.
        self._hints = HintBook()
        self._load_scale_kw = settings.load_scale_kw or site.site.grid_connection_kw
        self._limit_kw = PLAUSIBLE_POWER_FACTOR * site.site.grid_connection_kw
        self._renewable_rated_kw = settings.renewable_rated_kw
        self._has_renewables = any(d.role == "renewable_meter" for d in site.devices)
        self.load_forecaster, self.renewable_forecaster = self._new_forecasters()
        self._means = MeanAccumulator(now_mono_s)
        self._busy: asyncio.Future[tuple[Plan, PlannerState]] | None = None
        #: Replacement inputs for the next runs, set through a test hook: field -> (value, runs).
        self.input_overrides: dict[str, tuple[float, int]] = {}

        #: The last plan that passed :func:`check_plan`, and when it was made (UTC).
        self.plan: Plan | None = None
        self.planned_utc: float | None = None
        self.last_means: PeriodMeans | None = None
        #: The error of the last run, None after a good one.
        self.error: str | None = None
        self.failures_in_row = 0

    def _new_forecasters(self) -> tuple[Forecaster, Forecaster | None]:
        load = Forecaster(
            forecast_config("load", self._load_scale_kw, self.period_s, use_hints=True),
            self._hints,
        )
        renewable = None
        if self._has_renewables and self._renewable_rated_kw is not None:
            rated = self._renewable_rated_kw
            renewable = Forecaster(
                forecast_config("renewable", rated, self.period_s, upper_kw=rated)
            )
        return load, renewable

    def _restore(self, now_utc: float | None) -> PlannerState:
        if self.state_path is None or now_utc is None:
            return PlannerState()
        try:
            state = load_state(self.state_path, self.config, now_utc)
        except PlannerStateError as err:
            log.warning("planner_state_not_restored", error=str(err), action="starting afresh")
            return PlannerState()
        if state is None:
            return PlannerState()
        log.info(
            "planner_state_restored",
            path=str(self.state_path),
            billing_peak_kw=round(state.billing_peak_kw, 1),
            history_intervals=len(state.history_net_kw),
        )
        return state

    def save(self, now_utc: float) -> None:
        """Write the planner state to :attr:`state_path` (no-op without one)."""
        if self.state_path is not None:
            save_state(self.state_path, self.config, self.state, now_utc)
            self._saved_index = self.state.interval_index

    def sample(self, readings: SiteReadings) -> None:
        self._means.add(readings)

    def restart_period(self, now_mono_s: float) -> None:
        """Drop the samples so far; the current period starts at ``now_mono_s``."""
        self._means = MeanAccumulator(now_mono_s)

    async def run(
        self,
        now_utc: float,
        now_mono_s: float,
        events: tuple[DemandResponseEvent, ...],
        hints: list[JobHint],
        *,
        timeout_s: float,
        check: Callable[[Plan], object] | None = None,
    ) -> Plan:
        """Close the period, plan on the planner thread, check the plan and keep it.

        ``check`` is the caller's own test of the plan, called after
        :func:`check_plan`; whatever it raises rejects the plan like a
        planner error. Raises :class:`PlannerBusyError` while an earlier run
        is still on the thread, ``TimeoutError`` when this one takes longer
        than ``timeout_s``, and any error of the forecasters or the planner.
        The period's means are consumed in every case.
        """
        means = self._means.take(now_mono_s)
        self.last_means = means
        if self._busy is not None and not self._busy.done():
            raise PlannerBusyError(
                "the planner thread is still busy with an earlier period; "
                "this period's means are dropped"
            )
        self._hints.replace_source(hints, "daemon")
        overrides = self._take_overrides()
        aio = asyncio.get_running_loop()
        self._busy = aio.run_in_executor(
            self._executor, self._step, now_utc, means, events, overrides
        )
        try:
            plan, state = await asyncio.wait_for(asyncio.shield(self._busy), timeout_s)
        except asyncio.TimeoutError as err:
            raise TimeoutError(
                f"the planner took longer than {timeout_s:g} s; the previous plan stays in force"
            ) from err
        check_plan(plan)
        if check is not None:
            check(plan)
        # The state moves on only with a good plan, so a failed period's means are left out
        # of the planner's history and billing peak.
        self.state = state
        self.plan = plan
        self.planned_utc = now_utc
        if state.interval_index != self._saved_index:
            await self._save_on_thread(now_utc)
        return plan

    async def _save_on_thread(self, now_utc: float) -> None:
        """Save the state on the planner thread; a failure is logged and planning goes on."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.save, now_utc)
        except OSError as err:
            if not self._save_failing:
                # The OS error text is the whole diagnosis; no traceback.
                log.error(  # noqa: TRY400
                    "planner_state_not_saved",
                    path=str(self.state_path),
                    error=str(err),
                    effect="a restart would forget this month's billing peak",
                )
            self._save_failing = True
            return
        if self._save_failing:
            log.info("planner_state_saved_again", path=str(self.state_path))
        self._save_failing = False

    def _take_overrides(self) -> dict[str, float]:
        taken = {}
        for name, (value, runs) in list(self.input_overrides.items()):
            taken[name] = value
            if runs <= 1:
                del self.input_overrides[name]
            else:
                self.input_overrides[name] = (value, runs - 1)
        return taken

    def _step(
        self,
        now_utc: float,
        means: PeriodMeans,
        events: tuple[DemandResponseEvent, ...],
        overrides: dict[str, float],
    ) -> tuple[Plan, PlannerState]:
        """Feed the forecasters and make the plan; runs on the planner thread."""
        if overrides:
            means = replace(means, **overrides)
        inputs = PlannerInputs(
            now_utc=now_utc,
            period_s=means.period_s,
            grid_kw=means.grid_kw,
            net_load_kw=means.net_load_kw,
            battery_kw=means.battery_kw,
            soc_pct=means.soc_pct,
            renewable_kw=means.renewable_kw,
            events=events,
        )
        check_inputs(inputs, self._limit_kw)
        load_forecast, renewable_forecast = self._forecast(now_utc, means)
        inputs = replace(inputs, load_forecast=load_forecast, renewable_forecast=renewable_forecast)
        return plan_step(self.config, self.state, inputs)

    def _forecast(self, now_utc: float, means: PeriodMeans) -> tuple[Forecast, Forecast | None]:
        last = self.load_forecaster.last_t_utc_s
        if last is not None and now_utc - last < self.period_s / 2:
            log.warning(
                "planner_clock_stepped_back",
                by_s=round(last + self.period_s - now_utc, 3),
                action="forecast history dropped; the forecasts start again",
            )
            self.load_forecaster, self.renewable_forecaster = self._new_forecasters()
        net, renewable = means.net_load_kw, means.renewable_kw
        if not self._has_renewables:
            load = net
        else:
            load = None if net is None or renewable is None else net + renewable
        load_forecast = self.load_forecaster.update(now_utc, math.nan if load is None else load)
        renewable_forecast = None
        if self.renewable_forecaster is not None:
            value = math.nan if renewable is None else renewable
            renewable_forecast = self.renewable_forecaster.update(now_utc, value)
        return load_forecast, renewable_forecast

    def status(self) -> dict[str, Any]:
        """Return the planner's state for the API, JSON-ready."""
        plan = self.plan
        return {
            "period_s": self.period_s,
            "planned_utc": self.planned_utc,
            "cap_kw": None if plan is None else plan.cap_kw,
            "billing_cap_kw": None if plan is None else plan.billing_cap_kw,
            "headroom_kw": None if plan is None else plan.headroom_kw,
            "soc_band_pct": None if plan is None else list(plan.soc_target_band),
            "reason": None if plan is None else plan.reason,
            "billing_peak_kw": round(self.state.billing_peak_kw, 3),
            "error": self.error,
            "failures_in_row": self.failures_in_row,
            "load_forecast_fitted": self.load_forecaster.fitted,
        }


def events_ahead(
    events: dict[str, Any], now_utc: float, lookahead_s: float = EVENT_LOOKAHEAD_S
) -> tuple[DemandResponseEvent, ...]:
    """Return the events running now or starting within ``lookahead_s``, earliest first.

    ``events`` maps an event id to an object with ``start_utc``, ``end_utc``
    and ``reduce_kw`` (the API's parameters).
    """
    ahead = [
        DemandResponseEvent(event_id, e.start_utc, e.end_utc, e.reduce_kw)
        for event_id, e in events.items()
        if e.end_utc > now_utc and e.start_utc < now_utc + lookahead_s
    ]
    return tuple(sorted(ahead, key=lambda e: e.start_utc))
