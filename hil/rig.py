"""Real-time hardware-in-the-loop run: the plant, its simulated devices and the real daemon.

:func:`run_hil` runs one scenario::

    PlantClock (1 ms steps, caught up every 5 ms on time.monotonic())
        |-- meters, PCS read-back, BMS frames  --> Modbus TCP / slcan on 127.0.0.1
        |<- PCS setpoint, enable, heartbeat writes
    daemon: python -m gateway run --config OUT/bessgw.toml   (a child process)
    fault driver: scenario [[faults]] on run time; SIGKILL/SIGTERM to the daemon
    status poller: the daemon's state through its local API, as events

The daemon is reached only through its configuration, the device protocols
and its local API, as on a real site. The run has three phases:

1. warm-up: the plant runs with the traces' first values held while the
   daemon starts, until its API reports ``running``; nothing is captured;
2. the run: ``duration_s`` of the traces, captured every plant step;
3. stop: SIGTERM to the daemon with the plant still running; the daemon
   must ramp the PCS to 0 and exit with code 0.

After a device fault ends, the rig acts as the operator and asks for a
fault reset through the API until the daemon is running again, because
every fault bit of the control law latches. Scoring then uses
:func:`hil.evaluate.write_outputs`, and a run without faults is also
replayed through the SIL (:mod:`hil.sil`) for the comparison of
:mod:`hil.compare`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from gateway.service.api import ApiClient, ApiError
from hil import compare
from hil import plant as plant_model
from hil.devices import PcsWrite, SiteDevices
from hil.evaluate import Capture, compute_metrics, write_outputs
from hil.faults import FaultWindow, ReactionInputs, check_faults, measure_reaction
from hil.gateway_config import SIGTERM_RAMP_S, write_gateway_config
from hil.report import CriterionResult, judge
from hil.scenario import Scenario
from hil.sil import battery_params, pcs_params, run_sil
from hil.site import SiteTraces, build_traces

log = structlog.get_logger(__name__)

#: The plant clock catches up on monotonic time every CHUNK_S.
CHUNK_S = 0.005
#: A catch-up longer than this counts as a late chunk in the report.
LATE_CHUNK_S = 0.020
#: PCS registers other than active power are refreshed every this many chunks (100 ms).
FULL_PUBLISH_CHUNKS = 20
STATUS_PERIOD_S = 0.5
STARTUP_TIMEOUT_S = 60.0
#: How long the rig keeps asking for a fault reset after a fault ends.
RESET_GIVE_UP_S = 30.0
#: The daemon may take the SIGTERM ramp, 5 s to confirm each PCS, and this margin.
STOP_MARGIN_S = 15.0
#: Unix socket paths must fit sockaddr_un (108 bytes on Linux).
MAX_SOCKET_PATH = 100


class HilError(RuntimeError):
    """The rig could not run the scenario (the daemon did not start, a device failed)."""


@dataclass
class Progress:
    """State of a run, passed to a progress callback about twice a second."""

    phase: str
    run_s: float
    duration_s: float
    gateway_state: str | None
    grid_kw: float
    battery_kw: float


@dataclass
class HilResult:
    """The ``report.json`` object of a run, and the captured signals behind it."""

    report: dict[str, Any]
    out_dir: Path
    capture: Capture | None = None
    #: Output of each PCS unit, shape (units, samples), in kW; HIL runs only.
    unit_kw: np.ndarray | None = None

    @property
    def verdict(self) -> str:
        return str(self.report["verdict"])

    @property
    def report_png(self) -> Path:
        return self.out_dir / "report.png"


# --------------------------------------------------------------------------- plant clock


class PlantClock:
    """Steps the plant on absolute monotonic time, publishes the devices, captures the run."""

    def __init__(self, scenario: Scenario, plant: plant_model.Plant, devices: SiteDevices,
                 traces: SiteTraces) -> None:  # fmt: skip
        self.plant = plant
        self.devices = devices
        self.dt_s = plant.dt_s
        self.n = traces.samples
        self.load_kw = traces.load_kw
        self.wind_kw = traces.wind_kw
        self.running = False
        self.finished = asyncio.Event()
        #: Next capture index; -1 during the warm-up.
        self.run_index = -1
        self.run_start_plant_s = 0.0
        self.max_chunk_s = 0.0
        self.late_chunks = 0
        self.chunks = 0
        self._stop = False
        self._hold = (float(self.load_kw[0]), float(self.wind_kw[0]))

        # Meter phases are drawn as the SIL replay draws them, so both runs sample alike.
        update_s = scenario.meters.update_ms / 1000.0
        window_s = scenario.meters.window_ms / 1000.0
        rng = np.random.default_rng(scenario.run.seed)
        phases = rng.uniform(0.0, update_s, traces.racks_kw.shape[0] + 2)
        self.load_meters: list[tuple[Any, np.ndarray, float]] = []
        for rack, device in enumerate(devices.racks):
            series = traces.racks_kw[rack]
            measured = plant_model.meter_batch(series, self.dt_s, window_s, update_s, phases[rack])
            self.load_meters.append((device, measured, float(series[0])))
        for device, series, phase in (
            (devices.facility, traces.facility_kw, phases[-2]),
            (devices.wind, traces.wind_kw, phases[-1]),
        ):
            if device is not None:
                measured = plant_model.meter_batch(series, self.dt_s, window_s, update_s, phase)
                self.load_meters.append((device, measured, float(series[0])))
        self.grid_meter = plant_model.Meter(
            self.dt_s, window_s, update_s, float(rng.uniform(0.0, update_s))
        )

        n, units = self.n, plant.pcs.units
        self.grid_kw = np.zeros(n)
        self.battery_kw = np.zeros(n)
        self.soc_pct = np.zeros(n)
        self.current_a = np.zeros(n)
        self.charge_limit_a = np.zeros(n)
        self.discharge_limit_a = np.zeros(n)
        self.unit_kw = np.zeros((units, n))
        limits = plant.battery.bms_limits()
        self._limits = (limits.charge_current_a, limits.discharge_current_a)
        self._published: dict[str, float] = {}
        for device, _, first in self.load_meters:
            device.publish(first, 0.0)

    @property
    def run_s(self) -> float:
        """Run time of the last captured step; negative during the warm-up."""
        return self.run_index * self.dt_s if self.running else -1.0

    def plant_to_run_s(self, plant_s: float) -> float:
        """Convert a plant time to run time (sample i of the capture is run time i * dt_s)."""
        return plant_s - self.run_start_plant_s - self.dt_s

    def start_run(self) -> None:
        self.run_start_plant_s = self.plant.t_s
        self.run_index = 0
        self.running = True

    def stop(self) -> None:
        self._stop = True

    async def run(self) -> None:
        """Step until :meth:`stop`, catching up on monotonic time in chunks of about CHUNK_S."""
        dt = self.dt_s
        started = time.monotonic()
        done = 0
        while not self._stop:
            due = int((time.monotonic() - started) / dt)
            behind = due - done
            if behind > 0:
                self._advance(behind)
                done = due
                self._publish()
                chunk_s = behind * dt
                self.max_chunk_s = max(self.max_chunk_s, chunk_s)
                if chunk_s > LATE_CHUNK_S:
                    self.late_chunks += 1
                self.chunks += 1
            await asyncio.sleep(CHUNK_S)

    def _advance(self, steps: int) -> None:
        plant = self.plant
        plant_step = plant.step
        grid_step = self.grid_meter.step
        battery = plant.battery.state
        pcs_state = plant.pcs.state
        i, n = self.run_index, self.n
        capturing = self.running and i < n
        load_kw, wind_kw = self.load_kw, self.wind_kw
        grid, batt, soc, current = self.grid_kw, self.battery_kw, self.soc_pct, self.current_a
        charge_a, discharge_a = self._limits
        for _ in range(steps):
            sample = plant_step(load_kw[i], wind_kw[i]) if capturing else plant_step(*self._hold)
            grid_step(sample.grid_kw)
            if capturing:
                grid[i] = sample.grid_kw
                batt[i] = sample.battery_kw
                soc[i] = battery.soc_pct
                current[i] = battery.current_a
                self.charge_limit_a[i] = charge_a
                self.discharge_limit_a[i] = discharge_a
                self.unit_kw[:, i] = pcs_state.p_kw
                i += 1
                if i == n:
                    capturing = False
                    self._hold = (float(load_kw[-1]), float(wind_kw[-1]))
                    self.finished.set()
        if self.running:
            self.run_index = i

    def _publish(self) -> None:
        plant = self.plant
        t_s = plant.t_s
        grid_value = self.grid_meter.value
        if np.isfinite(grid_value):
            self.devices.grid.publish(grid_value, t_s)
        if self.running:
            index = min(self.run_index, self.n) - 1
            if index >= 0:
                for device, measured, _ in self.load_meters:
                    value = float(measured[index])
                    if np.isfinite(value) and self._published.get(device.name) != value:
                        device.publish(value, t_s)
                        self._published[device.name] = value
        full = self.chunks % FULL_PUBLISH_CHUNKS == 0
        for unit in self.devices.pcs:
            unit.check_heartbeat(t_s)
            unit.publish(full)
        sent = False
        for string in self.devices.bms:
            if string.due(t_s):
                sent = string.send(t_s) or sent
        if sent:
            charge = discharge = 0.0
            for string in self.devices.bms:
                if string.sent_limits is not None:
                    charge += string.sent_limits.charge_current_a / string.strings
                    discharge += string.sent_limits.discharge_current_a / string.strings
            self._limits = (charge, discharge)


# --------------------------------------------------------------------------- daemon


class DaemonProcess:
    """The real daemon as a child process: start, signal, and a record of every exit."""

    def __init__(self, config_path: Path, log_path: Path, run_clock: Callable[[], float]) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self._run_clock = run_clock
        self.proc: asyncio.subprocess.Process | None = None
        #: (run time, exit code) of every exit.
        self.exits: list[tuple[float, int]] = []
        #: Exits the rig did not cause.
        self.unexpected_exits = 0
        self.expect_exit = False
        self.starts = 0
        self._watch: asyncio.Task[None] | None = None
        self._log_file: Any = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        env = dict(os.environ)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID"):
            env.pop(key, None)
        if self._log_file is None:
            self._log_file = self.log_path.open("ab")
        self.expect_exit = False
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(self.config_path),
            "--log-format", "json", "--log-level", "info",
            stdin=asyncio.subprocess.DEVNULL, stdout=self._log_file,
            stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
        self.starts += 1
        log.info("gateway started", pid=self.proc.pid, config=str(self.config_path))
        self._watch = asyncio.create_task(self._wait(self.proc), name="daemon exit")

    async def _wait(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        self.exits.append((self._run_clock(), rc))
        if not self.expect_exit:
            self.unexpected_exits += 1
            log.error("gateway exited unexpectedly", pid=proc.pid, exit_code=rc)
        else:
            log.info("gateway exited", pid=proc.pid, exit_code=rc)

    def send(self, signum: int) -> None:
        """Send ``signum`` to the daemon, marking the exit it may cause as expected."""
        if self.alive:
            assert self.proc is not None
            self.expect_exit = True
            self.proc.send_signal(signum)

    async def wait_exit(self, timeout_s: float) -> int | None:
        """Wait for the current process to end; None on timeout."""
        if self.proc is None or self._watch is None:
            return None
        try:
            await asyncio.wait_for(asyncio.shield(self._watch), timeout_s)
        except asyncio.TimeoutError:
            return None
        return self.proc.returncode

    async def close(self) -> None:
        """Kill a daemon still running and close the log."""
        if self.alive:
            self.send(signal.SIGKILL)
            await self.wait_exit(10.0)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no daemon log)"
        return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- the run


@dataclass
class _Timeline:
    """Events for the report picture and the record of what the rig did."""

    events: list[tuple[float, str]] = field(default_factory=list)

    def add(self, t_s: float, label: str) -> None:
        self.events.append((max(t_s, 0.0), label))
        log.info("hil event", run_s=round(t_s, 3), label=label)


class HilRun:
    """One HIL run of ``scenario`` into ``out_dir``; see the module docstring."""

    def __init__(
        self,
        scenario: Scenario,
        out_dir: Path,
        *,
        compare_sil: bool = True,
        progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.out_dir = out_dir
        self.compare_sil = compare_sil
        self.progress = progress
        self.dt_s = scenario.run.dt_ms / 1000.0
        self.timeline = _Timeline()
        self.gateway_state: str | None = None
        self.windows: list[FaultWindow] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._socket_dir: Path | None = None
        self.daemon: DaemonProcess | None = None

    # -- set-up ----------------------------------------------------------------

    def _socket_folder(self) -> Path:
        """Folder for the API socket: the output folder when its path is short enough."""
        if len(str(self.out_dir.resolve() / "api.sock")) <= MAX_SOCKET_PATH:
            return self.out_dir.resolve()
        self._socket_dir = Path(tempfile.mkdtemp(prefix="bessgw-hil-"))
        return self._socket_dir

    async def execute(self) -> HilResult:
        """Run the warm-up, the run and the stop, then score; every server and process ends."""
        started = time.perf_counter()
        traces = self._prepare()
        clock_task = None
        try:
            await self.devices.start()
            clock_task = asyncio.create_task(self.clock.run(), name="plant clock")
            await self._start_gateway()

            self.clock.start_run()
            self.timeline.add(0.0, f"gateway {self.gateway_state}")
            self._tasks = [
                asyncio.create_task(self._poll_status(), name="status"),
                asyncio.create_task(self._drive_faults(), name="faults"),
            ]
            await self._wait_finished()

            stop = await self._stop_daemon()
        finally:
            await self._teardown(clock_task)

        self._report("scoring", self.clock.n * self.dt_s)
        return self._score(traces, stop, time.perf_counter() - started)

    def _prepare(self) -> SiteTraces:
        """Build the traces, the plant, its devices and the clock; check the fault timeline."""
        scenario = self.scenario
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A previous run's store and log would mix into this run's records.
        shutil.rmtree(self.out_dir / "state", ignore_errors=True)
        (self.out_dir / "daemon.log").unlink(missing_ok=True)

        traces = build_traces(scenario, self.dt_s)
        plant = plant_model.Plant(
            pcs_params(scenario), battery_params(scenario), scenario.pcs.units, self.dt_s
        )
        self.devices = SiteDevices(scenario, plant)
        self.windows = check_faults(scenario.faults, self.devices.kinds())
        self.clock = PlantClock(scenario, plant, self.devices, traces)
        return traces

    async def _start_gateway(self) -> None:
        """Write the configuration for the started devices, start the daemon, wait for running."""
        devices = self.devices
        self.files = write_gateway_config(
            self.scenario,
            self.out_dir,
            self._socket_folder(),
            meters=devices.meters(),
            pcs=devices.pcs,
            bms=devices.bms,
        )
        self.api = ApiClient(self.files.api_socket, timeout_s=2.0)
        clock = self.clock
        self.daemon = DaemonProcess(
            self.files.config_path, self.out_dir / "daemon.log", lambda: clock.run_s
        )
        self._report("starting", 0.0)
        await self.daemon.start()
        self.gateway_state = await self._wait_running(STARTUP_TIMEOUT_S)

    async def _teardown(self, clock_task: asyncio.Task[None] | None) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.daemon is not None:
            await self.daemon.close()
        self.clock.stop()
        if clock_task is not None:
            await clock_task
        await self.devices.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _report(self, phase: str, run_s: float) -> None:
        if self.progress is None:
            return
        last = max(min(self.clock.run_index, self.clock.n) - 1, 0)
        self.progress(
            Progress(
                phase,
                run_s,
                self.scenario.run.duration_s,
                self.gateway_state,
                float(self.clock.grid_kw[last]),
                float(self.clock.battery_kw[last]),
            )
        )

    # -- the daemon through its API ----------------------------------------------

    async def _status(self) -> dict[str, Any] | None:
        try:
            return await asyncio.to_thread(self.api.call, "status")
        except (ConnectionError, TimeoutError, ApiError, OSError):
            return None

    async def _wait_running(self, timeout_s: float) -> str:
        """Wait until the daemon's API reports ``running`` or ``degraded``; return the state."""
        daemon = self.daemon
        deadline = time.monotonic() + timeout_s
        state = "unreachable"
        while time.monotonic() < deadline:
            if not daemon.alive:
                raise HilError(
                    f"the daemon exited with code {daemon.proc.returncode} before it was "
                    f"running; its log {daemon.log_path} ends with:\n{daemon.log_tail()}"
                )
            status = await self._status()
            if status is not None:
                state = status["state"]
                if state in ("running", "degraded"):
                    return state
            await asyncio.sleep(0.2)
        raise HilError(
            f"the daemon was not running {timeout_s:g} s after its start (state {state}); "
            f"its log {daemon.log_path} ends with:\n{daemon.log_tail()}"
        )

    async def _poll_status(self) -> None:
        """Record the daemon's state changes as events."""
        while True:
            status = await self._status()
            state = status["state"] if status is not None else "unreachable"
            if state != self.gateway_state and not self.clock.finished.is_set():
                self.gateway_state = state
                codes = sorted({f["code"] for f in (status or {}).get("faults_active") or []})
                causes = f" ({', '.join(codes)})" if codes and state != "running" else ""
                self.timeline.add(self.clock.run_s, f"gateway {state}{causes}")
            await asyncio.sleep(STATUS_PERIOD_S)

    async def _operator_reset(self, label: str) -> None:
        """Ask for a fault reset until the daemon runs again, as an operator would."""
        await asyncio.sleep(1.0)
        deadline = time.monotonic() + RESET_GIVE_UP_S
        requested = False
        while time.monotonic() < deadline:
            status = await self._status()
            # One PCS out leaves the daemon degraded, so only running means every fault is reset.
            if status is not None and status["state"] == "running":
                return
            if status is not None and self.daemon.alive:
                with contextlib.suppress(ConnectionError, TimeoutError, ApiError, OSError):
                    await asyncio.to_thread(self.api.call, "reset_faults", operator="hil-rig")
                    if not requested:
                        self.timeline.add(self.clock.run_s, f"operator reset after {label}")
                        requested = True
            await asyncio.sleep(1.0)
        log.warning("gateway not running after operator resets", fault=label)

    async def _restart_daemon(self) -> None:
        await self.daemon.start()
        self.timeline.add(self.clock.run_s, "gateway restarted")
        try:
            await self._wait_running(STARTUP_TIMEOUT_S)
        except HilError as err:
            # The message carries the daemon's log tail; a traceback adds nothing.
            log.error("gateway restart failed", error=str(err))  # noqa: TRY400

    # -- faults --------------------------------------------------------------------

    async def _drive_faults(self) -> None:
        """Start and end every fault on run time; restart the daemon after an unplanned exit."""
        devices = self.devices.by_name()
        exits_seen = 0
        while True:
            run_s = self.clock.run_s
            for window in self.windows:
                fault = window.fault
                if not window.started and run_s >= window.start_s:
                    window.started = True
                    self.timeline.add(window.start_s, f"{fault.kind} {fault.device}")
                    if window.device_kind == "gateway":
                        self.daemon.send(
                            signal.SIGKILL if fault.kind == "gateway_sigkill" else signal.SIGTERM
                        )
                    else:
                        await devices[fault.device].inject(fault.kind, fault.value)
                end_s = window.end_s
                if window.started and not window.ended and end_s is not None and run_s >= end_s:
                    window.ended = True
                    self.timeline.add(end_s, f"end {fault.kind} {fault.device}")
                    if window.device_kind == "gateway":
                        if not self.daemon.alive:
                            self._tasks.append(asyncio.create_task(self._restart_daemon()))
                    else:
                        await devices[fault.device].clear(fault.kind)
                        self._tasks.append(asyncio.create_task(self._operator_reset(window.label)))
            if self.daemon.unexpected_exits > exits_seen:
                exits_seen = self.daemon.unexpected_exits
                t_s, rc = self.daemon.exits[-1]
                self.timeline.add(t_s, f"gateway exited unexpectedly ({rc})")
                self._tasks.append(asyncio.create_task(self._restart_daemon()))
            await asyncio.sleep(CHUNK_S)

    async def _wait_finished(self) -> None:
        while not self.clock.finished.is_set():
            self._report("running", self.clock.run_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.clock.finished.wait(), 0.5)
        self._report("stopping", self.clock.n * self.dt_s)

    async def _stop_daemon(self) -> dict[str, Any]:
        """SIGTERM the daemon with the plant still running; return what happened."""
        daemon = self.daemon
        if not daemon.alive:
            return {"exit_code": None, "note": "the daemon was not running at the end of the run"}
        sent = time.monotonic()
        daemon.send(signal.SIGTERM)
        rc = await daemon.wait_exit(SIGTERM_RAMP_S + STOP_MARGIN_S)
        output_kw = float(np.sum(self.clock.plant.pcs.state.p_kw))
        if rc is None:
            return {"exit_code": None, "note": "the daemon did not exit after SIGTERM"}
        return {
            "exit_code": rc,
            "stop_s": round(time.monotonic() - sent, 3),
            "output_at_exit_kw": round(output_kw, 3),
        }

    # -- scoring ---------------------------------------------------------------------

    def _score(self, traces: SiteTraces, stop: dict[str, Any], wall_s: float) -> HilResult:
        """Measure the reactions, judge every criterion and write the three report files."""
        scenario, clock = self.scenario, self.clock
        unit_tolerance_kw = max(2.0, 0.01 * scenario.pcs.rated_kw)
        total_tolerance_kw = max(2.0, 0.01 * scenario.pcs.rated_kw * scenario.pcs.units)
        self._measure_reactions(total_tolerance_kw, unit_tolerance_kw)
        capture = self._capture()

        results = self._rig_criteria(stop, total_tolerance_kw)

        extra: dict[str, Any] = {
            "driver": "daemon",
            "gateway_config": str(self.files.config_path),
            "daemon_log": str(self.daemon.log_path),
            "gateway_control_keys_skipped": list(self.files.control_keys_skipped),
            "gateway_starts": self.daemon.starts,
            "final_stop": stop,
            "faults": [_window_record(w) for w in self.windows],
            "reaction_tolerance_kw": {"unit": unit_tolerance_kw, "total": total_tolerance_kw},
            "plant_clock": {
                "dt_ms": self.dt_s * 1000.0,
                "chunks": clock.chunks,
                "max_chunk_ms": round(clock.max_chunk_s * 1000.0, 1),
                "late_chunks": clock.late_chunks,
                "late_chunk_ms": LATE_CHUNK_S * 1000.0,
            },
        }

        if self.compare_sil and not scenario.faults:
            self._report("sil replay", clock.n * self.dt_s)
            rows, sil_info = self._compare_sil(traces, capture)
            extra["hil_vs_sil"] = {**sil_info, "metrics": compare.rows_as_dicts(rows)}
            if scenario.criteria.hil_sil_tolerance is not None:
                results.append(compare.agreement_result(rows))
        elif self.compare_sil:
            extra["hil_vs_sil"] = {"skipped": "the SIL replay does not model faults"}

        report = write_outputs(
            self.out_dir,
            scenario,
            capture,
            "hil",
            extra=extra,
            wall_s=wall_s,
            extra_results=results,
        )
        return HilResult(report, self.out_dir, capture, clock.unit_kw)

    def _measure_reactions(self, total_tolerance_kw: float, unit_tolerance_kw: float) -> None:
        clock = self.clock
        writes = [
            [replace_time(w, clock.plant_to_run_s(w.t_s)) for w in unit.writes]
            for unit in self.devices.pcs
        ]
        unit_of = {unit.name: i for i, unit in enumerate(self.devices.pcs)}
        unit_of.update({string.name: i for i, string in enumerate(self.devices.bms)})
        inputs = ReactionInputs(
            dt_s=self.dt_s,
            total_kw=clock.battery_kw,
            unit_kw=clock.unit_kw,
            total_tolerance_kw=total_tolerance_kw,
            unit_tolerance_kw=unit_tolerance_kw,
            writes=writes,
            unit_of=unit_of,
            daemon_exits=self.daemon.exits,
        )
        for window in self.windows:
            measure_reaction(window, inputs)

    def _capture(self) -> Capture:
        clock = self.clock
        return Capture(
            dt_s=self.dt_s,
            load_kw=clock.load_kw,
            renewable_kw=clock.wind_kw,
            grid_kw=clock.grid_kw,
            battery_kw=clock.battery_kw,
            soc_pct=clock.soc_pct,
            current_a=clock.current_a,
            charge_limit_a=clock.charge_limit_a,
            discharge_limit_a=clock.discharge_limit_a,
            events=sorted(self.timeline.events),
            reactions_ms={w.label: w.reaction_ms for w in self.windows if w.reaction},
        )

    def _rig_criteria(self, stop: dict[str, Any], tolerance_kw: float) -> list[CriterionResult]:
        """Criteria the rig judges: a clean exit on SIGTERM with the PCS at 0, no crashes."""
        rc = stop.get("exit_code")
        return [
            CriterionResult(
                "gateway_exit_code",
                rc == 0,
                None if rc is None else float(rc),
                0.0,
                "==",
                "",
                f"gateway exit code on SIGTERM: {rc}"
                + ("" if rc == 0 else f" ({stop.get('note', 'expected 0')})"),
            ),
            judge_value(
                "pcs_output_at_exit_kw",
                None if rc is None else abs(stop["output_at_exit_kw"]),
                tolerance_kw,
                "kW",
            ),
            judge_value("gateway_unexpected_exits", float(self.daemon.unexpected_exits), 0.0, ""),
        ]

    def _compare_sil(
        self, traces: SiteTraces, capture: Capture
    ) -> tuple[list[compare.Agreement], dict[str, Any]]:
        """Replay the scenario through the SIL with the control the daemon had; compare."""
        scenario = self.scenario
        sil_scenario = scenario
        if "feedforward" in self.files.control_keys_skipped and scenario.control.feedforward:
            # The daemon ran without feed-forward, so the replay must too.
            control = scenario.control.model_copy(update={"feedforward": False})
            sil_scenario = scenario.model_copy(update={"control": control})
        same_step = abs(self.dt_s - 0.001) < 1e-12
        sil = run_sil(sil_scenario, traces=traces if same_step else None)
        rows = compare.compare_runs(
            compute_metrics(scenario, capture),
            compute_metrics(scenario, sil.capture),
            scenario.criteria.hil_sil_tolerance,
        )
        info = {
            "sil_kernel": sil.kernel,
            "sil_wall_s": round(sil.wall_s, 2),
            "sil_feedforward": sil_scenario.control.feedforward,
        }
        return rows, info


def replace_time(write: PcsWrite, t_s: float) -> PcsWrite:
    return replace(write, t_s=t_s)


def judge_value(name: str, value: float | None, limit: float, unit: str) -> CriterionResult:
    return judge(name, value, limit, "<=", unit)


def _window_record(window: FaultWindow) -> dict[str, Any]:
    fault = window.fault
    return {
        "device": fault.device,
        "kind": fault.kind,
        "at_s": fault.at_s,
        "duration_s": fault.duration_s,
        "value": fault.value,
        "started": window.started,
        "reaction": window.reaction,
        "reaction_ms": window.reaction_ms,
        "output_before_kw": window.output_before_kw,
        "notes": window.notes,
    }


def run_hil(
    scenario: Scenario,
    out_dir: Path | str,
    *,
    duration_s: float | None = None,
    compare_sil: bool = True,
    progress: Callable[[Progress], None] | None = None,
) -> HilResult:
    """Run ``scenario`` against the real daemon in real time; write the reports into ``out_dir``.

    ``duration_s`` shortens the scenario (faults after it are dropped).
    ``compare_sil`` also replays a fault-free scenario through the SIL and
    reports the differences. Raises :class:`HilError` when the daemon does not
    start, and ValueError for a fault timeline that does not fit the site.
    """
    if duration_s is not None:
        scenario = scenario.with_duration(duration_s)
    run = HilRun(scenario, Path(out_dir), compare_sil=compare_sil, progress=progress)
    return asyncio.run(run.execute())


def run_sil_report(
    scenario: Scenario, out_dir: Path | str, *, duration_s: float | None = None
) -> HilResult:
    """Replay ``scenario`` through the SIL only (no sockets, no daemon) and write the reports."""
    if duration_s is not None:
        scenario = scenario.with_duration(duration_s)
    sil = run_sil(scenario)
    extra = {"driver": "sil", "kernel": sil.kernel}
    if scenario.faults:
        extra["faults_ignored"] = "the SIL replay does not model faults"
    report = write_outputs(
        Path(out_dir), scenario, sil.capture, "sil", extra=extra, wall_s=sil.wall_s
    )
    return HilResult(report, Path(out_dir), sil.capture)
