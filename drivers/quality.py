"""Quality flags and the timestamped reading that every driver produces."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Quality(enum.IntEnum):
    """Why a value may or may not be used.

    Only ``GOOD`` values may reach a power sum, an energy integral or a
    setpoint. The integer codes are stable: they are stored and exported.
    """

    GOOD = 0
    #: The device answered with its "no value" sentinel (for example int16 0x8000).
    NOT_IMPLEMENTED = 1
    #: No fresh value arrived within the point's stale time.
    STALE = 2
    #: The last read failed: timeout, exception response, lost link.
    COMM_ERROR = 3
    #: The value decoded but lies outside the range the profile allows.
    OUT_OF_RANGE = 4


@dataclass(frozen=True, slots=True)
class Reading:
    """One decoded value with its source time and quality.

    ``value`` is ``None`` whenever ``quality`` is not ``GOOD``: an unusable
    value is never carried along where a caller could sum it by mistake.
    """

    value: float | int | str | None
    quality: Quality
    #: ``time.monotonic()`` seconds when the value was received.
    t_mono_s: float
    unit: str = ""

    @property
    def good(self) -> bool:
        return self.quality is Quality.GOOD

    @classmethod
    def bad(cls, quality: Quality, t_mono_s: float, unit: str = "") -> Reading:
        if quality is Quality.GOOD:
            raise ValueError("Reading.bad() needs a quality other than GOOD")
        return cls(None, quality, t_mono_s, unit)

    @classmethod
    def checked(
        cls,
        value: float | int | str,
        t_mono_s: float,
        unit: str = "",
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> Reading:
        """Build a reading, flagging NaN, infinities and values outside [minimum, maximum]."""
        if isinstance(value, float) and not math.isfinite(value):
            return cls(None, Quality.NOT_IMPLEMENTED, t_mono_s, unit)
        if isinstance(value, (int, float)) and (
            (minimum is not None and value < minimum) or (maximum is not None and value > maximum)
        ):
            return cls(None, Quality.OUT_OF_RANGE, t_mono_s, unit)
        return cls(value, Quality.GOOD, t_mono_s, unit)

    def aged(self, now_mono_s: float, stale_after_s: float) -> Reading:
        """Return this reading, or a STALE one once it is older than ``stale_after_s``."""
        if self.quality is Quality.GOOD and now_mono_s - self.t_mono_s > stale_after_s:
            return Reading(None, Quality.STALE, self.t_mono_s, self.unit)
        return self
