"""The simulator over Modbus RTU on a pseudo-terminal: exact response bytes of a BMS read.

A BMS returns 23 registers from 0x1000 for function 04. Register 0 is the
pack voltage (0.01 V), register 1 the signed current (0.01 A, negative while
discharging) and register 8 the SoC (0.1 %).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from drivers.modbus.planner import decode_block, plan_reads
from drivers.modbus.profile import parse_profile
from drivers.modbus.server import RegisterServer
from drivers.quality import Quality

# The first ten registers of the field report; the other 13 are zero here.
BMS_REGISTERS = [0x1457, 0xFD44, 0x1ACD, 0x00C5, 0x00D2, 0x0000, 0x0000, 0x1E00, 0x028C, 0x03E8]
RESPONSE_PREFIX = bytes.fromhex(
    "01 04 2E 14 57 FD 44 1A CD 00 C5 00 D2 00 00 00 00 1E 00 02 8C 03 E8"
)


def crc16_modbus(frame: bytes) -> bytes:
    """Return the Modbus RTU CRC of ``frame``, low byte first as sent."""
    crc = 0xFFFF
    for byte in frame:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def bms_profile():
    points = [
        {
            "name": "pack_v",
            "address": 0x1000,
            "function": "input",
            "type": "u16",
            "scale": 0.01,
            "unit": "V",
        },
        {
            "name": "pack_a",
            "address": 0x1001,
            "function": "input",
            "type": "i16",
            "scale": 0.01,
            "unit": "A",
        },
        {
            "name": "soc_pct",
            "address": 0x1008,
            "function": "input",
            "type": "u16",
            "scale": 0.1,
            "unit": "%",
        },
    ]
    # The remaining registers up to 0x1016, so the simulator serves all 23.
    points += [
        {"name": f"reg_{a:04x}", "address": a, "function": "input", "type": "u16"}
        for a in range(0x1002, 0x1017)
        if a != 0x1008
    ]
    return parse_profile({"profile": {"name": "bms", "max_gap_regs": 0}, "points": points})


async def read_frame(fd: int, size: int, timeout_s: float) -> bytes:
    """Read ``size`` bytes from the pty master, or what arrived before the timeout."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while len(data) < size and time.monotonic() < deadline:
        try:
            data += os.read(fd, size - len(data))
        except BlockingIOError:
            await asyncio.sleep(0.01)
    return data


@pytest.fixture
async def rtu_bms():
    master, slave = os.openpty()
    os.set_blocking(master, False)
    profile = bms_profile()
    server = RegisterServer(profile, unit_id=1)
    server.set_registers("input", 0x1000, BMS_REGISTERS)
    await server.start_rtu(os.ttyname(slave), baudrate=19200)
    yield server, master, profile
    await server.stop()
    os.close(master)
    os.close(slave)


async def test_bms_rtu_response_bytes(rtu_bms):
    _, master, profile = rtu_bms
    request = bytes.fromhex("01 04 10 00 00 17")
    os.write(master, request + crc16_modbus(request))

    # Address, function, byte count, 46 data bytes and 2 CRC bytes.
    response = await read_frame(master, 3 + 46 + 2, timeout_s=5)

    assert response.startswith(RESPONSE_PREFIX)
    assert len(response) == 51
    assert response[-2:] == crc16_modbus(response[:-2])
    registers = [int.from_bytes(response[3 + 2 * i : 5 + 2 * i], "big") for i in range(23)]
    (block,) = plan_reads(profile.points, profile.max_gap_regs)
    readings = decode_block(block, registers, t_mono_s=time.monotonic())
    assert readings["pack_v"].value == 52.07
    assert readings["pack_a"].value == -7.0
    assert readings["soc_pct"].value == 65.2
    assert readings["pack_a"].quality is Quality.GOOD


async def test_rtu_other_unit_silent(rtu_bms):
    _, master, _ = rtu_bms
    request = bytes.fromhex("02 04 10 00 00 01")
    os.write(master, request + crc16_modbus(request))
    assert await read_frame(master, 7, timeout_s=0.5) == b""


async def test_rtu_exception_fault(rtu_bms):
    server, master, _ = rtu_bms
    server.faults.exception_for(0x1008, 1)
    request = bytes.fromhex("01 04 10 00 00 17")
    os.write(master, request + crc16_modbus(request))
    response = await read_frame(master, 5, timeout_s=5)
    # Exception response: function | 0x80, exception code 02, CRC.
    assert response[:3] == bytes.fromhex("01 84 02")
    assert response[3:] == crc16_modbus(response[:3])
