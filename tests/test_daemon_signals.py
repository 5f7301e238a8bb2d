"""The daemon process under signals and operator commands.

SIGTERM ramps to 0 and exits 0, SIGHUP reloads or rejects a configuration,
SIGKILL leaves the store intact with every acknowledged event, and a fault
reset clears a latched fault whose cause is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import time
import urllib.request
from pathlib import Path

import comtrade
from daemon_rig import BMS_WINDOW_KW, DaemonRig

from gateway.service.api import ApiClient
from gateway.service.store import Store

REPO = Path(__file__).resolve().parents[1]


async def _until(predicate, timeout_s: float, what: str, rig: DaemonRig):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{rig.log_tail()}")


def _logged(rig: DaemonRig, event: str) -> list[dict]:
    return [e for e in rig.log_events() if e.get("event") == event]


def _scrape(port: int) -> dict[str, float]:
    """Fetch the daemon's /metrics on 127.0.0.1 and return sample name (with labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def _cli(*args: str) -> tuple[int, str, str]:
    """Run ``bessgw ARGS`` without blocking the event loop that serves the simulators."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def _status(rig: DaemonRig) -> dict:
    return await asyncio.to_thread(ApiClient(rig.api_socket).call, "status")


async def test_sigterm_ramps_to_zero(tmp_path):
    """SIGTERM lowers the PCS setpoint in steps to 0 within the ramp time, disables it, exits 0."""
    rig = DaemonRig(tmp_path, sigterm_ramp_s=1.0, metrics=True)
    await rig.start_plant()
    rig.write_config()
    try:
        await rig.start_daemon()
        await rig.wait_notify("STATUS=running", 30)
        # Load 800 kW over a 600 kW cap: the BMS window (48.66 kW) limits the discharge.
        await _until(
            lambda: rig.setpoints and rig.setpoints[-1][1] > 0.9 * BMS_WINDOW_KW,
            15,
            "the PCS setpoint to reach the BMS window",
            rig,
        )
        assert rig.pcs.get_point("Conn") == 1

        metrics = await asyncio.to_thread(_scrape, rig.metrics_port)
        assert metrics['bessgw_state{bessgw_state="running"}'] == 1.0
        assert metrics['bessgw_device_up{device="grid",role="grid_meter"}'] == 1.0
        assert metrics['bessgw_device_up{device="bms-1",role="bms"}'] == 1.0
        assert metrics["bessgw_loop_healthy"] == 1.0
        assert metrics["bessgw_loop_ticks"] > 0
        assert metrics["bessgw_grid_cap_kw"] == 600.0
        assert metrics['bessgw_pcs_setpoint_kw{device="pcs-1"}'] > 0.0
        assert 0.0 < metrics['bessgw_soc_percent{device="pcs-1"}'] <= 100.0
        assert metrics["bessgw_faults_active"] == 0.0
        assert 'bessgw_device_value_age_seconds{device="pcs-1",role="pcs"}' in metrics

        t_term = time.monotonic()
        await rig.signal(signal.SIGTERM)
        assert await rig.wait_exit(30) == 0

        after = [(t - t_term, p) for t, p in rig.setpoints if t >= t_term]
        values = [p for _, p in after]
        assert values[-1] == 0.0
        assert all(b <= a for a, b in itertools.pairwise(values))
        # A ramp, not a step: several values between the start and 0.
        assert len([p for p in values if 0.0 < p < 0.9 * BMS_WINDOW_KW]) >= 3
        first_zero_s = next(t for t, p in after if p == 0.0)
        assert first_zero_s <= rig.sigterm_ramp_s + 1.5
        assert rig.pcs.get_point("Conn") == 0

        shutdown = _logged(rig, "pcs_shutdown")
        assert shutdown[-1]["confirmed"] == {"pcs-1": True}
        with Store(rig.state_dir) as store:
            assert store.integrity_check() == "ok"
            kinds = [e["kind"] for e in store.events(limit=10_000)]
        assert kinds[-1] == "daemon_stopped"
        assert "state_changed" in kinds
        # Stopping is not a fault: the fast loop stops before its inputs go stale.
        assert "fault_raised" not in kinds
    finally:
        await rig.close()


async def test_sighup_reload_and_sigkill(tmp_path):
    """SIGHUP applies a valid new cap and refuses a broken file; SIGKILL keeps every acked event."""
    rig = DaemonRig(tmp_path)
    await rig.start_plant()
    rig.write_config()
    try:
        await rig.start_daemon()
        await rig.wait_notify("STATUS=running", 30)
        assert (await _status(rig))["cap_kw"] == 600.0

        rig.write_config(grid_cap_kw="grid_cap_kw = 700.0")
        await rig.signal(signal.SIGHUP)
        await _until(lambda: _logged(rig, "config_reloaded"), 10, "config_reloaded", rig)
        assert (await _status(rig))["cap_kw"] == 700.0
        assert any(m == "RELOADING=1" for _, m in rig.read_notify())

        rig.write_config(grid_cap_kw="grid_cap_kw = -5.0")
        await rig.signal(signal.SIGHUP)
        rejected = await _until(
            lambda: _logged(rig, "config_reload_rejected"), 10, "config_reload_rejected", rig
        )
        assert "grid_cap_kw" in rejected[-1]["reason"]
        status = await _status(rig)
        assert status["cap_kw"] == 700.0
        assert status["state"] == "running"

        rig.config_path.write_text("this is [not toml")
        await rig.signal(signal.SIGHUP)
        await _until(
            lambda: len(_logged(rig, "config_reload_rejected")) == 2, 10, "second rejection", rig
        )
        assert "not valid TOML" in _logged(rig, "config_reload_rejected")[-1]["reason"]

        code, out, err = await _cli("status", "--socket", str(rig.api_socket))
        assert code == 0, err
        assert "site rig: running, mode auto" in out
        assert "grid cap: 700 kW" in out

        client = ApiClient(rig.api_socket)
        acked = []
        for i in range(30):
            mode = "standby" if i % 2 == 0 else "auto"
            result = await asyncio.to_thread(client.call, "set_mode", mode=mode, operator=f"op{i}")
            acked.append((result["event_id"], f"op{i}"))
        rig.proc.send_signal(signal.SIGKILL)
        assert await rig.wait_exit(10) == -signal.SIGKILL

        with Store(rig.state_dir) as store:
            assert store.integrity_check() == "ok"
            events = {e["id"]: e for e in store.events(limit=100_000)}
        for event_id, operator in acked:
            assert events[event_id]["kind"] == "mode_changed"
            assert events[event_id]["source"] == operator
    finally:
        await rig.close()


async def test_sighup_rejects_broken_profile(tmp_path):
    """SIGHUP checks the device profiles as `bessgw run` does; a broken one keeps the old config."""
    profile = tmp_path / "grid-meter.toml"
    profile.write_text((REPO / "drivers/profiles/meter-3ph.toml").read_text())
    rig = DaemonRig(tmp_path)
    await rig.start_plant()

    def write_config(**overrides: str) -> None:
        rig.write_config(**overrides)
        text = rig.config_path.read_text()
        rig.config_path.write_text(text.replace('"meter-3ph"', f'"{profile}"', 1))

    write_config()
    try:
        await rig.start_daemon()
        await rig.wait_notify("STATUS=running", 30)

        profile.write_text("[device]\nname = 'broken'\n[[blocks]]\n")
        write_config(grid_cap_kw="grid_cap_kw = 700.0")
        await rig.signal(signal.SIGHUP)
        rejected = await _until(
            lambda: _logged(rig, "config_reload_rejected"), 10, "config_reload_rejected", rig
        )
        assert str(profile) in rejected[-1]["reason"]
        status = await _status(rig)
        assert status["cap_kw"] == 600.0
        assert status["state"] == "running"
    finally:
        await rig.close()


async def test_locked_memory_start_no_fault(tmp_path):
    """A start with locked memory and the default stale time (three 50 ms polls) has no fault.

    mlockall runs on a worker thread with the GIL released, so the pollers go
    on while it faults in the process's pages. Here it takes tens of ms, so
    the test guards the whole start rather than a long lock.
    """
    rig = DaemonRig(tmp_path)
    await rig.start_plant()
    rig.write_config()
    text = rig.config_path.read_text()
    text = text.replace("lock_memory = false", "lock_memory = true")
    text = text.replace("\nstale_ms = 1000\n", "\n")
    rig.config_path.write_text(text)
    try:
        await rig.start_daemon()
        await rig.wait_notify("READY=1", 30)
        started = _logged(rig, "fast_loop_started")
        assert started[-1]["mlockall"] is True
        await asyncio.sleep(0.5)
        assert _logged(rig, "fault_raised") == []
        assert (await _status(rig))["state"] == "running"
    finally:
        await rig.close()


async def test_bms_link_loss_silences_bms(tmp_path):
    """A closed BMS link (the adapter unplugged) silences the BMS at once, not after 3 s."""
    rig = DaemonRig(tmp_path)
    await rig.start_plant()
    rig.write_config()
    try:
        await rig.start_daemon()
        await rig.wait_notify("STATUS=running", 30)
        rig.bms.close()
        silent = await _until(
            lambda: [
                e
                for e in _logged(rig, "bms_state_changed")
                if e["bms"] == "bms-1" and e["state"] == "silent"
            ],
            10,
            "bms-1 silent",
            rig,
        )
        assert silent[0]["reason"].startswith("CAN link down: slcan ")
    finally:
        await rig.close()


async def test_fault_reset_cli(tmp_path):
    """A silent BMS latches a fault; once frames return, `bessgw fault reset` clears it."""
    rig = DaemonRig(tmp_path)
    await rig.start_plant()
    rig.write_config()
    try:
        await rig.start_daemon()
        await rig.wait_notify("STATUS=running", 30)
        rig.bms.silent.set()
        await rig.wait_notify("STATUS=fault", 15)
        status = await _status(rig)
        assert "bms_silent" in [f["code"] for f in status["faults_active"]]
        rig.bms.silent.clear()
        # The fault stays latched after frames return, so the state stays fault until the reset.
        await _until(
            lambda: _logged(rig, "bms_state_changed")[-1]["state"] == "online",
            15,
            "the BMS to come back online",
            rig,
        )
        assert (await _status(rig))["state"] == "fault"

        code, out, err = await _cli(
            "fault", "reset", "--socket", str(rig.api_socket), "--operator", "alice"
        )
        assert code == 0, err
        assert "bms_silent" in out
        await rig.wait_notify("STATUS=running", 15)
        faults = (await asyncio.to_thread(ApiClient(rig.api_socket).call, "faults"))["faults"]
        bms = next(f for f in faults if f["code"] == "bms_silent")
        assert bms["reset_by"] == "alice"
        assert bms["active"] is False

        # The fault left a COMTRADE disturbance record: 10 s before the trigger
        # (or since the loop started, if shorter) and 2 s after it.
        def records() -> list[dict]:
            with Store(rig.state_dir) as store:
                return store.disturbances()

        (record,) = await _until(records, 10, "a disturbance record", rig)
        assert "bms_silent" in record["fault_code"]
        recording = comtrade.Comtrade()
        recording.load(record["cfg_path"], record["dat_path"])
        assert recording.total_samples == record["n_samples"]
        assert recording.frequency == 50.0
        channel = recording.status_channel_ids.index("bms_silent")
        bits = list(recording.status[channel])
        trigger = recording.trigger_timestamp - recording.start_timestamp
        trigger_index = round(trigger.total_seconds() * 1000)
        assert bits[0] == 0
        assert bits[trigger_index] == 1
    finally:
        await rig.close()
