"""The C loop on its thread: build, timing grid, ring, seqlock, stall detection, fallback.

No test checks a wall-clock speed: timing is checked in ticks and on the
loop's own deadline grid, and every wait is bounded by a generous timeout.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import structlog
from control_helpers import healthy_inputs, make_params, refresh, site_config

from gateway.control import layout
from gateway.control.layout import Fault, Limit
from gateway.control.loop import (
    FastLoop,
    LoopHealth,
    LoopUnavailableError,
    PythonLoop,
    load_extension,
    make_loop,
)

WAIT_S = 20.0
#: Stale limits long enough that inputs written once stay fresh for a whole test.
LONG_STALE = {"meter_stale_ms": 60_000.0, "pcs_stale_ms": 60_000.0, "bms_stale_ms": 60_000.0}


@pytest.fixture
def loops():
    """Collect loops so that every test stops its threads, pass or fail."""
    started = []
    yield started
    for loop in started:
        loop.stop()


def fast_params(**changes):
    return make_params(**{"rate_hz": 1000.0, **changes})


def wait_for(predicate, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def start(loops, loop):
    loops.append(loop)
    loop.start()
    return loop


def test_fastloop_layout_matches():
    extension = load_extension()
    assert extension is not None, "the C extension is not built; run `pip install -e .`"
    assert layout.layout_mismatches(extension.layout()) == []


def test_fastloop_imports_in_fresh_interpreter(tmp_path):
    # The editable install must put the .so where a new process finds it,
    # from any working directory.
    code = "import gateway.control._fastloop as f; print(f.MAX_UNITS)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(layout.MAX_UNITS)


def test_fastloop_ticks_on_deadline_grid(loops):
    # Deadlines are absolute: consecutive deadlines differ by exactly one
    # period, or by whole periods where a tick overran (counted as missed).
    loop = start(loops, FastLoop(None, params=fast_params()))
    wait_for(lambda: loop.health().ticks >= 300, "300 ticks")
    loop.stop()
    health = loop.health()
    records = loop.drain()
    assert len(records) == health.ticks
    assert records["tick"].tolist() == list(range(health.ticks))
    assert (records["wake_late_ns"] >= 0).all()
    deadlines = records["t_ns"] - records["wake_late_ns"]
    steps = np.diff(deadlines)
    assert (steps % 1_000_000 == 0).all()
    assert (steps >= 1_000_000).all()
    assert int((steps // 1_000_000 - 1).sum()) <= health.missed
    assert health.max_late_ns == records["wake_late_ns"].max()
    assert health.overflows == 0


def test_fastloop_ring_overflow(loops):
    # A 64-record ring without a consumer keeps the 64 oldest records and
    # counts every later one as an overflow, while the loop keeps ticking.
    loop = start(loops, FastLoop(None, params=fast_params(), ring_capacity=64))
    wait_for(lambda: loop.health().ticks >= 200, "200 ticks")
    loop.stop()
    health = loop.health()
    assert health.pending == 64
    assert health.overflows == health.ticks - 64
    records = loop.drain()
    assert records["tick"].tolist() == list(range(64))
    assert len(loop.drain()) == 0
    assert loop.health().pending == 0


def test_fastloop_seqlock_no_torn_reads(loops):
    # A Python thread publishes inputs as fast as it can. Write g carries
    # grid g, load 2g and PCS power 16g + unit index, and gets generation
    # g + 1 (the constructor wrote generation 1). A torn snapshot would mix
    # two writes and break one of these relations.
    n_units = 8
    loop = start(loops, FastLoop(None, params=fast_params(rated_kw=np.full(n_units, 500.0))))
    stop = threading.Event()
    written = []

    def writer():
        site, units = loop.new_inputs()
        g = 0
        while not stop.is_set():
            g += 1
            site["grid_kw"] = g
            site["load_kw"] = 2 * g
            units["pcs_p_kw"] = 16 * g + np.arange(n_units)
            written.append(loop.write_inputs(site, units))

    thread = threading.Thread(target=writer)
    thread.start()
    records = []
    try:
        target_ticks = loop.health().ticks + 2000
        deadline = time.monotonic() + WAIT_S
        while loop.health().ticks < target_ticks:
            assert time.monotonic() < deadline, "timed out waiting for 2000 ticks"
            records.append(loop.drain())
            time.sleep(0.005)
        records.append(loop.drain())
    finally:
        stop.set()
        thread.join(timeout=WAIT_S)
    records = np.concatenate(records)
    used = records[records["generation"] > 1]
    assert len(used) > 1000
    assert (used["load_kw"] == 2 * used["grid_kw"]).all()
    assert (used["generation"] == used["grid_kw"] + 1).all()
    expected_p = 16 * used["grid_kw"][:, None] + np.arange(n_units)
    assert (used["units"]["pcs_p_kw"] == expected_p).all()
    # The writer really raced the loop: many different snapshots were used.
    assert len(np.unique(used["generation"])) > 100
    assert len(written) > 100


def test_fastloop_stale_without_writer(loops):
    # Inputs carry their receive time, so the thread finds a silent writer on
    # its own: the first tick whose age exceeds 50 ms latches LOAD_STALE.
    params = fast_params(meter_stale_ms=50.0, pcs_stale_ms=1000.0, bms_stale_ms=1000.0)
    loop = FastLoop(None, params=params)
    now = loop.monotonic_ns()
    site, units = healthy_inputs(2, now, load_kw=700.0)
    loop.write_inputs(site, units)
    loop.reset_faults()
    start(loops, loop)
    wait_for(lambda: loop.health().ticks >= 150, "150 ticks")
    loop.stop()
    records = loop.drain()
    age = records["t_ns"] - now
    stale = (records["active_fault_bits"] & Fault.LOAD_STALE) != 0
    assert stale.any()
    assert (stale == (age > 50_000_000)).all()
    first = int(np.argmax(stale))
    assert records["units"]["reaction"][first].tolist() == [2, 2]  # ramp_to_zero from that tick


def test_fastloop_stall_detected(loops):
    # stall() makes one tick busy-wait 300 ms. Polling health() every ~2 ms
    # must report the stall while it lasts, once the last tick is older than
    # the 5 ms limit. Afterwards the skipped deadlines are counted as missed.
    loop = start(loops, FastLoop(None, params=fast_params()))
    wait_for(lambda: loop.health().ticks >= 50, "50 ticks")
    assert not loop.health().stalled
    loop.stall(300.0)
    detected = wait_for(lambda: (h := loop.health()).stalled and h, "the stall to be reported")
    assert detected.stall_limit_ns == 5_000_000
    assert detected.since_last_tick_ns > detected.stall_limit_ns
    assert detected.since_last_tick_ns < 300_000_000  # reported during the stall, not after it
    wait_for(lambda: loop.health().ticks > detected.ticks + 10, "ticks after the stall")
    health = loop.health()
    assert not health.stalled
    assert health.missed >= 299


def test_fastloop_stall_rule():
    # The rule health() applies: stalled once the last tick is older than the limit.
    base = {
        "running": True,
        "ticks": 10,
        "missed": 0,
        "max_late_ns": 0,
        "last_tick_ns": 1_000_000_000,
        "overflows": 0,
        "snapshot_reuses": 0,
        "pending": 0,
        "stall_limit_ns": 5_000_000,
    }
    assert not LoopHealth(**base, now_ns=1_005_000_000).stalled
    assert LoopHealth(**base, now_ns=1_005_000_001).stalled
    assert not LoopHealth(**{**base, "running": False}, now_ns=2_000_000_000).stalled


def test_fastloop_setpoints_match_last_record(loops):
    loop = FastLoop(None, params=fast_params(**LONG_STALE))
    site, units = healthy_inputs(2, loop.monotonic_ns(), load_kw=800.0)
    loop.write_inputs(site, units)
    loop.reset_faults()
    start(loops, loop)
    wait_for(lambda: loop.health().ticks >= 50, "50 ticks")
    loop.stop()
    last = loop.drain()[-1]
    setpoints = loop.setpoints()
    assert setpoints.tick == last["tick"]
    assert setpoints.setpoint_kw.tolist() == last["units"]["setpoint_kw"].tolist()
    assert setpoints.enabled.tolist() == [True, True]


def test_fastloop_realtime_report(loops):
    # What the OS grants depends on the machine, so only the report is checked.
    config = site_config(rt_priority=10, cpu=0, lock_memory=False)
    loop = FastLoop(config)
    with structlog.testing.capture_logs() as logs:
        start(loops, loop)
    granted = loop.granted
    assert set(granted) >= {"sched_fifo", "priority", "cpu_affinity", "cpu", "mlockall"}
    assert granted["priority"] == (10 if granted["sched_fifo"] else 0)
    assert granted["mlockall"] is False
    started = [entry for entry in logs if entry["event"] == "fast_loop_started"]
    assert len(started) == 1
    assert started[0]["sched_fifo"] == granted["sched_fifo"]
    wait_for(lambda: loop.health().ticks >= 10, "10 ticks")


def test_fastloop_rejects_bad_use(loops):
    extension = load_extension()
    with pytest.raises(ValueError, match="n_units is 0"):
        extension.Kernel(0)
    with pytest.raises(ValueError, match="ring_capacity is 100"):
        extension.Kernel(2, 100)
    kernel = extension.Kernel(2)
    with pytest.raises(RuntimeError, match="before set_params"):
        kernel.start(1_000_000)
    site_par, unit_par = fast_params().to_structs()
    kernel.set_params(site_par, unit_par)
    with pytest.raises(ValueError, match="cpu is 5000"):
        kernel.start(1_000_000, cpu=5000)
    with pytest.raises(ValueError, match="period_ns is 50"):
        kernel.start(50)
    with pytest.raises(ValueError, match="spin_ns is 2000000"):
        kernel.start(1_000_000, spin_ns=2_000_000)
    with pytest.raises(ValueError, match="stall of -1 ns"):
        kernel.stall(-1)
    with pytest.raises(ValueError, match="site input buffer is 8 bytes"):
        kernel.write_inputs(b"12345678", bytes(2 * layout.UNIT_INPUT_DTYPE.itemsize))

    loop = FastLoop(None, params=fast_params())
    site, _ = loop.new_inputs()
    with pytest.raises(ValueError, match=r"units has shape \(3,\)"):
        loop.write_inputs(site, np.zeros(3, layout.UNIT_INPUT_DTYPE))
    with pytest.raises(ValueError, match="this loop runs 2 units"):
        loop.set_params(fast_params(rated_kw=np.full(3, 500.0)))
    with pytest.raises(ValueError, match="sweep"):
        fast_params(cap_kw=np.array([600.0, 700.0])).to_structs()
    start(loops, loop)
    with pytest.raises(RuntimeError, match="already running"):
        loop.start()
    with pytest.raises(RuntimeError, match="needs a stopped loop"):
        loop.step(0)
    with pytest.raises(ValueError, match=r"control\.spin_us"):
        FastLoop(site_config(rate_hz=2000, spin_us=600))


def test_fastloop_refused_without_extension(monkeypatch):
    # A None entry in sys.modules makes the import fail as if the .so were missing.
    monkeypatch.setitem(sys.modules, "gateway.control._fastloop", None)
    config = site_config()
    with pytest.raises(LoopUnavailableError, match=r"control\.allow_python_fallback = true"):
        make_loop(config)
    with pytest.raises(LoopUnavailableError, match=r"pip install -e \."):
        FastLoop(config)
    allowed = site_config(allow_python_fallback=True)
    assert isinstance(make_loop(allowed), PythonLoop)


def test_make_loop_prefers_extension():
    assert isinstance(make_loop(site_config(allow_python_fallback=True)), FastLoop)


def test_python_loop_same_api(loops):
    # The fallback at 100 Hz: ticks, records, setpoints and the same interlocks.
    loop = PythonLoop(site_config(rate_hz=100, spin_us=0), params=make_params(**LONG_STALE))
    now = time.monotonic_ns()
    site, units = healthy_inputs(2, now, load_kw=800.0)
    loop.write_inputs(site, units)
    loop.reset_faults()
    start(loops, loop)
    wait_for(lambda: loop.health().ticks >= 20, "20 ticks")
    with pytest.raises(RuntimeError, match="needs a stopped loop"):
        loop.step(now)
    loop.stop()
    records = loop.drain()
    assert records.dtype == layout.record_dtype(2)
    assert records["tick"].tolist() == list(range(len(records)))
    assert records[-1]["fault_bits"] == 0
    # cap 600, load 800: 200 kW shared by two 500 kW units
    assert records[-1]["units"]["setpoint_kw"].tolist() == [100.0, 100.0]
    assert loop.setpoints().setpoint_kw.tolist() == [100.0, 100.0]
    refresh(site, units, 0)  # received long ago: stale
    loop.write_inputs(site, units)
    record = loop.step(now + 100_000_000_000)
    assert record["active_fault_bits"] & Fault.LOAD_STALE
    assert not record["limit_bits"] & Limit.SNAPSHOT_REUSED


def test_fastloop_runs_when_realtime_refused(loops):
    # CPU 1000 does not exist, so pinning fails; the loop logs the refusal
    # with the OS error and ticks on without it.
    loop = FastLoop(site_config(cpu=1000))
    with structlog.testing.capture_logs() as logs:
        start(loops, loop)
    assert loop.granted["cpu_affinity"] is False
    assert loop.granted["affinity_error"] != ""
    refused = [entry for entry in logs if entry["event"] == "fast_loop_realtime_refused"]
    assert len(refused) == 1
    assert refused[0]["refused"] == ["cpu_affinity"]
    wait_for(lambda: loop.health().ticks >= 20, "20 ticks without CPU pinning")


def test_python_loop_logs_jitter(loops, monkeypatch):
    # The fallback logs its lateness once per period (a minute in service,
    # 50 ms here), as one event with percentiles.
    monkeypatch.setattr(PythonLoop, "JITTER_LOG_PERIOD_S", 0.05)
    loop = PythonLoop(site_config(rate_hz=100, spin_us=0))
    with structlog.testing.capture_logs() as logs:
        start(loops, loop)
        wait_for(lambda: loop.health().ticks >= 12, "12 ticks")
        loop.stop()
    jitter = [entry for entry in logs if entry["event"] == "python_fallback_loop_jitter"]
    assert jitter
    assert {"late_p50_us", "late_p99_us", "late_max_us", "missed_total"} <= set(jitter[0])
    assert jitter[0]["ticks"] >= 1
