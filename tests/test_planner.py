"""Block planner and block decoding: fewest reads, scale factors, sentinels, ranges."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.client import AsyncModbusTcpClient

from drivers.modbus.planner import decode_block, plan_reads
from drivers.modbus.profile import Point, load_profile, parse_profile
from drivers.modbus.server import RegisterServer
from drivers.quality import Quality

T = 12.5  # monotonic time stamp given to decode_block


def point(name, address, type_="u16", function="holding", **extra):
    count = {"u16": 1, "i16": 1, "u32": 2, "i32": 2, "f32": 2, "u64": 4}[type_]
    return Point(
        name=name,
        address=address,
        function=function,
        type=type_,
        order="ABCD",
        count=count,
        **extra,
    )


def spans(blocks):
    return [(b.function, b.address, b.count) for b in blocks]


# -- planning -----------------------------------------------------------------


def test_plan_merges_within_gap():
    points = [point("a", 0), point("b", 3, "u32"), point("c", 10)]
    # Gaps: 1..2 (2 registers) and 5..9 (5 registers).
    assert spans(plan_reads(points, max_gap_regs=5)) == [("holding", 0, 11)]
    assert spans(plan_reads(points, max_gap_regs=4)) == [("holding", 0, 5), ("holding", 10, 1)]
    assert spans(plan_reads(points, max_gap_regs=1)) == [
        ("holding", 0, 1),
        ("holding", 3, 2),
        ("holding", 10, 1),
    ]


def test_plan_splits_at_block_limit():
    points = [point(f"p{i}", i * 2, "u32") for i in range(100)]  # 200 contiguous registers
    blocks = plan_reads(points, max_gap_regs=0, max_block_regs=125)
    assert spans(blocks) == [("holding", 0, 124), ("holding", 124, 76)]
    # A u32 is never cut in two: 125 would split point p62.
    assert all(b.count % 2 == 0 for b in blocks)


def test_plan_separates_functions():
    points = [point("h", 5), point("i", 5, function="input"), point("h2", 6)]
    blocks = plan_reads(points, max_gap_regs=10)
    assert spans(blocks) == [("holding", 5, 2), ("input", 5, 1)]
    assert blocks[0].function_code == 3
    assert blocks[1].function_code == 4


def test_plan_fewest_reads_unsorted_input():
    points = [point("c", 200), point("a", 0), point("b", 120), point("d", 124)]
    blocks = plan_reads(points, max_gap_regs=200, max_block_regs=125)
    # 0..124 and 200: two reads, the fewest for a 201-register span.
    assert spans(blocks) == [("holding", 0, 125), ("holding", 200, 1)]
    assert [p.name for p in blocks[0].points] == ["a", "b", "d"]


def test_plan_rejects_bad_limits():
    with pytest.raises(ValueError, match="max_block_regs 126 is invalid"):
        plan_reads([point("a", 0)], max_gap_regs=0, max_block_regs=126)
    with pytest.raises(ValueError, match="max_gap_regs -1 is invalid"):
        plan_reads([point("a", 0)], max_gap_regs=-1)


# FC-05: a value and its scale factor always share a request.
def test_scale_factor_joins_across_gap():
    points = [
        point("W", 100, "i16", scale_factor="W_SF"),
        point("VA", 101),
        point("W_SF", 140, "i16"),
    ]
    blocks = plan_reads(points, max_gap_regs=10)
    assert spans(blocks) == [("holding", 100, 41)]


def test_scale_factor_shared_by_far_values():
    points = [
        point("DCW", 10, scale_factor="SF"),
        point("SF", 60, "i16"),
        point("ACW", 110, scale_factor="SF"),
        point("other", 30),
    ]
    blocks = plan_reads(points, max_gap_regs=0)
    block_of = {p.name: b.address for b in blocks for p in b.points}
    assert block_of["DCW"] == block_of["SF"] == block_of["ACW"]
    assert spans(blocks)[0] == ("holding", 10, 101)


def test_scale_factor_too_far_rejected():
    points = [point("W", 0, scale_factor="W_SF"), point("W_SF", 200, "i16")]
    with pytest.raises(ValueError, match="span 201 registers, more than max_block_regs = 125"):
        plan_reads(points, max_gap_regs=0)


def test_scale_factor_not_planned_rejected():
    with pytest.raises(ValueError, match="scaled by 'W_SF', which is not among the points"):
        plan_reads([point("W", 0, scale_factor="W_SF")], max_gap_regs=0)


@pytest.mark.parametrize("name", ["pcs-sunspec", "meter-3ph", "pdu-rack", "generic-example"])
def test_builtin_profile_plan(name):
    profile = load_profile(name)
    blocks = plan_reads(profile.points, profile.max_gap_regs, profile.max_block_regs)
    block_of = {p.name: id(b) for b in blocks for p in b.points}
    assert sorted(block_of) == sorted(p.name for p in profile.points)
    for p in profile.points:
        if p.scale_factor:
            assert block_of[p.name] == block_of[p.scale_factor], p.name
    assert all(b.count <= profile.max_block_regs for b in blocks)


@st.composite
def layouts(draw):
    addresses = draw(st.lists(st.integers(0, 600), min_size=1, max_size=40, unique=True))
    types = draw(
        st.lists(
            st.sampled_from(["u16", "u32", "u64"]), min_size=len(addresses), max_size=len(addresses)
        )
    )
    points, end = [], -1
    for index, (address, type_) in enumerate(sorted(zip(addresses, types, strict=True))):
        if address > end:
            p = point(f"p{index}", address, type_)
            points.append(p)
            end = p.end - 1
    return points


@settings(max_examples=200, deadline=None)
@given(layouts(), st.integers(0, 30), st.integers(4, 125))
def test_plan_invariants(points, max_gap, max_block):
    blocks = plan_reads(points, max_gap, max_block)
    planned = [p.name for b in blocks for p in b.points]
    assert sorted(planned) == sorted(p.name for p in points)
    for block in blocks:
        assert 1 <= block.count <= max_block
        assert block.address == block.points[0].address
        assert block.address + block.count == max(p.end for p in block.points)
        ends = [block.address]
        for p in block.points:
            assert p.address - max(ends) <= max_gap
            ends.append(p.end)
    # Greedy merging leaves no two neighbouring blocks that fit in one read.
    for before, after in itertools.pairwise(blocks):
        gap = after.address - (before.address + before.count)
        merged = after.address + after.count - before.address
        assert gap > max_gap or merged > max_block


# -- decoding -----------------------------------------------------------------


def _sunspec_dc_block():
    profile = parse_profile(
        {
            "profile": {"name": "inverter"},
            "points": [
                {"name": "DCW", "address": 0, "type": "u16", "scale_factor": "DCW_SF", "unit": "W"},
                {"name": "DCW_SF", "address": 1, "type": "i16"},
            ],
        }
    )
    (block,) = plan_reads(profile.points, profile.max_gap_regs)
    return block


def test_scale_factor_read_each_poll():
    block = _sunspec_dc_block()
    poll_1 = decode_block(block, [0xE678, 0xFFFE], T)
    poll_2 = decode_block(block, [0x17EB, 0xFFFF], T)
    assert poll_1["DCW"].value == 590.0
    assert poll_2["DCW"].value == 612.3
    assert poll_1["DCW_SF"].value == -2
    assert poll_2["DCW"].unit == "W"
    assert poll_2["DCW"].t_mono_s == T


def test_scale_factor_sentinel_voids_values():
    profile = parse_profile(
        {
            "profile": {"name": "inverter", "max_gap_regs": 4},
            "points": [
                {"name": "A", "address": 0, "type": "u16", "scale_factor": "A_SF"},
                {"name": "AphA", "address": 1, "type": "u16", "scale_factor": "A_SF"},
                {"name": "A_SF", "address": 2, "type": "i16"},
                {"name": "Hz", "address": 3, "type": "u16", "scale": 0.01},
            ],
        }
    )
    (block,) = plan_reads(profile.points, profile.max_gap_regs)
    readings = decode_block(block, [120, 40, 0x8000, 5000], T)
    assert readings["A"].quality is Quality.NOT_IMPLEMENTED
    assert readings["A"].value is None
    assert readings["AphA"].quality is Quality.NOT_IMPLEMENTED
    assert readings["A_SF"].quality is Quality.NOT_IMPLEMENTED
    assert readings["Hz"].value == 50.0


def test_scale_factor_out_of_range():
    block = _sunspec_dc_block()
    readings = decode_block(block, [100, 0x7FFF], T)  # SF 32767 would overflow a float
    assert readings["DCW"].quality is Quality.OUT_OF_RANGE
    assert readings["DCW"].value is None


def test_bms_registers_scaled():
    profile = parse_profile(
        {
            "profile": {"name": "bms"},
            "points": [
                {
                    "name": "v_v",
                    "address": 0x1000,
                    "function": "input",
                    "type": "u16",
                    "scale": 0.01,
                },
                {
                    "name": "i_a",
                    "address": 0x1001,
                    "function": "input",
                    "type": "i16",
                    "scale": 0.01,
                },
                {
                    "name": "soc_pct",
                    "address": 0x1008,
                    "function": "input",
                    "type": "u16",
                    "scale": 0.1,
                },
            ],
        }
    )
    (block,) = plan_reads(profile.points, max_gap_regs=10)
    registers = [0x1457, 0xFD44, 0x1ACD, 0x00C5, 0x00D2, 0, 0, 0x1E00, 0x028C]
    readings = decode_block(block, registers, T)
    assert readings["v_v"].value == 52.07
    assert readings["i_a"].value == -7.0
    assert readings["soc_pct"].value == 65.2


def test_reboot_sentinels_then_recovery():
    profile = parse_profile(
        {
            "profile": {"name": "inverter"},
            "points": [
                {"name": "p_kw", "address": 0, "type": "i32", "scale": 0.001},
                {"name": "e_total_kwh", "address": 2, "type": "u64", "scale": 0.001},
            ],
        }
    )
    (block,) = plan_reads(profile.points, 0)
    before = decode_block(block, [0, 12_000, 0, 0, 0x0001, 0x86A0], T)
    rebooting = decode_block(block, [0x8000, 0, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], T + 1)
    after = decode_block(block, [0, 11_500, 0, 0, 0x0001, 0x86A1], T + 2)
    assert before["p_kw"].value == 12.0
    assert before["e_total_kwh"].value == 100.0
    assert rebooting["p_kw"].quality is Quality.NOT_IMPLEMENTED
    assert rebooting["p_kw"].value is None
    assert rebooting["e_total_kwh"].quality is Quality.NOT_IMPLEMENTED
    assert rebooting["e_total_kwh"].value is None
    assert after["e_total_kwh"].value == 100.001


def test_float_nan_not_implemented():
    profile = parse_profile(
        {
            "profile": {"name": "meter"},
            "points": [{"name": "p_kw", "address": 0, "type": "f32", "scale": 0.001}],
        }
    )
    (block,) = plan_reads(profile.points, 0)
    assert decode_block(block, [0x7FBF, 0xFF80], T)["p_kw"].quality is Quality.NOT_IMPLEMENTED
    assert decode_block(block, [0x7FC0, 0x0000], T)["p_kw"].quality is Quality.NOT_IMPLEMENTED
    assert decode_block(block, [0x7F80, 0x0000], T)["p_kw"].quality is Quality.NOT_IMPLEMENTED


def test_accumulator_zero_not_implemented():
    profile = parse_profile(
        {
            "profile": {"name": "inverter"},
            "points": [{"name": "WH", "address": 0, "type": "u32", "accumulator": True}],
        }
    )
    (block,) = plan_reads(profile.points, 0)
    assert decode_block(block, [0, 0], T)["WH"].quality is Quality.NOT_IMPLEMENTED
    assert decode_block(block, [0, 7], T)["WH"].value == 7


def test_range_offset_and_raw_int():
    profile = parse_profile(
        {
            "profile": {"name": "sensor", "max_gap_regs": 4},
            "points": [
                {
                    "name": "t_c",
                    "address": 0,
                    "type": "u16",
                    "scale": 0.1,
                    "offset": -40.0,
                    "min": -30.0,
                    "max": 80.0,
                },
                {"name": "status", "address": 1, "type": "u16"},
            ],
        }
    )
    (block,) = plan_reads(profile.points, profile.max_gap_regs)
    ok = decode_block(block, [650, 3], T)
    too_cold = decode_block(block, [50, 3], T)  # 5.0 - 40.0 = -35.0 < -30.0
    assert ok["t_c"].value == 25.0
    assert ok["status"].value == 3
    assert isinstance(ok["status"].value, int)
    assert too_cold["t_c"].quality is Quality.OUT_OF_RANGE
    assert too_cold["t_c"].value is None


def test_decode_wrong_length_rejected():
    block = _sunspec_dc_block()
    with pytest.raises(ValueError, match=r"read of holding 0..1 expected 2 registers, got 1"):
        decode_block(block, [1], T)


# -- on the wire ---------------------------------------------------------------


async def test_scale_factor_one_request_on_wire():
    """Value and factor change together between polls; each poll pairs them right."""
    profile = parse_profile(
        {
            "profile": {"name": "inverter", "max_gap_regs": 0},
            "points": [
                {"name": "DCW", "address": 40100, "type": "u16", "scale_factor": "DCW_SF"},
                {"name": "Hz", "address": 40105, "type": "u16"},
                {"name": "DCW_SF", "address": 40110, "type": "i16"},
            ],
        }
    )
    blocks = plan_reads(profile.points, profile.max_gap_regs, profile.max_block_regs)
    assert spans(blocks) == [("holding", 40100, 11)]
    server = RegisterServer(profile)
    port = await server.start_tcp()
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    try:
        assert await client.connect()
        values = []
        for sf_word, value_word in ((0xFFFE, 0xE678), (0xFFFF, 0x17EB)):
            server.set_registers("holding", 40110, [sf_word])
            server.set_registers("holding", 40100, [value_word])
            response = await client.read_holding_registers(40100, count=11, device_id=1)
            values.append(decode_block(blocks[0], response.registers, T)["DCW"].value)
    finally:
        client.close()
        await server.stop()
    assert values == [590.0, 612.3]
    assert list(server.requests) == [(3, 40100, 11), (3, 40100, 11)]
