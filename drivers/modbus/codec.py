"""Register codec: turn 16-bit Modbus registers into numbers and strings, and back.

A point's value is stored in one or more 16-bit registers. Devices disagree on
two things: which register contains the most significant word, and which byte of
a register comes first on the wire. The ``order`` of a point names both, with
the letters of the big-endian value (A = most significant byte)::

    32-bit value 0xAABBCCDD         register n      register n+1
                                  +------+------+ +------+------+
    ABCD  big-endian               |  A   |  B   | |  C   |  D   |
    CDAB  least significant word   |  C   |  D   | |  A   |  B   |
          first ("word swap")      +------+------+ +------+------+
    BADC  bytes swapped in         |  B   |  A   | |  D   |  C   |
          each register            +------+------+ +------+------+
    DCBA  fully little-endian      |  D   |  C   | |  B   |  A   |
                                  +------+------+ +------+------+

The same two rules hold for 64-bit types (bytes A..H): CDAB puts the least
significant word first, so all four words are reversed (``GH EF CD AB``), not
only swapped in pairs; BADC swaps the bytes in each word (``BA DC FE HG``);
DCBA is fully little-endian (``HG FE DC BA``). This is what pymodbus 3.16's
``convert_from_registers(word_order="little")`` does too. For 16-bit types the
word order has no effect, so ABCD = CDAB and BADC = DCBA.

Strings (``str``) are ``length`` registers of ASCII or UTF-8, two bytes per
register, first character in the first register; only the byte order inside
a register applies (BADC and DCBA put the second character first). Trailing
NUL and space padding is removed on decode and NUL padding is added on encode.

Values here are raw: scaling, scale factors and ranges belong to
:mod:`drivers.modbus.planner`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

#: Point types and the number of registers each uses (``str`` takes its length).
TYPE_REGISTERS: dict[str, int] = {
    "u16": 1,
    "i16": 1,
    "u32": 2,
    "i32": 2,
    "u64": 4,
    "i64": 4,
    "f32": 2,
    "f64": 4,
}
POINT_TYPES: tuple[str, ...] = (*TYPE_REGISTERS, "str")
ORDERS: tuple[str, ...] = ("ABCD", "CDAB", "BADC", "DCBA")

# struct format code of each numeric type, read big-endian after reordering.
_STRUCT_CODE = {
    "u16": "H",
    "i16": "h",
    "u32": "I",
    "i32": "i",
    "u64": "Q",
    "i64": "q",
    "f32": "f",
    "f64": "d",
}
# (reverse the word order, swap the two bytes of each word) per order.
_ORDER_RULES = {
    "ABCD": (False, False),
    "CDAB": (True, False),
    "BADC": (False, True),
    "DCBA": (True, True),
}
_INTEGER_RANGE = {
    "u16": (0, 0xFFFF),
    "i16": (-0x8000, 0x7FFF),
    "u32": (0, 0xFFFF_FFFF),
    "i32": (-0x8000_0000, 0x7FFF_FFFF),
    "u64": (0, 0xFFFF_FFFF_FFFF_FFFF),
    "i64": (-0x8000_0000_0000_0000, 0x7FFF_FFFF_FFFF_FFFF),
}

#: The raw value that means "no value" per integer type. The unsigned values
#: also cover enum16 and bitfield16 points, which are declared as ``u16``.
#: Floats use any NaN, accumulators use 0 and strings use all-NUL registers.
SENTINELS: dict[str, int] = {
    "u16": 0xFFFF,
    "i16": -0x8000,
    "u32": 0xFFFF_FFFF,
    "i32": -0x8000_0000,
    "u64": 0xFFFF_FFFF_FFFF_FFFF,
    "i64": -0x8000_0000_0000_0000,
}

Value = int | float | str


def check_type(type_: str) -> None:
    """Raise ValueError unless ``type_`` is one of :data:`POINT_TYPES`."""
    if type_ not in POINT_TYPES:
        raise ValueError(f"unknown point type {type_!r}: expected one of {', '.join(POINT_TYPES)}")


def check_order(order: str) -> None:
    """Raise ValueError unless ``order`` is one of :data:`ORDERS`."""
    if order not in _ORDER_RULES:
        raise ValueError(f"unknown word/byte order {order!r}: expected one of {', '.join(ORDERS)}")


def register_count(type_: str, length: int | None = None) -> int:
    """Return how many registers one value of ``type_`` uses.

    ``length`` is required for ``str`` (its register count). For a numeric
    type it is optional, and it must equal the type's own count when given.
    """
    check_type(type_)
    if type_ == "str":
        if length is None or isinstance(length, bool) or not isinstance(length, int):
            raise ValueError(
                f"type 'str' needs a length in registers (an integer >= 1), got {length!r}"
            )
        if length < 1:
            raise ValueError(f"string length must be >= 1 register, got {length}")
        return length
    count = TYPE_REGISTERS[type_]
    if length is not None and length != count:
        raise ValueError(
            f"type {type_!r} uses {count} register(s), but the length given is {length!r}"
        )
    return count


def _check_registers(registers: Sequence[int]) -> None:
    for word in registers:
        if isinstance(word, bool) or not isinstance(word, int) or not 0 <= word <= 0xFFFF:
            raise ValueError(f"register value {word!r} is not a 16-bit word (0..65535)")


def _words_to_bytes(registers: Sequence[int], order: str) -> bytes:
    reverse_words, swap_bytes = _ORDER_RULES[order]
    words = reversed(registers) if reverse_words else registers
    if swap_bytes:
        return b"".join(((w & 0xFF) << 8 | w >> 8).to_bytes(2, "big") for w in words)
    return b"".join(w.to_bytes(2, "big") for w in words)


def _bytes_to_words(data: bytes, order: str) -> list[int]:
    reverse_words, swap_bytes = _ORDER_RULES[order]
    byteorder = "little" if swap_bytes else "big"
    words = [int.from_bytes(data[i : i + 2], byteorder) for i in range(0, len(data), 2)]
    if reverse_words:
        words.reverse()
    return words


def _decode_string(registers: Sequence[int], order: str) -> str:
    _, swap_bytes = _ORDER_RULES[order]
    byteorder = "little" if swap_bytes else "big"
    data = b"".join(w.to_bytes(2, byteorder) for w in registers)
    # Text ends at the first NUL; spaces after the text are padding.
    data = data.split(b"\x00", 1)[0].rstrip(b" ")
    return data.decode("utf-8", errors="replace")


def decode(registers: Sequence[int], type_: str, order: str = "ABCD") -> Value:
    """Decode one value of ``type_`` from ``registers`` in wire order.

    Raises ValueError for an unknown type or order, a word outside 0..65535,
    or a register count that does not fit the type.
    """
    check_type(type_)
    check_order(order)
    _check_registers(registers)
    if type_ == "str":
        if not registers:
            raise ValueError("a 'str' value needs at least 1 register, got 0")
        return _decode_string(registers, order)
    count = TYPE_REGISTERS[type_]
    if len(registers) != count:
        raise ValueError(f"type {type_!r} needs {count} register(s), got {len(registers)}")
    return struct.unpack(">" + _STRUCT_CODE[type_], _words_to_bytes(registers, order))[0]


def decode_many(registers: Sequence[int], type_: str, order: str = "ABCD") -> list[Value]:
    """Decode consecutive values of one numeric type from a block of registers.

    The order applies inside each value: a CDAB block ``0000 3F80 0000 4000``
    is ``[1.0, 2.0]``. The list as a whole is never reversed.
    """
    check_type(type_)
    if type_ == "str":
        raise ValueError("decode_many() handles numeric types; decode a 'str' point with decode()")
    count = TYPE_REGISTERS[type_]
    if len(registers) % count:
        raise ValueError(
            f"{len(registers)} registers do not split into whole {type_!r} values "
            f"of {count} register(s) each"
        )
    return [decode(registers[i : i + count], type_, order) for i in range(0, len(registers), count)]


def _encode_number(value: object, type_: str) -> bytes:
    code = _STRUCT_CODE[type_]
    if type_ in _INTEGER_RANGE:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"type {type_!r} takes an integer, got {value!r}")
        low, high = _INTEGER_RANGE[type_]
        if not low <= value <= high:
            raise ValueError(f"value {value} is outside the {type_} range {low}..{high}")
        return struct.pack(">" + code, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # ValueError, not TypeError: callers handle every bad value in one place.
        raise ValueError(f"type {type_!r} takes a number, got {value!r}")  # noqa: TRY004
    try:
        return struct.pack(">" + code, value)
    except OverflowError as err:
        raise ValueError(
            f"value {value!r} is too large for {type_} (max about {3.4028235e38:g})"
        ) from err


def encode(value: Value, type_: str, order: str = "ABCD", length: int | None = None) -> list[int]:
    """Encode one value as registers in wire order; the inverse of :func:`decode`.

    ``length`` is the register count of a ``str`` point; shorter text is NUL
    padded and longer text raises ValueError. Integers outside the type's
    range, non-numbers and floats too large for ``f32`` raise ValueError.
    """
    check_type(type_)
    check_order(order)
    count = register_count(type_, length)
    if type_ == "str":
        if not isinstance(value, str):
            raise ValueError(f"type 'str' takes text, got {value!r}")
        data = value.encode("utf-8")
        if len(data) > 2 * count:
            raise ValueError(
                f"text {value!r} is {len(data)} bytes, "
                f"but {count} register(s) hold at most {2 * count}"
            )
        data = data.ljust(2 * count, b"\x00")
        _, swap_bytes = _ORDER_RULES[order]
        byteorder = "little" if swap_bytes else "big"
        return [int.from_bytes(data[i : i + 2], byteorder) for i in range(0, len(data), 2)]
    return _bytes_to_words(_encode_number(value, type_), order)


def encode_many(values: Sequence[Value], type_: str, order: str = "ABCD") -> list[int]:
    """Encode consecutive numeric values into one block; the inverse of :func:`decode_many`."""
    if type_ == "str":
        raise ValueError("encode_many() handles numeric types; encode a 'str' point with encode()")
    block: list[int] = []
    for value in values:
        block.extend(encode(value, type_, order))
    return block


def is_sentinel_value(value: Value, type_: str, accumulator: bool = False) -> bool:
    """Tell whether a decoded raw value is the type's "no value" sentinel.

    The integer sentinels are in :data:`SENTINELS`. Any float NaN is a
    sentinel too. An empty string (all-NUL registers) is one, because SunSpec
    marks an unimplemented string that way. A point flagged as a SunSpec
    accumulator also treats 0 as no value.
    """
    if type_ == "str":
        return value == ""
    if type_ in ("f32", "f64"):
        return math.isnan(value)  # type: ignore[arg-type]
    if accumulator and value == 0:
        return True
    return value == SENTINELS[type_]


def is_sentinel(
    registers: Sequence[int], type_: str, order: str = "ABCD", accumulator: bool = False
) -> bool:
    """Tell whether ``registers`` contain the "no value" sentinel of ``type_``.

    The check is made on the decoded value, so an int32 sentinel in CDAB
    order (``0000 8000`` on the wire) is found as well.
    """
    return is_sentinel_value(decode(registers, type_, order), type_, accumulator)
