"""State of one battery string as its BMS reports it over CAN.

:class:`BmsString` takes decoded frames from the CAN reader's thread and
returns :class:`BmsSnapshot` objects to the caller of :meth:`BmsString.snapshot`. It owns every
conversion from the BMS's conventions to the gateway's, each done in one
place:

* current and power: positive = discharge. The profile's ``current_sign``
  says how the BMS signs discharge; the factor is applied once, in
  :meth:`BmsString._store`. The decoded ``pack_current_a`` keeps the BMS's
  sign and is published as ``battery_current_a``.
* current limits: non-negative magnitudes, capped at the string's hardware
  ceiling (``max_current_a``), whichever sign or offset the frame used.
* power limits: ``charge_limit_kw = charge_current_limit_a * pack_voltage_v / 1000``,
  likewise for discharge.

Link state and recovery gating::

    WAITING --N consistent frame sets--> ONLINE --no frame for stale time--> SILENT
       |                                  |  ^                                 |
       |                inconsistent frame|  |N consistent frame sets          |
       |                or a set frame    v  |                                 |
       |                missing        RECOVERING <-----frames resume----------+
       +---------no frame for stale time-----------------------------------> SILENT

Only ONLINE allows power. A consistent frame set contains every frame of the
profile's ``frame_set`` (which includes a limit frame), each with every
non-optional point valid. After silence the count restarts at zero, so the
limits in force when power is allowed again come from frames received after
the silence. While SILENT every value is STALE and the ``bms_silent`` alarm
is active.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import can
import structlog

from drivers.can.points import POINTS, DecodedFrame
from drivers.can.profile import BmsProfile, load_bms_profile
from drivers.quality import Quality, Reading

log = structlog.get_logger(__name__)

#: Readings a snapshot adds to the decoded points, in the gateway's conventions.
DERIVED_POINTS = {
    "battery_current_a": "A",
    "battery_power_kw": "kW",
    "charge_limit_kw": "kW",
    "discharge_limit_kw": "kW",
}
#: Points that carry a current limit; a BMS may send them with either sign.
LIMIT_POINTS = ("charge_current_limit_a", "discharge_current_limit_a")


def limit_magnitude_a(raw_a: float) -> float:
    """Return the non-negative current limit, in A, that a BMS's signed limit value means.

    Some BMSs send the discharge limit with the sign of a discharge current:
    ``351`` with bytes ``54 FC`` decodes to -94.0 A and means a 94.0 A limit,
    the same as ``AC 03``. A limit is a magnitude, so only ``abs`` is kept.
    """
    return abs(raw_a)


class Severity(enum.IntEnum):
    """Severity of an active BMS alarm; a higher value is worse."""

    WARNING = 1
    ALARM = 2
    #: The BMS has stopped, or is about to stop, charge or discharge.
    PROTECTION = 3


class BmsState(enum.Enum):
    """Whether the string's data may be used to allow power."""

    #: No consistent frame set yet since start.
    WAITING = "waiting"
    #: Frames arrive, but fewer than the required consistent frame sets in a row.
    RECOVERING = "recovering"
    #: Enough consistent frame sets in a row: power is allowed.
    ONLINE = "online"
    #: No frame for the stale time; every value is STALE.
    SILENT = "silent"


@dataclass(frozen=True, slots=True)
class Alarm:
    """One active alarm of a string."""

    name: str
    severity: Severity
    #: Power directions this alarm blocks: ``charge``, ``discharge``, both or none.
    blocks: frozenset[str] = frozenset()


_SILENT_ALARM = Alarm("bms_silent", Severity.ALARM, frozenset({"charge", "discharge"}))


@dataclass(frozen=True)
class BmsStringConfig:
    """Settings of one string; build from the site configuration with :meth:`from_site`."""

    name: str
    profile: BmsProfile
    #: Hardware ceiling of the charge and discharge current limits, in A.
    max_current_a: float
    #: Values older than this are STALE; ``None`` uses the profile's default.
    stale_s: float | None = None
    #: Consistent frame sets in a row needed before power is allowed.
    recovery_frame_sets: int = 3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_current_a) and self.max_current_a > 0):
            raise ValueError(
                f"BMS {self.name}: max_current_a must be > 0 A, got {self.max_current_a}"
            )
        if self.stale_s is not None and not self.stale_s > 0:
            raise ValueError(f"BMS {self.name}: stale_s must be > 0 s, got {self.stale_s}")
        if self.recovery_frame_sets < 1:
            raise ValueError(
                f"BMS {self.name}: recovery_frame_sets must be >= 1, got {self.recovery_frame_sets}"
            )

    @property
    def effective_stale_s(self) -> float:
        return self.stale_s if self.stale_s is not None else self.profile.stale_s

    @classmethod
    def from_site(cls, device, safety, profile: BmsProfile | None = None) -> BmsStringConfig:
        """Build from a ``gateway.config.Device`` with role ``bms`` and the site's ``Safety``.

        The stale time is ``device.stale_ms`` when set, else ``safety.bms_stale_ms``.
        Raise ValueError when the device has no ``max_current_a``.
        """
        if device.max_current_a is None:
            raise ValueError(
                f"device {device.name!r} is a BMS without max_current_a; set it to the "
                "string's hardware current ceiling in A, which caps the BMS's limits"
            )
        stale_ms = device.stale_ms if device.stale_ms is not None else safety.bms_stale_ms
        return cls(
            name=device.name,
            profile=profile if profile is not None else load_bms_profile(device.profile),
            max_current_a=device.max_current_a,
            stale_s=stale_ms / 1000.0,
            recovery_frame_sets=safety.bms_recovery_frame_sets,
        )


@dataclass(frozen=True)
class BmsSnapshot:
    """The state of one string at ``t_mono_s``, ready for the control core.

    ``readings`` contains every decoded point except ``pack_current_a``, plus the
    points in :data:`DERIVED_POINTS`. A value that is not GOOD is ``None``.
    """

    name: str
    t_mono_s: float
    state: BmsState
    #: True only in ONLINE: the data is fresh and consistent enough to allow power.
    power_allowed: bool
    #: Reason power is not allowed, or ``""`` when it is.
    reason: str
    consistent_frame_sets: int
    required_frame_sets: int
    readings: Mapping[str, Reading]
    alarms: tuple[Alarm, ...]
    frames_received: int
    frames_unknown: int
    #: Whether the profile's frame set carries the charge and discharge enable flags.
    enable_flags_expected: bool = field(default=True, repr=False)

    def __getitem__(self, point: str) -> Reading:
        return self.readings[point]

    @property
    def charge_limit_kw(self) -> Reading:
        return self.readings["charge_limit_kw"]

    @property
    def discharge_limit_kw(self) -> Reading:
        return self.readings["discharge_limit_kw"]

    def alarm(self, name: str) -> Alarm | None:
        return next((a for a in self.alarms if a.name == name), None)

    def power_window_kw(self) -> tuple[float, float]:
        """Return ``(max_charge_kw, max_discharge_kw)``, both >= 0, failing closed.

        A direction gets 0.0 unless power is allowed, its power limit is GOOD,
        its enable flag is GOOD and set (where the frame set carries enable
        flags), and no active alarm blocks it.
        """
        if not self.power_allowed:
            return 0.0, 0.0
        blocked = set().union(*(a.blocks for a in self.alarms)) if self.alarms else set()
        window = []
        for direction in ("charge", "discharge"):
            limit = self.readings[f"{direction}_limit_kw"]
            enable = self.readings.get(f"{direction}_enable")
            enabled = not self.enable_flags_expected or (
                enable is not None and enable.value is True
            )
            usable = limit.good and enabled and direction not in blocked
            window.append(float(limit.value) if usable else 0.0)
        return window[0], window[1]


class BmsString:
    """Per-string BMS state, fed by :meth:`on_frame` and read by :meth:`snapshot`.

    Both methods take a lock, so the CAN reader's thread may feed frames while
    another thread takes snapshots. Times are ``time.monotonic()`` seconds.
    """

    def __init__(self, config: BmsStringConfig, t_start_mono_s: float | None = None) -> None:
        self.config = config
        self.name = config.name
        profile = config.profile
        self._decoder = profile.decoder
        self._stale_s = config.effective_stale_s
        self._sign = profile.current_sign
        self._lock = threading.Lock()

        points = {p for frame in self._decoder.points_by_frame.values() for p in frame}
        set_points = {
            p for frame_id in profile.frame_set for p in self._decoder.points_by_frame[frame_id]
        }
        self._required = frozenset(set_points - profile.optional_points)
        self._enable_expected = {"charge_enable", "discharge_enable"} <= set_points
        self._units = {p: POINTS[p].unit for p in points} | DERIVED_POINTS
        t0 = time.monotonic() if t_start_mono_s is None else t_start_mono_s
        self._values: dict[str, Reading] = {
            p: Reading.bad(Quality.STALE, t0, unit)
            for p, unit in self._units.items()
            if p != "pack_current_a"
        }

        self._state = BmsState.WAITING
        self._reason = "no frame received yet"
        self._t_start = t0
        self._last_frame_t: float | None = None
        self._frame_t: dict[int, float] = {}
        self._set_seen: set[int] = set()
        self._set_problem = ""
        self._consistent_sets = 0
        self._capped = dict.fromkeys(LIMIT_POINTS, False)
        self.frames_received = 0
        self.frames_unknown = 0

    # -- input -------------------------------------------------------------

    def on_message(self, message: can.Message, t_mono_s: float) -> None:
        """Feed a python-can message; fits the sink of :class:`drivers.can.reader.CanReader`."""
        if message.is_error_frame or message.is_remote_frame:
            return
        self.on_frame(message.arbitration_id, message.data, message.is_extended_id, t_mono_s)

    def on_frame(
        self, frame_id: int, data: bytes, is_extended: bool | None, t_mono_s: float
    ) -> None:
        """Decode one frame received at ``t_mono_s`` and update the string's state."""
        decoded = self._decoder.decode(frame_id, data, is_extended)
        with self._lock:
            if decoded is None:
                self.frames_unknown += 1
                return
            self.frames_received += 1
            self._check_silence(t_mono_s)
            if self._state is BmsState.SILENT:
                self._set_state(BmsState.RECOVERING, "frames resumed after silence", t_mono_s)
            elif self._state is BmsState.ONLINE:
                self._check_late_frames(t_mono_s)
            self._last_frame_t = t_mono_s
            self._frame_t[frame_id] = t_mono_s

            problem = self._store(decoded, t_mono_s)
            if frame_id in self.config.profile.frame_set:
                self._count_frame_set(frame_id, problem, t_mono_s)

    def _store(self, decoded: DecodedFrame, t: float) -> str:
        """Store a frame's points as readings; return the first problem with a required point."""
        problems = []
        ranges = self.config.profile.ranges
        for point, value in decoded.signals.items():
            unit = self._units[point]
            low, high = ranges.get(point, (None, None))
            if point in LIMIT_POINTS:
                magnitude_a = limit_magnitude_a(value)
                reading = Reading(self._cap_limit(point, magnitude_a), Quality.GOOD, t, unit)
            else:
                reading = Reading.checked(value, t, unit, low, high)
                if point == "pack_current_a" and reading.good:
                    # The one place where the BMS's current sign becomes the gateway's.
                    reading = Reading(reading.value * self._sign, Quality.GOOD, t, unit)
            self._values[snapshot_name(point)] = reading
            if not reading.good and point in self._required:
                problems.append(
                    f"{point} = {value} {unit} is outside the profile range {low}..{high}"
                )
        for point in decoded.missing:
            self._values[snapshot_name(point)] = Reading.bad(
                Quality.NOT_IMPLEMENTED, t, self._units[point]
            )
            if point in self._required:
                problems.append(
                    f"{point} missing from frame 0x{decoded.frame_id:X} (DLC too short)"
                )
        return problems[0] if problems else ""

    def _cap_limit(self, point: str, magnitude_a: float) -> float:
        ceiling = self.config.max_current_a
        capped = magnitude_a > ceiling
        if capped != self._capped[point]:
            self._capped[point] = capped
            if capped:
                log.warning(
                    "bms_limit_capped",
                    bms=self.name,
                    point=point,
                    reported_a=magnitude_a,
                    ceiling_a=ceiling,
                )
            else:
                log.info(
                    "bms_limit_within_ceiling", bms=self.name, point=point, reported_a=magnitude_a
                )
        return min(magnitude_a, ceiling)

    def _count_frame_set(self, frame_id: int, problem: str, t: float) -> None:
        if problem:
            self._set_problem = self._set_problem or problem
            if self._state is BmsState.ONLINE:
                self._set_state(BmsState.RECOVERING, problem, t)
        self._set_seen.add(frame_id)
        if not self._set_seen >= self.config.profile.frame_set:
            return

        if self._set_problem:
            self._consistent_sets = 0
            if self._state is not BmsState.ONLINE:
                self._reason = self._set_problem
        else:
            self._consistent_sets += 1
        self._set_seen.clear()
        self._set_problem = ""

        required = self.config.recovery_frame_sets
        if self._state is not BmsState.ONLINE:
            if self._consistent_sets >= required:
                self._set_state(BmsState.ONLINE, "", t)
            elif self._consistent_sets:
                self._reason = (
                    f"{self._consistent_sets} of {required} consistent frame sets received"
                )

    # -- time --------------------------------------------------------------

    def _check_silence(self, now: float) -> None:
        """Enter SILENT when no frame arrived for more than the stale time."""
        last = self._last_frame_t if self._last_frame_t is not None else self._t_start
        if self._state is not BmsState.SILENT and now - last > self._stale_s:
            self._consistent_sets = 0
            self._set_seen.clear()
            self._set_problem = ""
            self._set_state(
                BmsState.SILENT, f"no frame for more than {self._stale_s:g} s", last + self._stale_s
            )

    def link_down(self, reason: str, now_mono_s: float | None = None) -> None:
        """Enter SILENT at once because the CAN link that carries the frames failed.

        Waiting for the stale time would allow power on values that can no
        longer change for seconds. Recovery then needs the usual consistent
        frame sets. Before the first frame (WAITING) nothing changes.
        """
        now = time.monotonic() if now_mono_s is None else now_mono_s
        with self._lock:
            if self._state in (BmsState.SILENT, BmsState.WAITING):
                return
            self._consistent_sets = 0
            self._set_seen.clear()
            self._set_problem = ""
            self._set_state(BmsState.SILENT, f"CAN link down: {reason}", now)

    def _check_late_frames(self, now: float) -> None:
        """Leave ONLINE when frames still arrive but one frame of the set stopped.

        Checked on each frame, not in :meth:`snapshot`: when the whole link
        goes quiet the string passes straight from ONLINE to SILENT.
        """
        for frame_id in sorted(self.config.profile.frame_set):
            if now - self._frame_t.get(frame_id, self._t_start) > self._stale_s:
                self._consistent_sets = 0
                self._set_state(
                    BmsState.RECOVERING,
                    f"frame 0x{frame_id:X} not received for more than {self._stale_s:g} s",
                    now,
                )
                return

    def _set_state(self, state: BmsState, reason: str, t: float) -> None:
        if state is self._state:
            return
        event = "bms_state_changed"
        fields = {
            "bms": self.name,
            "state": state.value,
            "previous": self._state.value,
            "t_mono_s": t,
        }
        if state is BmsState.SILENT:
            log.error(event, **fields, reason=reason, alarm=_SILENT_ALARM.name)
        elif state is BmsState.ONLINE:
            log.info(event, **fields, frame_sets=self._consistent_sets)
        else:
            log.warning(event, **fields, reason=reason)
        self._state = state
        self._reason = reason

    # -- output ------------------------------------------------------------

    def snapshot(self, now_mono_s: float | None = None) -> BmsSnapshot:
        """Return the string's state at ``now_mono_s`` (default: now), entering SILENT if due."""
        now = time.monotonic() if now_mono_s is None else now_mono_s
        with self._lock:
            self._check_silence(now)
            silent = self._state is BmsState.SILENT
            readings: dict[str, Reading] = {}
            for point, stored in self._values.items():
                if silent and stored.good:
                    readings[point] = Reading.bad(Quality.STALE, stored.t_mono_s, stored.unit)
                else:
                    readings[point] = stored.aged(now, self._stale_s)
            readings["battery_power_kw"] = _product_kw(
                readings["battery_current_a"], readings["pack_voltage_v"], now
            )
            for direction in ("charge", "discharge"):
                readings[f"{direction}_limit_kw"] = _product_kw(
                    readings[f"{direction}_current_limit_a"], readings["pack_voltage_v"], now
                )
            alarms = self._alarms(readings, silent)
            online = self._state is BmsState.ONLINE
            return BmsSnapshot(
                name=self.name,
                t_mono_s=now,
                state=self._state,
                power_allowed=online,
                reason="" if online else self._reason,
                consistent_frame_sets=self._consistent_sets,
                required_frame_sets=self.config.recovery_frame_sets,
                readings=readings,
                alarms=alarms,
                frames_received=self.frames_received,
                frames_unknown=self.frames_unknown,
                enable_flags_expected=self._enable_expected,
            )

    def _alarms(self, readings: Mapping[str, Reading], silent: bool) -> tuple[Alarm, ...]:
        alarms = [_SILENT_ALARM] if silent else []
        rules = self.config.profile.flags
        for point, reading in readings.items():
            if (
                POINTS.get(point) is None
                or POINTS[point].kind != "flag"
                or reading.value is not True
            ):
                continue
            if not point.startswith(("protection_", "warning_")):
                continue
            rule = rules.get(point)
            if rule is None:
                alarms.append(Alarm(point, Severity.WARNING))
            else:
                alarms.append(Alarm(point, Severity[rule.severity.upper()], frozenset(rule.blocks)))
        alarms.sort(key=lambda a: (-a.severity, a.name))
        return tuple(alarms)


def snapshot_name(point: str) -> str:
    """Return the snapshot name of a decoded point (``pack_current_a`` is ``battery_current_a``)."""
    return "battery_current_a" if point == "pack_current_a" else point


def _product_kw(current: Reading, voltage: Reading, now: float) -> Reading:
    """Return ``current * voltage / 1000`` with the worse quality and the older time of the two."""
    t = min(current.t_mono_s, voltage.t_mono_s)
    if not current.good:
        return Reading.bad(current.quality, t, "kW")
    if not voltage.good:
        return Reading.bad(voltage.quality, t, "kW")
    return Reading(current.value * voltage.value / 1000.0, Quality.GOOD, t, "kW")
