"""Built-in decoder for the Pylontech-style CAN BMS protocol.

The low-voltage protocol runs at 500 kbit/s with 11-bit ids and little-endian
fields. Every frame below is sent about once a second. Frames may be shorter
than 8 bytes: the decoder reads only the bytes inside the DLC, returns the
points it found and names the points the DLC cut off.

=====  ========  ==========================================================
id     name      bytes (little-endian; s = signed, u = unsigned)
=====  ========  ==========================================================
0x351  limits    0-1 u charge voltage limit 0.1 V, 2-3 s charge current
                 limit 0.1 A, 4-5 s discharge current limit 0.1 A,
                 6-7 u discharge voltage limit 0.1 V
0x355  soc_soh   0-1 u SoC 1 %, 2-3 u SoH 1 %
0x356  pack      0-1 s pack voltage 0.01 V, 2-3 s pack current 0.1 A
                 (discharge negative), 4-5 s temperature 0.1 °C
0x359  status    protection and warning bits (diagram at ``_STATUS``),
                 4 u module count, 5-6 the letters ``PN``
0x35C  requests  enable and request bits (diagram at ``_REQUESTS``)
0x35E  name      0-7 ASCII manufacturer name, space or NUL padded
0x373  cells     0-1 u min cell voltage 1 mV, 2-3 u max cell voltage 1 mV,
                 4-5 u min cell temperature 1 K, 6-7 u max cell temperature
                 1 K (the Victron-style extension some of these BMSs send)
0x4220 hv_limits 29-bit id of the high-voltage variant: 0-1 u charge
                 voltage limit 0.1 V, 2-3 u discharge voltage limit 0.1 V,
                 4-5 u charge current limit, 6-7 u discharge current limit,
                 both 0.1 A with an offset of 30000 (raw 30250 is +25.0 A)
=====  ========  ==========================================================

Current limits keep the sign the frame used. Some BMSs send the discharge
limit as a negative number. :class:`drivers.can.bms.BmsString` turns limits
into non-negative magnitudes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from drivers.can.points import DecodedFrame, PointValue, decode_text

#: Offset of the current fields in the high-voltage limit frame, in raw units of 0.1 A.
HV_CURRENT_OFFSET = 30000


@dataclass(frozen=True, slots=True)
class Field:
    """A numeric field: ``value = (raw * premultiplier - raw_offset) / divisor``.

    Integer ``divisor`` and ``raw_offset`` keep decimal results exact: raw 532
    with divisor 10 decodes to the float nearest 53.2, where ``532 * 0.1`` would
    not. With the defaults the raw integer is returned unchanged.
    """

    name: str
    start: int
    #: Field width in bytes: 1 or 2.
    size: int
    signed: bool = False
    divisor: int = 1
    raw_offset: int = 0
    premultiplier: int = 1
    byte_order: Literal["little", "big"] = "little"

    @property
    def end(self) -> int:
        return self.start + self.size

    def struct_format(self) -> str:
        code = {1: "b", 2: "h"}[self.size]
        if not self.signed:
            code = code.upper()
        return ("<" if self.byte_order == "little" else ">") + code

    def converter(self) -> Callable[[int], PointValue] | None:
        """Return the raw-to-value function, or ``None`` when the raw integer is the value."""
        if self.divisor == 1 and self.raw_offset == 0 and self.premultiplier == 1:
            return None
        premultiplier, raw_offset, divisor = self.premultiplier, self.raw_offset, self.divisor
        return lambda raw: (raw * premultiplier - raw_offset) / divisor

    def raw_from_value(self, value: float) -> int:
        """Invert :meth:`converter`; raise ValueError when the value does not fit the field."""
        raw = round((value * self.divisor + self.raw_offset) / self.premultiplier)
        bits = 8 * self.size
        low, high = (
            (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if self.signed else (0, (1 << bits) - 1)
        )
        if not low <= raw <= high:
            kind = "signed" if self.signed else "unsigned"
            raise ValueError(
                f"{self.name} = {value} needs raw {raw}, outside the {kind} {bits}-bit "
                f"range {low}..{high}"
            )
        return raw


@dataclass(frozen=True, slots=True)
class Flag:
    """One bit: ``data[byte] & (1 << bit)``."""

    name: str
    byte: int
    bit: int


@dataclass(frozen=True, slots=True)
class FrameSpec:
    """Layout of one frame id."""

    frame_id: int
    name: str
    is_extended: bool
    #: DLC of a complete frame.
    length: int
    fields: tuple[Field, ...] = ()
    flags: tuple[Flag, ...] = ()
    #: Name of a point that is the whole payload as ASCII text.
    text: str | None = None
    #: Bytes that :func:`encode_frame` puts where no field or flag is.
    fill: bytes = b""

    @property
    def points(self) -> tuple[str, ...]:
        names = [f.name for f in self.fields] + [f.name for f in self.flags]
        if self.text:
            names.append(self.text)
        return tuple(names)


def _u16(name: str, start: int, divisor: int = 1) -> Field:
    return Field(name, start, 2, signed=False, divisor=divisor)


def _s16(name: str, start: int, divisor: int = 1) -> Field:
    return Field(name, start, 2, signed=True, divisor=divisor)


def _kelvin(name: str, start: int) -> Field:
    # Whole kelvin to degrees Celsius: (100 * raw - 27315) / 100.
    return Field(name, start, 2, divisor=100, raw_offset=27315, premultiplier=100)


def _hv_current(name: str, start: int) -> Field:
    return Field(name, start, 2, divisor=10, raw_offset=HV_CURRENT_OFFSET)


_LIMITS = FrameSpec(
    0x351,
    "limits",
    is_extended=False,
    length=8,
    fields=(
        _u16("charge_voltage_limit_v", 0, 10),
        _s16("charge_current_limit_a", 2, 10),
        _s16("discharge_current_limit_a", 4, 10),
        _u16("discharge_voltage_limit_v", 6, 10),
    ),
)

_SOC_SOH = FrameSpec(
    0x355,
    "soc_soh",
    is_extended=False,
    length=4,
    fields=(_u16("soc_pct", 0), _u16("soh_pct", 2)),
)

_PACK = FrameSpec(
    0x356,
    "pack",
    is_extended=False,
    length=6,
    fields=(
        _s16("pack_voltage_v", 0, 100),
        _s16("pack_current_a", 2, 10),
        _s16("pack_temperature_c", 4, 10),
    ),
)

# 0x359 bytes 0-3. P = protection (the BMS stops that direction),
# W = warning. Bits not drawn are reserved.
#
#   byte 0 (P)        7   6   5   4   3   2   1   0
#                   +---+---+---+---+---+---+---+---+
#                   |DOC|   |   |UT |OT |UV |OV |   |
#                   +---+---+---+---+---+---+---+---+
#   byte 1 (P)      |   |   |   |   |SYS|   |   |COC|
#                   +---+---+---+---+---+---+---+---+
#   byte 2 (W)      |DHC|   |   |LT |HT |LV |HV |   |
#                   +---+---+---+---+---+---+---+---+
#   byte 3 (W)      |   |   |   |   |COM|   |   |CHC|
#                   +---+---+---+---+---+---+---+---+
#
#   OV/UV cell over/under voltage, OT/UT over/under temperature,
#   DOC/COC discharge/charge over current, SYS system error,
#   HV/LV cell high/low voltage, HT/LT high/low temperature,
#   DHC/CHC discharge/charge high current, COM internal communication failure.
_STATUS = FrameSpec(
    0x359,
    "status",
    is_extended=False,
    length=7,
    flags=(
        Flag("protection_cell_over_voltage", 0, 1),
        Flag("protection_cell_under_voltage", 0, 2),
        Flag("protection_over_temperature", 0, 3),
        Flag("protection_under_temperature", 0, 4),
        Flag("protection_discharge_over_current", 0, 7),
        Flag("protection_charge_over_current", 1, 0),
        Flag("protection_system_error", 1, 3),
        Flag("warning_cell_high_voltage", 2, 1),
        Flag("warning_cell_low_voltage", 2, 2),
        Flag("warning_high_temperature", 2, 3),
        Flag("warning_low_temperature", 2, 4),
        Flag("warning_discharge_high_current", 2, 7),
        Flag("warning_charge_high_current", 3, 0),
        Flag("warning_internal_communication", 3, 3),
    ),
    fields=(Field("module_count", 4, 1),),
    fill=b"\x00\x00\x00\x00\x00PN",
)

# 0x35C byte 0. Byte 1, where sent, is reserved.
#
#      7   6   5   4   3   2   1   0
#    +---+---+---+---+---+---+---+---+
#    |CE |DE |FC1|FC2|FUL|   |   |   |
#    +---+---+---+---+---+---+---+---+
#
#   CE charge enable, DE discharge enable, FC1/FC2 force charge request I/II,
#   FUL full charge request.
_REQUESTS = FrameSpec(
    0x35C,
    "requests",
    is_extended=False,
    length=2,
    flags=(
        Flag("charge_enable", 0, 7),
        Flag("discharge_enable", 0, 6),
        Flag("force_charge_request_1", 0, 5),
        Flag("force_charge_request_2", 0, 4),
        Flag("full_charge_request", 0, 3),
    ),
    fill=b"\x00\x00",
)

_NAME = FrameSpec(0x35E, "name", is_extended=False, length=8, text="manufacturer_name")

_CELLS = FrameSpec(
    0x373,
    "cells",
    is_extended=False,
    length=8,
    fields=(
        _u16("cell_voltage_min_v", 0, 1000),
        _u16("cell_voltage_max_v", 2, 1000),
        _kelvin("cell_temperature_min_c", 4),
        _kelvin("cell_temperature_max_c", 6),
    ),
)

_HV_LIMITS = FrameSpec(
    0x4220,
    "hv_limits",
    is_extended=True,
    length=8,
    fields=(
        _u16("charge_voltage_limit_v", 0, 10),
        _u16("discharge_voltage_limit_v", 2, 10),
        _hv_current("charge_current_limit_a", 4),
        _hv_current("discharge_current_limit_a", 6),
    ),
)

#: Every frame the built-in decoder decodes, by frame id.
FRAMES: Mapping[int, FrameSpec] = {
    spec.frame_id: spec
    for spec in (_LIMITS, _SOC_SOH, _PACK, _STATUS, _REQUESTS, _NAME, _CELLS, _HV_LIMITS)
}


class _CompiledFrame:
    """A :class:`FrameSpec` turned into tuples that the decode loop walks without lookups."""

    __slots__ = ("flags", "frame_id", "is_extended", "name", "numeric", "text")

    def __init__(self, spec: FrameSpec) -> None:
        self.frame_id = spec.frame_id
        self.name = spec.name
        self.is_extended = spec.is_extended
        self.numeric = tuple(
            (f.name, f.start, f.end, struct.Struct(f.struct_format()).unpack_from, f.converter())
            for f in spec.fields
        )
        self.flags = tuple((f.name, f.byte, 1 << f.bit) for f in spec.flags)
        self.text = spec.text

    def decode(self, data: bytes) -> DecodedFrame:
        size = len(data)
        signals: dict[str, PointValue] = {}
        missing: list[str] = []
        for name, start, end, unpack_from, convert in self.numeric:
            if end > size:
                missing.append(name)
                continue
            raw = unpack_from(data, start)[0]
            signals[name] = raw if convert is None else convert(raw)
        for name, byte, mask in self.flags:
            if byte < size:
                signals[name] = bool(data[byte] & mask)
            else:
                missing.append(name)
        if self.text is not None:
            if size:
                signals[self.text] = decode_text(bytes(data[:8]))
            else:
                missing.append(self.text)
        return DecodedFrame(self.frame_id, self.name, signals, tuple(missing))


class PylontechDecoder:
    """Decoder for the frames in :data:`FRAMES`; satisfies :class:`drivers.can.points.FrameDecoder`.

    The decode function of each frame id is built once, here. The instance
    has no mutable state, so one instance may serve several threads.
    """

    def __init__(self) -> None:
        self._frames = {frame_id: _CompiledFrame(spec) for frame_id, spec in FRAMES.items()}
        self.points_by_frame: Mapping[int, tuple[str, ...]] = {
            frame_id: spec.points for frame_id, spec in FRAMES.items()
        }

    def decode(
        self, frame_id: int, data: bytes, is_extended: bool | None = None
    ) -> DecodedFrame | None:
        """Decode one frame; return ``None`` for an unknown id or a mismatched id type.

        ``is_extended`` of ``None`` skips the check of the id type (11 or 29 bit).
        """
        frame = self._frames.get(frame_id)
        if frame is None or (is_extended is not None and is_extended != frame.is_extended):
            return None
        return frame.decode(data)


#: A shared decoder instance.
DECODER = PylontechDecoder()
decode_frame = DECODER.decode


def encode_frame(frame_id: int, values: Mapping[str, PointValue]) -> bytes:
    """Encode point values into a complete frame payload (used by tests and simulators).

    Numeric points are required. Missing flags are encoded as 0. A text frame
    is as long as its text, at most 8 bytes. Raise KeyError for an unknown frame
    id or a missing numeric point, and ValueError for a value that does not fit.
    """
    spec = FRAMES[frame_id]
    if spec.text is not None:
        text = str(values[spec.text]).encode("ascii")
        if len(text) > 8:
            raise ValueError(f"{spec.text} {values[spec.text]!r} is longer than 8 bytes")
        return text
    data = bytearray(spec.fill.ljust(spec.length, b"\x00"))
    for field in spec.fields:
        struct.pack_into(
            field.struct_format(), data, field.start, field.raw_from_value(values[field.name])
        )
    for flag in spec.flags:
        if values.get(flag.name):
            data[flag.byte] |= 1 << flag.bit
    return bytes(data)
