"""``bessgw can decode`` and ``bessgw can dump`` end to end."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import can
import pytest
from can_support import PtySlcan, frame_bytes, no_reader_threads, slcan_line  # noqa: F401

from gateway.cli import main

DBC_PATH = Path(__file__).resolve().parents[1] / "drivers" / "can" / "pylontech.dbc"


def decode_json(capsys, *frames: str, extra=()) -> list[dict]:
    assert main(["can", "decode", "--json", *extra, *frames]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# -- decode ----------------------------------------------------------------------------------


def test_decode_json_frame_set(capsys):
    limits, soc, pack, status, requests, name = decode_json(
        capsys,
        "351#1402740E740ECC01",
        "355#1A006400",
        "356#021300004A01",
        "359#8200000101504E",
        "35C#C000",
        "35E#5059544553",
    )
    assert limits == {
        "charge_voltage_limit_v": 53.2,
        "charge_current_limit_a": 370.0,
        "discharge_current_limit_a": 370.0,
        "discharge_voltage_limit_v": 46.0,
    }
    assert soc == {"soc_pct": 26, "soh_pct": 100}
    assert pack == {"pack_voltage_v": 48.66, "pack_current_a": 0.0, "pack_temperature_c": 33.0}
    assert sorted(k for k, v in status.items() if v is True) == [
        "protection_cell_over_voltage",
        "protection_discharge_over_current",
        "warning_charge_high_current",
    ]
    assert status["module_count"] == 1
    assert requests["charge_enable"] is True
    assert requests["discharge_enable"] is True
    assert requests["force_charge_request_1"] is False
    assert name == {"manufacturer_name": "PYTES"}


def test_decode_json_signed(capsys):
    (pack,) = decode_json(capsys, "356#0A0211FFBE000000")
    assert pack["pack_current_a"] == -23.9
    assert pack["pack_temperature_c"] == 19.0


def test_decode_json_limit_magnitudes(capsys):
    """Current limits sent with either sign or the 30000 offset are shown as the limit they mean."""
    low_a, low_b, high = decode_json(
        capsys,
        "351#4502AC0354FCC001",
        "351#440264009CFF3F02",
        "00004220#A410200D2A763674",
        extra=["--protocol", "pylontech"],
    )
    assert low_a == {
        "charge_voltage_limit_v": 58.1,
        "charge_current_limit_a": 94.0,
        "discharge_current_limit_a": 94.0,
        "discharge_voltage_limit_v": 44.8,
    }
    assert low_b == {
        "charge_voltage_limit_v": 58.0,
        "charge_current_limit_a": 10.0,
        "discharge_current_limit_a": 10.0,
        "discharge_voltage_limit_v": 57.5,
    }
    assert high == {
        "charge_voltage_limit_v": 426.0,
        "discharge_voltage_limit_v": 336.0,
        "charge_current_limit_a": 25.0,
        "discharge_current_limit_a": 25.0,
    }


def test_decode_positive_limit_unchanged(capsys):
    """The same frame with the discharge limit sent as +94.0 A decodes to the same limits."""
    (negative,) = decode_json(capsys, "351#4502AC0354FCC001")
    (positive,) = decode_json(capsys, "351#4502AC03AC03C001")
    assert positive == negative


def test_decode_raw_keeps_wire_sign(capsys):
    (low, high) = decode_json(
        capsys, "351#4502AC0354FCC001", "00004220#A410200D2A763674", extra=["--raw"]
    )
    assert low["charge_current_limit_a"] == 94.0
    assert low["discharge_current_limit_a"] == -94.0
    assert high["charge_current_limit_a"] == 25.0
    assert high["discharge_current_limit_a"] == -25.0

    assert main(["can", "decode", "--raw", "351#4502AC0354FCC001"]) == 0
    assert "discharge_current_limit_a=-94.0 A" in capsys.readouterr().out
    assert main(["can", "decode", "351#4502AC0354FCC001"]) == 0
    assert "discharge_current_limit_a=94.0 A" in capsys.readouterr().out


def test_decode_limit_missing_stays_null(capsys):
    (limits,) = decode_json(capsys, "351#4502AC03")
    assert limits["charge_current_limit_a"] == 94.0
    assert limits["discharge_current_limit_a"] is None


def test_decode_json_short_frame(capsys):
    (limits,) = decode_json(capsys, "351#14.02.74.0E")
    assert limits == {
        "charge_voltage_limit_v": 53.2,
        "charge_current_limit_a": 370.0,
        "discharge_current_limit_a": None,
        "discharge_voltage_limit_v": None,
    }


def test_decode_json_dbc(capsys):
    """Signals of an unmapped DBC keep their DBC names and wire signs, limits included."""
    (limits, name) = decode_json(
        capsys, "351#4502AC0354FCC001", "35E#5059544553", extra=["--dbc", str(DBC_PATH)]
    )
    assert limits == {
        "ChargeVoltageLimit": 58.1,
        "ChargeCurrentLimit": 94.0,
        "DischargeCurrentLimit": -94.0,
        "DischargeVoltageLimit": 44.8,
    }
    assert name["NameChar0"] == ord("P")
    assert name["NameChar5"] is None


def test_decode_unknown_id(capsys):
    assert decode_json(capsys, "123#00") == [{}]
    assert main(["can", "decode", "123#00"]) == 0
    assert "(no decoder for this id)" in capsys.readouterr().out


def test_decode_text(capsys):
    assert main(["can", "decode", "351#1402740E740ECC01", "356#0213"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("351 [8] 14 02 74 0E 74 0E CC 01  limits: ")
    assert "charge_voltage_limit_v=53.2 V" in lines[0]
    assert "discharge_current_limit_a=370.0 A" in lines[0]
    assert "pack_voltage_v=48.66 V" in lines[1]
    assert "pack_current_a=missing" in lines[1]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("3511402740E740ECC01", ""),
        ("351#1", "is not 0 to 8 whole bytes"),
        ("351#GG", ""),
        ("4220#00", "has 4 digits"),
        ("800#00", "out of range"),
        ("351#001122334455667788", "is not 0 to 8 whole bytes"),
        ("351##100", "CAN FD frames are not supported"),
        ("351#R", "remote frames carry no data"),
    ],
)
def test_decode_malformed(capsys, frame, reason):
    assert main(["can", "decode", "355#1A006400", frame]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"invalid frame {frame!r}" in captured.err
    assert reason in captured.err
    assert "expected candump form ID#HEX such as 351#1402740E740ECC01" in captured.err


def test_decode_missing_dbc(capsys, tmp_path):
    assert main(["can", "decode", "--dbc", str(tmp_path / "x.dbc"), "351#00"]) == 2
    assert "x.dbc not found" in capsys.readouterr().err


def test_decode_protocol_and_dbc_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["can", "decode", "--protocol", "pylontech", "--dbc", str(DBC_PATH), "351#00"])
    assert info.value.code == 2


# -- dump ------------------------------------------------------------------------------------


def run_dump(argv: list[str], send, timeout_s: float = 10.0) -> int:
    """Run ``bessgw can dump`` in a thread, calling ``send()`` every 10 ms until it returns."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(argv)), name="dump-under-test")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        send()
        time.sleep(0.01)
    thread.join(2.0)
    assert not thread.is_alive(), "dump did not stop"
    return result[0]


@pytest.fixture
def virtual_sender():
    channel = f"test-{uuid.uuid4().hex}"
    bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    frames = [
        can.Message(
            arbitration_id=0x351, is_extended_id=False, data=frame_bytes("1402740E740ECC01")
        ),
        can.Message(
            arbitration_id=0x356, is_extended_id=False, data=frame_bytes("0A0211FFBE000000")
        ),
        can.Message(
            arbitration_id=0x4220, is_extended_id=True, data=frame_bytes("A410200D2A763674")
        ),
    ]

    def send() -> None:
        for message in frames:
            bus.send(message)

    yield channel, send
    bus.shutdown()


def test_dump_json_virtual(capsys, virtual_sender):
    channel, send = virtual_sender
    argv = ["can", "dump", "--interface", "virtual", "--channel", channel, "--json", "--count", "3"]
    assert run_dump(argv, send) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 3
    by_id = {r["id"]: r for r in records}
    # The dump may start mid-burst, but three frames in a row cover each id once.
    assert set(by_id) == {"351", "356", "00004220"}
    assert by_id["351"]["data"] == "1402740E740ECC01"
    assert by_id["351"]["signals"]["charge_current_limit_a"] == 370.0
    assert by_id["356"]["signals"]["pack_current_a"] == -23.9
    assert by_id["00004220"]["extended"] is True
    assert by_id["00004220"]["signals"]["discharge_current_limit_a"] == 25.0
    assert "3 frame(s) printed" in captured.err


def test_dump_json_raw(capsys, virtual_sender):
    channel, send = virtual_sender
    argv = ["can", "dump", "--interface", "virtual", "--channel", channel, "--json", "--raw"]
    assert run_dump([*argv, "--count", "3"], send) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_id = {r["id"]: r for r in records}
    assert by_id["00004220"]["signals"]["discharge_current_limit_a"] == -25.0
    assert by_id["351"]["signals"]["discharge_current_limit_a"] == 370.0


@pytest.mark.parametrize("suffix", [".asc", ".log", ".blf"])
def test_dump_log_file(capsys, tmp_path, virtual_sender, suffix):
    channel, send = virtual_sender
    path = tmp_path / f"bms{suffix}"
    argv = ["can", "dump", "--interface", "virtual", "--channel", channel, "--count", "6"]
    assert run_dump([*argv, "--log", str(path)], send) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 6
    logged = list(can.LogReader(path))
    assert len(logged) == 6
    expected = {0x351: "1402740e740ecc01", 0x356: "0a0211ffbe000000", 0x4220: "a410200d2a763674"}
    for message in logged:
        assert bytes(message.data).hex() == expected[message.arbitration_id]
        assert message.is_extended_id == (message.arbitration_id == 0x4220)


def test_dump_slcan_pty(capsys):
    pty = PtySlcan()
    argv = ["can", "dump", "--interface", "slcan", "--channel", pty.path, "--open-delay", "0"]
    try:
        code = run_dump(
            [*argv, "--count", "2"],
            lambda: pty.write(b"garbage\r" + slcan_line(0x355, frame_bytes("1A006400"))),
        )
    finally:
        pty.close()
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2
    assert "355  [4]  1A 00 64 00" in lines[0]
    assert "soc_pct=26 %" in lines[0]
    assert "garbled slcan lines" in captured.err


def test_dump_seconds_without_frames(capsys, virtual_sender):
    channel, _ = virtual_sender
    argv = ["can", "dump", "--interface", "virtual", "--channel", channel, "--seconds", "0.2"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "0 frame(s) printed; link closed: 0 received" in captured.err


def test_dump_open_failure(capsys, tmp_path):
    missing = tmp_path / "ttyACM7"
    argv = ["can", "dump", "--interface", "slcan", "--channel", str(missing), "--open-delay", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"cannot open CAN slcan {missing} at 500000 bit/s" in err
    assert "check the serial device" in err


def test_dump_bad_log_suffix(capsys, tmp_path, virtual_sender):
    channel, _ = virtual_sender
    argv = ["can", "dump", "--interface", "virtual", "--channel", channel, "--count", "1"]
    assert main([*argv, "--log", str(tmp_path / "frames.xyz")]) == 2
    assert "use a python-can log suffix" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value"), [("--count", "0"), ("--seconds", "-1")])
def test_dump_bad_limits(capsys, option, value):
    argv = ["can", "dump", "--interface", "virtual", "--channel", "x", option, value]
    assert main(argv) == 2
    assert f"{option} must be" in capsys.readouterr().err
