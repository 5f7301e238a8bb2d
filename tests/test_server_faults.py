"""Simulator fault hooks and write handling, read with a plain pymodbus TCP client."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException

from drivers.modbus import codec
from drivers.modbus.profile import load_profile
from drivers.modbus.server import RegisterServer, RegisterWrite, ServerStartError

UNIT = 3


@pytest.fixture
async def pcs():
    server = RegisterServer(load_profile("pcs-sunspec"), unit_id=UNIT)
    port = await server.start_tcp()
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.5, retries=0)
    assert await client.connect()
    yield server, client
    client.close()
    await server.stop()


async def read_w(client):
    return await client.read_holding_registers(40084, count=2, device_id=UNIT)


async def test_defaults_served(pcs):
    server, client = pcs
    marker = await client.read_holding_registers(40000, count=4, device_id=UNIT)
    assert codec.decode(marker.registers[:2], "str") == "SunS"
    assert marker.registers[2:] == [1, 66]
    assert server.get_point("WRtg") == 500000.0
    assert server.get_registers("holding", 40125, 2) == [500, 3]


async def test_set_point_scaled_on_wire(pcs):
    server, client = pcs
    server.set_point("W", -12300.0)  # W_SF = 2, so raw -123
    response = await read_w(client)
    assert response.registers == [codec.encode(-123, "i16")[0], 2]
    assert server.get_point("W") == -12300.0


async def test_exception_fault_range(pcs):
    server, client = pcs
    server.faults.exception_for(40084, 1, ExcCodes.DEVICE_BUSY)
    busy = await read_w(client)
    other = await client.read_holding_registers(40086, count=1, device_id=UNIT)
    assert busy.exception_code == ExcCodes.DEVICE_BUSY
    assert not other.isError()
    server.faults.clear()
    assert not (await read_w(client)).isError()


async def test_exception_fault_function_filter(pcs):
    server, client = pcs
    server.faults.exception_for(40084, 2, function="input")
    assert not (await read_w(client)).isError()


async def test_drop_next_responses(pcs):
    server, client = pcs
    server.faults.drop_next = 1
    with pytest.raises(ModbusIOException):
        await read_w(client)
    assert server.faults.drop_next == 0
    # The connection stays usable after a dropped response.
    assert not (await read_w(client)).isError()


async def test_drop_all_responses(pcs):
    server, client = pcs
    server.faults.drop_all = True
    with pytest.raises(ModbusIOException):
        await read_w(client)
    server.faults.drop_all = False
    assert not (await read_w(client)).isError()


async def test_delay_responses(pcs):
    server, client = pcs
    server.faults.delay_s = 2.0
    # The client gives up after 0.5 s, well before the delayed response.
    with pytest.raises(ModbusIOException):
        await read_w(client)
    assert server.requests[-1] == (3, 40084, 2)


async def test_frozen_registers(pcs):
    server, client = pcs
    server.set_point("W", 1000.0)
    assert (await read_w(client)).registers[0] == 10
    server.faults.frozen = True
    server.set_point("W", 5000.0)
    frozen = await read_w(client)
    server.faults.frozen = False
    thawed = await read_w(client)
    assert frozen.registers[0] == 10
    assert thawed.registers[0] == 50


async def test_write_calls_on_write(pcs):
    server, client = pcs
    writes: list[RegisterWrite] = []
    server.on_write = writes.append
    response = await client.write_registers(40204, [25, 1], device_id=UNIT)
    assert not response.isError()
    assert writes == [RegisterWrite(40204, (25, 1), ("WSet", "WSet_Ena"))]
    assert server.get_point("WSet") == 2500.0
    assert server.get_point("WSet_Ena") == 1


async def test_async_on_write_rejects(pcs):
    server, client = pcs

    async def reject_large(write: RegisterWrite):
        await asyncio.sleep(0)
        value = codec.decode([write.words[0]], "i16")
        return ExcCodes.ILLEGAL_VALUE if abs(value) > 5000 else None

    server.on_write = reject_large
    rejected = await client.write_register(40204, 6000, device_id=UNIT)
    accepted = await client.write_register(40204, 40, device_id=UNIT)
    read_back = await client.read_holding_registers(40204, count=1, device_id=UNIT)
    assert rejected.exception_code == ExcCodes.ILLEGAL_VALUE
    assert not accepted.isError()
    assert read_back.registers == [40]


async def test_write_to_read_only_rejected(pcs):
    server, client = pcs
    response = await client.write_register(40084, 1, device_id=UNIT)
    assert response.exception_code == ExcCodes.ILLEGAL_ADDRESS
    assert server.get_point("W") == 0


def test_set_point_none_is_sentinel():
    server = RegisterServer(load_profile("pcs-sunspec"))
    server.set_point("W", None)
    server.set_point("W_SF", None)
    assert server.get_registers("holding", 40084, 2) == [0x8000, 0x8000]
    assert server.get_point("W_SF") is None


def test_bad_access_rejected():
    server = RegisterServer(load_profile("meter-3ph"))
    with pytest.raises(KeyError, match="profile 'meter-3ph' has no point 'p_mw'"):
        server.set_point("p_mw", 1.0)
    with pytest.raises(
        ValueError, match=r"input registers 500..501 are outside the simulated span"
    ):
        server.set_registers("input", 500, [0, 0])
    with pytest.raises(ValueError, match="register value 70000 is not a 16-bit word"):
        server.set_registers("input", 0, [70000])
    with pytest.raises(ValueError, match="function 'coil' is invalid"):
        server.set_registers("coil", 0, [1])
    with pytest.raises(ValueError, match="unit_id 0 is invalid"):
        RegisterServer(load_profile("meter-3ph"), unit_id=0)


def test_meter_set_point_in_kw():
    server = RegisterServer(load_profile("meter-3ph"))
    server.set_point("p_kw", 12.5)
    assert server.get_registers("input", 52, 2) == codec.encode(12500.0, "f32")
    assert server.get_point("p_kw") == 12.5


async def test_start_tcp_busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = RegisterServer(load_profile("meter-3ph"), unit_id=UNIT)
        with pytest.raises(ServerStartError) as info:
            await server.start_tcp("127.0.0.1", port)
    await server.stop()
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.EADDRINUSE
    message = str(info.value)
    assert message.startswith(f"cannot listen for Modbus TCP on 127.0.0.1:{port} (")
    assert "choose another port; port 0 picks a free one" in message


async def test_start_rtu_missing_device(tmp_path):
    path = tmp_path / "ttyUSB9"
    server = RegisterServer(load_profile("meter-3ph"), unit_id=UNIT)
    with pytest.raises(ServerStartError) as info:
        await server.start_rtu(str(path))
    await server.stop()
    assert info.value.errno == errno.ENOENT
    assert str(info.value).startswith(f"cannot open serial port '{path}' for the RTU simulator (")
