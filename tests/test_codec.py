"""Register codec: word and byte orders, sentinels, round trips and bad input."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus import codec


def f32(value: float) -> float:
    """Round ``value`` to the nearest float32, the value a device stores."""
    return struct.unpack(">f", struct.pack(">f", value))[0]


# FC-01: one float32 in every order, with the registers as they arrive on the wire.
FLOAT_ORDERS = [
    ("ABCD", [0x3F80, 0x0000], 1.0),
    ("BADC", [0x8EBF, 0x7B14], f32(-1.11)),
    ("CDAB", [0x0000, 0x3F80], 1.0),
]


@pytest.mark.parametrize(("order", "registers", "expected"), FLOAT_ORDERS)
def test_f32_each_order(order, registers, expected):
    assert codec.decode(registers, "f32", order) == expected


def test_f32_dcba_little_endian():
    value = codec.decode([0xDA77, 0xFB41], "f32", "DCBA")
    assert round(value, 4) == 31.4335
    assert value == f32(31.433521)


@pytest.mark.parametrize(("order", "registers", "expected"), FLOAT_ORDERS)
def test_f32_encode_each_order(order, registers, expected):
    assert codec.encode(expected, "f32", order) == registers


def test_same_bytes_differ_by_order():
    # One device can mix orders, so the order belongs to the point.
    registers = [0x3F80, 0x0000]
    assert codec.decode(registers, "f32", "ABCD") == 1.0
    assert codec.decode(registers, "f32", "CDAB") != 1.0


def test_u64_cdab_reverses_all_words():
    value = 0x1122_3344_5566_7788
    assert codec.encode(value, "u64", "ABCD") == [0x1122, 0x3344, 0x5566, 0x7788]
    assert codec.encode(value, "u64", "CDAB") == [0x7788, 0x5566, 0x3344, 0x1122]
    assert codec.encode(value, "u64", "BADC") == [0x2211, 0x4433, 0x6655, 0x8877]
    assert codec.encode(value, "u64", "DCBA") == [0x8877, 0x6655, 0x4433, 0x2211]


def test_u16_order_swaps_bytes_only():
    assert codec.decode([0x1234], "u16", "ABCD") == 0x1234
    assert codec.decode([0x1234], "u16", "CDAB") == 0x1234
    assert codec.decode([0x1234], "u16", "BADC") == 0x3412
    assert codec.decode([0x1234], "u16", "DCBA") == 0x3412


# FC-02: several values in one read; words swap inside each value only.
def test_decode_many_cdab_block():
    block = [0x0000, 0x3F80, 0x0000, 0x4000, 0x0000, 0x4040]
    assert codec.decode_many(block, "f32", "CDAB") == [1.0, 2.0, 3.0]


def test_encode_many_cdab_block():
    block = codec.encode_many([1.0, 2.0, 3.0], "f32", "CDAB")
    assert block == [0x0000, 0x3F80, 0x0000, 0x4000, 0x0000, 0x4040]


def test_decode_many_rejects_partial_value():
    with pytest.raises(ValueError, match="3 registers do not split into whole 'f32'"):
        codec.decode_many([0, 0x3F80, 0], "f32", "CDAB")


# FC-03, decode part: the BMS current is signed.
def test_i16_negative_current():
    assert codec.decode([0xFD44], "i16") == -700
    assert codec.decode([0xFD44], "u16") == 64836
    assert codec.decode([0x1457], "i16") == 5207


# FC-04: sentinels mean "no value".
SENTINEL_CASES = [
    ("i16", [0x8000]),
    ("u16", [0xFFFF]),
    ("i32", [0x8000, 0x0000]),
    ("u32", [0xFFFF, 0xFFFF]),
    ("u64", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    ("i64", [0x8000, 0x0000, 0x0000, 0x0000]),
    ("f32", [0x7FC0, 0x0000]),
    ("f32", [0x7FBF, 0xFF80]),
    ("f32", [0xFFC0, 0x0001]),
    ("f64", [0x7FF8, 0x0000, 0x0000, 0x0000]),
    ("str", [0x0000, 0x0000]),
]


@pytest.mark.parametrize(("type_", "registers"), SENTINEL_CASES)
def test_sentinel_detected(type_, registers):
    assert codec.is_sentinel(registers, type_)


NEAR_SENTINEL_CASES = [
    ("i16", [0x8001]),
    ("u16", [0xFFFE]),
    ("i32", [0x8000, 0x0001]),
    ("u32", [0xFFFF, 0xFFFE]),
    ("u64", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
    ("f32", [0x7F80, 0x0000]),  # +infinity is not NaN
    ("u16", [0x0000]),  # 0 is a value unless the point is an accumulator
]


@pytest.mark.parametrize(("type_", "registers"), NEAR_SENTINEL_CASES)
def test_near_sentinel_is_value(type_, registers):
    assert not codec.is_sentinel(registers, type_)


def test_i32_sentinel_in_cdab():
    assert codec.is_sentinel([0x0000, 0x8000], "i32", "CDAB")
    assert not codec.is_sentinel([0x0000, 0x8000], "i32", "ABCD")


def test_accumulator_zero_sentinel():
    assert codec.is_sentinel([0, 0], "u32", accumulator=True)
    assert codec.is_sentinel([0], "u16", accumulator=True)
    assert not codec.is_sentinel([0, 1], "u32", accumulator=True)
    assert not codec.is_sentinel([0, 0], "u32", accumulator=False)


def test_string_padding_removed():
    registers = [0x5059, 0x4C4F, 0x4E20, 0x2020]  # "PYLON   "
    assert codec.decode(registers, "str") == "PYLON"
    assert codec.decode([0x4142, 0x4300, 0x5858], "str") == "ABC"  # text ends at NUL


def test_string_byte_swapped():
    assert codec.decode([0x5950, 0x4F4C, 0x004E], "str", "BADC") == "PYLON"


def test_string_encode_pads_with_nul():
    assert codec.encode("SunS", "str", length=3) == [0x5375, 0x6E53, 0x0000]


def test_string_utf8_round_trip():
    text = "Wh°C"
    assert codec.decode(codec.encode(text, "str", length=4), "str") == text


# -- Hypothesis round trips over every type and order ---------------------

INTEGER_LIMITS = {
    "u16": (0, 0xFFFF),
    "i16": (-0x8000, 0x7FFF),
    "u32": (0, 0xFFFF_FFFF),
    "i32": (-0x8000_0000, 0x7FFF_FFFF),
    "u64": (0, 2**64 - 1),
    "i64": (-(2**63), 2**63 - 1),
}
orders = st.sampled_from(codec.ORDERS)


@st.composite
def typed_values(draw):
    type_ = draw(st.sampled_from(sorted(codec.TYPE_REGISTERS)))
    if type_ in INTEGER_LIMITS:
        low, high = INTEGER_LIMITS[type_]
        return type_, draw(st.integers(low, high))
    if type_ == "f32":
        return type_, draw(st.floats(width=32, allow_nan=False))
    return type_, draw(st.floats(allow_nan=False))


@given(typed_values(), orders)
def test_round_trip_every_type(typed, order):
    type_, value = typed
    registers = codec.encode(value, type_, order)
    assert len(registers) == codec.register_count(type_)
    assert all(0 <= word <= 0xFFFF for word in registers)
    assert codec.decode(registers, type_, order) == value


@given(st.lists(typed_values(), min_size=1, max_size=5), orders)
def test_round_trip_many(typed_list, order):
    type_ = typed_list[0][0]
    values = [value for t, value in typed_list if t == type_]
    block = codec.encode_many(values, type_, order)
    assert codec.decode_many(block, type_, order) == values
    # Each value's registers are those of encoding it alone: the list is never reversed.
    size = codec.register_count(type_)
    for index, value in enumerate(values):
        assert block[index * size : (index + 1) * size] == codec.encode(value, type_, order)


@given(st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2), orders)
def test_f32_registers_round_trip(registers, order):
    value = codec.decode(registers, "f32", order)
    if math.isnan(value):
        assert codec.is_sentinel(registers, "f32", order)
    else:
        assert codec.encode(value, "f32", order) == registers


@given(st.text(st.characters(min_codepoint=1, max_codepoint=0x7F), max_size=16), orders)
def test_string_round_trip(text, order):
    text = text.rstrip(" ")
    registers = codec.encode(text, "str", order, length=8)
    assert codec.decode(registers, "str", order) == text


# -- bad input ----------------------------------------------------------------


def test_unknown_type_rejected():
    with pytest.raises(ValueError, match=r"unknown point type 'float'.*u16"):
        codec.decode([0, 0], "float")


def test_unknown_order_rejected():
    with pytest.raises(ValueError, match=r"unknown word/byte order 'BACD'.*ABCD"):
        codec.decode([0, 0], "f32", "BACD")


def test_wrong_register_count_rejected():
    with pytest.raises(ValueError, match=r"type 'u32' needs 2 register\(s\), got 3"):
        codec.decode([0, 0, 0], "u32")


def test_word_out_of_range_rejected():
    with pytest.raises(ValueError, match="register value 65536 is not a 16-bit word"):
        codec.decode([65536], "u16")
    with pytest.raises(ValueError, match="register value -1 is not a 16-bit word"):
        codec.decode([-1], "i16")


def test_integer_out_of_range_rejected():
    with pytest.raises(ValueError, match=r"value 65536 is outside the u16 range 0..65535"):
        codec.encode(65536, "u16")
    with pytest.raises(ValueError, match=r"value -32769 is outside the i16 range"):
        codec.encode(-32769, "i16")


def test_non_integer_rejected():
    with pytest.raises(ValueError, match=r"type 'u16' takes an integer, got 1.5"):
        codec.encode(1.5, "u16")
    with pytest.raises(ValueError, match=r"type 'i32' takes an integer, got True"):
        codec.encode(True, "i32")
    with pytest.raises(ValueError, match=r"type 'f32' takes a number, got '1.0'"):
        codec.encode("1.0", "f32")


def test_f32_overflow_rejected():
    with pytest.raises(ValueError, match="too large for f32"):
        codec.encode(1e39, "f32")


def test_string_too_long_rejected():
    with pytest.raises(ValueError, match=r"text 'ABCDE' is 5 bytes, but 2 register\(s\) hold"):
        codec.encode("ABCDE", "str", length=2)


def test_register_count_rules():
    assert codec.register_count("f64") == 4
    assert codec.register_count("str", 8) == 8
    with pytest.raises(ValueError, match="type 'str' needs a length"):
        codec.register_count("str")
    with pytest.raises(
        ValueError, match=r"type 'u32' uses 2 register\(s\), but the length given is 1"
    ):
        codec.register_count("u32", 1)
    with pytest.raises(ValueError, match="string length must be >= 1"):
        codec.register_count("str", 0)
