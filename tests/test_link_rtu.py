"""Modbus RTU link over a pseudo-terminal pair; the test plays the device on the master side."""

from __future__ import annotations

import asyncio

import pytest

from drivers.modbus import framing
from drivers.modbus.errors import ModbusConnectError, ModbusExceptionResponse, ModbusTimeout
from drivers.modbus.link import Backoff, LinkState, ModbusLink
from tests.modbus_fakes import PtyPeer

pytestmark = pytest.mark.timeout(30)

COILS_REQUEST = bytes.fromhex("01 01 0001 0050 6DF6")
COILS_FIRST = bytes.fromhex("01 01 0A FFFF")
COILS_REST = bytes.fromhex("FFFF FFFF FFFF FFFF EC F2")


def registers_frame(unit: int, function: int, words: list[int]) -> bytes:
    data = b"".join(word.to_bytes(2, "big") for word in words)
    return framing.rtu_adu(unit, bytes((function, len(data))) + data)


@pytest.fixture
async def peer():
    pty = PtyPeer()
    yield pty
    pty.close()


@pytest.fixture
async def link(peer):
    rtu = ModbusLink.rtu(peer.path, 19200, timeout_s=0.5, backoff=Backoff(0.02, 0.1))
    await rtu.start()
    await rtu.wait_connected(5.0)
    yield rtu
    await rtu.close()


async def test_reply_in_fragments(peer, link):
    reading = asyncio.ensure_future(link.read(1, 1, 1, 80))
    assert await peer.read_request(8) == COILS_REQUEST
    peer.send(COILS_FIRST)
    await asyncio.sleep(0.05)
    peer.send(COILS_REST)
    assert await reading == [1] * 80


async def test_bytewise_noise_second_frame(peer, link):
    reading = asyncio.ensure_future(link.read(1, 1, 1, 80))
    await peer.read_request(8)
    # Line noise, the reply one byte at a time, then another unit's frame.
    stream = bytes.fromhex("00 FF 01 03") + COILS_FIRST + COILS_REST
    stream += registers_frame(2, 3, [0x1234])
    for byte in stream:
        peer.send(bytes((byte,)))
        await asyncio.sleep(0)
    assert await reading == [1] * 80
    await asyncio.sleep(0.05)
    assert link.counters.stale_frames == 1
    assert link.counters.discarded_bytes == 4


async def test_late_reply_rejected_by_byte_count(peer, link):
    # Request 1 (4 registers) times out, and its response arrives while request 2
    # (2 registers, same unit and function) waits. Byte count 8 != 4, so it is dropped.
    with pytest.raises(ModbusTimeout):
        await link.read(1, 3, 0, 4, timeout_s=0.1)
    first = await peer.read_request(8)
    assert first == framing.rtu_adu(1, framing.read_request_pdu(3, 0, 4))
    reading = asyncio.ensure_future(link.read(1, 3, 10, 2))
    await peer.read_request(8)
    peer.send(registers_frame(1, 3, [9, 9, 9, 9]))
    await asyncio.sleep(0.02)
    assert not reading.done()
    peer.send(registers_frame(1, 3, [10, 11]))
    assert await reading == [10, 11]
    assert link.counters.stale_frames == 1


async def test_late_reply_rejected_by_function(peer, link):
    # Same unit and byte count, but an input-register response while a
    # holding-register read waits: a late response, dropped.
    reading = asyncio.ensure_future(link.read(1, 3, 0, 2))
    await peer.read_request(8)
    peer.send(registers_frame(1, 4, [9, 9]))
    peer.send(registers_frame(1, 3, [1, 2]))
    assert await reading == [1, 2]
    assert link.counters.stale_frames == 1


async def test_late_reply_flushed_before_next_request(peer, link):
    with pytest.raises(ModbusTimeout):
        await link.read(1, 3, 0, 2, timeout_s=0.1)
    await peer.read_request(8)
    late = registers_frame(1, 3, [9, 9])
    peer.send(late[:4])  # half a late response waits in the input
    await asyncio.sleep(0.05)
    reading = asyncio.ensure_future(link.read(1, 3, 0, 2))
    await peer.read_request(8)
    peer.send(registers_frame(1, 3, [1, 2]))
    assert await reading == [1, 2]
    assert link.counters.discarded_bytes == 4


async def test_exception_response_over_rtu(peer, link):
    reading = asyncio.ensure_future(link.read(1, 3, 0, 2, timeout_s=20.0))
    await peer.read_request(8)
    peer.send(bytes.fromhex("01 83 02 C0 F1"))
    with pytest.raises(ModbusExceptionResponse) as caught:
        await reading
    assert caught.value.illegal_address
    assert "rtu " + peer.path in str(caught.value)
    assert link.counters.timeouts == 0


async def test_other_unit_exception_ignored(peer, link):
    reading = asyncio.ensure_future(link.read(1, 3, 0, 1))
    await peer.read_request(8)
    peer.send(framing.rtu_adu(2, bytes.fromhex("83 0B")))
    peer.send(registers_frame(1, 3, [42]))
    assert await reading == [42]
    assert link.counters.stale_frames == 1


async def test_write_registers_over_rtu(peer, link):
    writing = asyncio.ensure_future(link.write_registers(7, 0x20, [1, 2]))
    request = await peer.read_request(13)
    assert request == framing.rtu_adu(7, bytes.fromhex("10 0020 0002 04 0001 0002"))
    peer.send(framing.rtu_adu(7, bytes.fromhex("10 0020 0002")))
    await writing


async def test_pyserial_socket_url():
    """An RTU device behind a raw serial-to-TCP converter, reached with a socket:// URL."""

    async def converter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readexactly(8)
        assert request == framing.rtu_adu(3, framing.read_request_pdu(4, 0x10, 2))
        writer.write(registers_frame(3, 4, [0x1234, 0x5678]))
        await writer.drain()
        await reader.read()  # until the link closes
        writer.close()

    server = await asyncio.start_server(converter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rtu = ModbusLink.rtu(f"socket://127.0.0.1:{port}", 9600, timeout_s=2.0)
    try:
        await rtu.start()
        await rtu.wait_connected(5.0)
        assert await rtu.read(3, 4, 0x10, 2) == [0x1234, 0x5678]
    finally:
        await rtu.close()
        server.close()
        await server.wait_closed()


async def test_unit_zero_rejected(link):
    with pytest.raises(ValueError, match="broadcast"):
        await link.read(0, 3, 0, 1)


async def test_port_closed_fails_request_at_once(peer, link):
    reading = asyncio.ensure_future(link.read(1, 3, 0, 1, timeout_s=20.0))
    await peer.read_request(8)
    peer.close()
    with pytest.raises(ModbusConnectError):
        await reading
    assert link.counters.timeouts == 0
    assert link.state is LinkState.DOWN


async def test_missing_device_is_down_with_hint(tmp_path):
    path = str(tmp_path / "ttyMISSING")
    rtu = ModbusLink.rtu(path, backoff=Backoff(5.0, 5.0))
    await rtu.start()
    try:
        with pytest.raises(ModbusConnectError, match="ttyMISSING"):
            await rtu.wait_connected(0.2)
        assert rtu.state is LinkState.DOWN
        with pytest.raises(ModbusConnectError, match="adapter is plugged in"):
            await rtu.read(1, 3, 0, 1)
    finally:
        await rtu.close()


async def test_invalid_url_keeps_retrying():
    rtu = ModbusLink.rtu("nosuchscheme://device", backoff=Backoff(0.01, 0.02))
    await rtu.start()
    try:
        with pytest.raises(ModbusConnectError, match="nosuchscheme"):
            await rtu.wait_connected(0.2)
        assert rtu.counters.connect_attempts >= 2
        assert rtu.state is LinkState.DOWN
    finally:
        await rtu.close()


def test_silence_from_baud():
    assert ModbusLink.rtu("/dev/null", 9600).silence_s == pytest.approx(3.5 * 10 / 9600)
    assert ModbusLink.rtu("/dev/null", 9600, "E").silence_s == pytest.approx(3.5 * 11 / 9600)
    assert ModbusLink.rtu("/dev/null", 115200).silence_s == pytest.approx(0.00175)


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        (("/dev/null", 9600, "X"), {}, "parity"),
        (("/dev/null", 9600, "N", 3), {}, "stop bits"),
        (("/dev/null", 0), {}, "baud rate"),
        (("/dev/null",), {"max_in_flight": 2}, "one request at a time"),
    ],
)
def test_rtu_rejects_settings(args, options, message):
    with pytest.raises(ValueError, match=message):
        ModbusLink.rtu(*args, **options)
