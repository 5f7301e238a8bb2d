"""The fast control loop as the daemon uses it: the C thread, or the Python fallback.

:class:`FastLoop` drives the C extension ``gateway.control._fastloop``; its
thread never takes the GIL. :class:`PythonLoop` runs :func:`law.step` on a
Python thread with the same API; it cannot hold 1 kHz timing and may run
only when the configuration sets ``control.allow_python_fallback = true``.
:func:`make_loop` picks one.

A caller's cycle::

    loop = make_loop(config)
    loop.start()
    site, units = loop.new_inputs()
    put_reading(site, "grid", grid_reading)        # and the load, PCS and BMS fields
    loop.write_inputs(site, units)
    records = loop.drain()                          # tick records since the last drain
    setpoints = loop.setpoints()                    # for the PCS writer
    if loop.health().stalled: ...                   # stop feeding the watchdog

Inputs carry their own receive times, so the loop itself turns a reading
stale when the writer stops, without Python's help.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import structlog

from gateway.control import law
from gateway.control.layout import empty_inputs, layout_mismatches, record_dtype

log = structlog.get_logger(__name__)

#: Default ring size in records: about 4 s at 1 kHz between two drains.
DEFAULT_RING_CAPACITY = 4096
#: A loop whose last tick is older than this (and 3 periods) counts as stalled.
DEFAULT_STALL_LIMIT_MS = 5.0


class LoopUnavailableError(RuntimeError):
    """The C extension is missing and the configuration does not allow the Python fallback."""


class LayoutMismatchError(ImportError):
    """The extension's structs differ from the dtypes in ``gateway.control.layout``."""


@dataclass(frozen=True)
class LoopHealth:
    """Counters of a running loop, read at ``now_ns`` (CLOCK_MONOTONIC)."""

    running: bool
    ticks: int
    #: Deadlines skipped because a tick ran past the next one.
    missed: int
    max_late_ns: int
    #: Wake time of the last completed tick.
    last_tick_ns: int
    now_ns: int
    #: Records dropped because the ring was full.
    overflows: int
    #: Ticks that reused the previous input snapshot (C loop only).
    snapshot_reuses: int
    #: Records waiting in the ring.
    pending: int
    stall_limit_ns: int

    @property
    def since_last_tick_ns(self) -> int:
        return self.now_ns - self.last_tick_ns

    @property
    def stalled(self) -> bool:
        """True when the loop runs but has not finished a tick within the stall limit."""
        return self.running and self.since_last_tick_ns > self.stall_limit_ns


@dataclass(frozen=True)
class Setpoints:
    """The published setpoints of one tick, read as one consistent snapshot."""

    #: Per unit, positive = discharge.
    setpoint_kw: np.ndarray
    #: False where the safe action is disable: the PCS writer turns that unit off.
    enabled: np.ndarray
    tick: int


def put_reading(site: np.ndarray, name: str, reading: Any) -> None:
    """Copy a :class:`drivers.quality.Reading` into the ``grid`` or ``load`` fields of ``site``."""
    if name not in ("grid", "load"):
        raise ValueError(f"reading name is {name!r}; expected 'grid' or 'load'")
    site[f"{name}_kw"] = reading.value if reading.good else np.nan
    site[f"{name}_quality"] = int(reading.quality)
    site[f"{name}_t_ns"] = round(reading.t_mono_s * 1e9)


def load_extension() -> ModuleType | None:
    """Import ``gateway.control._fastloop``; return None when it is not built."""
    try:
        return importlib.import_module("gateway.control._fastloop")
    except ImportError:
        return None


class _LoopBase:
    """State and input handling shared by both loops."""

    def __init__(
        self, params: law.LawParams, control: Any, ring_capacity: int, stall_limit_ms: float
    ) -> None:
        self.params = params
        self.n_units = params.n_units
        self.record_dtype = record_dtype(self.n_units)
        self._site, self._units = empty_inputs(self.n_units)
        self._reset_count = 0
        self._ring_capacity = ring_capacity
        period_ns = params.derived.period_ns
        self._period_ns = period_ns
        self._stall_limit_ns = max(round(stall_limit_ms * 1e6), 3 * period_ns)
        self._priority = control.rt_priority if control is not None else 0
        self._cpu = control.cpu if control is not None and control.cpu is not None else -1
        self._lock_memory = bool(control.lock_memory) if control is not None else False
        spin_ns = (control.spin_us if control is not None else 100) * 1000
        if spin_ns >= period_ns:
            raise ValueError(
                f"control.spin_us ({spin_ns // 1000} us) must be below the period "
                f"({period_ns // 1000} us at {params.rate_hz:g} Hz); lower control.spin_us"
            )
        self._spin_ns = spin_ns

    def _check_shape(self, params: law.LawParams) -> None:
        if params.n_units != self.n_units or params.derived.period_ns != self._period_ns:
            raise ValueError(
                f"new parameters have {params.n_units} units at {params.rate_hz:g} Hz; "
                f"this loop runs {self.n_units} units at {self.params.rate_hz:g} Hz; "
                "build a new loop to change them"
            )

    def new_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Return a copy of the last inputs written, ready to change and write back."""
        return self._site.copy(), self._units.copy()

    def _stage(self, site: np.ndarray | None, units: np.ndarray | None) -> None:
        if site is not None:
            self._site = np.array(site, dtype=self._site.dtype).reshape(())
        if units is not None:
            units = np.asarray(units, dtype=self._units.dtype)
            if units.shape != (self.n_units,):
                raise ValueError(f"units has shape {units.shape}; expected ({self.n_units},)")
            self._units = units.copy()
        self._site["reset_count"] = self._reset_count

    def reset_faults(self) -> None:
        """Request the operator reset: latched faults whose cause is gone clear on the next tick."""
        self._reset_count = (self._reset_count + 1) & 0xFFFFFFFF
        log.info("fast_loop_fault_reset_requested", reset_count=self._reset_count)
        self.write_inputs()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FastLoop(_LoopBase):
    """The C loop: a native thread on absolute CLOCK_MONOTONIC deadlines.

    Thread safety: call the methods from one Python thread, or serialise
    them. The loop thread calls no Python API and takes no lock, so it does
    not wait for Python.
    """

    def __init__(
        self,
        config: Any,
        n_units: int | None = None,
        *,
        params: law.LawParams | None = None,
        ring_capacity: int = DEFAULT_RING_CAPACITY,
        stall_limit_ms: float = DEFAULT_STALL_LIMIT_MS,
    ) -> None:
        extension = load_extension()
        if extension is None:
            raise LoopUnavailableError(
                "the C extension gateway.control._fastloop is not built; run "
                "`pip install -e .` with gcc and the Python headers installed"
            )
        problems = layout_mismatches(extension.layout())
        if problems:
            raise LayoutMismatchError(
                "gateway.control._fastloop was built from other sources than "
                "gateway/control/layout.py; "
                "rebuild with `pip install -e .`: " + "; ".join(problems)
            )
        params = params if params is not None else law.LawParams.from_config(config, n_units)
        control = config.control if config is not None else None
        super().__init__(params, control, ring_capacity, stall_limit_ms)
        self._kernel = extension.Kernel(self.n_units, ring_capacity)
        self._monotonic_ns = extension.monotonic_ns
        self._drain_buffer = np.empty(ring_capacity, self.record_dtype)
        self.granted: dict[str, Any] | None = None
        self.set_params(params)
        self.write_inputs()

    def set_params(self, params: law.LawParams) -> None:
        """Publish new parameters; the next tick uses them. The rate and unit count are fixed."""
        self._check_shape(params)
        site, units = params.to_structs()
        self._kernel.set_params(site, units)
        self.params = params

    def write_inputs(self, site: np.ndarray | None = None, units: np.ndarray | None = None) -> int:
        """Publish a new input snapshot; return its generation number.

        ``site`` and ``units`` replace the last ones written; pass None to keep them.
        """
        self._stage(site, units)
        return self._kernel.write_inputs(self._site, self._units)

    def start(self) -> dict[str, Any]:
        """Start the thread; return and log what the OS granted (SCHED_FIFO, CPU, mlockall)."""
        granted = self._kernel.start(
            self._period_ns, self._spin_ns, self._priority, self._cpu, self._lock_memory
        )
        self.granted = granted
        refused = {
            "sched_fifo": self._priority > 0 and not granted["sched_fifo"],
            "cpu_affinity": self._cpu >= 0 and not granted["cpu_affinity"],
            "mlockall": self._lock_memory and not granted["mlockall"],
        }
        log.info(
            "fast_loop_started",
            rate_hz=self.params.rate_hz,
            units=self.n_units,
            sched_fifo=granted["sched_fifo"],
            priority=granted["priority"],
            cpu=granted["cpu"],
            mlockall=granted["mlockall"],
        )
        if any(refused.values()):
            log.warning(
                "fast_loop_realtime_refused",
                refused=[name for name, value in refused.items() if value],
                sched_error=granted["sched_error"] or None,
                affinity_error=granted["affinity_error"] or None,
                mlock_error=granted["mlock_error"] or None,
                hint="run as root or grant CAP_SYS_NICE and CAP_IPC_LOCK; "
                "the loop runs on without them",
            )
        return granted

    def stop(self) -> None:
        """Stop the thread and wait for it; records stay in the ring until drained."""
        was_running = self._kernel.health()["running"]
        self._kernel.stop()
        if was_running:
            health = self.health()
            log.info(
                "fast_loop_stopped",
                ticks=health.ticks,
                missed=health.missed,
                max_late_us=health.max_late_ns / 1000,
                overflows=health.overflows,
            )

    def step(self, now_ns: int) -> np.ndarray:
        """Run exactly one tick without the thread, at ``now_ns``; return its record.

        The deterministic mode of the equivalence tests and the HIL replay.
        """
        return np.frombuffer(self._kernel.step(int(now_ns)), self.record_dtype)[0].copy()

    def reset_state(self) -> None:
        """Forget the law state (filters, latches, setpoints) of a stopped loop."""
        self._kernel.reset_state()

    def drain(self) -> np.ndarray:
        """Return the tick records since the last drain, oldest first (at most the ring size)."""
        count = self._kernel.drain_into(self._drain_buffer)
        return self._drain_buffer[:count].copy()

    def health(self) -> LoopHealth:
        return LoopHealth(**self._kernel.health(), stall_limit_ns=self._stall_limit_ns)

    def setpoints(self) -> Setpoints:
        setpoint_bytes, enabled_bytes, tick = self._kernel.setpoints()
        return Setpoints(
            setpoint_kw=np.frombuffer(setpoint_bytes, np.float64).copy(),
            enabled=np.frombuffer(enabled_bytes, np.uint8).astype(bool),
            tick=tick,
        )

    def stall(self, duration_ms: float) -> None:
        """Test hook: make the next tick busy-wait for ``duration_ms`` before it runs."""
        self._kernel.stall(round(duration_ms * 1e6))

    def monotonic_ns(self) -> int:
        """CLOCK_MONOTONIC in ns, the loop's clock."""
        return self._monotonic_ns()


class PythonLoop(_LoopBase):
    """The fallback: :func:`law.step` on a Python thread, with the API of :class:`FastLoop`.

    Each tick holds the GIL for the whole numpy step, so its timing depends
    on every other Python thread. It logs its wake lateness once a minute.
    """

    #: How often the fallback logs its measured jitter.
    JITTER_LOG_PERIOD_S = 60.0

    def __init__(
        self,
        config: Any,
        n_units: int | None = None,
        *,
        params: law.LawParams | None = None,
        ring_capacity: int = DEFAULT_RING_CAPACITY,
        stall_limit_ms: float = DEFAULT_STALL_LIMIT_MS,
    ) -> None:
        params = params if params is not None else law.LawParams.from_config(config, n_units)
        super().__init__(
            params, config.control if config is not None else None, ring_capacity, stall_limit_ms
        )
        self._lock = threading.Lock()
        self._state = law.LawState.initial(self.n_units)
        self._ring = np.zeros(ring_capacity, self.record_dtype)
        self._head = 0
        self._tail = 0
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._counters = {
            "ticks": 0,
            "missed": 0,
            "max_late_ns": 0,
            "last_tick_ns": 0,
            "overflows": 0,
        }
        self._setpoints = Setpoints(np.zeros(self.n_units), np.ones(self.n_units, bool), 0)
        self.granted: dict[str, Any] | None = None
        self.write_inputs()

    def set_params(self, params: law.LawParams) -> None:
        self._check_shape(params)
        with self._lock:
            self.params = params

    def write_inputs(self, site: np.ndarray | None = None, units: np.ndarray | None = None) -> int:
        with self._lock:
            self._stage(site, units)
            self._generation += 1
            self._site["generation"] = self._generation
            return self._generation

    def start(self) -> dict[str, Any]:
        if self._thread is not None:
            raise RuntimeError("the loop is already running")
        self._stop_event.clear()
        self._counters["last_tick_ns"] = time.monotonic_ns()
        self._granted_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bessgw-python-loop", daemon=True)
        self._thread.start()
        if not self._granted_event.wait(timeout=10.0):
            raise TimeoutError("the Python fallback loop thread did not start within 10 s")
        log.warning(
            "python_fallback_loop_started",
            rate_hz=self.params.rate_hz,
            units=self.n_units,
            sched_fifo=self.granted["sched_fifo"],
            cpu=self.granted["cpu"],
            note="control.allow_python_fallback is set; timing is best effort",
        )
        return self.granted

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop_event.set()
        self._thread.join(timeout=10.0)
        if self._thread.is_alive():
            raise TimeoutError("the Python fallback loop did not stop within 10 s")
        self._thread = None
        log.info(
            "python_fallback_loop_stopped",
            ticks=self._counters["ticks"],
            missed=self._counters["missed"],
        )

    def step(self, now_ns: int) -> np.ndarray:
        """Run exactly one tick at ``now_ns`` on the calling thread; return its record."""
        if self._thread is not None:
            raise RuntimeError("step() needs a stopped loop; call stop() first")
        return self._tick(int(now_ns), 0)

    def reset_state(self) -> None:
        if self._thread is not None:
            raise RuntimeError("reset_state() needs a stopped loop; call stop() first")
        self._state = law.LawState.initial(self.n_units)
        self._counters["ticks"] = 0

    def _tick(self, now_ns: int, late_ns: int) -> np.ndarray:
        with self._lock:
            site, units, params = self._site.copy(), self._units.copy(), self.params
        self._state, result = law.step(params, self._state, site, units, now_ns)
        record = result.to_record(site, units, self._counters["ticks"], now_ns)
        record["wake_late_ns"] = late_ns
        self._setpoints = Setpoints(
            result.setpoint_kw.copy(),
            np.asarray(result.enabled, bool).copy(),
            self._counters["ticks"],
        )
        self._counters["ticks"] += 1
        return record

    def _push(self, record: np.ndarray) -> None:
        with self._lock:
            if self._head - self._tail >= self._ring_capacity:
                self._counters["overflows"] += 1
                return
            self._ring[self._head % self._ring_capacity] = record
            self._head += 1

    def _apply_realtime(self) -> None:
        """Give this thread the scheduling the C loop would get (Linux applies it per thread)."""
        granted: dict[str, Any] = {
            "sched_fifo": False,
            "priority": 0,
            "cpu_affinity": False,
            "cpu": -1,
            "mlockall": False,
        }
        if self._priority > 0:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self._priority))
                granted.update(sched_fifo=True, priority=self._priority)
            except OSError as err:
                granted["sched_error"] = err.strerror
        if self._cpu >= 0:
            try:
                os.sched_setaffinity(0, {self._cpu})
                granted.update(cpu_affinity=True, cpu=self._cpu)
            except OSError as err:
                granted["affinity_error"] = err.strerror
        self.granted = granted
        self._granted_event.set()

    def _run(self) -> None:
        self._apply_realtime()
        period = self._period_ns
        lateness = np.zeros(max(1, round(self.JITTER_LOG_PERIOD_S * 1e9 / period)), np.int64)
        samples = 0
        next_log_ns = time.monotonic_ns() + round(self.JITTER_LOG_PERIOD_S * 1e9)
        deadline = time.monotonic_ns() + period
        while not self._stop_event.is_set():
            remaining_ns = deadline - self._spin_ns - time.monotonic_ns()
            if remaining_ns > 0:
                time.sleep(remaining_ns / 1e9)
            now = time.monotonic_ns()
            while now < deadline:
                now = time.monotonic_ns()
            late = now - deadline
            record = self._tick(now, late)
            done = time.monotonic_ns()
            record["compute_ns"] = done - now
            self._push(record)
            self._counters["max_late_ns"] = max(self._counters["max_late_ns"], late)
            self._counters["last_tick_ns"] = now
            if samples < lateness.size:
                lateness[samples] = late
                samples += 1
            deadline += period
            if done > deadline:
                skipped = (done - deadline) // period + 1
                self._counters["missed"] += skipped
                deadline += skipped * period
            if done >= next_log_ns:
                self._log_jitter(lateness[:samples])
                samples = 0
                next_log_ns = done + round(self.JITTER_LOG_PERIOD_S * 1e9)

    def _log_jitter(self, lateness_ns: np.ndarray) -> None:
        if lateness_ns.size == 0:
            return
        p50, p99, p999 = np.percentile(lateness_ns, [50, 99, 99.9]) / 1000
        log.info(
            "python_fallback_loop_jitter",
            ticks=int(lateness_ns.size),
            late_p50_us=round(float(p50), 1),
            late_p99_us=round(float(p99), 1),
            late_p999_us=round(float(p999), 1),
            late_max_us=round(float(lateness_ns.max()) / 1000, 1),
            missed_total=self._counters["missed"],
        )

    def drain(self) -> np.ndarray:
        with self._lock:
            count = self._head - self._tail
            index = (self._tail + np.arange(count)) % self._ring_capacity
            records = self._ring[index].copy()
            self._tail = self._head
        return records

    def health(self) -> LoopHealth:
        with self._lock:
            pending = self._head - self._tail
        return LoopHealth(
            running=self._thread is not None,
            ticks=self._counters["ticks"],
            missed=self._counters["missed"],
            max_late_ns=self._counters["max_late_ns"],
            last_tick_ns=self._counters["last_tick_ns"],
            now_ns=time.monotonic_ns(),
            overflows=self._counters["overflows"],
            snapshot_reuses=0,
            pending=pending,
            stall_limit_ns=self._stall_limit_ns,
        )

    def setpoints(self) -> Setpoints:
        return self._setpoints

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


def make_loop(config: Any, n_units: int | None = None, **options: Any) -> FastLoop | PythonLoop:
    """Build the loop the daemon runs: the C loop, or the Python fallback if the config allows it.

    Raises :class:`LoopUnavailableError` when the extension is missing and
    ``control.allow_python_fallback`` is false.
    """
    if load_extension() is not None:
        return FastLoop(config, n_units, **options)
    if not config.control.allow_python_fallback:
        raise LoopUnavailableError(
            "the C extension gateway.control._fastloop is not built, so the 1 kHz loop cannot run; "
            "rebuild with `pip install -e .` (needs gcc and the Python headers), or set "
            "control.allow_python_fallback = true in the configuration to run the slower "
            "Python loop"
        )
    log.warning(
        "fast_loop_extension_missing", fallback="python", key="control.allow_python_fallback"
    )
    return PythonLoop(config, n_units, **options)
