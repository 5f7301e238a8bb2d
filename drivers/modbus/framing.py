"""Modbus framing without I/O: request PDUs, the TCP stream splitter and the RTU frame extractor.

Why not pymodbus's framers: pymodbus 3.16.1 passes the literal bytes of a
late response followed by the right one in one TCP read, but

* its client clears the receive buffer whenever it sends, so a stale
  response split across that moment turns the rest of the stream into
  garbage and the next, correct response is lost;
* it accepts a response whose byte count differs from the request's count;
* its RTU framer drops the whole buffer when a CRC fails, so one byte of
  line noise before a reply loses the reply, and it drops a second frame
  that arrived in the same read.

The classes here are pure byte-in, frames-out state machines, so the tests
can feed them every split position. :mod:`drivers.modbus.link` owns the
sockets and serial ports.

TCP application data unit (all fields big-endian)::

    +----------------+-------------+-----------+---------+------------------+
    | transaction id | protocol id | length    | unit id | PDU              |
    | 2 bytes        | 2 bytes = 0 | 2 bytes   | 1 byte  | length - 1 bytes |
    +----------------+-------------+-----------+---------+------------------+

RTU frame (CRC-16/MODBUS, low byte first on the wire)::

    +---------+-------------------------------------+-----------+
    | unit id | PDU: function, data                 | CRC lo hi |
    +---------+-------------------------------------+-----------+

Response PDUs this engine expects, by function::

    1, 2, 3, 4     function | byte count n | n data bytes
    5, 6, 15, 16   function | 4 bytes echoing the request's address and value or count
    any | 0x80     function | exception code
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from drivers.modbus.errors import ModbusFrameError

READ_FUNCTIONS = (1, 2, 3, 4)
WRITE_FUNCTIONS = (5, 6, 15, 16)
#: The protocol's limits per request (Modbus Application Protocol V1.1b3, section 6).
MAX_READ_REGISTERS = 125
MAX_READ_BITS = 2000
MAX_WRITE_REGISTERS = 123
MBAP_HEADER_BYTES = 7
#: Largest PDU the protocol allows; the MBAP length field counts it plus the unit byte.
MAX_PDU_BYTES = 253
MAX_RTU_FRAME_BYTES = 256


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC16_TABLE = _crc16_table()


def crc16_modbus(data: bytes | bytearray | memoryview) -> int:
    """Compute CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF).

    The result goes on the wire low byte first: ``crc.to_bytes(2, "little")``.
    """
    crc = 0xFFFF
    table = _CRC16_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


# ----------------------------------------------------------------------------- requests


def read_request_pdu(function: int, address: int, count: int) -> bytes:
    """Build a read request PDU for function 1, 2, 3 or 4.

    Raises ``ValueError`` for an unknown function, or an address or count
    outside the protocol's limits.
    """
    if function not in READ_FUNCTIONS:
        raise ValueError(f"read function must be 1, 2, 3 or 4, got {function}")
    limit = MAX_READ_BITS if function in (1, 2) else MAX_READ_REGISTERS
    if not 1 <= count <= limit:
        raise ValueError(f"count for function {function} must be 1..{limit}, got {count}")
    _check_address_range(address, count)
    return struct.pack(">BHH", function, address, count)


def write_register_pdu(address: int, value: int) -> bytes:
    """Build a function 6 (write single register) request PDU."""
    _check_address_range(address, 1)
    _check_word(value, 0)
    return struct.pack(">BHH", 6, address, value)


def write_registers_pdu(address: int, values: list[int] | tuple[int, ...]) -> bytes:
    """Build a function 16 (write multiple registers) request PDU."""
    count = len(values)
    if not 1 <= count <= MAX_WRITE_REGISTERS:
        raise ValueError(f"function 16 writes 1..{MAX_WRITE_REGISTERS} registers, got {count}")
    _check_address_range(address, count)
    for index, value in enumerate(values):
        _check_word(value, index)
    return struct.pack(f">BHHB{count}H", 16, address, count, 2 * count, *values)


def _check_address_range(address: int, count: int) -> None:
    if not 0 <= address <= 0xFFFF:
        raise ValueError(f"address must be 0..65535 (0-based wire address), got {address}")
    if address + count > 0x10000:
        raise ValueError(f"address {address} + count {count} runs past register 65535")


def _check_word(value: int, index: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"register value [{index}] must be an int 0..65535, got {value!r}")


def tcp_adu(transaction_id: int, unit: int, pdu: bytes) -> bytes:
    """Wrap a PDU in an MBAP header."""
    return struct.pack(">HHHB", transaction_id, 0, len(pdu) + 1, unit) + pdu


def rtu_adu(unit: int, pdu: bytes) -> bytes:
    """Wrap a PDU in an RTU frame: unit id, PDU, CRC."""
    body = bytes((unit,)) + pdu
    return body + crc16_modbus(body).to_bytes(2, "little")


# ----------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class ExpectedResponse:
    """Layout of a correct, non-exception response to one request."""

    function: int
    #: Length of the whole response PDU, function byte included.
    length: int
    #: For writes: the exact PDU the device must send back; ``None`` for reads.
    echo: bytes | None = None


def expected_response(request_pdu: bytes) -> ExpectedResponse:
    """Derive the expected response from a request PDU built by this module."""
    function = request_pdu[0]
    if function in (1, 2):
        count = int.from_bytes(request_pdu[3:5], "big")
        return ExpectedResponse(function, 2 + (count + 7) // 8)
    if function in (3, 4):
        count = int.from_bytes(request_pdu[3:5], "big")
        return ExpectedResponse(function, 2 + 2 * count)
    if function in (5, 6):
        return ExpectedResponse(function, 5, bytes(request_pdu[:5]))
    if function in (15, 16):
        return ExpectedResponse(function, 5, bytes(request_pdu[:5]))
    raise ValueError(f"no response layout known for function {function}")


def exception_code(expected: ExpectedResponse, pdu: bytes) -> int | None:
    """Return the exception code if ``pdu`` is an exception response to this request."""
    if len(pdu) == 2 and pdu[0] == expected.function | 0x80:
        return pdu[1]
    return None


def mismatch(expected: ExpectedResponse, pdu: bytes) -> str | None:
    """Describe why ``pdu`` is not the expected response, or return ``None`` if it is."""
    if not pdu:
        return "empty PDU"
    if pdu[0] != expected.function:
        return f"function {pdu[0]} where {expected.function} was expected"
    if len(pdu) != expected.length:
        if expected.echo is None and len(pdu) >= 2:
            return (
                f"byte count {pdu[1]} and PDU length {len(pdu)} where byte count "
                f"{expected.length - 2} was expected"
            )
        return f"PDU length {len(pdu)} where {expected.length} was expected"
    if expected.echo is None:
        if pdu[1] != expected.length - 2:
            return f"byte count {pdu[1]} where {expected.length - 2} was expected"
    elif pdu != expected.echo:
        return f"echo {pdu.hex(' ')} where {expected.echo.hex(' ')} was expected"
    return None


def decode_registers(pdu: bytes, count: int) -> list[int]:
    """Unpack the words of a checked function 3 or 4 response PDU."""
    return list(struct.unpack_from(f">{count}H", pdu, 2))


def decode_bits(pdu: bytes, count: int) -> list[int]:
    """Unpack a checked function 1 or 2 response PDU into ``count`` 0/1 ints, LSB first."""
    return [(pdu[2 + i // 8] >> (i % 8)) & 1 for i in range(count)]


# ----------------------------------------------------------------------------- TCP


class MbapSplitter:
    """Cut a TCP byte stream into ADUs by the MBAP length field.

    Feed it whatever each socket read returns; it keeps an incomplete ADU
    until the rest arrives. A header that cannot be right (protocol id not 0,
    length outside 2..254) means the stream lost its framing: :meth:`feed`
    raises :class:`ModbusFrameError` and the caller must drop the
    connection, because nothing marks where the next ADU starts.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Add received bytes; return every complete ADU as ``(transaction_id, unit, pdu)``."""
        buffer = self._buffer
        buffer += data
        adus = []
        start = 0
        end_of_data = len(buffer)
        while end_of_data - start >= MBAP_HEADER_BYTES:
            transaction_id, protocol_id, length, unit = struct.unpack_from(">HHHB", buffer, start)
            if protocol_id != 0 or not 2 <= length <= MAX_PDU_BYTES + 1:
                header = bytes(buffer[start : start + MBAP_HEADER_BYTES]).hex(" ")
                self._buffer = bytearray()
                raise ModbusFrameError(
                    f"invalid MBAP header {header}: protocol id {protocol_id} (expected 0), "
                    f"length {length} (expected 2..{MAX_PDU_BYTES + 1}); the peer is not "
                    "speaking Modbus TCP or the stream lost its framing"
                )
            end = start + 6 + length
            if end > end_of_data:
                break
            adus.append((transaction_id, unit, bytes(buffer[start + MBAP_HEADER_BYTES : end])))
            start = end
        if start:
            del buffer[:start]
        return adus

    def reset(self) -> None:
        self._buffer.clear()

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)


# ----------------------------------------------------------------------------- RTU


def rtu_response_length(buffer: bytes | bytearray, start: int) -> int | None:
    """Return the length of the RTU response frame that would begin at ``start``.

    Returns ``None`` when no response this engine expects can begin there
    (unit id outside 1..247, unknown function, impossible byte count), and
    0 when the header is not complete yet.
    """
    available = len(buffer) - start
    if available < 1 or not 1 <= buffer[start] <= 247:
        return None if available >= 1 else 0
    if available < 2:
        return 0
    function = buffer[start + 1]
    if function & 0x80:
        return 5 if function & 0x7F in READ_FUNCTIONS + WRITE_FUNCTIONS else None
    if function in WRITE_FUNCTIONS:
        return 8
    if function not in READ_FUNCTIONS:
        return None
    if available < 3:
        return 0
    byte_count = buffer[start + 2]
    if byte_count == 0 or byte_count > 250 or (function in (3, 4) and byte_count % 2):
        return None
    return 5 + byte_count


class RtuFrameExtractor:
    """Find CRC-valid RTU response frames in a serial byte stream.

    A frame may arrive in any number of pieces, with line noise before it and
    another frame right after it. Each position in the buffer is a candidate
    start. A candidate whose header names a known function and a plausible
    byte count becomes a frame once all its bytes are there, if its
    CRC-16/MODBUS matches. A complete, CRC-valid frame further on wins over
    an earlier candidate that is still incomplete, so a noise byte that looks
    like a header announcing 250 bytes cannot stall the stream. Bytes that
    belong to no frame are counted in :attr:`discarded_bytes`.

    Random noise passes the CRC about once in 65536 complete candidates. The
    caller's match on unit, function and byte count rejects most of those.
    """

    __slots__ = ("_buffer", "_incomplete", "_scanned", "discarded_bytes")

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: Start positions of candidates still waiting for bytes, in ascending order.
        self._incomplete: list[int] = []
        #: Positions below this one are classified (dead or in ``_incomplete``).
        self._scanned = 0
        self.discarded_bytes = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add received bytes; return every complete frame as ``(unit, pdu)`` without the CRC."""
        self._buffer += data
        frames = []
        while (found := self._find_frame()) is not None:
            start, length = found
            buffer = self._buffer
            frames.append((buffer[start], bytes(buffer[start + 1 : start + length - 2])))
            self.discarded_bytes += start
            del buffer[: start + length]
            self._incomplete = []
            self._scanned = 0
        self._trim()
        return frames

    def reset(self) -> int:
        """Drop everything buffered (before a new request); return how many bytes that was."""
        dropped = len(self._buffer)
        self.discarded_bytes += dropped
        self._buffer.clear()
        self._incomplete = []
        self._scanned = 0
        return dropped

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def _find_frame(self) -> tuple[int, int] | None:
        buffer = self._buffer
        end_of_data = len(buffer)
        still_incomplete = []
        candidates = [*self._incomplete, *range(self._scanned, end_of_data)]
        for start in candidates:
            length = rtu_response_length(buffer, start)
            if length is None:
                continue
            if length == 0 or start + length > end_of_data:
                still_incomplete.append(start)
                continue
            crc = buffer[start + length - 2] | buffer[start + length - 1] << 8
            if crc16_modbus(bytes(buffer[start : start + length - 2])) == crc:
                return start, length
        self._incomplete = still_incomplete
        self._scanned = end_of_data
        return None

    def _trim(self) -> None:
        """Bound the buffer: no frame is longer than 256 bytes, so older bytes are noise."""
        excess = len(self._buffer) - 2 * MAX_RTU_FRAME_BYTES
        if excess <= 0:
            return
        del self._buffer[:excess]
        self.discarded_bytes += excess
        self._incomplete = [start - excess for start in self._incomplete if start >= excess]
        self._scanned -= excess
