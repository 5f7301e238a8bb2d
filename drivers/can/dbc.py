"""A CAN BMS decoder driven by a DBC file and cantools.

A profile maps DBC signal names to the gateway's BMS points
(:data:`drivers.can.points.POINTS`). Signals the profile does not map are
ignored. A text point such as the manufacturer name is built from a list of
8-bit signals, one per character, because DBC has no string type. Without a
mapping the decoder returns every signal under its DBC name, with value
tables decoded to their names. The CLI uses that mode for a DBC without a
profile.

Frames shorter than the DBC message length are decoded with
``allow_truncated``: signals whose bits lie past the DLC are reported
missing, never filled in. Longer frames are cut to the message length.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cantools
from cantools.database.can import Message, Signal
from cantools.database.namedsignalvalue import NamedSignalValue
from cantools.typechecking import SignalValueType

from drivers.can.points import POINTS, DecodedFrame, PointValue, decode_text

#: Scales and offsets with more decimal places than this are not rounded.
_MAX_DECIMAL_PLACES = 9


class DbcError(ValueError):
    """The DBC file cannot be loaded, or the profile's signal mapping does not fit it."""


def _identity(value: SignalValueType) -> PointValue:
    if isinstance(value, NamedSignalValue):
        return value.name
    return value  # type: ignore[return-value]


def _decimal_places(number: float) -> int | None:
    """Return the decimal places of a short decimal such as 0.1 or -273.15, else ``None``."""
    exponent = decimal.Decimal(repr(float(number))).as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -_MAX_DECIMAL_PLACES:
        return None
    return max(0, -exponent)


def _rounding(signal: Signal, convert: Callable[[Any], PointValue]) -> Callable[[Any], PointValue]:
    """Wrap ``convert`` to round away float noise of a decimal scale.

    cantools computes ``raw * scale + offset``, so raw 448 at scale 0.1 gives
    44.800000000000004. Every exact result is a whole multiple of the scale
    plus the offset, so for results of up to 15 significant digits, rounding
    to their decimal places gives the float nearest the exact value. The
    built-in decoder returns that float too.
    """
    scale = _decimal_places(signal.scale)
    offset = _decimal_places(signal.offset)
    if scale is None or offset is None or (scale == 0 and offset == 0):
        return convert
    places = max(scale, offset)

    def rounded(value: Any) -> PointValue:
        if isinstance(value, float):
            value = round(value, places)
        return convert(value)

    return rounded


_COERCE: Mapping[str, Callable[[Any], PointValue]] = {
    "number": lambda value: value,
    "integer": int,
    "flag": bool,
}


@dataclass(frozen=True, slots=True)
class _MessagePlan:
    """Signals to extract from one DBC message, chosen once at load."""

    message: Message
    #: (DBC signal, point name, converter) per mapped numeric or flag point.
    signals: tuple[tuple[str, str, Callable[[Any], PointValue]], ...]
    #: (point name, DBC signals of its characters in order) per text point.
    texts: tuple[tuple[str, tuple[str, ...]], ...]
    decode_choices: bool

    @property
    def points(self) -> tuple[str, ...]:
        return tuple(point for _, point, _ in self.signals) + tuple(
            point for point, _ in self.texts
        )


def load_database(path: str | Path) -> cantools.database.can.Database:
    """Load a DBC file, raising :class:`DbcError` with the file and the parser's reason."""
    try:
        database = cantools.database.load_file(str(path), database_format="dbc", strict=True)
    except FileNotFoundError as err:
        raise DbcError(
            f"DBC file {path} not found; check the path in --dbc or the profile"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise DbcError(f"DBC file {path} cannot be read: {err}") from err
    except cantools.database.Error as err:
        raise DbcError(f"DBC file {path} is not a valid DBC: {err}") from err
    if not isinstance(database, cantools.database.can.Database):
        raise DbcError(f"{path} loaded as {type(database).__name__}, not a CAN database")
    return database


class DbcDecoder:
    """Decode frames with a DBC; satisfies :class:`drivers.can.points.FrameDecoder`.

    ``signals`` maps DBC signal names to point names and ``texts`` maps a text
    point to its character signals. Leave both ``None`` to get every signal
    under its own name. The instance has no mutable state after construction.
    """

    def __init__(
        self,
        path: str | Path,
        signals: Mapping[str, str] | None = None,
        texts: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.database = load_database(path)
        if signals is None and texts is None:
            plans = {m.frame_id: self._plan_unmapped(m) for m in self.database.messages}
        else:
            plans = self._plan_mapped(signals or {}, texts or {})
        self._plans: dict[int, _MessagePlan] = plans
        self.points_by_frame: Mapping[int, tuple[str, ...]] = {
            frame_id: plan.points for frame_id, plan in plans.items()
        }

    @staticmethod
    def _plan_unmapped(message: Message) -> _MessagePlan:
        signals = tuple((s.name, s.name, _rounding(s, _identity)) for s in message.signals)
        return _MessagePlan(message, signals, (), decode_choices=True)

    def _plan_mapped(
        self, signals: Mapping[str, str], texts: Mapping[str, Sequence[str]]
    ) -> dict[int, _MessagePlan]:
        by_signal = {s.name: m for m in self.database.messages for s in m.signals}
        signal_specs = {s.name: s for m in self.database.messages for s in m.signals}
        problems: list[str] = []
        chosen: dict[int, list[tuple[str, str, Callable[[Any], PointValue]]]] = {}
        chosen_texts: dict[int, list[tuple[str, tuple[str, ...]]]] = {}

        for signal_name, point in signals.items():
            message = by_signal.get(signal_name)
            spec = POINTS.get(point)
            if message is None:
                problems.append(f"signal {signal_name!r} is not in the DBC")
            elif spec is None or spec.kind == "text":
                problems.append(
                    f"signal {signal_name!r} maps to {point!r}, which is not a numeric or flag "
                    "BMS point"
                )
            else:
                convert = _rounding(signal_specs[signal_name], _COERCE[spec.kind])
                chosen.setdefault(message.frame_id, []).append((signal_name, point, convert))

        for point, characters in texts.items():
            messages = {by_signal[name].frame_id for name in characters if name in by_signal}
            unknown = [name for name in characters if name not in by_signal]
            if POINTS.get(point) is None or POINTS[point].kind != "text":
                problems.append(f"text point {point!r} is not a text BMS point")
            elif unknown:
                problems.append(f"text point {point!r}: signals {unknown} are not in the DBC")
            elif len(messages) != 1 or not characters:
                problems.append(f"text point {point!r}: its signals must all be in one message")
            else:
                chosen_texts.setdefault(messages.pop(), []).append((point, tuple(characters)))

        if problems:
            known = ", ".join(sorted(by_signal))
            raise DbcError(
                f"profile signal mapping does not fit {self.path}: "
                + "; ".join(problems)
                + f". Signals in the DBC: {known}"
            )
        return {
            frame_id: _MessagePlan(
                self.database.get_message_by_frame_id(frame_id),
                tuple(chosen.get(frame_id, ())),
                tuple(chosen_texts.get(frame_id, ())),
                decode_choices=False,
            )
            for frame_id in sorted(set(chosen) | set(chosen_texts))
        }

    def decode(
        self, frame_id: int, data: bytes, is_extended: bool | None = None
    ) -> DecodedFrame | None:
        """Decode one frame; return ``None`` for an unknown id or a mismatched id type."""
        plan = self._plans.get(frame_id)
        if plan is None or (
            is_extended is not None and is_extended != plan.message.is_extended_frame
        ):
            return None
        try:
            raw = plan.message.decode(
                bytes(data),
                decode_choices=plan.decode_choices,
                scaling=True,
                allow_truncated=True,
                allow_excess=True,
            )
        except cantools.database.DecodeError:
            # NOTE: cantools raises here only for layouts it cannot slice, such as a
            # multiplexer whose selector lies past the DLC; every point is missing then.
            raw = {}

        signals: dict[str, PointValue] = {}
        missing: list[str] = []
        for signal_name, point, convert in plan.signals:
            value = raw.get(signal_name)
            if value is None:
                missing.append(point)
            else:
                signals[point] = convert(value)
        for point, characters in plan.texts:
            codes = []
            for name in characters:
                if name not in raw:
                    break
                codes.append(int(raw[name]) & 0xFF)
            if codes:
                signals[point] = decode_text(bytes(codes))
            else:
                missing.append(point)
        return DecodedFrame(frame_id, plan.message.name, signals, tuple(missing))
