"""The poller's precompiled block decoder must give exactly what planner.decode_block gives."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus import codec
from drivers.modbus.block_decoder import BlockDecoder
from drivers.modbus.planner import decode_block, plan_reads
from drivers.modbus.profile import parse_profile


def every_type_and_order_profile():
    """One point per numeric type and order, strings, scales, a scale factor, an accumulator."""
    points = []
    address = 0
    for type_ in codec.TYPE_REGISTERS:
        for order in codec.ORDERS:
            name = f"{type_}_{order.lower()}"
            points.append(
                {"name": name, "address": address, "function": "input", "type": type_}
                | {"order": order}
            )
            address += codec.TYPE_REGISTERS[type_]
    points += [
        {"name": "text_abcd", "address": address, "function": "input", "type": "str"}
        | {"length": 3},
        {"name": "text_badc", "address": address + 3, "function": "input", "type": "str"}
        | {"length": 3, "order": "BADC"},
        {"name": "scaled", "address": address + 6, "function": "input", "type": "i16"}
        | {"scale": 0.01, "offset": -5.0, "min": -100.0, "max": 100.0},
        {"name": "dc_w", "address": address + 7, "function": "input", "type": "u16"}
        | {"scale_factor": "dc_w_sf"},
        {"name": "dc_w_sf", "address": address + 8, "function": "input", "type": "i16"},
        {"name": "yield_wh", "address": address + 9, "function": "input", "type": "u32"}
        | {"accumulator": True, "order": "CDAB"},
    ]
    return parse_profile({"profile": {"name": "all-types", "max_gap_regs": 0}, "points": points})


PROFILE = every_type_and_order_profile()
BLOCKS = plan_reads(PROFILE.points, 0, 125)
SENTINEL_WORDS = [0x0000, 0x8000, 0xFFFF, 0x7FC0, 0x7FBF, 0xFF80, 0x3F80, 0xFFFE]


def test_profile_fits_one_block():
    assert len(BLOCKS) == 1
    assert len(BLOCKS[0].points) == len(PROFILE.points)


@given(st.data())
def test_same_readings_as_decode_block(data):
    block = BLOCKS[0]
    word = st.one_of(st.integers(0, 0xFFFF), st.sampled_from(SENTINEL_WORDS))
    registers = data.draw(st.lists(word, min_size=block.count, max_size=block.count))
    assert BlockDecoder(block).decode(registers, 12.5) == decode_block(block, registers, 12.5)


def test_scale_factor_from_same_read():
    block = BLOCKS[0]
    decoder = BlockDecoder(block)
    offset = PROFILE.point("dc_w").address - block.address
    registers = [0] * block.count
    registers[offset : offset + 2] = [0xE678, 0xFFFE]
    assert decoder.decode(registers, 1.0)["dc_w"].value == 590.0
    registers[offset : offset + 2] = [0x17EB, 0xFFFF]
    assert decoder.decode(registers, 1.0)["dc_w"].value == 612.3


def test_rejects_wrong_length():
    decoder = BlockDecoder(BLOCKS[0])
    with pytest.raises(ValueError, match="data bytes"):
        decoder.decode_bytes(b"\x00\x01", 1.0)
    with pytest.raises(ValueError, match="registers"):
        decoder.decode([0], 1.0)
