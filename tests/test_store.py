"""Embedded store: durability under SIGKILL, faults, aggregates, retention, disturbance records."""

from __future__ import annotations

import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import comtrade
import numpy as np
import pytest

from gateway.service.comtrade import AnalogChannel, DigitalChannel, write_comtrade
from gateway.service.recording import DisturbanceRecorder, SecondAggregator
from gateway.service.store import Aggregate, Store, StoreError

WRITER = textwrap.dedent(
    """
    import sys
    from gateway.service.store import Aggregate, Store

    store = Store(sys.argv[1]).open()
    i = 0
    while True:
        i += 1
        event_id = store.add_event("test", f"event {i}", data={"i": i, "pad": "x" * 500})
        print(event_id, i, flush=True)
        rows = [Aggregate(i * 10 + k, "grid_kw", 1000, 1.0, 0.0, 2.0) for k in range(10)]
        store.add_aggregates(rows)
    """
)


def test_store_sigkill_keeps_acked_events(tmp_path):
    """A writer killed with SIGKILL mid-write leaves a sound database with every acked event."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: dict[int, int] = {}
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while len(acked) < 300 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            event_id, i = map(int, line.split())
            acked[event_id] = i
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) == 300

    with Store(tmp_path) as store:
        assert store.integrity_check() == "ok"
        rows = {e["id"]: e for e in store.events(limit=100_000)}
    for event_id, i in acked.items():
        assert event_id in rows
        assert rows[event_id]["message"] == f"event {i}"
        assert rows[event_id]["data"]["i"] == i


def test_store_wal_mode(tmp_path):
    with Store(tmp_path) as store:
        mode = store.db.execute("PRAGMA journal_mode").fetchone()[0]
        sync = store.db.execute("PRAGMA synchronous").fetchone()[0]
    assert mode == "wal"
    assert sync == 2  # FULL


def test_store_rejects_garbage_file(tmp_path):
    (tmp_path / "bessgw.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        Store(tmp_path).open()


def test_store_rejects_newer_schema(tmp_path):
    with Store(tmp_path) as store:
        store.db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path).open()


def test_store_unwritable_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open the store"):
        Store(blocker / "state").open()


def test_store_closed_use_raises(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="not open"):
        store.add_event("x", "y")


def test_store_bad_severity(tmp_path):
    with Store(tmp_path) as store, pytest.raises(ValueError, match="severity"):
        store.add_event("x", "y", severity="loud")


def test_fault_lifecycle(tmp_path):
    """A latched fault stays active after its cause clears, until an operator resets it."""
    with Store(tmp_path) as store:
        fault_id = store.raise_fault("meter_stale", "grid meter stale", source="grid", t_utc=100.0)
        assert [f.id for f in store.faults(active_only=True)] == [fault_id]

        assert store.clear_fault(fault_id, t_utc=101.0) is True
        assert store.clear_fault(fault_id, t_utc=102.0) is False
        assert [f.id for f in store.faults(active_only=True)] == [fault_id]

        assert store.reset_fault(fault_id, "alice", t_utc=103.0) is True
        assert store.reset_fault(fault_id, "alice", t_utc=104.0) is False
        assert store.faults(active_only=True) == []

        fault = store.faults()[0]
        assert fault.cleared_utc == 101.0
        assert fault.reset_utc == 103.0
        assert fault.reset_by == "alice"
        kinds = [e["kind"] for e in store.events()]
    assert kinds == ["fault_raised", "fault_cleared", "fault_reset"]


def test_fault_unlatched_clears(tmp_path):
    with Store(tmp_path) as store:
        fault_id = store.raise_fault("bms_silent", "no frames", latched=False)
        store.clear_fault(fault_id)
        assert store.faults(active_only=True) == []
        assert store.reset_fault(fault_id, "bob") is False


def test_previous_run_faults_closed(tmp_path):
    """A restart closes what the last process left active, and only that, with its events."""
    with Store(tmp_path) as store:
        present = store.raise_fault("pcs_lost", "no answer", source="pcs-1", t_utc=100.0)
        waiting = store.raise_fault("grid_stale", "stale", source="site", t_utc=101.0)
        store.clear_fault(waiting, t_utc=102.0)
        unlatched = store.raise_fault("bms_silent", "no frames", latched=False, t_utc=103.0)
        done = store.raise_fault("meter_stale", "stale", t_utc=104.0)
        store.clear_fault(done, t_utc=105.0)
        store.reset_fault(done, "alice", t_utc=106.0)

    with Store(tmp_path) as store:
        assert store.close_previous_run_faults(t_utc=200.0) == [present, waiting, unlatched]
        assert store.faults(active_only=True) == []
        faults = {f.id: f for f in store.faults()}
        assert faults[present].cleared_utc == 200.0
        assert faults[present].reset_by == "restart"
        assert faults[waiting].cleared_utc == 102.0
        assert faults[waiting].reset_utc == 200.0
        assert faults[unlatched].reset_utc is None
        assert faults[done].reset_by == "alice"
        assert store.close_previous_run_faults(t_utc=300.0) == []
        restart_events = [e for e in store.events(limit=100) if e["t_utc"] == 200.0]
    assert [e["kind"] for e in restart_events] == [
        "fault_cleared",
        "fault_reset",
        "fault_reset",
        "fault_cleared",
    ]


def test_aggregates_roundtrip_nan(tmp_path):
    rows = [
        Aggregate(10, "grid_kw", 1000, 5.0, 1.0, 9.0),
        Aggregate(10, "soc_pct", 0, float("nan"), float("nan"), float("nan")),
    ]
    with Store(tmp_path) as store:
        assert store.add_aggregates(rows) == 2
        assert store.aggregates("grid_kw", 0, 100) == [rows[0]]
        empty = store.aggregates("soc_pct", 0, 100)[0]
    assert empty.n == 0
    assert empty.mean is None


def test_retention_by_age(tmp_path):
    now = 1_000_000.0
    with Store(tmp_path, max_age_s=3600) as store:
        store.add_event("old", "old", t_utc=now - 7200)
        store.add_event("new", "new", t_utc=now - 60)
        old_fault = store.raise_fault("x", "old and done", latched=False, t_utc=now - 7200)
        store.clear_fault(old_fault, t_utc=now - 7100)
        active = store.raise_fault("y", "old but active", t_utc=now - 7200)
        store.add_aggregates(
            [Aggregate(int(now) - 7200, "g", 1, 1, 1, 1), Aggregate(int(now) - 10, "g", 1, 1, 1, 1)]
        )
        result = store.enforce_retention(now_utc=now)
        # Four old events go: the plain one, the raised and cleared events of
        # the finished fault, and the raised event of the active fault.
        assert result.events == 4
        assert result.faults == 1
        assert result.aggregates == 1
        assert [f.id for f in store.faults()] == [active]
        assert [e["kind"] for e in store.events()] == ["new"]


def test_retention_by_size(tmp_path):
    """Size pressure removes the oldest aggregates first and ends under the limit."""
    max_bytes = 256 * 1024
    with Store(tmp_path, max_bytes=max_bytes) as store:
        base = int(time.time()) - 20_000
        rows = [
            Aggregate(base + t, f"s{k}", 1000, 1.0, 0.0, 2.0)
            for t in range(20_000)
            for k in range(3)
        ]
        store.add_aggregates(rows)
        store.add_event("keep", "recent event")
        assert store.used_bytes() > max_bytes
        result = store.enforce_retention()
        assert result.aggregates > 0
        assert store.used_bytes() <= max_bytes
        assert store.aggregates("s0", base + 19_999, base + 20_000) != []
        assert store.aggregates("s0", base, base + 1) == []
        assert [e["kind"] for e in store.events()] == ["keep"]
        assert store.integrity_check() == "ok"
    assert os.path.getsize(tmp_path / "bessgw.sqlite3") <= 2 * max_bytes


def test_retention_disturbance_count(tmp_path):
    with Store(tmp_path, max_disturbances=2) as store:
        paths = []
        for i in range(3):
            cfg = store.disturbance_dir / f"r{i}.cfg"
            dat = store.disturbance_dir / f"r{i}.dat"
            cfg.write_text("c")
            dat.write_text("d")
            paths.append((cfg, dat))
            store.add_disturbance("f", cfg, dat, 1)
        result = store.enforce_retention()
        assert result.disturbances == 1
        assert len(store.disturbances()) == 2
    assert not paths[0][0].exists()
    assert not paths[0][1].exists()
    assert paths[2][0].exists()


def test_store_limits_invalid(tmp_path):
    with pytest.raises(ValueError, match="must be positive"):
        Store(tmp_path, max_bytes=0)


def test_aggregator_seconds():
    """Ticks are grouped by UTC second; a NaN tick is left out of that second's statistics."""
    agg = SecondAggregator(["grid_kw"])
    t = np.array([100.0, 100.5, 100.999, 101.0, 101.5])
    out = agg.add(t, {"grid_kw": np.array([1.0, 3.0, np.nan, 10.0, 20.0])})
    assert out == [Aggregate(100, "grid_kw", 2, 2.0, 1.0, 3.0)]
    # Second 101 is still open until a later tick arrives.
    out = agg.add(np.array([102.2]), {"grid_kw": np.array([7.0])})
    assert out == [Aggregate(101, "grid_kw", 2, 15.0, 10.0, 20.0)]
    assert agg.flush() == [Aggregate(102, "grid_kw", 1, 7.0, 7.0, 7.0)]
    assert agg.flush() == []


def test_aggregator_all_nan_second():
    agg = SecondAggregator(["soc_pct"])
    agg.add(np.array([5.1, 5.2]), {"soc_pct": np.array([np.nan, np.nan])})
    (row,) = agg.flush()
    assert row.n == 0
    assert np.isnan(row.mean)


def test_aggregator_missing_signal():
    agg = SecondAggregator(["grid_kw", "soc_pct"])
    with pytest.raises(KeyError, match="soc_pct"):
        agg.add(np.array([1.0]), {"grid_kw": np.array([1.0])})


TICK = np.dtype([("tick", np.int64), ("grid_kw", np.float64)])


def _ticks(start: int, count: int) -> np.ndarray:
    out = np.zeros(count, dtype=TICK)
    out["tick"] = np.arange(start, start + count)
    out["grid_kw"] = out["tick"] * 0.5
    return out


def test_recorder_pre_and_post():
    """A capture contains the last pre_ticks before the trigger and post_ticks + 1 from it."""
    rec = DisturbanceRecorder(TICK, pre_ticks=100, post_ticks=20)
    for start in range(0, 1000, 37):
        assert rec.feed(_ticks(start, 37)) == []
    # Ticks 0..1035 have been fed; the trigger is the next tick, 1036.
    rec.trigger("meter_stale")
    assert rec.feed(_ticks(1036, 10)) == []
    (capture,) = rec.feed(_ticks(1046, 50))
    assert capture.fault_code == "meter_stale"
    assert capture.trigger_index == 100
    assert capture.ticks["tick"][0] == 936
    assert capture.ticks["tick"][100] == 1036
    assert capture.ticks["tick"][-1] == 1056
    assert np.all(np.diff(capture.ticks["tick"]) == 1)


def test_recorder_trigger_offset():
    """A trigger at tick 7 of the next batch puts that tick at the trigger index."""
    rec = DisturbanceRecorder(TICK, pre_ticks=50, post_ticks=5)
    rec.feed(_ticks(0, 100))
    rec.trigger("estop", 7)
    (capture,) = rec.feed(_ticks(100, 20))
    assert capture.trigger_index == 57
    assert capture.ticks["tick"][capture.trigger_index] == 107
    assert capture.ticks["tick"][0] == 50
    assert capture.ticks["tick"][-1] == 112
    with pytest.raises(ValueError, match="offset"):
        rec.trigger("x", -1)


def test_recorder_short_history_and_flush():
    rec = DisturbanceRecorder(TICK, pre_ticks=100, post_ticks=20)
    rec.feed(_ticks(0, 30))
    rec.trigger("a")
    rec.trigger("b")
    rec.feed(_ticks(30, 5))
    (capture,) = rec.flush()
    assert capture.fault_code == "a+b"
    assert capture.trigger_index == 30
    assert list(capture.ticks["tick"]) == list(range(35))
    assert rec.flush() == []


def test_comtrade_readable(tmp_path):
    """The comtrade reader package loads the record and gets the values back within one step."""
    n = 2000
    grid = np.linspace(-400.0, 1200.0, n)
    grid[7] = np.nan
    fault = np.arange(n) >= 1500
    start = dt.datetime(2026, 12, 4, 12, 0, 0, 250_000, tzinfo=dt.timezone.utc)
    cfg, dat = write_comtrade(
        tmp_path / "rec",
        station="block-a",
        device="bessgw",
        start_utc=start,
        rate_hz=1000.0,
        trigger_index=1500,
        analog=[AnalogChannel("grid_kw", "kW", grid), AnalogChannel("idle", "kW", np.zeros(n))],
        digital=[DigitalChannel("meter_stale", fault)],
    )
    record = comtrade.Comtrade()
    record.load(str(cfg), str(dat))
    assert record.analog_count == 2
    assert record.status_count == 1
    assert record.total_samples == n
    assert record.start_timestamp == start.replace(tzinfo=None)
    assert record.trigger_timestamp == dt.datetime(2026, 12, 4, 12, 0, 1, 750_000)
    values = np.array(record.analog[0])
    step = 1200.0 / 99998
    good = ~np.isnan(grid)
    assert np.isnan(values[7])
    assert np.max(np.abs(values[good] - grid[good])) <= step
    assert list(record.status[0][1498:1502]) == [0, 0, 1, 1]


def test_comtrade_bad_input(tmp_path):
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    one = [AnalogChannel("a", "kW", np.zeros(3))]
    with pytest.raises(ValueError, match="same number of samples"):
        write_comtrade(
            tmp_path / "x",
            station="s",
            device="d",
            start_utc=start,
            rate_hz=1000,
            trigger_index=0,
            analog=[*one, AnalogChannel("b", "kW", np.zeros(4))],
        )
    with pytest.raises(ValueError, match="trigger_index"):
        write_comtrade(
            tmp_path / "x",
            station="s",
            device="d",
            start_utc=start,
            rate_hz=1000,
            trigger_index=3,
            analog=one,
        )
    with pytest.raises(ValueError, match="commas"):
        write_comtrade(
            tmp_path / "x",
            station="s,t",
            device="d",
            start_utc=start,
            rate_hz=1000,
            trigger_index=0,
            analog=one,
        )


def test_store_readable_while_writing(tmp_path):
    """WAL lets a second connection read while the store keeps its own connection open."""
    with Store(tmp_path) as store:
        store.add_event("a", "first")
        reader = sqlite3.connect(tmp_path / "bessgw.sqlite3")
        try:
            assert reader.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
            store.add_event("b", "second")
            assert reader.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2
        finally:
            reader.close()
