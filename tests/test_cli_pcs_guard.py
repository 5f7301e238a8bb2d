"""`bessgw pcs set` against its BMS and the daemon: what it rejects and when it stops.

The PCS is the pymodbus simulator of tests/pcs_sim.py on 127.0.0.1; the BMS
is the HIL rig's Pylontech BMS model sending frame sets on python-can's
virtual bus from a thread, so the CLI reads it through its real CAN reader.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from gateway.cli import main
from hil.devices import BmsDevice
from hil.plant import Battery, BatteryParams
from tests.pcs_sim import ServerThread
from tests.test_cli_pcs import closed_port, setpoints_w, wait_for

pytestmark = pytest.mark.timeout(60)

#: A 48 V Pylontech-style pack: 16 LFP cells (about 52 V at 50 % SoC) and 200 A, so the BMS
#: allows about 10 kW each way.
CELLS = 16
MAX_CURRENT_A = 200.0

CONFIG = """
[site]
name = "guard-site"
grid_connection_kw = 1000.0

[[devices]]
name = "grid"
role = "grid_meter"
profile = "meter-3ph"
transport = {{ kind = "tcp", host = "127.0.0.1", port = {port} }}

[[devices]]
name = "pcs-1"
role = "pcs"
profile = "pcs-sunspec"
transport = {{ kind = "tcp", host = "127.0.0.1", port = {port} }}
poll_period_ms = 50
timeout_ms = 500
rated_kw = 100.0
bms = "bms-1"

[[devices]]
name = "bms-1"
role = "bms"
profile = "bms-pylontech"
transport = {{ kind = "can", interface = "virtual", channel = "{channel}" }}
max_current_a = 1000.0
stale_ms = 800

[control]
grid_cap_kw = 800.0
ramp_limit_kw_per_s = 100.0
unit_slew_kw_per_s = 400.0

[safety]
pcs_revert_s = 1.0
safe_ramp_kw_per_s = 20.0

[service]
api_socket = "{api_socket}"
"""


class BmsSender:
    """Send the BMS model's frame sets every 0.2 s on a virtual channel until stopped."""

    def __init__(self, soc_pct: float = 50.0) -> None:
        self.channel = f"guard-{uuid.uuid4().hex[:8]}"
        battery = Battery(
            BatteryParams(
                energy_kwh=100.0,
                soc_initial_pct=soc_pct,
                cells_in_series=CELLS,
                max_current_a=MAX_CURRENT_A,
            )
        )
        self.bms = BmsDevice("bms-1", battery, period_s=0.2)
        self.bus = self.bms.attach_virtual(self.channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            t_s = time.monotonic() - started
            if self.bms.due(t_s):
                self.bms.send(t_s)
            self._stop.wait(0.02)

    def __enter__(self) -> BmsSender:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.bus.shutdown()


def write_config(tmp_path: Path, port: int, channel: str) -> str:
    path = tmp_path / "bessgw.toml"
    path.write_text(
        CONFIG.format(port=port, channel=channel, api_socket=tmp_path / "api.sock"),
        encoding="utf-8",
    )
    return str(path)


def pcs_set(config: str, *options: str) -> int:
    return main(["pcs", "set", "pcs-1", "--config", config, *options, "--yes"])


def run_in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------- refusals


def test_rejects_without_paired_bms(tmp_path, capsys):
    config = Path(write_config(tmp_path, closed_port(), "unused"))
    text = config.read_text().replace('bms = "bms-1"\n', "")
    bms_block = text[text.index('[[devices]]\nname = "bms-1"') : text.index("[control]")]
    config.write_text(text.replace(bms_block, ""))
    code = pcs_set(str(config), "--kw", "10", "--for", "1")
    assert code == 2
    err = capsys.readouterr().err
    assert "no BMS is paired with 'pcs-1'" in err
    assert "add --without-bms" in err


def test_rejects_while_daemon_listens(tmp_path, capsys):
    config = write_config(tmp_path, closed_port(), "unused")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as daemon_api:
        daemon_api.bind(str(tmp_path / "api.sock"))
        daemon_api.listen(1)
        code = pcs_set(config, "--kw", "10", "--for", "1")
    assert code == 2
    err = capsys.readouterr().err
    assert "the bessgw daemon may be running (it accepts connections on" in err
    assert "systemctl stop bessgw" in err


def test_unreadable_api_socket_rejects(tmp_path, capsys, monkeypatch):
    # A user outside group bessgw cannot connect to the daemon's 0660 socket; that must not
    # read as "no daemon". Root passes every permission check, so the error is injected.
    config = write_config(tmp_path, closed_port(), "unused")
    (tmp_path / "api.sock").touch()

    def denied(self, address):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", denied)
    code = pcs_set(config, "--kw", "10", "--for", "1")
    assert code == 2
    err = capsys.readouterr().err
    assert "the bessgw daemon may be running (connecting to" in err
    assert "Permission denied" in err
    assert "member of group bessgw" in err


def test_stale_api_socket_ignored(tmp_path, capsys):
    # A socket file that nothing listens on (a daemon killed with SIGKILL) does not block
    # the test; the missing BMS then does.
    config = write_config(tmp_path, closed_port(), f"silent-{uuid.uuid4().hex[:8]}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:
        leftover.bind(str(tmp_path / "api.sock"))
    code = pcs_set(config, "--kw", "10", "--for", "1", "--bms-wait", "0.5")
    assert code == 1
    err = capsys.readouterr().err
    assert "daemon" not in err
    assert "BMS 'bms-1' on virtual" in err
    assert "is waiting after 0.5 s" in err
    assert "the PCS was not commanded" in err


def test_silent_bms_pcs_untouched(tmp_path, capsys):
    with ServerThread() as sim:
        config = write_config(tmp_path, sim.port, f"silent-{uuid.uuid4().hex[:8]}")
        code = pcs_set(config, "--kw", "10", "--for", "1", "--bms-wait", "0.5")
        requests = sim.call(list, sim.server.requests)
    assert code == 1
    assert "the PCS was not commanded" in capsys.readouterr().err
    assert requests == []


def test_rejects_power_above_bms_limit(tmp_path, capsys):
    with ServerThread() as sim, BmsSender() as sender:
        config = write_config(tmp_path, sim.port, sender.channel)
        code = pcs_set(config, "--kw", "20", "--for", "1")
        requests = sim.call(list, sim.server.requests)
    assert code == 2
    err = capsys.readouterr().err
    assert "--kw 20 is more than BMS 'bms-1' allows now: discharge up to" in err
    allowed = float(err.split("choose |--kw| <= ")[1].split()[0])
    # 200 A at the pack voltage of 16 cells at 50 % SoC (about 3.3 V each).
    assert 9.5 < allowed < 11.5
    assert requests == []


def test_rejects_discharge_at_soc_floor(tmp_path, capsys):
    with ServerThread() as sim, BmsSender(soc_pct=4.0) as sender:
        config = write_config(tmp_path, sim.port, sender.channel)
        code = pcs_set(config, "--kw", "5", "--for", "1")
        requests = sim.call(list, sim.server.requests)
    assert code == 2
    assert "SoC 4 % is at or below control.soc_hard_min_pct = 5 %: no discharge" in (
        capsys.readouterr().err
    )
    assert requests == []


@pytest.mark.parametrize("wait", ["0", "-1", "nan"])
def test_rejects_bad_bms_wait(tmp_path, capsys, wait):
    config = write_config(tmp_path, closed_port(), "unused")
    code = pcs_set(config, "--kw", "5", "--for", "1", "--bms-wait", wait)
    assert code == 2
    assert f"--bms-wait {wait} is invalid" in capsys.readouterr().err.replace("-nan", "nan")


# ----------------------------------------------------------------------------- during the test


def test_runs_within_bms_limit(tmp_path, capsys):
    with ServerThread() as sim, BmsSender() as sender:
        config = write_config(tmp_path, sim.port, sender.channel)
        code = pcs_set(config, "--kw", "-8", "--for", "0.5")
        written = setpoints_w(sim)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "BMS bms-1: online, SoC 50 %, charge up to" in out
    assert "done: 0 kW, PCS disabled" in out
    assert min(written) == -8_000


def test_silent_bms_stops_test(tmp_path, capsys):
    with ServerThread() as sim, BmsSender() as sender:
        config = write_config(tmp_path, sim.port, sender.channel)

        def silence_at_hold() -> None:
            wait_for(sim, lambda: sim.server.get_point("WSet") == 8_000)
            sender.bms.silent = True

        watcher = run_in_thread(silence_at_hold)
        code = pcs_set(config, "--kw", "8", "--for", "30", "--ramp-kw-per-s", "40")
        watcher.join(5)
        written = setpoints_w(sim)
        final = {name: sim.call(sim.server.get_point, name) for name in ("WSet", "Conn")}
    captured = capsys.readouterr()
    assert code == 1, captured.out
    assert "BMS check: BMS 'bms-1' is silent" in captured.out
    assert "step test stopped by the BMS check" in captured.err
    assert final == {"WSet": 0, "Conn": 0}
    # From the hold it ramps down at 40 kW/s (the test's rate, above the 20 kW/s safe
    # ramp) over 0.2 s; it does not jump.
    after = written[len(written) - 1 - written[::-1].index(8_000) :]
    assert after == sorted(after, reverse=True)
    assert len({w for w in after if 0 < w < 8_000}) >= 2


def test_zero_limits_clamp_target(tmp_path, capsys):
    with ServerThread() as sim, BmsSender() as sender:
        config = write_config(tmp_path, sim.port, sender.channel)
        clamped_at = []

        def zero_limits_at_hold() -> None:
            wait_for(sim, lambda: sim.server.get_point("WSet") == 8_000)
            sender.bms.limits_zero = True
            clamped_at.append(len(setpoints_w(sim)))

        watcher = run_in_thread(zero_limits_at_hold)
        code = pcs_set(config, "--kw", "8", "--for", "3", "--ramp-kw-per-s", "40")
        watcher.join(5)
        written = setpoints_w(sim)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "BMS check: bms-1 allows 0.0 kW now; target clamped from 8.0 kW" in out
    assert clamped_at
    # The zero limits arrive with the next frame set, within 0.2 s. The next write is 0 W,
    # a step rather than a ramp, and every later write stays at 0 W.
    tail = written[clamped_at[0] :]
    assert 0 in tail
    first_zero = tail.index(0)
    assert set(tail[:first_zero]) <= {8_000}
    assert set(tail[first_zero:]) == {0}


# ----------------------------------------------------------------------------- another master


def test_other_writer_stops_test(tmp_path, capsys):
    # Another controller writes its own setpoint every 20 ms from the hold on: the test must
    # stop writing instead of fighting it (no ramp, no disable), and report it.
    with ServerThread() as sim:
        config = write_config(tmp_path, sim.port, "unused")
        done = threading.Event()

        def other_master() -> None:
            wait_for(sim, lambda: sim.server.get_point("WSet") == 8_000)
            while not done.is_set():
                sim.call(sim.server.set_point, "WSet", -5_000)
                done.wait(0.02)

        watcher = run_in_thread(other_master)
        try:
            code = pcs_set(
                config, "--kw", "8", "--for", "30", "--ramp-kw-per-s", "40", "--without-bms"
            )
        finally:
            done.set()
            watcher.join(5)
        written = setpoints_w(sim)
        conn = sim.call(sim.server.get_point, "Conn")
    captured = capsys.readouterr()
    assert code == 1, captured.out
    assert "stopped: the PCS's setpoint reads -5.0 kW, not the 8.0 kW this test wrote" in (
        captured.out
    )
    assert "did not disable it" in captured.err
    # The test's own writes end at 8 kW: no ramp down, no 0 kW, and the PCS still enabled.
    assert written[-1] == 8_000
    assert conn == 1


def test_daemon_start_stops_test(tmp_path, capsys):
    # The daemon (restarted by systemd, say) starts listening during the hold.
    with ServerThread() as sim:
        config = write_config(tmp_path, sim.port, "unused")
        daemon_api = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def start_daemon_at_hold() -> None:
            wait_for(sim, lambda: sim.server.get_point("WSet") == 8_000)
            daemon_api.bind(str(tmp_path / "api.sock"))
            daemon_api.listen(1)

        watcher = run_in_thread(start_daemon_at_hold)
        try:
            code = pcs_set(
                config, "--kw", "8", "--for", "30", "--ramp-kw-per-s", "40", "--without-bms"
            )
        finally:
            watcher.join(5)
            daemon_api.close()
        conn = sim.call(sim.server.get_point, "Conn")
    captured = capsys.readouterr()
    assert code == 1, captured.out
    assert "stopped: the bessgw daemon started during the test (it accepts connections" in (
        captured.out
    )
    assert "done:" not in captured.out
    assert conn == 1
