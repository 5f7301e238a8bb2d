"""The gateway's BMS points and the decoded-frame type that every CAN BMS decoder returns.

Both decoders, the built-in Pylontech one (:mod:`drivers.can.pylontech`) and the
cantools one (:mod:`drivers.can.dbc`), produce :class:`DecodedFrame` objects
keyed by the point names below, so :mod:`drivers.can.bms` does not care which
one is in use.

Values in a :class:`DecodedFrame` are as the device means them. In particular
``pack_current_a`` keeps the BMS's own sign (these BMSs report discharge as
negative) and current limits keep whatever sign the frame used. Turning them
into the gateway's conventions is :class:`drivers.can.bms.BmsString`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

PointValue = float | int | bool | str
PointKind = Literal["number", "integer", "flag", "text"]


@dataclass(frozen=True, slots=True)
class PointSpec:
    """Unit and value kind of one BMS point."""

    unit: str
    kind: PointKind


_NUMBER_UNITS = {
    "charge_voltage_limit_v": "V",
    "charge_current_limit_a": "A",
    "discharge_current_limit_a": "A",
    "discharge_voltage_limit_v": "V",
    "soc_pct": "%",
    "soh_pct": "%",
    "pack_voltage_v": "V",
    "pack_current_a": "A",
    "pack_temperature_c": "°C",
    "cell_voltage_min_v": "V",
    "cell_voltage_max_v": "V",
    "cell_temperature_min_c": "°C",
    "cell_temperature_max_c": "°C",
}

#: Protection bits: the BMS has stopped, or is about to stop, charge or discharge.
PROTECTION_FLAGS = (
    "protection_cell_over_voltage",
    "protection_cell_under_voltage",
    "protection_over_temperature",
    "protection_under_temperature",
    "protection_discharge_over_current",
    "protection_charge_over_current",
    "protection_system_error",
)
#: Alarm bits that Pylontech-style BMSs send as early warnings.
WARNING_FLAGS = (
    "warning_cell_high_voltage",
    "warning_cell_low_voltage",
    "warning_high_temperature",
    "warning_low_temperature",
    "warning_discharge_high_current",
    "warning_charge_high_current",
    "warning_internal_communication",
)
#: Enable and request bits.
REQUEST_FLAGS = (
    "charge_enable",
    "discharge_enable",
    "force_charge_request_1",
    "force_charge_request_2",
    "full_charge_request",
)

#: Every point a CAN BMS decoder may produce, with its unit and kind.
POINTS: Mapping[str, PointSpec] = {
    **{name: PointSpec(unit, "number") for name, unit in _NUMBER_UNITS.items()},
    "module_count": PointSpec("", "integer"),
    **{name: PointSpec("", "flag") for name in PROTECTION_FLAGS + WARNING_FLAGS + REQUEST_FLAGS},
    "manufacturer_name": PointSpec("", "text"),
}


def decode_text(data: bytes) -> str:
    """Decode a space- or NUL-padded ASCII name; bytes outside ASCII become U+FFFD."""
    return data.decode("ascii", errors="replace").rstrip(" \x00")


class DecodedFrame(NamedTuple):
    """The points one CAN frame carried.

    ``signals`` contains every point whose bytes lay inside the frame's DLC.
    ``missing`` names the points the frame defines but whose bytes the DLC cut
    off. A decoder never reads past the DLC and never fills in a default.
    A NamedTuple rather than a frozen dataclass because one is built per
    frame and a frozen dataclass takes about twice as long to build.
    """

    frame_id: int
    #: Short frame name, for example ``limits`` for 0x351.
    name: str
    signals: dict[str, PointValue]
    missing: tuple[str, ...] = ()


class FrameDecoder(Protocol):
    """Interface that :class:`drivers.can.bms.BmsString` requires of a decoder."""

    #: Point names each known frame id can carry, in frame order.
    points_by_frame: Mapping[int, tuple[str, ...]]

    def decode(
        self, frame_id: int, data: bytes, is_extended: bool | None = None
    ) -> DecodedFrame | None:
        """Decode one frame; return ``None`` for an id the decoder does not know."""
        ...
