"""Built-in Pylontech decoder: field cases, short frames and property tests."""

from __future__ import annotations

import struct

import pytest
from can_support import FIELD_CASES, frame_bytes
from hypothesis import given
from hypothesis import strategies as st

from drivers.can.pylontech import FRAMES, Field, decode_frame, encode_frame


def decode_hex(frame_id: int, data_hex: str, is_extended: bool | None = None):
    decoded = decode_frame(frame_id, frame_bytes(data_hex), is_extended)
    assert decoded is not None
    return decoded


# -- the frame set ----------------------------------------------------------------


def test_limits_frame():
    decoded = decode_hex(0x351, "14 02 74 0E 74 0E CC 01")
    # 0x0214 = 532 -> 53.2 V; 0x0E74 = 3700 -> 370.0 A; 0x01CC = 460 -> 46.0 V.
    assert decoded.signals == {
        "charge_voltage_limit_v": 53.2,
        "charge_current_limit_a": 370.0,
        "discharge_current_limit_a": 370.0,
        "discharge_voltage_limit_v": 46.0,
    }
    assert decoded.missing == ()


def test_soc_soh_frame():
    decoded = decode_hex(0x355, "1A 00 64 00")
    assert decoded.signals == {"soc_pct": 26, "soh_pct": 100}


def test_pack_frame():
    decoded = decode_hex(0x356, "02 13 00 00 4A 01")
    # 0x1302 = 4866 -> 48.66 V; 0x014A = 330 -> 33.0 degC.
    assert decoded.signals == {
        "pack_voltage_v": 48.66,
        "pack_current_a": 0.0,
        "pack_temperature_c": 33.0,
    }


def test_status_frame_clear():
    decoded = decode_hex(0x359, "00 00 00 00 0A 50 4E")
    assert decoded.signals["module_count"] == 10
    flags = {k: v for k, v in decoded.signals.items() if k != "module_count"}
    assert len(flags) == 14
    assert not any(flags.values())


def test_status_frame_alarms():
    decoded = decode_hex(0x359, "82 00 00 01 01 50 4E")
    active = sorted(k for k, v in decoded.signals.items() if v is True)
    assert active == [
        "protection_cell_over_voltage",
        "protection_discharge_over_current",
        "warning_charge_high_current",
    ]
    assert decoded.signals["module_count"] == 1


def test_requests_frame():
    decoded = decode_hex(0x35C, "C0 00")
    assert decoded.signals["charge_enable"] is True
    assert decoded.signals["discharge_enable"] is True
    assert decoded.signals["force_charge_request_1"] is False
    assert decoded.signals["force_charge_request_2"] is False
    assert decoded.signals["full_charge_request"] is False


def test_name_frame_full():
    assert decode_hex(0x35E, "50 59 4C 4F 4E 20 20 20").signals == {"manufacturer_name": "PYLON"}


def test_name_frame_dlc5():
    decoded = decode_hex(0x35E, "50 59 54 45 53")
    assert decoded.signals == {"manufacturer_name": "PYTES"}
    assert decoded.missing == ()


# -- signed current and temperature ------------------------------------------------


def test_pack_current_negative_word():
    # Current word 16 FE = 0xFE16 = -490 -> -49.0 A, not 6502.2 A.
    assert decode_hex(0x356, "02 13 16 FE 4A 01").signals["pack_current_a"] == -49.0


def test_pack_discharging_frame():
    signals = decode_hex(0x356, "0A 02 11 FF BE 00 00 00").signals
    assert signals["pack_current_a"] == -23.9
    assert signals["pack_temperature_c"] == 19.0


def test_pack_temperature_below_zero():
    # 38 FF = 0xFF38 = -200 -> -20.0 degC.
    assert decode_hex(0x356, "02 13 00 00 38 FF").signals["pack_temperature_c"] == -20.0


def test_big_endian_signed_field():
    field = Field("pack_current_a", 0, 2, signed=True, divisor=10, byte_order="big")
    assert field.converter()(int.from_bytes(b"\xff\xfe", "big", signed=True)) == -0.2
    encoded = encode_field(field, -0.2)
    assert encoded == b"\xff\xfe"


def encode_field(field: Field, value: float) -> bytes:
    return struct.pack(field.struct_format(), field.raw_from_value(value))


# -- limits with either sign or an offset ------------------------------------------


def test_limits_negative_discharge():
    signals = decode_hex(0x351, "45 02 AC 03 54 FC C0 01").signals
    assert signals["charge_voltage_limit_v"] == 58.1
    assert signals["charge_current_limit_a"] == 94.0
    # The decoder keeps the sign; BmsString turns it into a magnitude.
    assert signals["discharge_current_limit_a"] == -94.0
    assert signals["discharge_voltage_limit_v"] == 44.8


def test_limits_positive_discharge():
    signals = decode_hex(0x351, "45 02 AC 03 AC 03 C0 01").signals
    assert signals["discharge_current_limit_a"] == 94.0


def test_limits_small_values():
    signals = decode_hex(0x351, "44 02 64 00 9C FF 3F 02").signals
    assert signals["charge_current_limit_a"] == 10.0
    assert signals["discharge_current_limit_a"] == -10.0


def test_hv_limits_offset():
    decoded = decode_hex(0x4220, "A4 10 20 0D 2A 76 36 74", is_extended=True)
    # 0x10A4 = 4260 -> 426.0 V; 0x0D20 = 3360 -> 336.0 V;
    # 0x762A = 30250 -> (30250 - 30000) / 10 = 25.0 A; 0x7436 = 29750 -> -25.0 A.
    assert decoded.signals == {
        "charge_voltage_limit_v": 426.0,
        "discharge_voltage_limit_v": 336.0,
        "charge_current_limit_a": 25.0,
        "discharge_current_limit_a": -25.0,
    }


# -- frame handling --------------------------------------------------------------


def test_short_limits_frame():
    decoded = decode_hex(0x351, "14 02 74")
    assert decoded.signals == {"charge_voltage_limit_v": 53.2}
    assert decoded.missing == (
        "charge_current_limit_a",
        "discharge_current_limit_a",
        "discharge_voltage_limit_v",
    )


def test_status_frame_dlc2():
    decoded = decode_hex(0x359, "82 01")
    assert decoded.signals["protection_charge_over_current"] is True
    assert "warning_charge_high_current" in decoded.missing
    assert "module_count" in decoded.missing


def test_empty_name_frame():
    decoded = decode_hex(0x35E, "")
    assert decoded.signals == {}
    assert decoded.missing == ("manufacturer_name",)


def test_unknown_frame_id():
    assert decode_frame(0x123, b"\x00" * 8) is None


def test_id_type_mismatch():
    assert decode_frame(0x351, frame_bytes("1402740E740ECC01"), is_extended=True) is None
    assert decode_frame(0x4220, frame_bytes("A410200D2A763674"), is_extended=False) is None


def test_cell_extremes_frame():
    # 3300 mV, 3344 mV, 298 K, 304 K.
    signals = decode_hex(0x373, "E4 0C 10 0D 2A 01 30 01").signals
    assert signals == {
        "cell_voltage_min_v": 3.3,
        "cell_voltage_max_v": 3.344,
        "cell_temperature_min_c": 24.85,
        "cell_temperature_max_c": 30.85,
    }


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_field_frames_truncated(case):
    """Each prefix of a field-case frame decodes the fields inside it to their full values."""
    frame_id, is_extended, data_hex = FIELD_CASES[case]
    full = decode_hex(frame_id, data_hex, is_extended)
    data = frame_bytes(data_hex)
    for dlc in range(len(data) + 1):
        part = decode_frame(frame_id, data[:dlc], is_extended)
        assert set(part.signals) | set(part.missing) == set(FRAMES[frame_id].points)
        assert set(part.signals).isdisjoint(part.missing)
        for name, value in part.signals.items():
            if name != "manufacturer_name":
                assert value == full.signals[name], (case, dlc, name)


def test_encode_out_of_range():
    with pytest.raises(ValueError, match="charge_current_limit_a = 4000"):
        encode_frame(
            0x351,
            {
                "charge_voltage_limit_v": 53.2,
                "charge_current_limit_a": 4000.0,
                "discharge_current_limit_a": 0.0,
                "discharge_voltage_limit_v": 46.0,
            },
        )


# -- properties ------------------------------------------------------------------


@given(
    frame_id=st.sampled_from(sorted(FRAMES)),
    data=st.binary(min_size=0, max_size=64),
)
def test_decode_any_bytes(frame_id, data):
    decoded = decode_frame(frame_id, data)
    assert decoded is not None
    assert set(decoded.signals) | set(decoded.missing) == set(FRAMES[frame_id].points)


@given(
    frame_id=st.sampled_from(sorted(FRAMES)),
    data=st.binary(min_size=0, max_size=8),
)
def test_decode_never_reads_past_dlc(frame_id, data):
    """Bytes after the DLC never change a value: padding with 0x00 or 0xFF decodes the same.

    A text point grows with the padding, so only its start must match.
    """
    short = decode_frame(frame_id, data)
    for pad in (b"\x00", b"\xff"):
        padded = decode_frame(frame_id, data + pad * (8 - len(data)))
        for name, value in short.signals.items():
            if name == "manufacturer_name":
                assert padded.signals[name].startswith(value)
            else:
                assert padded.signals[name] == value


SIGNED_FIELDS = [
    (frame_id, field) for frame_id, spec in FRAMES.items() for field in spec.fields if field.signed
]


@given(
    case=st.sampled_from(SIGNED_FIELDS),
    raw=st.integers(min_value=-32768, max_value=32767),
)
def test_signed_round_trip(case, raw):
    frame_id, field = case
    value = field.converter()(raw)
    spec = FRAMES[frame_id]
    values = {f.name: 0 for f in spec.fields} | {field.name: value}
    data = encode_frame(frame_id, values)
    assert decode_frame(frame_id, data).signals[field.name] == value
    assert int.from_bytes(data[field.start : field.end], "little", signed=True) == raw


@given(raw=st.integers(min_value=-32768, max_value=32767), order=st.sampled_from(["little", "big"]))
def test_signed_field_both_orders(raw, order):
    field = Field("pack_current_a", 0, 2, signed=True, divisor=10, byte_order=order)
    value = field.converter()(raw)
    assert value < 0 if raw < 0 else value >= 0
    assert field.raw_from_value(value) == raw
    assert encode_field(field, value) == raw.to_bytes(2, order, signed=True)
