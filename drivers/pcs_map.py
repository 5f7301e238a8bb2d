"""The ``[pcs]`` table of a device profile: which points command a PCS, and how.

Keys that name points, and what the driver does with each:

============================  ===================================================
``setpoint_point``            active-power setpoint, unit W, kW, MW or %; percent
                              is of the nameplate power read at start, or of
                              ``rated_kw`` without one. ``setpoint_sign`` is +1
                              when a positive value discharges, -1 when it charges
``reactive_setpoint_point``   optional reactive-power setpoint (var, kvar or %)
``setpoint_enable_point``     optional: 1 = follow the setpoint, 0 = ignore it
``enable_point``              optional run/connect command; ``enable_on`` and
                              ``enable_off`` are its values
``revert_timer_point``        optional: seconds (unit s or ms) after the last
                              setpoint write until the PCS itself goes to 0 W
``heartbeat_point``           optional counter the gateway increments
``heartbeat_timeout_point``   optional: the PCS's heartbeat timeout (s or ms)
``active_power_point``        measured active power, with ``active_power_sign``
                              as for the setpoint
``status_point``              operating state; ``status_fault_values`` lists the
                              states that mean fault, ``status_names`` names them
``fault_point``               event bitfield; ``fault_bit_names[i]`` names bit i
``rated_power_point``         nameplate power, checked against ``rated_kw``
============================  ===================================================

Optional numbers in ``[pcs]``: ``min_write_interval_ms`` (default: the
device's poll period), ``heartbeat_period_ms`` (default: a third of the
heartbeat timeout read at start, or 1 s without one) and
``readback_tolerance_kw`` (default: 0.1 % of ``rated_kw``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from drivers.modbus.profile import Point, Profile

#: kW per engineering unit of an active-power point.
POWER_UNITS_KW = {"W": 1e-3, "kW": 1.0, "MW": 1e3}
#: kvar per engineering unit of a reactive-power point.
REACTIVE_UNITS_KVAR = {"var": 1e-3, "VAr": 1e-3, "kvar": 1.0, "kVAr": 1.0, "Mvar": 1e3}
#: Seconds per engineering unit of a timer point.
TIME_UNITS_S = {"s": 1.0, "ms": 1e-3}
PERCENT = "%"
INTEGER_TYPES = ("u16", "i16", "u32", "i32")


class PcsError(Exception):
    """Base of the errors the PCS driver raises."""


class PcsConfigError(PcsError, ValueError):
    """The profile's ``[pcs]`` table or the PCS's settings cannot drive this PCS.

    ``problems`` contains one line per error.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PcsMap:
    """The points and settings of a profile's ``[pcs]`` table, checked against its points."""

    setpoint: Point
    setpoint_sign: int
    reactive_setpoint: Point | None
    reactive_sign: int
    setpoint_enable: Point | None
    enable: Point | None
    enable_on: int
    enable_off: int
    revert_timer: Point | None
    heartbeat: Point | None
    heartbeat_timeout: Point | None
    active_power: Point | None
    active_power_sign: int
    status: Point | None
    status_fault_values: frozenset[int]
    status_names: Mapping[int, str]
    fault: Point | None
    fault_bit_names: tuple[str, ...]
    rated_power: Point | None
    min_write_interval_s: float | None
    heartbeat_period_s: float | None
    readback_tolerance_kw: float | None

    @classmethod
    def from_profile(cls, profile: Profile) -> PcsMap:
        """Check ``profile.pcs`` and return the map; raise PcsConfigError listing every problem."""
        table = profile.pcs
        problems: list[str] = []
        if not table:
            raise PcsConfigError(
                f"profile {profile.name!r}",
                ["has no [pcs] table; add one that names at least setpoint_point"],
            )

        def point(key: str, *, required: bool = False) -> Point | None:
            name = table.get(key)
            if name is None:
                if required:
                    problems.append(f"[pcs] {key} is missing; name the point to write")
                return None
            return profile.point(name)  # the profile loader checked that it exists

        setpoint = point("setpoint_point", required=True)
        reactive = point("reactive_setpoint_point")
        timer = point("revert_timer_point")
        heartbeat = point("heartbeat_point")
        heartbeat_timeout = point("heartbeat_timeout_point")
        for key, target in (
            ("setpoint_point", setpoint),
            ("reactive_setpoint_point", reactive),
            ("setpoint_enable_point", point("setpoint_enable_point")),
            ("enable_point", point("enable_point")),
            ("revert_timer_point", timer),
            ("heartbeat_point", heartbeat),
        ):
            if target is not None and not (target.writable and target.function == "holding"):
                problems.append(
                    f"[pcs] {key} = {target.name!r} is not a writable holding point; "
                    "set writable = true on it or name another point"
                )
        _check_unit(problems, "setpoint_point", setpoint, (*POWER_UNITS_KW, PERCENT))
        _check_unit(problems, "reactive_setpoint_point", reactive, (*REACTIVE_UNITS_KVAR, PERCENT))
        _check_unit(problems, "revert_timer_point", timer, tuple(TIME_UNITS_S))
        _check_unit(problems, "heartbeat_timeout_point", heartbeat_timeout, tuple(TIME_UNITS_S))
        active_power = point("active_power_point")
        _check_unit(problems, "active_power_point", active_power, tuple(POWER_UNITS_KW))
        rated_power = point("rated_power_point")
        _check_unit(problems, "rated_power_point", rated_power, tuple(POWER_UNITS_KW))
        if heartbeat is not None and heartbeat.type not in INTEGER_TYPES:
            problems.append(
                f"[pcs] heartbeat_point {heartbeat.name!r} is {heartbeat.type!r}; "
                f"a heartbeat counter is one of {', '.join(INTEGER_TYPES)}"
            )

        settings = {
            "setpoint_sign": _sign(table, "setpoint_sign", problems),
            "reactive_sign": _sign(table, "reactive_setpoint_sign", problems),
            "active_power_sign": _sign(table, "active_power_sign", problems),
            "enable_on": _integer(table, "enable_on", 1, problems),
            "enable_off": _integer(table, "enable_off", 0, problems),
            "min_write_interval_s": _milliseconds(table, "min_write_interval_ms", problems),
            "heartbeat_period_s": _milliseconds(table, "heartbeat_period_ms", problems),
            "readback_tolerance_kw": _positive(table, "readback_tolerance_kw", problems),
            "status_fault_values": frozenset(
                _integer_list(table, "status_fault_values", problems)
            ),
            "status_names": _status_names(table, problems),
            "fault_bit_names": _fault_bit_names(table, problems),
        }
        if problems or setpoint is None:
            raise PcsConfigError(f"profile {profile.name!r}", problems)
        return cls(
            setpoint=setpoint,
            reactive_setpoint=reactive,
            setpoint_enable=point("setpoint_enable_point"),
            enable=point("enable_point"),
            revert_timer=timer,
            heartbeat=heartbeat,
            heartbeat_timeout=heartbeat_timeout,
            active_power=active_power,
            status=point("status_point"),
            fault=point("fault_point"),
            rated_power=rated_power,
            **settings,
        )

    def points(self) -> list[Point]:
        """Return every point the map names, without repeats."""
        named = [
            self.setpoint,
            self.reactive_setpoint,
            self.setpoint_enable,
            self.enable,
            self.revert_timer,
            self.heartbeat,
            self.heartbeat_timeout,
            self.active_power,
            self.status,
            self.fault,
            self.rated_power,
        ]
        return list({p.name: p for p in named if p is not None}.values())


def _check_unit(problems: list[str], key: str, point: Point | None, units: tuple[str, ...]) -> None:
    if point is not None and point.unit not in units:
        problems.append(
            f"[pcs] {key} {point.name!r} has unit {point.unit!r}; "
            f"the driver converts {', '.join(repr(u) for u in units)}: set the point's unit"
        )


def _sign(table: Mapping[str, Any], key: str, problems: list[str]) -> int:
    value = table.get(key, 1)
    if value not in (1, -1) or isinstance(value, bool):
        problems.append(f"[pcs] {key} = {value!r} is invalid; use 1 or -1")
        return 1
    return int(value)


def _integer(table: Mapping[str, Any], key: str, default: int, problems: list[str]) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"[pcs] {key} = {value!r} is invalid; use an integer")
        return default
    return value


def _positive(table: Mapping[str, Any], key: str, problems: list[str]) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        problems.append(f"[pcs] {key} = {value!r} is invalid; use a number > 0")
        return None
    return float(value)


def _milliseconds(table: Mapping[str, Any], key: str, problems: list[str]) -> float | None:
    value_ms = _positive(table, key, problems)
    return None if value_ms is None else value_ms / 1000


def _integer_list(table: Mapping[str, Any], key: str, problems: list[str]) -> list[int]:
    values = table.get(key, [])
    if not isinstance(values, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in values
    ):
        problems.append(f"[pcs] {key} = {values!r} is invalid; use a list of integers")
        return []
    return values


def _status_names(table: Mapping[str, Any], problems: list[str]) -> dict[int, str]:
    names = table.get("status_names", {})
    if not isinstance(names, dict):
        problems.append('[pcs] status_names must be a table such as { "7" = "fault" }')
        return {}
    result: dict[int, str] = {}
    for key, name in names.items():
        if not (str(key).isdigit() and isinstance(name, str)):
            problems.append(
                f"[pcs] status_names entry {key!r} = {name!r} is invalid; "
                'use a state number as key and a name as value, such as "7" = "fault"'
            )
            continue
        result[int(key)] = name
    return result


def _fault_bit_names(table: Mapping[str, Any], problems: list[str]) -> tuple[str, ...]:
    names = table.get("fault_bit_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append("[pcs] fault_bit_names must be a list of names, bit 0 first")
        return ()
    return tuple(names)
