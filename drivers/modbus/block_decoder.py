"""Precompiled decoding of one read block: the poller's hot path.

:func:`drivers.modbus.planner.decode_block` decodes a block point by point
through the general codec, which checks its arguments on every call. A
poller decodes the same block thousands of times, so :class:`BlockDecoder`
picks each point's ``struct`` format and byte view once, at construction,
and then unpacks straight from the response bytes. Sentinels, scaling and
range checks stay in :func:`drivers.modbus.planner.point_reading`, so both
paths give identical Readings; a property test compares them.

Every word order maps to a big-endian or a little-endian unpack of one of two
views of the response, the bytes as received or with the two bytes of each
register swapped (letters are the value's bytes, A most significant)::

    order  wire (32-bit)   view      unpack      64-bit wire
    ABCD   A B C D         received  big         A B C D E F G H
    DCBA   D C B A         received  little      H G F E D C B A
    BADC   B A D C         swapped   big         B A D C F E H G
    CDAB   C D A B         swapped   little      G H E F C D A B

For one register the same rule holds: CDAB reads the swapped view
little-endian, which is the received register big-endian, as ABCD.
"""

from __future__ import annotations

import struct

from drivers.modbus import codec
from drivers.modbus.planner import ReadBlock, point_reading
from drivers.quality import Reading

# The codec's own tables, shared within the package so that both decoders
# follow one definition of the types and orders.
_STRUCT_CODE = codec._STRUCT_CODE
_ORDER_RULES = codec._ORDER_RULES


class BlockDecoder:
    """Decode the response bytes of one :class:`ReadBlock` into Readings."""

    __slots__ = ("_byte_count", "_needs_swapped", "_plan", "_points", "block")

    def __init__(self, block: ReadBlock) -> None:
        self.block = block
        self._byte_count = 2 * block.count
        self._points = block.points
        #: One entry per point: (name, use swapped view, struct or None for str, byte offset).
        self._plan: list[tuple[str, bool, struct.Struct | None, int]] = []
        for point in block.points:
            offset = 2 * (point.address - block.address)
            if point.type == "str":
                self._plan.append((point.name, False, None, offset))
                continue
            reverse_words, swap_bytes = _ORDER_RULES[point.order]
            # Reading the byte-swapped view little-endian reverses the words
            # and keeps each word's bytes, so the view and the endianness
            # together give all four orders, for one word as well as for four.
            swapped = reverse_words != swap_bytes
            fmt = ("<" if reverse_words else ">") + _STRUCT_CODE[point.type]
            self._plan.append((point.name, swapped, struct.Struct(fmt), offset))
        self._needs_swapped = any(swapped for _, swapped, _, _ in self._plan)

    def decode_bytes(self, data: bytes, t_mono_s: float) -> dict[str, Reading]:
        """Decode the data bytes of a function 3 or 4 response (big-endian registers).

        Raises ``ValueError`` when ``data`` is not exactly the block's length.
        """
        if len(data) != self._byte_count:
            raise ValueError(
                f"read of {self.block.function} {self.block.address}.."
                f"{self.block.address + self.block.count - 1} expected {self._byte_count} "
                f"data bytes, got {len(data)}"
            )
        swapped = _swap_bytes(data) if self._needs_swapped else data
        raw_values: dict[str, codec.Value] = {}
        for name, use_swapped, unpacker, offset in self._plan:
            if unpacker is None:
                raw_values[name] = self._decode_string(name, data, offset)
            else:
                raw_values[name] = unpacker.unpack_from(swapped if use_swapped else data, offset)[0]
        return {point.name: point_reading(point, raw_values, t_mono_s) for point in self._points}

    def decode(self, registers: list[int], t_mono_s: float) -> dict[str, Reading]:
        """Decode register words; the same result as :func:`planner.decode_block`."""
        if len(registers) != self.block.count:
            raise ValueError(
                f"read of {self.block.function} at {self.block.address} expected "
                f"{self.block.count} registers, got {len(registers)}"
            )
        return self.decode_bytes(struct.pack(f">{len(registers)}H", *registers), t_mono_s)

    def _decode_string(self, name: str, data: bytes, offset: int) -> codec.Value:
        point = next(p for p in self._points if p.name == name)
        words = struct.unpack_from(f">{point.count}H", data, offset)
        return codec.decode(list(words), point.type, point.order)


def _swap_bytes(data: bytes) -> bytearray:
    """Swap the two bytes of every 16-bit register."""
    swapped = bytearray(len(data))
    swapped[0::2] = data[1::2]
    swapped[1::2] = data[0::2]
    return swapped
