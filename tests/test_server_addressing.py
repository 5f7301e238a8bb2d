"""A read of wire address a returns the register the profile puts at a.

A pymodbus data block built naively (``ModbusSequentialDataBlock(0, values)``)
returns the value meant for address 1 when address 0 is read. These tests read the
simulator with a plain pymodbus client, so a pymodbus upgrade that shifts
addresses fails here first.
"""

from __future__ import annotations

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException

from drivers.modbus.profile import parse_profile
from drivers.modbus.server import RegisterServer


def _profile():
    # Holding 0..5 and input 0..3 with a different value at every address.
    points = [
        {"name": f"h{a}", "address": a, "function": "holding", "type": "u16", "writable": a >= 4}
        for a in range(6)
    ]
    points += [
        {"name": f"i{a}", "address": a, "function": "input", "type": "u16"} for a in range(4)
    ]
    points.append({"name": "h_far", "address": 40000, "function": "holding", "type": "u16"})
    return parse_profile({"profile": {"name": "addressing"}, "points": points})


@pytest.fixture
async def served():
    server = RegisterServer(_profile(), unit_id=7)
    for a in range(6):
        server.set_point(f"h{a}", 0x1000 + a)
    for a in range(4):
        server.set_point(f"i{a}", 0x2000 + a)
    server.set_point("h_far", 0x4000)
    port = await server.start_tcp()
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert await client.connect()
    yield server, client, port
    client.close()
    await server.stop()


async def test_holding_address_zero(served):
    _, client, _ = served
    response = await client.read_holding_registers(0, count=6, device_id=7)
    assert not response.isError()
    assert response.registers == [0x1000, 0x1001, 0x1002, 0x1003, 0x1004, 0x1005]


async def test_each_address_alone(served):
    _, client, _ = served
    for address in range(6):
        response = await client.read_holding_registers(address, count=1, device_id=7)
        assert response.registers == [0x1000 + address]
    for address in range(4):
        response = await client.read_input_registers(address, count=1, device_id=7)
        assert response.registers == [0x2000 + address]


async def test_input_and_holding_separate(served):
    _, client, _ = served
    holding = await client.read_holding_registers(1, count=1, device_id=7)
    inputs = await client.read_input_registers(1, count=1, device_id=7)
    assert holding.registers == [0x1001]
    assert inputs.registers == [0x2001]


async def test_gap_reads_zero_and_far_point(served):
    _, client, _ = served
    gap = await client.read_holding_registers(100, count=2, device_id=7)
    far = await client.read_holding_registers(40000, count=1, device_id=7)
    assert gap.registers == [0, 0]
    assert far.registers == [0x4000]


async def test_outside_span_is_exception(served):
    _, client, _ = served
    past_end = await client.read_holding_registers(40001, count=1, device_id=7)
    past_input = await client.read_input_registers(3, count=2, device_id=7)
    assert past_end.isError()
    assert past_end.exception_code == ExcCodes.ILLEGAL_ADDRESS
    assert past_input.exception_code == ExcCodes.ILLEGAL_ADDRESS


async def test_write_lands_at_address(served):
    server, client, _ = served
    response = await client.write_register(4, 0xBEEF, device_id=7)
    assert not response.isError()
    assert server.get_registers("holding", 4, 1) == [0xBEEF]
    assert server.get_point("h4") == 0xBEEF
    read_back = await client.read_holding_registers(3, count=3, device_id=7)
    assert read_back.registers == [0x1003, 0xBEEF, 0x1005]


async def test_write_read_only_rejected(served):
    server, client, _ = served
    response = await client.write_register(2, 1, device_id=7)
    assert response.exception_code == ExcCodes.ILLEGAL_ADDRESS
    assert server.get_point("h2") == 0x1002


async def test_other_unit_gets_no_response(served):
    _, _, port = served
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.3, retries=0)
    assert await client.connect()
    try:
        with pytest.raises(ModbusIOException):
            await client.read_holding_registers(0, count=1, device_id=8)
        answered = await client.read_holding_registers(0, count=1, device_id=7)
    finally:
        client.close()
    assert answered.registers == [0x1000]
