"""cantools DBC decoder: agreement with the built-in decoder, mapping errors, property tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from can_support import FIELD_CASES, frame_bytes
from hypothesis import given
from hypothesis import strategies as st

from drivers.can.dbc import DbcDecoder, DbcError
from drivers.can.profile import load_bms_profile
from drivers.can.pylontech import FRAMES, decode_frame

DBC_PATH = Path(__file__).resolve().parents[1] / "drivers" / "can" / "pylontech.dbc"


@pytest.fixture(scope="module")
def dbc_decoder() -> DbcDecoder:
    return load_bms_profile("bms-pylontech").dbc_decoder()


def assert_same_values(builtin: dict, dbc: dict) -> None:
    """Both decoders give the same points with equal values of the same type."""
    assert set(builtin) == set(dbc)
    for name, value in builtin.items():
        assert dbc[name] == value, name
        assert type(dbc[name]) is type(value), name


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_dbc_agrees_on_field_frames(dbc_decoder, case):
    frame_id, is_extended, data_hex = FIELD_CASES[case]
    data = frame_bytes(data_hex)
    for dlc in range(len(data) + 1):
        builtin = decode_frame(frame_id, data[:dlc], is_extended)
        dbc = dbc_decoder.decode(frame_id, data[:dlc], is_extended)
        assert_same_values(builtin.signals, dbc.signals)
        assert set(builtin.missing) == set(dbc.missing), (case, dlc)


def test_dbc_points_match_builtin(dbc_decoder):
    for frame_id, spec in FRAMES.items():
        assert set(dbc_decoder.points_by_frame[frame_id]) == set(spec.points), hex(frame_id)


def test_dbc_limits_values(dbc_decoder):
    signals = dbc_decoder.decode(0x351, frame_bytes("4502AC0354FCC001")).signals
    assert signals["charge_current_limit_a"] == 94.0
    assert signals["discharge_current_limit_a"] == -94.0


def test_dbc_hv_limits_values(dbc_decoder):
    signals = dbc_decoder.decode(0x4220, frame_bytes("A410200D2A763674"), is_extended=True).signals
    assert signals["charge_current_limit_a"] == 25.0
    assert signals["discharge_current_limit_a"] == -25.0


def test_dbc_unknown_frame(dbc_decoder):
    assert dbc_decoder.decode(0x123, b"\x00") is None
    assert dbc_decoder.decode(0x351, frame_bytes("1402740E740ECC01"), is_extended=True) is None


def test_dbc_unmapped_names():
    decoder = DbcDecoder(DBC_PATH)
    signals = decoder.decode(0x351, frame_bytes("1402740E740ECC01")).signals
    assert signals == {
        "ChargeVoltageLimit": 53.2,
        "ChargeCurrentLimit": 370.0,
        "DischargeCurrentLimit": 370.0,
        "DischargeVoltageLimit": 46.0,
    }


BIG_ENDIAN_DBC = """VERSION ""

NS_ :

BS_:

BU_: BMS

BO_ 1280 Pack: 4 BMS
 SG_ Current : 7|16@0- (0.1,0) [-3276.8|3276.7] "A" Vector__XXX
 SG_ Mode : 23|8@0+ (1,0) [0|255] "" Vector__XXX

VAL_ 1280 Mode 0 "idle" 1 "charging" 2 "discharging" ;
"""


@pytest.fixture
def big_endian_dbc(tmp_path) -> Path:
    path = tmp_path / "big.dbc"
    path.write_text(BIG_ENDIAN_DBC, encoding="ascii")
    return path


def test_dbc_big_endian_signed(big_endian_dbc):
    # Current bytes FF FE, big-endian signed at 0.1 A -> -0.2 A.
    mapped = DbcDecoder(big_endian_dbc, {"Current": "pack_current_a"})
    assert mapped.decode(0x500, b"\xff\xfe\x00\x00").signals == {"pack_current_a": -0.2}


def test_dbc_choice_names(big_endian_dbc):
    signals = DbcDecoder(big_endian_dbc).decode(0x500, b"\x00\x0a\x02\x00").signals
    assert signals["Mode"] == "discharging"
    assert signals["Current"] == 1.0


def test_dbc_unknown_signal(big_endian_dbc):
    with pytest.raises(DbcError, match="signal 'Voltage' is not in the DBC") as info:
        DbcDecoder(big_endian_dbc, {"Voltage": "pack_voltage_v"})
    assert "Signals in the DBC: Current, Mode" in str(info.value)


def test_dbc_unknown_point(big_endian_dbc):
    with pytest.raises(DbcError, match="'pack_amps', which is not a numeric or flag BMS point"):
        DbcDecoder(big_endian_dbc, {"Current": "pack_amps"})


def test_dbc_missing_file(tmp_path):
    with pytest.raises(DbcError, match="not found"):
        DbcDecoder(tmp_path / "none.dbc")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("garbage (((\n", "Invalid syntax at line 1"),
        (
            'BO_ 12 X: 8 Y\n SG_ A : 0|16@1+ (1,0) [0|1] "" Y\n SG_ B : 8|16@1+ (1,0) [0|1] "" Y\n',
            "overlapping",
        ),
    ],
)
def test_dbc_invalid_file(tmp_path, text, reason):
    path = tmp_path / "bad.dbc"
    path.write_text(text, encoding="ascii")
    with pytest.raises(DbcError, match="not a valid DBC") as info:
        DbcDecoder(path)
    assert reason in str(info.value)


@given(
    frame_id=st.sampled_from(sorted(FRAMES)),
    data=st.binary(min_size=0, max_size=64),
)
def test_dbc_decode_any_bytes(dbc_decoder, frame_id, data):
    decoded = dbc_decoder.decode(frame_id, data)
    assert set(decoded.signals) | set(decoded.missing) == set(dbc_decoder.points_by_frame[frame_id])


@given(
    frame_id=st.sampled_from(sorted(FRAMES)),
    data=st.binary(min_size=8, max_size=8),
)
def test_dbc_agrees_on_any_bytes(dbc_decoder, frame_id, data):
    builtin = decode_frame(frame_id, data)
    dbc = dbc_decoder.decode(frame_id, data)
    assert_same_values(builtin.signals, dbc.signals)
