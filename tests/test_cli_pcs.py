"""``bessgw pcs status`` and ``bessgw pcs set`` against the simulated PCS on 127.0.0.1.

The simulator runs in a thread (:class:`tests.pcs_sim.ServerThread`) because
the CLI calls ``asyncio.run`` itself. The Ctrl-C tests run the CLI as a child
process and send it SIGINT, as a terminal does.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymodbus.constants import ExcCodes

from drivers.modbus.server import RegisterWrite
from gateway.cli import main
from tests.pcs_sim import ServerThread

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
[site]
name = "test-site"
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
unit_id = 1
poll_period_ms = 50
timeout_ms = 500
rated_kw = 100.0

[control]
grid_cap_kw = 800.0
ramp_limit_kw_per_s = 50.0
unit_slew_kw_per_s = 200.0
deadband_kw = 1.0

[safety]
pcs_revert_s = 1.0
safe_ramp_kw_per_s = {safe_ramp}
"""


def write_config(tmp_path: Path, port: int, safe_ramp: float = 100.0) -> str:
    path = tmp_path / "bessgw.toml"
    path.write_text(CONFIG.format(port=port, safe_ramp=safe_ramp), encoding="utf-8")
    return str(path)


def closed_port() -> int:
    """Return a 127.0.0.1 port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setpoints_w(sim: ServerThread) -> list[int]:
    """Return every WSet value written, in W (raw i16 at scale factor 2)."""
    words = sim.call(sim.model.words_written, "WSet")
    return [(raw - 0x10000 if raw >= 0x8000 else raw) * 100 for (raw,) in words]


def wait_for(sim: ServerThread, condition, timeout_s: float = 15.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not sim.call(condition):
        if time.monotonic() > deadline_s:
            pytest.fail(f"simulator condition not met within {timeout_s} s")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- checks


def test_set_refuses_without_yes(tmp_path, capsys):
    with ServerThread() as sim:
        config = write_config(tmp_path, sim.port)
        code = main(["pcs", "set", "pcs-1", "--config", config, "--kw", "20", "--for", "5"])
        requests = sim.call(list, sim.server.requests)
    assert code == 2
    err = capsys.readouterr().err
    assert "not commanding 'pcs-1' without --yes" in err
    assert "ramp it to 20 kW at 50 kW/s, hold for 5 s" in err
    assert requests == []  # nothing was sent to the PCS


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--kw", "150", "--for", "5"], "rated_kw = 100"),
        (["--kw", "-100.5", "--for", "5"], "allows -100 to 100 kW"),
        (["--kw", "nan", "--for", "5"], "--kw nan is outside the rating"),
        (["--kw", "20", "--for", "0"], "--for 0 is invalid"),
        (["--kw", "20", "--for", "5", "--ramp-kw-per-s", "500"], "unit_slew_kw_per_s = 200"),
        (["--kw", "20", "--for", "5", "--ramp-kw-per-s", "0"], "--ramp-kw-per-s 0 is invalid"),
    ],
)
def test_set_rejects_bad_input(tmp_path, capsys, options, message):
    config = write_config(tmp_path, closed_port())
    code = main(["pcs", "set", "pcs-1", "--config", config, *options, "--yes"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_set_rejects_non_pcs(tmp_path, capsys):
    config = write_config(tmp_path, closed_port())
    code = main(["pcs", "set", "grid", "--config", config, "--kw", "1", "--for", "1", "--yes"])
    assert code == 2
    assert "has role 'grid_meter', not 'pcs'" in capsys.readouterr().err


def test_status_missing_config(tmp_path, capsys):
    code = main(["pcs", "status", "pcs-1", "--config", str(tmp_path / "absent.toml")])
    assert code == 2
    assert "file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- status


def test_status_prints_pcs(tmp_path, capsys):
    with ServerThread() as sim:
        # The model makes W follow WSet while Conn and WSet_Ena are 1.
        for name, value in (("Conn", 1), ("WSet_Ena", 1), ("WSet", -12_300), ("Evt1", 1 << 7)):
            sim.call(sim.server.set_point, name, value)
        wait_for(sim, lambda: sim.server.get_point("W") == -12_300)
        config = write_config(tmp_path, sim.port)
        code = main(["pcs", "status", "pcs-1", "--config", config])
    assert code == 0
    out = capsys.readouterr().out
    assert f"pcs-1 (pcs-sunspec, tcp 127.0.0.1:{sim.port} unit 1): online" in out
    assert "  active power   -12.3 kW\n" in out
    assert "  setpoint       -12.3 kW\n" in out
    assert "  enabled        yes\n" in out
    assert "  state          standby (8)\n" in out
    assert "  events         over_temp\n" in out
    assert "  revert timer   0 s (off: the PCS does not fall back to 0 kW by itself)\n" in out


def test_status_unreachable(tmp_path, capsys):
    port = closed_port()
    config = write_config(tmp_path, port)
    code = main(["pcs", "status", "pcs-1", "--config", config])
    assert code == 1
    err = capsys.readouterr().err
    assert f"PCS 'pcs-1' (tcp 127.0.0.1:{port} unit 1): cannot connect within 3 s (" in err
    assert err.count("powered and reachable") == 1
    assert "host, port and unit_id in the configuration" in err
    assert "reconnecting" not in err


# ----------------------------------------------------------------------------- step test


def test_set_runs_step_test(tmp_path, capsys):
    with ServerThread() as sim:
        config = write_config(tmp_path, sim.port)
        code = main(
            [
                "pcs", "set", "pcs-1", "--config", config,
                "--kw", "20", "--for", "1.2", "--ramp-kw-per-s", "40", "--yes", "--without-bms",
            ]
        )  # fmt: skip
        written = setpoints_w(sim)
        final = {
            name: sim.call(sim.server.get_point, name) for name in ("WSet", "Conn", "WSet_Ena")
        }
        revert_s = sim.call(sim.server.get_point, "WSet_RvrtTms")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "reversion timer 1.0 s, step to 20 kW for 1.2 s" in out
    assert "done: 0 kW, PCS disabled" in out
    hold_lines = [line for line in out.splitlines() if " hold " in line]
    assert hold_lines
    assert all(line.split()[-2:] == ["20.0", "20.0"] for line in hold_lines)
    assert revert_s == 1
    assert final == {"WSet": 0, "Conn": 0, "WSet_Ena": 0}

    # 0 W from enable, a ramp up to 20 kW, refreshes, a ramp down, 0 W from disable.
    peak = written.index(20_000)
    last_peak = len(written) - 1 - written[::-1].index(20_000)
    ramp_up, ramp_down = written[: peak + 1], written[last_peak:]
    assert max(written) == 20_000
    assert ramp_up == sorted(ramp_up)
    assert ramp_down == sorted(ramp_down, reverse=True)
    # 20 kW at 40 kW/s takes 0.5 s; writes at most every 50 ms land in between.
    assert len({w for w in ramp_up if 0 < w < 20_000}) >= 3
    assert len({w for w in ramp_down if 0 < w < 20_000}) >= 3
    assert ramp_down[-1] == 0


def test_set_unverified_disable(tmp_path, capsys):
    """A disable that does not read back is an error, never a "done: ... disabled" line."""
    with ServerThread() as sim:
        model = sim.model

        def reject_disconnect(write: RegisterWrite) -> ExcCodes | None:
            if "Conn" in write.point_names and write.words == (0,):
                return ExcCodes.DEVICE_FAILURE
            return model.on_write(write)

        sim.call(setattr, sim.server, "on_write", reject_disconnect)
        config = write_config(tmp_path, sim.port)
        code = main(
            [
                "pcs", "set", "pcs-1", "--config", config,
                "--kw", "10", "--for", "0.2", "--ramp-kw-per-s", "100", "--yes", "--without-bms",
            ]
        )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "done:" not in captured.out
    assert "PCS disabled" not in captured.out
    assert captured.err.count("not both verified") == 1
    assert "0 kW and disable were written but not both verified by read-back" in captured.err


def test_set_charge_never_minus_zero(tmp_path, capsys):
    with ServerThread() as sim:
        config = write_config(tmp_path, sim.port)
        code = main(
            [
                "pcs", "set", "pcs-1", "--config", config,
                "--kw", "-10", "--for", "0.2", "--ramp-kw-per-s", "40", "--yes", "--without-bms",
            ]
        )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and "." in line]
    assert rows
    # The last three columns: target_kw, setpoint_kw and power_kw.
    numbers = [value for row in rows for value in row[-3:]]
    assert "-0.0" not in numbers
    assert rows[0][-3] == "0.0"  # the first target of the ramp rounds to zero
    assert "done: 0 kW, PCS disabled" in out


@contextlib.contextmanager
def running_cli(config: str, *options: str) -> Iterator[subprocess.Popen]:
    """Run ``bessgw pcs set pcs-1`` as a child process; kill it if the test leaves it running."""
    cli = subprocess.Popen(
        [sys.executable, "-m", "gateway", "pcs", "set", "pcs-1", "--config", config, *options],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield cli
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.communicate(timeout=5)


def test_set_ctrl_c_ramps_to_zero(tmp_path):
    with ServerThread() as sim:
        config = write_config(tmp_path, sim.port)
        options = ("--kw", "30", "--for", "30", "--ramp-kw-per-s", "60", "--yes", "--without-bms")
        with running_cli(config, *options) as cli:
            wait_for(sim, lambda: sim.server.get_point("WSet") == 30_000)
            cli.send_signal(signal.SIGINT)
            out, err = cli.communicate(timeout=15)
        written = setpoints_w(sim)
        final = {name: sim.call(sim.server.get_point, name) for name in ("WSet", "Conn")}
    assert cli.returncode == 130, err
    assert "interrupted: ramping to 0 kW" in out
    assert "stopped: 0 kW, PCS disabled" in out
    assert final == {"WSet": 0, "Conn": 0}
    # After the last 30 kW write the setpoint ramps down (at 100 kW/s, the
    # configured safe ramp) instead of jumping to 0.
    after = written[len(written) - 1 - written[::-1].index(30_000) :]
    assert after == sorted(after, reverse=True)
    assert len({w for w in after if 0 < w < 30_000}) >= 2


def test_set_second_ctrl_c_zeroes(tmp_path):
    with ServerThread() as sim:
        # Abort ramp: max(10 kW/s test rate, 5 kW/s safe ramp) = 10 kW/s, so 2 s from 20 kW.
        config = write_config(tmp_path, sim.port, safe_ramp=5.0)
        options = ("--kw", "20", "--for", "30", "--ramp-kw-per-s", "10", "--yes", "--without-bms")
        with running_cli(config, *options) as cli:
            wait_for(sim, lambda: sim.server.get_point("WSet") == 20_000)
            cli.send_signal(signal.SIGINT)
            wait_for(sim, lambda: 0 < sim.server.get_point("WSet") < 20_000)
            cli.send_signal(signal.SIGINT)
            out, err = cli.communicate(timeout=15)
        written = setpoints_w(sim)
    assert cli.returncode == 130, err
    assert "second interrupt: commanding 0 kW now" in out
    # The setpoint jumps from somewhere in the ramp straight to 0.
    first_zero = written.index(0, written.index(20_000))
    assert written[first_zero - 1] > 1_000
