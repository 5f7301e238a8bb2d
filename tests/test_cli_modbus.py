"""``bessgw modbus`` and ``bessgw device`` against the simulator and against mbpoll.

The simulator runs on its own event loop in a thread, because the CLI
starts its own loop with ``asyncio.run``. mbpoll (a Debian package written
in C on libmodbus) proves the simulator and the CLI speak standard Modbus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus import codec
from drivers.modbus.profile import load_profile
from drivers.modbus.server import RegisterServer
from gateway.cli import main

PCS_UNIT = 2


class ThreadedServer:
    """A RegisterServer on an event loop in a daemon thread; ``call`` runs code on that loop."""

    def __init__(self, server: RegisterServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, function: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def start_tcp(self) -> int:
        future = asyncio.run_coroutine_threadsafe(self.server.start_tcp(), self.loop)
        return future.result(timeout=10)

    def start_rtu(self, device: str) -> None:
        future = asyncio.run_coroutine_threadsafe(self.server.start_rtu(device), self.loop)
        future.result(timeout=10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def pcs() -> Iterator[tuple[ThreadedServer, int]]:
    threaded = ThreadedServer(RegisterServer(load_profile("pcs-sunspec"), unit_id=PCS_UNIT))
    port = threaded.start_tcp()
    yield threaded, port
    threaded.close()


@pytest.fixture
def meter() -> Iterator[tuple[ThreadedServer, int]]:
    threaded = ThreadedServer(RegisterServer(load_profile("meter-3ph"), unit_id=1))
    port = threaded.start_tcp()
    yield threaded, port
    threaded.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``bessgw`` in this process; restore the logging set-up the command replaced."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = main(list(argv))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- read -----------------------------------------------------------------------


def test_read_string_marker(capsys, pcs):
    _, port = pcs
    code, out, _ = run_cli(
        capsys,
        "modbus",
        "read",
        f"127.0.0.1:{port}",
        "40000",
        "--count",
        "2",
        "--type",
        "str",
        "--unit",
        "2",
    )
    assert code == 0
    assert "registers: 5375 6E53" in out
    assert "value (str ABCD): 'SunS'" in out


def test_read_json_several_values(capsys, pcs):
    threaded, port = pcs
    threaded.call(lambda: threaded.server.set_point("W", -12300))
    code, out, _ = run_cli(
        capsys,
        "modbus",
        "read",
        f"127.0.0.1:{port}",
        "0x9C94",
        "--count",
        "2",
        "--type",
        "i16",
        "--unit",
        "2",
        "--json",
    )
    assert code == 0
    assert json.loads(out) == {
        "registers": [0xFF85, 2],
        "value": [-123, 2],
        "quality": ["good", "good"],
    }


def test_read_input_f32_scaled(capsys, meter):
    threaded, port = meter
    threaded.call(lambda: threaded.server.set_point("p_kw", 12.5))
    code, out, _ = run_cli(
        capsys,
        "modbus",
        "read",
        f"127.0.0.1:{port}",
        "52",
        "--function",
        "input",
        "--type",
        "f32",
        "--scale",
        "0.001",
        "--json",
    )
    assert code == 0
    assert json.loads(out) == {
        "registers": codec.encode(12500.0, "f32"),
        "value": 12.5,
        "quality": "good",
    }


def test_read_cdab_order(capsys, meter):
    threaded, port = meter
    threaded.call(lambda: threaded.server.set_registers("input", 0, [0x0000, 0x3F80]))
    code, out, _ = run_cli(
        capsys,
        "modbus",
        "read",
        f"127.0.0.1:{port}",
        "0",
        "--function",
        "input",
        "--type",
        "f32",
        "--order",
        "CDAB",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["value"] == 1.0


def test_read_nan_is_null(capsys, meter):
    threaded, port = meter
    threaded.call(lambda: threaded.server.set_registers("input", 0, [0x7FBF, 0xFF80]))
    code, out, _ = run_cli(
        capsys,
        "modbus",
        "read",
        f"127.0.0.1:{port}",
        "0",
        "--function",
        "input",
        "--type",
        "f32",
        "--json",
    )
    assert code == 0
    assert json.loads(out) == {
        "registers": [0x7FBF, 0xFF80],
        "value": None,
        "quality": "not_implemented",
    }
    code, out, _ = run_cli(
        capsys, "modbus", "read", f"127.0.0.1:{port}", "0", "--function", "input", "--type", "f32"
    )
    assert "value (f32 ABCD): no value (sentinel 7FBF FF80)\n" in out


# Each "no value" sentinel, read with --scale 0.1: never scaled, never a number.
SENTINEL_CASES = [
    ("i16", "ABCD", [0x8000], "8000"),
    ("u16", "ABCD", [0xFFFF], "FFFF"),
    ("i32", "ABCD", [0x8000, 0x0000], "8000 0000"),
    ("i32", "CDAB", [0x0000, 0x8000], "0000 8000"),
    ("u32", "ABCD", [0xFFFF, 0xFFFF], "FFFF FFFF"),
    ("u64", "ABCD", [0xFFFF] * 4, "FFFF FFFF FFFF FFFF"),
    ("i64", "ABCD", [0x8000, 0, 0, 0], "8000 0000 0000 0000"),
]


@pytest.mark.parametrize(("type_", "order", "words", "shown"), SENTINEL_CASES)
def test_read_sentinel_not_scaled(capsys, meter, type_, order, words, shown):
    threaded, port = meter
    threaded.call(lambda: threaded.server.set_registers("input", 0, words))
    argv = ["modbus", "read", f"127.0.0.1:{port}", "0", "--function", "input"]
    argv += ["--type", type_, "--order", order, "--scale", "0.1"]

    code, out, _ = run_cli(capsys, *argv, "--json")
    assert code == 0
    assert json.loads(out) == {"registers": words, "value": None, "quality": "not_implemented"}

    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    assert f"registers: {shown}\n" in out
    assert f"value ({type_} {order}): no value (sentinel {shown})\n" in out


def test_read_sentinel_among_values(capsys, meter):
    threaded, port = meter
    threaded.call(lambda: threaded.server.set_registers("input", 0, [0x0010, 0x8000, 0xFFF6]))
    argv = ["modbus", "read", f"127.0.0.1:{port}", "0", "--function", "input", "--type", "i16"]
    argv += ["--count", "3", "--scale", "0.1"]

    code, out, _ = run_cli(capsys, *argv, "--json")
    assert code == 0
    assert json.loads(out) == {
        "registers": [0x0010, 0x8000, 0xFFF6],
        "value": [1.6, None, -1.0],
        "quality": ["good", "not_implemented", "good"],
    }

    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    assert "value (i16 ABCD): 1.6, no value (sentinel 8000), -1\n" in out


def test_read_infinity_is_null(capsys, meter):
    threaded, port = meter
    threaded.call(lambda: threaded.server.set_registers("input", 0, [0x7F80, 0x0000]))
    argv = ["modbus", "read", f"127.0.0.1:{port}", "0", "--function", "input", "--type", "f32"]
    code, out, _ = run_cli(capsys, *argv, "--json")
    assert code == 0
    assert json.loads(out) == {
        "registers": [0x7F80, 0x0000],
        "value": None,
        "quality": "out_of_range",
    }


def test_read_exception_names_request(capsys, pcs):
    _, port = pcs
    code, _, err = run_cli(capsys, "modbus", "read", f"127.0.0.1:{port}", "30000", "--unit", "2")
    assert code == 1
    assert f"127.0.0.1:{port} unit 2" in err
    assert "address 30000" in err
    assert "exception response 0x02" in err


def test_read_silent_unit_times_out(capsys, pcs):
    _, port = pcs
    code, _, err = run_cli(
        capsys, "modbus", "read", f"127.0.0.1:{port}", "40000", "--unit", "9", "--timeout", "0.2"
    )
    assert code == 1
    assert "unit 9" in err
    assert "no answer within 0.2 s" in err


def test_read_connection_refused(capsys):
    port = free_port()
    code, _, err = run_cli(capsys, "modbus", "read", f"127.0.0.1:{port}", "0")
    assert code == 1
    assert f"bessgw modbus: tcp 127.0.0.1:{port}: cannot connect (" in err
    assert "reconnecting" not in err
    assert "next attempt" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["127.0.0.1:502", "70000"], "invalid register address '70000'"),
        (["127.0.0.1:502", "zero"], "invalid register address 'zero'"),
        (["127.0.0.1:99999", "0"], "invalid port in '127.0.0.1:99999'"),
        (
            ["127.0.0.1", "0", "--type", "f32", "--count", "3"],
            "--count 3 is not a whole number of f32",
        ),
        (["127.0.0.1", "0", "--type", "str"], "--type str needs --count"),
        (["127.0.0.1", "0", "--count", "126"], "invalid --count 126"),
        (["127.0.0.1", "0", "--timeout", "0"], "invalid --timeout 0"),
        (["127.0.0.1"], "missing operands after the device address"),
        (["127.0.0.1", "0", "1"], "read takes one ADDRESS"),
    ],
)
def test_read_usage_errors(capsys, argv, message):
    code, _, err = run_cli(capsys, "modbus", "read", *argv)
    assert code == 2
    assert message in err


# -- write ----------------------------------------------------------------------


def test_write_needs_yes(capsys, pcs):
    threaded, port = pcs
    code, _, err = run_cli(
        capsys,
        "modbus",
        "write",
        f"127.0.0.1:{port}",
        "40204",
        "25",
        "--type",
        "i16",
        "--unit",
        "2",
    )
    assert code == 2
    assert "not written: add --yes to write 0019" in err
    assert threaded.call(lambda: threaded.server.get_point("WSet")) == 0


def test_write_and_read_back(capsys, pcs):
    threaded, port = pcs
    code, out, err = run_cli(
        capsys,
        "modbus",
        "write",
        f"127.0.0.1:{port}",
        "40204",
        "25",
        "-3",
        "--type",
        "i16",
        "--unit",
        "2",
        "--yes",
    )
    assert code == 0
    assert "0019 FFFD; read back matches" in out
    assert "modbus write" in err  # the log line, on stderr
    assert threaded.call(lambda: threaded.server.get_point("WSet")) == 2500.0
    assert threaded.call(lambda: threaded.server.get_registers("holding", 40205, 1)) == [0xFFFD]


def test_write_f32_cdab(capsys, pcs):
    threaded, port = pcs
    # HbCnt and HbTmoTms are two writable u16 registers side by side.
    code, _, _ = run_cli(
        capsys,
        "modbus",
        "write",
        f"127.0.0.1:{port}",
        "40208",
        "1.0",
        "--type",
        "f32",
        "--order",
        "CDAB",
        "--unit",
        "2",
        "--yes",
    )
    assert code == 0
    assert threaded.call(lambda: threaded.server.get_registers("holding", 40208, 2)) == [0, 0x3F80]


def test_write_rejected_by_device(capsys, pcs):
    _, port = pcs
    code, _, err = run_cli(
        capsys, "modbus", "write", f"127.0.0.1:{port}", "40084", "1", "--unit", "2", "--yes"
    )
    assert code == 1
    assert "write single register (function 6) at address 40084" in err


def test_write_read_back_mismatch(capsys, pcs):
    threaded, port = pcs

    def clamp(write):
        # Like a PCS that limits the setpoint to 50 (x 100 W) after accepting it.
        threaded.server.set_registers("holding", 40204, [min(write.words[0], 50)])

    threaded.call(lambda: setattr(threaded.server, "on_write", clamp))
    code, _, err = run_cli(
        capsys, "modbus", "write", f"127.0.0.1:{port}", "40204", "80", "--unit", "2", "--yes"
    )
    assert code == 1
    assert "wrote 0050 but read back 0032" in err


def test_write_bad_value(capsys):
    code, _, err = run_cli(capsys, "modbus", "write", "127.0.0.1", "0", "70000", "--yes")
    assert code == 2
    assert "value 70000 is outside the u16 range" in err
    code, _, err = run_cli(capsys, "modbus", "write", "127.0.0.1", "0", "abc", "--yes")
    assert code == 2
    assert "invalid value 'abc' for type u16" in err


# -- scan -----------------------------------------------------------------------


def test_scan_finds_sunspec_models(capsys, pcs):
    _, port = pcs
    code, out, _ = run_cli(
        capsys, "modbus", "scan", f"127.0.0.1:{port}", "--units", "1-3", "--timeout", "0.2"
    )
    assert code == 0
    assert "1 of 3 unit id(s) responded" in out
    assert (
        "unit 2: SunSpec at 40000: models 1 at 40002 (L 66), 103 at 40070 (L 50), "
        "120 at 40122 (L 26), 123 at 40150 (L 24), 124 at 40176 (L 24), "
        "64900 at 40202 (L 8)"
    ) in out


def test_scan_non_sunspec_unit(capsys, meter):
    _, port = meter
    code, out, _ = run_cli(
        capsys, "modbus", "scan", f"127.0.0.1:{port}", "--units", "1", "--timeout", "0.2"
    )
    assert code == 0
    assert "unit 1: responds, no SunSpec map" in out


def test_scan_nothing_responds(capsys, pcs):
    _, port = pcs
    code, _, err = run_cli(
        capsys, "modbus", "scan", f"127.0.0.1:{port}", "--units", "5,7", "--timeout", "0.1"
    )
    assert code == 1
    assert "no unit id in 5,7 responded within 0.1 s" in err


@pytest.mark.parametrize(
    ("units", "message"),
    [
        ("1-x", "invalid --units '1-x'"),
        ("5-2", "invalid unit range '5-2': the range is reversed; write 2-5"),
        ("1,250-300", "invalid unit range '250-300': unit ids are 0..255"),
    ],
)
def test_scan_bad_units(capsys, units, message):
    code, _, err = run_cli(capsys, "modbus", "scan", "127.0.0.1", "--units", units)
    assert code == 2
    assert message in err


def test_scan_unreachable_one_shot(capsys):
    port = free_port()
    code, _, err = run_cli(capsys, "modbus", "scan", f"127.0.0.1:{port}", "--units", "1")
    assert code == 1
    assert f"tcp 127.0.0.1:{port}: cannot connect (" in err
    assert "reconnecting" not in err


# -- RTU through a socat pty pair ---------------------------------------------------


@pytest.fixture
def pty_pair(tmp_path) -> Iterator[tuple[str, str]]:
    if shutil.which("socat") is None:
        pytest.fail("socat is missing: apt-get install -y socat (.ci/run installs it)")
    left, right = tmp_path / "left", tmp_path / "right"
    process = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={left}", f"pty,raw,echo=0,link={right}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not (left.exists() and right.exists()) and time.monotonic() < deadline:
        time.sleep(0.02)
    yield str(left), str(right)
    process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    if process.poll() is None:
        process.kill()


def test_read_over_rtu(capsys, pty_pair):
    left, right = pty_pair
    threaded = ThreadedServer(RegisterServer(load_profile("pdu-rack"), unit_id=11))
    try:
        threaded.start_rtu(left)
        threaded.call(lambda: threaded.server.set_point("v_l1_v", 230.4))
        code, out, err = run_cli(
            capsys,
            "modbus",
            "read",
            "--rtu",
            right,
            "--baud",
            "19200",
            "--parity",
            "N",
            "26",
            "--function",
            "input",
            "--unit",
            "11",
            "--scale",
            "0.1",
            "--json",
        )
    finally:
        threaded.close()
    assert code == 0, err
    assert json.loads(out) == {"registers": [2304], "value": 230.4, "quality": "good"}


# -- mbpoll, an independent Modbus master -----------------------------------------


def mbpoll(*args: str) -> str:
    if shutil.which("mbpoll") is None:
        pytest.fail("mbpoll is missing: apt-get install -y mbpoll (.ci/run installs it)")
    result = subprocess.run(
        ["mbpoll", "-m", "tcp", "-0", "-1", "-o", "2", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_mbpoll_reads_simulator(pcs):
    threaded, port = pcs
    threaded.call(lambda: threaded.server.set_point("W", 4200))  # raw 42 at W_SF 2
    out = mbpoll("-p", str(port), "-a", "2", "-t", "4", "-r", "40084", "-c", "2", "127.0.0.1")
    assert "[40084]: \t42" in out
    assert "[40085]: \t2" in out


def test_mbpoll_write_then_cli_read(capsys, pcs):
    threaded, port = pcs
    # mbpoll writes 16-bit registers as unsigned numbers: 65529 is 0xFFF9, i16 -7.
    mbpoll("-p", str(port), "-a", "2", "-t", "4", "-r", "40204", "127.0.0.1", "65529")
    code, out, _ = run_cli(
        capsys,
        "modbus",
        "read",
        f"127.0.0.1:{port}",
        "40204",
        "--type",
        "i16",
        "--unit",
        "2",
        "--json",
    )
    assert code == 0
    assert json.loads(out) == {"registers": [0xFFF9], "value": -7, "quality": "good"}
    assert threaded.call(lambda: threaded.server.get_point("WSet")) == -700.0


def test_cli_write_then_mbpoll_read(capsys, pcs):
    _, port = pcs
    code, _, _ = run_cli(
        capsys, "modbus", "write", f"127.0.0.1:{port}", "40208", "1234", "--unit", "2", "--yes"
    )
    assert code == 0
    out = mbpoll("-p", str(port), "-a", "2", "-t", "4", "-r", "40208", "127.0.0.1")
    assert "[40208]: \t1234" in out


def test_mbpoll_float_matches_codec(meter):
    threaded, port = meter
    threaded.call(lambda: threaded.server.set_point("f_hz", 49.95))
    # mbpoll's -B reads 32-bit values most significant word first, the ABCD order.
    out = mbpoll("-p", str(port), "-a", "1", "-t", "3:float", "-B", "-r", "70", "127.0.0.1")
    assert "[70]: \t49.95" in out


# -- bessgw device read -------------------------------------------------------------


def site_config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(
        f"""
[site]
name = "test"
grid_connection_kw = 2000.0

[control]
grid_cap_kw = 1500.0

[[devices]]
name = "pcs-1"
role = "pcs"
profile = "pcs-sunspec"
transport = {{ kind = "tcp", host = "127.0.0.1", port = {port} }}
unit_id = {PCS_UNIT}
timeout_ms = 500
rated_kw = 500.0

[[devices]]
name = "grid"
role = "grid_meter"
profile = "meter-3ph"
transport = {{ kind = "tcp", host = "127.0.0.1", port = {port} }}
""",
        encoding="utf-8",
    )
    return path


def test_device_read_table(capsys, tmp_path, pcs):
    threaded, port = pcs
    threaded.call(lambda: threaded.server.set_point("W", -12300))
    code, out, _ = run_cli(
        capsys, "device", "read", "pcs-1", "--config", str(site_config(tmp_path, port))
    )
    assert code == 0
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["W"][1:] == ["-12300", "W", "good", "holding", "40084"]
    assert lines["WRtg"][1:4] == ["500000", "W", "good"]
    assert lines["Md"][1] == "SIM-PCS-500"
    assert lines["WH"][1:3] == ["-", "Wh"]  # an accumulator at 0 is no value
    assert lines["WH"][3] == "not_implemented"


def test_device_read_json_watch(capsys, tmp_path, pcs):
    _, port = pcs
    code, out, _ = run_cli(
        capsys,
        "device",
        "read",
        "pcs-1",
        "--config",
        str(site_config(tmp_path, port)),
        "--json",
        "--watch",
        "0.05",
        "--reads",
        "2",
    )
    assert code == 0
    objects = [json.loads(line) for line in out.splitlines()]
    assert len(objects) == 2
    assert objects[0]["points"]["ChaState"] == {"value": 0.0, "unit": "%", "quality": "good"}
    assert objects[1]["errors"] == []


def test_device_read_failed_block(capsys, tmp_path, pcs):
    threaded, port = pcs
    threaded.call(lambda: threaded.server.faults.exception_for(40204, 1))
    code, out, err = run_cli(
        capsys, "device", "read", "pcs-1", "--config", str(site_config(tmp_path, port)), "--json"
    )
    assert code == 1
    result = json.loads(out)
    assert result["points"]["WSet"]["quality"] == "comm_error"
    assert result["points"]["W"]["quality"] == "good"
    assert "modbus block rejected" in err
    assert "exception response 0x02" in err


def test_device_read_unknown_name(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "device", "read", "pcs-9", "--config", str(site_config(tmp_path, 502))
    )
    assert code == 2
    assert "no device 'pcs-9'" in err
    assert "configured devices are grid, pcs-1" in err


def test_device_read_bad_config(capsys, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[site]\nname = 1\n")
    code, _, err = run_cli(capsys, "device", "read", "pcs-1", "--config", str(path))
    assert code == 2
    assert "bessgw config check" in err


def test_device_read_unreachable(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "device", "read", "pcs-1", "--config", str(site_config(tmp_path, free_port()))
    )
    assert code == 1
    assert "device 'pcs-1'" in err


def test_device_read_silent_device(capsys, tmp_path, pcs):
    threaded, port = pcs
    threaded.call(lambda: setattr(threaded.server.faults, "drop_all", True))
    code, out, _ = run_cli(
        capsys, "device", "read", "pcs-1", "--config", str(site_config(tmp_path, port)), "--json"
    )
    assert code == 1
    result = json.loads(out)
    assert {p["quality"] for p in result["points"].values()} == {"comm_error"}
    assert "no answer within 0.5 s" in result["errors"][0]
