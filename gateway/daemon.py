"""``bessgw run``: the gateway daemon, one asyncio process around the 1 kHz C loop.

Tasks of the process::

    pollers, CAN reader  --readings-->  MeasurementStore
    input cycle (10 ms)  --site/unit inputs-->  fast loop (C thread, 1 kHz)
    fast loop  --setpoints-->  PCS writers (one task per PCS, at its own rate)
    supervision (100 ms) --drain ring--> Telemetry: store, metrics, faults,
                         disturbance records; loop health -> WATCHDOG=1;
                         state machine -> STATUS=, events
    planner (60 s), retention (10 min), local API, metrics listener

Signals: SIGTERM ramps every PCS to 0 kW within ``service.sigterm_ramp_s``,
disables them, flushes the store and returns exit code 0. SIGHUP loads and
validates the configuration file again and applies the control, safety
and store settings, or keeps the running ones and logs why. SIGINT acts
like SIGTERM, for a terminal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from drivers.quality import Quality
from gateway.config import ConfigError, SiteConfig
from gateway.control import law
from gateway.control.layout import Fault
from gateway.control.loop import make_loop
from gateway.control.predictor import PeriodicPredictor, PredictorParams
from gateway.forecast.hints import HintBook, HintFileWatcher
from gateway.measurements import MeasurementStore
from gateway.plan.planner import Plan
from gateway.planning import (
    SAMPLE_PERIOD_S,
    STATE_FILE,
    SupervisoryPlanner,
    events_ahead,
    planner_config,
)
from gateway.plant_io import Command, PlantIO
from gateway.service.api import ApiServer, DemandResponseParams
from gateway.service.metrics import Metrics
from gateway.service.notify import Notifier
from gateway.service.store import Store
from gateway.service.telemetry import Telemetry
from gateway.site_check import load_site_config
from gateway.states import Conditions, Mode, State, StateMachine, Transition

log = structlog.get_logger(__name__)

INPUT_PERIOD_S = 0.010
SUPERVISE_PERIOD_S = 0.100
RETENTION_PERIOD_S = 600.0
#: How long SIGTERM waits for each PCS to confirm 0 kW and disabled after the ramp.
SHUTDOWN_CONFIRM_S = 5.0
MB = 1024 * 1024
#: A loop with no tick for this long counts as stalled: the state goes to
#: fault and the watchdog pings stop. Without SCHED_FIFO the loop thread
#: can miss a few 1 ms deadlines when the machine is busy, and a limit of a
#: few periods would flap the state on every such miss.
LOOP_STALL_LIMIT_MS = 50.0
#: A planner run that takes longer than this share of the period is abandoned for that period.
PLANNER_TIMEOUT_SHARE = 0.8
#: How long shutdown waits for the planner thread to save the planner state.
PLANNER_SAVE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class CapOverride:
    cap_kw: float
    expires_mono_s: float
    expires_utc: float
    operator: str


class Daemon:
    """The running gateway. Build with a validated configuration, then ``await run()``."""

    def __init__(
        self,
        config: SiteConfig,
        config_path: str | Path | None = None,
        *,
        environ: dict[str, str] | None = None,
        plant_factory: Callable[[SiteConfig, MeasurementStore], PlantIO] = PlantIO,
    ) -> None:
        self.config = config
        self.config_path = None if config_path is None else Path(config_path)
        self._environ = dict(os.environ if environ is None else environ)
        self.notifier = Notifier(self._environ)

        # Operator state, changed through the API.
        self.machine = StateMachine()
        self.mode = Mode.AUTO
        self.manual_kw = 0.0
        self.cap_override: CapOverride | None = None
        self.hints = HintBook()
        #: Demand-response events by id; each lowers the cap by ``reduce_kw`` while it runs.
        self.dr_events: dict[str, DemandResponseParams] = {}
        self._dr_active: frozenset[str] = frozenset()

        # Plant, loop and service pieces; none of them does I/O before run().
        self.measurements = MeasurementStore()
        self.plant = plant_factory(config, self.measurements)
        self.pcs_names = self.plant.pcs_names
        self.metrics: Metrics | None = None
        self.metrics_port: int | None = None
        self.store = _store_for(config)
        self.loop = make_loop(config, len(self.pcs_names), stall_limit_ms=LOOP_STALL_LIMIT_MS)
        self.base_params = self.loop.params
        self.telemetry: Telemetry | None = None
        self.api = ApiServer(config.service.api_socket, self._api_handlers())
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bessgw-store")
        self._planner_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="bessgw-planner"
        )
        self.planner: SupervisoryPlanner | None = None
        self._hint_file: HintFileWatcher | None = None
        if config.planner.enabled:
            self.planner = SupervisoryPlanner(
                config,
                self._planner_pool,
                time.monotonic(),
                state_path=Path(config.service.state_dir) / STATE_FILE,
                now_utc=time.time(),
            )
            if config.planner.job_hint_file is not None:
                self._hint_file = HintFileWatcher(config.planner.job_hint_file, self.hints)
        #: The base parameters with the last good plan applied, before the cap override.
        self._planned_params: law.LawParams | None = None
        #: (reason, cap_kw, SoC band) of the last decision logged and stored as an event.
        self._last_decision: tuple[str, float, tuple[float, float]] | None = None

        self._store_failing = False
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._ramp: tuple[float, np.ndarray] | None = None
        self._last_setpoints = np.zeros(len(self.pcs_names))
        self._last_enabled = np.ones(len(self.pcs_names), bool)
        self._ready = False
        self._plant_started = False
        self._errors_counted: dict[str, int] = {}
        self._last_kick_mono_s = 0.0
        self._loop_healthy = False
        self._started_utc = time.time()

    # -- life cycle -------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the process exit code."""
        aio = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            aio.add_signal_handler(signum, self._request_stop, signum)
        aio.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            await self._start()
            await self._serve()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                aio.remove_signal_handler(signum)
            await self._shutdown()
        return 0

    async def _start(self) -> None:
        self.notifier.status("init: opening the store and the devices")
        await self._store_call(self.store.open)
        await self._record_event("daemon_started", f"bessgw started with {self._config_name()}")
        closed = await self._store_call(self.store.close_previous_run_faults)
        if closed:
            log.info("previous_run_faults_closed", fault_ids=closed)
        service = self.config.service
        if service.metrics_port:
            self.metrics = Metrics()
            self.metrics_port = self.metrics.serve(service.metrics_host, service.metrics_port)
            self.metrics.mode.state(self.mode.value)
            self.metrics.state.state(self.machine.state.value)
        self.telemetry = Telemetry(
            store=self.store,
            submit=self._submit,
            metrics=self.metrics,
            unit_names=self.pcs_names,
            record_dtype=self.loop.record_dtype,
            rate_hz=float(self.config.control.rate_hz),
            station=self.config.site.name,
        )
        await self.api.start()
        self._plant_started = True
        await self.plant.start(self._command)
        self._tasks = [
            asyncio.create_task(self._input_cycle(), name="inputs"),
            asyncio.create_task(self._supervise(), name="supervise"),
            asyncio.create_task(self._retention(), name="retention"),
        ]
        if self.planner is not None:
            self._tasks.append(asyncio.create_task(self._plan_cycle(), name="planner"))

    async def _serve(self) -> None:
        """Wait for a stop request, handling reloads; a task that dies ends the daemon."""
        while not self._stop.is_set():
            reload_wait = asyncio.create_task(self._reload.wait())
            stop_wait = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait(
                [reload_wait, stop_wait, *self._tasks], return_when=asyncio.FIRST_COMPLETED
            )
            reload_wait.cancel()
            stop_wait.cancel()
            for task in self._tasks:
                if task in done:
                    error = task.exception() if not task.cancelled() else None
                    raise RuntimeError(f"daemon task {task.get_name()} ended: {error!r}") from error
            if self._reload.is_set():
                self._reload.clear()
                await self.reload()

    def _request_stop(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            log.warning("stop_already_requested", signal=name)
            return
        log.info("stop_requested", signal=name)
        self._stop.set()

    async def _shutdown(self) -> None:
        """Ramp every PCS to 0, disable it, stop everything, flush the store."""
        transition = self.machine.stop("stop requested")
        if transition is not None:
            await self._on_transition(transition)
        self.notifier.stopping(
            f"stopping: ramping PCS to 0 kW within {self.config.service.sigterm_ramp_s:g} s"
        )
        try:
            # Before the plant starts no PCS has been commanded, so there is nothing to ramp.
            if self._plant_started:
                await self._ramp_to_zero()
                confirmed = await self.plant.shutdown_pcs(SHUTDOWN_CONFIRM_S)
                log.info("pcs_shutdown", confirmed=confirmed)
        except Exception:
            log.exception("pcs_shutdown_failed")

        # Stop the fast loop before its inputs: once the input cycle and the links stop, every
        # input goes stale and the loop would latch faults that are only the shutdown itself.
        self.loop.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.api.stop()
        await self.plant.stop()

        records = self.loop.drain()
        if self.telemetry is not None:
            offset = time.time() - time.monotonic()
            self.telemetry.process(records, offset)
            self.telemetry.flush(offset)
        if self.metrics is not None:
            self.metrics.stop()
        if self.store.is_open:
            await self._record_event("daemon_stopped", "bessgw stopped")
            await self._store_call(self.store.close)
        self._db.shutdown(wait=True)
        if self.planner is not None:
            await self._save_planner_state()
        # A planner step still running has nothing left to apply; the thread ends after it.
        self._planner_pool.shutdown(wait=False, cancel_futures=True)
        self.notifier.close()
        log.info("daemon_stopped")

    async def _ramp_to_zero(self) -> None:
        """Lower every commanded setpoint linearly to 0 over ``service.sigterm_ramp_s``."""
        ramp_s = self.config.service.sigterm_ramp_s
        start = self._last_setpoints.copy()
        t0 = time.monotonic()
        if not np.any(start):
            self._ramp = (t0 - ramp_s, start)
            return
        self._ramp = (t0, start)
        log.info("sigterm_ramp", ramp_s=ramp_s, from_kw=[round(float(p), 1) for p in start])
        # The PCS writers read the ramp through _command(); this only waits it out.
        await asyncio.sleep(ramp_s)
        self._ramp = (t0 - ramp_s, start)

    # -- commands to the PCS ---------------------------------------------

    def _command(self, index: int) -> Command:
        """Return the setpoint the PCS writer of unit ``index`` should send now."""
        state = self.machine.state
        if state is State.STOPPING:
            ramp = self._ramp
            if ramp is None:
                p = float(self._last_setpoints[index])
            else:
                t0, start = ramp
                frac = max(0.0, 1.0 - (time.monotonic() - t0) / self.config.service.sigterm_ramp_s)
                p = float(start[index]) * frac
            # The ramp keeps each unit's enable state; shutdown_pcs() disables them after it.
            return Command(p, bool(self._last_enabled[index]))
        setpoints = self.loop.setpoints()
        loop_p = float(setpoints.setpoint_kw[index])
        loop_enabled = bool(setpoints.enabled[index])
        if state in (State.INIT, State.STANDBY) or self.mode is Mode.STANDBY:
            p, enabled = 0.0, loop_enabled
        elif state is State.FAULT or self.mode is Mode.AUTO:
            p, enabled = loop_p, loop_enabled
        else:
            p, enabled = self._manual_command(index, loop_p, loop_enabled)
        self._last_setpoints[index] = p
        self._last_enabled[index] = enabled
        return Command(p, enabled)

    def _manual_command(self, index: int, loop_p: float, loop_enabled: bool) -> tuple[float, bool]:
        """Share ``manual_kw`` by rating, clipped to the unit's BMS window.

        A unit with a fault bit or a safe action in force follows the loop instead.
        """
        record = self.telemetry.last_record if self.telemetry is not None else None
        if record is None:
            return 0.0, loop_enabled
        unit = record["units"][index]
        if int(unit["reaction"]) != 0 or int(unit["fault_bits"]) != 0:
            return loop_p, loop_enabled
        rated = np.asarray(self.loop.params.rated_kw, float)
        share = self.manual_kw * float(rated[index] / rated.sum())
        high = float(unit["discharge_cap_kw"]) if np.isfinite(unit["discharge_cap_kw"]) else 0.0
        low = -float(unit["charge_cap_kw"]) if np.isfinite(unit["charge_cap_kw"]) else 0.0
        return float(np.clip(share, low, high)), loop_enabled

    # -- cycles -----------------------------------------------------------

    async def _input_cycle(self) -> None:
        """Copy the newest readings into the loop's inputs every ``INPUT_PERIOD_S``."""
        site, units = self.loop.new_inputs()
        predictor = self._make_predictor()
        next_t = time.monotonic()
        while True:
            now = time.monotonic()
            self.measurements.check_stale(now)
            self.plant.fill_inputs(site, units, now)
            if predictor is not None:
                load_good = int(site["load_quality"]) == int(Quality.GOOD)
                measured = float(site["load_kw"]) if load_good else math.nan
                site["load_kw"] = predictor.update(measured) if load_good else measured
                if not load_good:
                    predictor.reset()
            self.loop.write_inputs(site, units)
            next_t += INPUT_PERIOD_S
            delay = next_t - time.monotonic()
            if delay < 0:
                next_t = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    def _make_predictor(self) -> PeriodicPredictor | None:
        """Build the load feed-forward of ``control.feedforward``, sampled every input cycle."""
        control = self.config.control
        if not control.feedforward:
            return None
        return PeriodicPredictor(
            PredictorParams(
                sample_period_s=INPUT_PERIOD_S, lead_s=control.feedforward_lead_ms / 1000.0
            )
        )

    async def _wait_for_devices(self) -> None:
        """Stay in ``init`` until every device has responded, updating STATUS= as devices come up.

        The fast loop starts only afterwards, so its first ticks see fresh
        inputs and no interlock latches on the empty inputs of the start.
        """
        waiting: list[str] = []
        # Polled, because responses arrive through several drivers with no common event.
        while not self.measurements.all_answered():
            now_waiting = self.measurements.waiting_for()
            if now_waiting != waiting:
                waiting = now_waiting
                self.notifier.status("init: waiting for " + ", ".join(waiting))
                log.info("waiting_for_devices", devices=waiting)
            await asyncio.sleep(SUPERVISE_PERIOD_S / 2)
        # Two input cycles, so the loop's first snapshot contains every device.
        await asyncio.sleep(2 * INPUT_PERIOD_S)
        # On a thread: locking the memory can take a few hundred ms on a loaded machine. The
        # pollers and the input cycle must go on meanwhile, or the first ticks latch faults.
        await asyncio.to_thread(self.loop.start)

    async def _supervise(self) -> None:
        """Drain the ring, check loop health, feed the watchdog, update the state."""
        assert self.telemetry is not None
        await self._wait_for_devices()
        while True:
            await asyncio.sleep(SUPERVISE_PERIOD_S)
            records = self.loop.drain()
            self.telemetry.process(records, time.time() - time.monotonic())
            health = self.loop.health()
            healthy = health.running and not health.stalled and health.ticks > 0
            self._watch_loop(healthy, health)
            self._expire_cap_override()
            self._update_demand_response()
            transition = self.machine.update(self._conditions(healthy))
            if transition is not None:
                await self._on_transition(transition)
            self._update_metrics(health)

    def _watch_loop(self, healthy: bool, health: Any) -> None:
        if healthy != self._loop_healthy:
            if healthy:
                log.info("fast_loop_healthy", ticks=health.ticks)
            else:
                log.error(
                    "fast_loop_stalled",
                    since_last_tick_ms=health.since_last_tick_ns / 1e6,
                    missed=health.missed,
                    hint="WATCHDOG=1 stops; systemd restarts the service after WatchdogSec",
                )
            self._loop_healthy = healthy
        if not healthy:
            return
        # The watchdog is fed from this health check only: a stalled loop
        # stops the pings even while the event loop itself runs on.
        interval = self.notifier.watchdog_interval_s
        now = time.monotonic()
        if interval is not None and now - self._last_kick_mono_s >= min(interval / 2, 1.0):
            self.notifier.watchdog()
            self._last_kick_mono_s = now
        elif interval is None and self.notifier.enabled:
            self.notifier.watchdog()

    def _conditions(self, loop_healthy: bool) -> Conditions:
        fault_causes: list[str] = []
        degraded: list[str] = []
        record = self.telemetry.last_record if self.telemetry is not None else None
        if record is not None:
            site_bits = int(record["fault_bits"]) & 0xFF
            if site_bits:
                fault_causes.append("site faults " + _bit_names(site_bits))
            unit_bits = record["units"]["fault_bits"]
            faulted = [self.pcs_names[i] for i in range(len(self.pcs_names)) if unit_bits[i]]
            if faulted and len(faulted) == len(self.pcs_names):
                fault_causes.append(
                    "every PCS faulted: "
                    + ", ".join(
                        f"{name} {_bit_names(int(unit_bits[i]))}"
                        for i, name in enumerate(self.pcs_names)
                    )
                )
            elif faulted:
                degraded.append("PCS faulted: " + ", ".join(faulted))
        down = [name for name in self.measurements.devices if not self.measurements.health(name).up]
        if down and self.machine.state is not State.INIT:
            degraded.append("devices down: " + ", ".join(down))
        if self._store_failing:
            degraded.append("store writes failing")
        if self.planner is not None and self.planner.error is not None:
            degraded.append("planner failing, last good plan kept")
        return Conditions(
            mode=self.mode,
            loop_healthy=loop_healthy,
            devices_answered=self.measurements.all_answered(),
            fault_causes=tuple(fault_causes),
            degraded_causes=tuple(degraded),
        )

    async def _on_transition(self, transition: Transition) -> None:
        level = "error" if transition.new is State.FAULT else "info"
        getattr(log, level)(
            "state_changed",
            old=transition.old.value,
            new=transition.new.value,
            cause=transition.cause,
        )
        status = f"{transition.new.value}: {transition.cause}"
        if (
            not self._ready
            and transition.new is not State.INIT
            and transition.new is not State.STOPPING
        ):
            self._ready = True
            self.notifier.ready(status)
        else:
            self.notifier.status(status)
        if self.metrics is not None:
            self.metrics.state.state(transition.new.value)
        if self.store.is_open:
            await self._record_event(
                "state_changed",
                f"{transition.old.value} -> {transition.new.value}: {transition.cause}",
                severity="error" if transition.new is State.FAULT else "info",
                data={
                    "old": transition.old.value,
                    "new": transition.new.value,
                    "cause": transition.cause,
                },
            )

    def _update_metrics(self, health: Any) -> None:
        m = self.metrics
        if m is None:
            return
        m.loop_ticks.set(health.ticks)
        m.loop_missed.set(health.missed)
        m.loop_lateness_max.set(health.max_late_ns / 1e9)
        m.loop_ring_overflows.set(health.overflows)
        m.loop_healthy.set(1 if self._loop_healthy else 0)
        m.cap_kw.set(float(np.asarray(self.loop.params.cap_kw, float)))
        headroom = self.headroom_kw()
        m.headroom_kw.set(float("nan") if headroom is None else headroom)
        if self.telemetry is not None:
            m.faults_active.set(self.telemetry.open_faults)
        now = time.monotonic()
        renewable = self.plant.renewable_power(now)
        m.renewable_kw.set(float(renewable.value) if renewable.good else float("nan"))

        for name in self.measurements.devices:
            device = self.measurements.health(name)
            labels = {"device": name, "role": device.role}
            m.device_up.labels(**labels).set(1 if device.up else 0)
            if device.last_ok_mono_s is not None:
                m.device_age.labels(**labels).set(now - device.last_ok_mono_s)
            # The counter follows the store's error count, which only grows.
            counted = self._errors_counted.get(name, 0)
            if device.errors > counted:
                m.device_errors.labels(**labels).inc(device.errors - counted)
                self._errors_counted[name] = device.errors

    async def _retention(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_PERIOD_S)
            result = await self._store_call(self.store.enforce_retention)
            if result is not None and result.total:
                log.info(
                    "store_retention",
                    **{
                        k: getattr(result, k)
                        for k in ("events", "faults", "aggregates", "disturbances")
                    },
                )

    # -- cap override and configuration -------------------------------------

    def _apply_params(self) -> None:
        """Publish the loop's parameters: the configured ones, the plan, and the cap override.

        With the planner enabled and a good plan made, the plan sets the cap,
        floor, ramp and soft SoC band, and demand-response events are part of
        the plan. Otherwise the configured cap is the base, lowered by the sum
        of ``reduce_kw`` of the demand-response events running now. An
        operator cap override replaces either cap until it expires. The cap
        is kept above the grid floor.
        """
        params = self.base_params if self._planned_params is None else self._planned_params
        planned_cap = float(np.asarray(params.cap_kw, float))
        cap = self.cap_override.cap_kw if self.cap_override is not None else planned_cap
        if self.planner is None:
            reduce_kw = sum(self.dr_events[event_id].reduce_kw for event_id in self._dr_active)
            if reduce_kw:
                cap = min(cap, planned_cap - reduce_kw)
        floor = float(np.asarray(params.floor_kw, float))
        if cap <= floor:
            # NOTE: the law needs cap > floor; a deeper demand-response cut is
            # held at 1 kW above the floor and the rest is not delivered.
            cap = floor + 1.0
        if cap != planned_cap:
            params = params.replace(cap_kw=cap)
        self.loop.set_params(params)

    def _params_with_plan(self, base: law.LawParams, plan: Plan) -> law.LawParams:
        """Return ``base`` with the plan's cap, floor, ramp and soft SoC band.

        Raises ``ValueError`` when the result breaks a rule of the law, for
        example a band outside the configured hard SoC limits.
        """
        soft_min, soft_max = plan.soc_target_band
        return base.replace(
            cap_kw=plan.cap_kw,
            floor_kw=plan.floor_kw,
            ramp_kw_per_s=plan.ramp_limit_kw_per_s,
            soc_soft_min_pct=soft_min,
            soc_soft_max_pct=soft_max,
        )

    def headroom_kw(self) -> float | None:
        """Return the load the site can add for the next hour without breaking the cap.

        None without a plan. The plan's headroom counts against its billing
        cap. While a lower operator cap override is in force, the headroom is
        at most that cap minus the last period's mean net load, which leaves
        the battery out and so errs low.
        """
        planner = self.planner
        if planner is None or planner.plan is None:
            return None
        headroom = planner.plan.headroom_kw
        override = self.cap_override
        means = planner.last_means
        if override is not None and override.cap_kw < planner.plan.billing_cap_kw:
            net = means.net_load_kw if means is not None else None
            room = 0.0 if net is None else max(0.0, override.cap_kw - net)
            headroom = min(headroom, room)
        return headroom

    # -- supervisory planner ------------------------------------------------

    async def _plan_cycle(self) -> None:
        """Sample the site every second and run the planner once per ``planner.period_s``."""
        planner = self.planner
        assert planner is not None
        # Means of a period before every device answered would be plans on missing inputs.
        # Polled, because responses arrive through several drivers with no common event.
        while not self.measurements.all_answered():  # noqa: ASYNC110
            await asyncio.sleep(SUPERVISE_PERIOD_S)
        planner.restart_period(time.monotonic())
        sample_s = min(SAMPLE_PERIOD_S, planner.period_s / 10.0)
        next_sample = time.monotonic()
        next_plan = next_sample + planner.period_s
        while True:
            now = time.monotonic()
            planner.sample(self.plant.site_readings(now))
            if now >= next_plan:
                next_plan += planner.period_s
                if next_plan <= now:
                    next_plan = now + planner.period_s
                await self._run_planner(now)
            next_sample += sample_s
            delay = next_sample - time.monotonic()
            if delay < 0:
                next_sample = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    async def _run_planner(self, now_mono_s: float) -> None:
        """Make one plan and apply it; on any failure keep the parameters in force."""
        planner = self.planner
        assert planner is not None
        now_utc = time.time()
        if self._hint_file is not None:
            self._hint_file.poll()
        self.hints.prune(now_utc)

        def fits_law(plan: Plan) -> law.LawParams:
            return self._params_with_plan(self.base_params, plan)

        try:
            plan = await planner.run(
                now_utc,
                now_mono_s,
                events_ahead(self.dr_events, now_utc),
                self.hints.hints(),
                timeout_s=PLANNER_TIMEOUT_SHARE * planner.period_s,
                check=fits_law,
            )
        except Exception as err:
            await self._planner_failed(err)
            return

        if planner.error is not None:
            log.info("planner_recovered", failures=planner.failures_in_row)
            await self._record_event(
                "planner_recovered",
                f"planner recovered after {planner.failures_in_row} failed period(s)",
            )
        planner.error = None
        planner.failures_in_row = 0
        self._planned_params = fits_law(plan)
        self._apply_params()
        await self._record_decision(plan)

    async def _planner_failed(self, err: Exception) -> None:
        """Log and store a planner failure once per distinct error; the parameters stay."""
        planner = self.planner
        assert planner is not None
        message = f"{type(err).__name__}: {err}"
        planner.failures_in_row += 1
        # One line when the planner starts failing and when the kind of error changes.
        # Repeats of one kind are only counted, because their messages differ in values.
        same_kind = planner.error is not None and planner.error.startswith(type(err).__name__)
        planner.error = message
        if same_kind:
            return
        log.error(
            "planner_failed",
            error=message,
            failures=planner.failures_in_row,
            action="the fast loop keeps its last good parameters",
            exc_info=not isinstance(err, ValueError | TimeoutError),
        )
        await self._record_event(
            "planner_failed",
            f"planner failed, last good parameters kept: {message}",
            severity="error",
        )

    async def _save_planner_state(self) -> None:
        """Save the planner state on its thread, after any step still running there."""
        planner = self.planner
        assert planner is not None
        aio = asyncio.get_running_loop()
        try:
            save = aio.run_in_executor(self._planner_pool, planner.save, time.time())
            await asyncio.wait_for(save, PLANNER_SAVE_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as err:
            # The error text is the whole diagnosis; no traceback.
            log.error(  # noqa: TRY400
                "planner_state_not_saved", path=str(planner.state_path), error=repr(err)
            )

    async def _record_decision(self, plan: Plan) -> None:
        """Log and store the decision when its reason, cap (by 1 %) or SoC band changes."""
        applied_cap = float(np.asarray(self.loop.params.cap_kw, float))
        reason = plan.reason.split(" (", 1)[0]
        band = plan.soc_target_band
        last = self._last_decision
        if last is not None:
            last_reason, last_cap, last_band = last
            cap_moved = abs(applied_cap - last_cap) > max(1.0, 0.01 * abs(last_cap))
            if reason == last_reason and not cap_moved and band == last_band:
                return
        self._last_decision = (reason, applied_cap, band)
        override = self.cap_override
        log.info(
            "planner_decision",
            cap_kw=applied_cap,
            planned_cap_kw=plan.cap_kw,
            billing_cap_kw=plan.billing_cap_kw,
            soc_band_pct=band,
            headroom_kw=plan.headroom_kw,
            reason=plan.reason,
            cap_override_kw=None if override is None else override.cap_kw,
        )
        overridden = "" if override is None else f" (operator override; planned {plan.cap_kw:g})"
        await self._record_event(
            "planner_decision",
            f"cap {applied_cap:g} kW{overridden}, SoC band {band[0]:g}-{band[1]:g} %: "
            f"{plan.reason}",
            data={
                "cap_kw": applied_cap,
                "planned_cap_kw": plan.cap_kw,
                "billing_cap_kw": plan.billing_cap_kw,
                "soc_band_pct": list(band),
                "headroom_kw": plan.headroom_kw,
                "reason": plan.reason,
            },
        )

    def _update_demand_response(self) -> None:
        now = time.time()
        active = frozenset(
            event_id for event_id, e in self.dr_events.items() if e.start_utc <= now < e.end_utc
        )
        if active == self._dr_active:
            return
        for event_id in active - self._dr_active:
            log.info(
                "dr_event_started", event_id=event_id, reduce_kw=self.dr_events[event_id].reduce_kw
            )
        for event_id in self._dr_active - active:
            log.info("dr_event_ended", event_id=event_id)
        self._dr_active = active
        self.dr_events = {k: e for k, e in self.dr_events.items() if e.end_utc > now}
        self._apply_params()

    def _expire_cap_override(self) -> None:
        override = self.cap_override
        if override is not None and time.monotonic() >= override.expires_mono_s:
            self.cap_override = None
            self._apply_params()
            log.info("cap_override_expired", cap_kw=override.cap_kw, operator=override.operator)
            self._submit(
                self.store.add_event,
                "cap_override_expired",
                f"cap override {override.cap_kw:g} kW by {override.operator} expired",
            )

    async def reload(self) -> bool:
        """Load the configuration file again and apply it; keep the running one on any problem."""
        self.notifier.reloading()
        try:
            ok, why = await self._try_reload()
        finally:
            self.notifier.ready(f"{self.machine.state.value}: configuration reload done")
        if ok:
            log.info("config_reloaded", path=str(self.config_path), changed=why)
            await self._record_event("config_reloaded", f"configuration reloaded: {why}")
        else:
            log.error("config_reload_rejected", path=str(self.config_path), reason=why)
            await self._record_event("config_reload_rejected", why, severity="error")
        return ok

    async def _try_reload(self) -> tuple[bool, str]:
        if self.config_path is None:
            return False, "the daemon was started without a configuration file"
        try:
            new = await asyncio.to_thread(load_site_config, self.config_path)
        except ConfigError as err:
            return False, "kept the running configuration: " + "; ".join(err.problems)

        if new.devices != self.config.devices:
            return False, (
                "kept the running configuration: the device list changed, which needs a "
                "restart (systemctl restart bessgw)"
            )
        if (
            new.service.api_socket != self.config.service.api_socket
            or (new.service.metrics_host, new.service.metrics_port)
            != (self.config.service.metrics_host, self.config.service.metrics_port)
            or (new.service.state_dir != self.config.service.state_dir)
            or new.control.rate_hz != self.config.control.rate_hz
        ):
            return False, (
                "kept the running configuration: state_dir, api_socket, metrics_host/port and "
                "control.rate_hz take effect only at a restart"
            )

        restart_keys = (
            "enabled",
            "period_s",
            "load_scale_kw",
            "renewable_rated_kw",
            "job_hint_file",
        )
        changed_keys = [
            key
            for key in restart_keys
            if getattr(new.planner, key) != getattr(self.config.planner, key)
        ]
        if changed_keys:
            return False, (
                f"kept the running configuration: planner.{', planner.'.join(changed_keys)} "
                "take effect only at a restart"
            )

        try:
            params = law.LawParams.from_config(new, len(self.pcs_names))
            planned = self._planned_params
            if self.planner is not None:
                planner_settings = planner_config(new)
                if self.planner.plan is not None:
                    planned = self._params_with_plan(params, self.planner.plan)
        except ValueError as err:
            return False, f"kept the running configuration: {err}"
        changed = [
            section
            for section in ("site", "control", "safety", "service", "planner")
            if getattr(new, section) != getattr(self.config, section)
        ]

        self.config = new
        self.base_params = params
        if self.planner is not None:
            self.planner.config = planner_settings
            self._planned_params = planned
        self._apply_params()
        self.store.max_bytes = round(new.service.store_max_mb * MB)
        self.store.max_age_s = new.service.store_max_age_days * 86400.0
        return True, ", ".join(changed) or "nothing changed"

    # -- store access -------------------------------------------------------

    async def _store_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store method on the store's thread and wait for it (acknowledged after commit)."""
        aio = asyncio.get_running_loop()
        return await aio.run_in_executor(self._db, lambda: fn(*args, **kwargs))

    def _submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue a store write without waiting; a failure is logged once and degrades the state."""
        future = self._db.submit(fn, *args, **kwargs)
        future.add_done_callback(self._write_done)

    def _write_done(self, future: concurrent.futures.Future[Any]) -> None:
        error = future.exception()
        if error is None:
            if self._store_failing:
                self._store_failing = False
                log.info("store_writes_recovered", path=str(self.store.path))
            return
        if not self._store_failing:
            self._store_failing = True
            log.error("store_write_failed", path=str(self.store.path), error=repr(error))

    async def _record_event(self, kind: str, message: str, **fields: Any) -> int | None:
        """Add an event and wait for its commit; None when the store failed (logged once)."""
        try:
            return await self._store_call(self.store.add_event, kind, message, **fields)
        except Exception as err:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_exception(err)
            self._write_done(future)
            return None

    def _config_name(self) -> str:
        return (
            str(self.config_path) if self.config_path is not None else "an in-memory configuration"
        )

    def _api_handlers(self) -> dict[str, Any]:
        from gateway.daemon_api import TEST_HOOKS_ENV, handlers  # noqa: PLC0415 - imports Daemon

        return handlers(self, test_hooks=self._environ.get(TEST_HOOKS_ENV) == "1")


def _store_for(config: SiteConfig) -> Store:
    service = config.service
    return Store(
        service.state_dir,
        max_bytes=round(service.store_max_mb * MB),
        max_age_s=service.store_max_age_days * 86400.0,
    )


def _bit_names(bits: int) -> str:
    names = []
    for i in range(32):
        if bits & (1 << i):
            try:
                names.append(Fault(1 << i).name)
            except ValueError:
                names.append(f"BIT{i}")
    return "|".join(names)
