"""Device profiles: a device's register map as TOML data, validated when loaded.

A profile file has one ``[profile]`` table, one ``[[points]]`` table per
value, and optional role tables ``[pcs]`` and ``[meter]``::

    [profile]
    name = "meter-3ph"            # what load_profile() finds it by
    description = "..."
    source = "vendor document the map comes from"
    order = "ABCD"                # default word/byte order of the points
    max_gap_regs = 8              # unused registers a read may span
    max_block_regs = 100          # registers per read, at most 125

    [[points]]
    name = "p_kw"                 # units in the name, as everywhere in bessgw
    address = 52                  # 0-based wire address
    vendor_address = 30053        # optional: the number in the vendor's table
    function = "input"            # "holding" (FC 03) or "input" (FC 04)
    type = "f32"                  # u16 i16 u32 i32 u64 i64 f32 f64 str
    order = "CDAB"                # optional: overrides the profile default
    count = 2                     # optional: checked against the type
    length = 8                    # str only: registers
    scale = 0.001                 # engineering value = raw * scale + offset
    scale_factor = "W_SF"         # or: raw * 10**W_SF (an i16 point)
    offset = 0.0
    unit = "kW"
    min = -5000.0                 # outside [min, max] -> OUT_OF_RANGE
    max = 5000.0
    writable = false              # holding points only
    accumulator = false           # SunSpec accumulator: raw 0 means no value
    default = 0.0                 # value the simulator starts with (engineering units)
    description = "..."

Keys in ``[pcs]`` and ``[meter]`` are free-form settings for the driver of
that role, except that a key ending in ``_point`` must name a point of the
profile. Every rule is checked at load and all problems are reported at once.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from drivers.modbus import codec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Largest register count of one read (FC 03/04), from the Modbus application protocol.
MAX_READ_REGISTERS = 125
FUNCTIONS = ("holding", "input")
_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PROFILE_KEYS = {"name", "description", "source", "order", "max_gap_regs", "max_block_regs"}
_POINT_KEYS = {
    "name",
    "address",
    "vendor_address",
    "function",
    "type",
    "order",
    "count",
    "length",
    "scale",
    "scale_factor",
    "offset",
    "unit",
    "min",
    "max",
    "writable",
    "accumulator",
    "default",
    "description",
}
_TOP_KEYS = {"profile", "points", "pcs", "meter"}
#: Range of a SunSpec scale factor; anything outside is treated as corrupt.
SCALE_FACTOR_RANGE = (-10, 10)


class ProfileError(ValueError):
    """A profile file is missing, is not TOML, or breaks a rule.

    ``problems`` lists one line per error, and each line names the point and the fix.
    """

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} profile error(s):\n" + "\n".join(problems))


@dataclass(frozen=True)
class Point:
    """One value in a device's register map, with how to decode and scale it."""

    name: str
    address: int
    function: str
    type: str
    order: str
    count: int
    length: int | None = None
    scale: float | None = None
    scale_factor: str | None = None
    offset: float = 0.0
    unit: str = ""
    min: float | None = None
    max: float | None = None
    writable: bool = False
    accumulator: bool = False
    description: str = ""
    vendor_address: int | None = None
    #: Value the simulator starts with, in engineering units; None starts at raw 0.
    default: float | int | str | None = None

    @property
    def end(self) -> int:
        """First wire address after this point."""
        return self.address + self.count


@dataclass(frozen=True)
class Profile:
    """A validated register map plus the role settings of one device model."""

    name: str
    points: tuple[Point, ...]
    order: str = "ABCD"
    max_gap_regs: int = 0
    max_block_regs: int = MAX_READ_REGISTERS
    description: str = ""
    source: str = ""
    path: str = ""
    #: Settings for a PCS driver (setpoint point, sign, enable, heartbeat, ...).
    pcs: dict[str, Any] = field(default_factory=dict)
    #: Settings for a meter driver (power point names and their sign).
    meter: dict[str, Any] = field(default_factory=dict)

    def point(self, name: str) -> Point:
        """Return the point called ``name``; KeyError names the profile when missing."""
        for point in self.points:
            if point.name == name:
                return point
        raise KeyError(f"profile {self.name!r} has no point {name!r}")

    def points_for(self, function: str) -> tuple[Point, ...]:
        """Return the points read with ``function`` ("holding" or "input"), by address."""
        return tuple(
            sorted((p for p in self.points if p.function == function), key=lambda p: p.address)
        )


def builtin_profiles() -> list[str]:
    """Return the names of the Modbus profiles shipped in ``drivers/profiles``.

    The folder also contains profiles of other protocols (CAN BMS). Only
    files with a ``[profile]`` table are Modbus device profiles.
    """
    folder = resources.files("drivers") / "profiles"
    names = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".toml"):
            continue
        try:
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError:
            continue
        if isinstance(data.get("profile"), dict):
            names.append(entry.name[: -len(".toml")])
    return sorted(names)


def load_profile(name_or_path: str | Path) -> Profile:
    """Load and validate a profile by built-in name (``"meter-3ph"``) or by file path.

    Raises ProfileError listing every problem found.
    """
    text_name = str(name_or_path)
    if isinstance(name_or_path, Path) or text_name.endswith(".toml") or "/" in text_name:
        path = Path(name_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ProfileError(path, [f"cannot read the file: {err.strerror or err}"]) from err
    else:
        resource = resources.files("drivers") / "profiles" / f"{text_name}.toml"
        if not resource.is_file():
            known = ", ".join(builtin_profiles())
            raise ProfileError(
                text_name,
                [f"no built-in profile {text_name!r}: use one of {known}, or give a .toml path"],
            )
        path = Path(str(resource))
        text = resource.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(path, [f"invalid TOML: {err}"]) from err
    return parse_profile(data, path)


def parse_profile(data: dict[str, Any], path: str | Path = "<profile>") -> Profile:
    """Validate parsed TOML ``data`` and build a Profile; ``path`` is used in messages."""
    problems: list[str] = []
    for key in sorted(set(data) - _TOP_KEYS):
        problems.append(f"unknown top-level table or key {key!r}: allowed are {sorted(_TOP_KEYS)}")

    header = data.get("profile")
    if not isinstance(header, dict):
        raise ProfileError(path, [*problems, 'missing [profile] table with at least name = "..."'])
    for key in sorted(set(header) - _PROFILE_KEYS):
        problems.append(f"[profile]: unknown key {key!r}: allowed are {sorted(_PROFILE_KEYS)}")
    name = header.get("name")
    if not isinstance(name, str) or not name:
        problems.append("[profile]: name must be a non-empty string")
        name = str(path)
    default_order = header.get("order", "ABCD")
    if default_order not in codec.ORDERS:
        problems.append(f"[profile]: order {default_order!r} is invalid: use one of {codec.ORDERS}")
        default_order = "ABCD"
    max_gap = header.get("max_gap_regs", 0)
    if not _is_int(max_gap) or max_gap < 0:
        problems.append(f"[profile]: max_gap_regs {max_gap!r} must be an integer >= 0")
        max_gap = 0
    max_block = header.get("max_block_regs", MAX_READ_REGISTERS)
    if not _is_int(max_block) or not 1 <= max_block <= MAX_READ_REGISTERS:
        problems.append(
            f"[profile]: max_block_regs {max_block!r} must be an integer 1..{MAX_READ_REGISTERS}"
        )
        max_block = MAX_READ_REGISTERS
    for key in ("description", "source"):
        if not isinstance(header.get(key, ""), str):
            problems.append(f"[profile]: {key} must be a string")

    raw_points = data.get("points", [])
    if not isinstance(raw_points, list) or not raw_points:
        problems.append("no [[points]] tables: a profile needs at least one point")
        raw_points = []
    points = [
        point
        for index, raw in enumerate(raw_points)
        if (point := _parse_point(index, raw, default_order, max_block, problems)) is not None
    ]
    _check_names_and_overlaps(points, problems)
    _check_scale_factors(points, max_block, problems)

    roles: dict[str, dict[str, Any]] = {}
    names = {p.name for p in points}
    for role in ("pcs", "meter"):
        table = data.get(role, {})
        if not isinstance(table, dict):
            problems.append(f"[{role}] must be a table")
            table = {}
        for key, value in table.items():
            if key.endswith("_point") and value not in names:
                problems.append(
                    f"[{role}] {key} = {value!r}: no point of that name; "
                    "use the name of a [[points]] entry"
                )
        roles[role] = dict(table)

    if problems:
        raise ProfileError(path, problems)
    return Profile(
        name=name,
        points=tuple(points),
        order=default_order,
        max_gap_regs=max_gap,
        max_block_regs=max_block,
        description=header.get("description", ""),
        source=header.get("source", ""),
        path=str(path),
        pcs=roles["pcs"],
        meter=roles["meter"],
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_point(
    index: int, raw: object, default_order: str, max_block: int, problems: list[str]
) -> Point | None:
    """Check one [[points]] table; append problems and return None when it is unusable."""
    if not isinstance(raw, dict):
        problems.append(f"points[{index}]: must be a table")
        return None
    label = f"point {raw.get('name', f'#{index}')!r}"
    start = len(problems)
    for key in sorted(set(raw) - _POINT_KEYS):
        problems.append(f"{label}: unknown key {key!r}: allowed are {sorted(_POINT_KEYS)}")

    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        problems.append(f"{label}: name {name!r} must be an identifier (letters, digits, _)")
    address = raw.get("address")
    if not _is_int(address) or not 0 <= address <= 0xFFFF:
        problems.append(f"{label}: address {address!r} must be a 0-based wire address 0..65535")
    function = raw.get("function", "holding")
    if function not in FUNCTIONS:
        problems.append(f"{label}: function {function!r} is invalid: use 'holding' or 'input'")
    type_ = raw.get("type")
    if type_ not in codec.POINT_TYPES:
        problems.append(f"{label}: type {type_!r} is invalid: use one of {codec.POINT_TYPES}")
    order = raw.get("order", default_order)
    if order not in codec.ORDERS:
        problems.append(f"{label}: order {order!r} is invalid: use one of {codec.ORDERS}")
    length = raw.get("length")
    if length is not None and type_ != "str":
        problems.append(f"{label}: length applies to 'str' points only; use count for {type_!r}")

    count = None
    if type_ in codec.POINT_TYPES:
        try:
            count = codec.register_count(type_, length if type_ == "str" else None)
        except ValueError as err:
            problems.append(f"{label}: {err}")
    given_count = raw.get("count")
    if given_count is not None and count is not None and given_count != count:
        problems.append(
            f"{label}: count = {given_count!r} does not match type {type_!r}, which uses "
            f"{count} register(s): fix the type or the count"
        )
    if count is not None and _is_int(address) and address + count > 0x10000:
        problems.append(f"{label}: registers {address}..{address + count - 1} pass address 65535")
    if count is not None and count > max_block:
        problems.append(
            f"{label}: {count} registers do not fit in one read of max_block_regs = {max_block}"
        )

    scale = raw.get("scale")
    scale_factor = raw.get("scale_factor")
    if scale is not None and scale_factor is not None:
        problems.append(f"{label}: give either scale or scale_factor, not both")
    if scale is not None and (not _is_number(scale) or scale == 0):
        problems.append(f"{label}: scale {scale!r} must be a non-zero number")
    if scale_factor is not None and not isinstance(scale_factor, str):
        problems.append(f"{label}: scale_factor must be the name of an i16 point")
    offset = raw.get("offset", 0.0)
    if not _is_number(offset):
        problems.append(f"{label}: offset {offset!r} must be a number")
    minimum, maximum = raw.get("min"), raw.get("max")
    for key, bound in (("min", minimum), ("max", maximum)):
        if bound is not None and not _is_number(bound):
            problems.append(f"{label}: {key} {bound!r} must be a number")
    if _is_number(minimum) and _is_number(maximum) and minimum > maximum:
        problems.append(f"{label}: min {minimum} is above max {maximum}")
    writable = raw.get("writable", False)
    accumulator = raw.get("accumulator", False)
    for key, flag in (("writable", writable), ("accumulator", accumulator)):
        if not isinstance(flag, bool):
            problems.append(f"{label}: {key} must be true or false")
    if writable is True and function == "input":
        problems.append(
            f"{label}: input registers are read-only: set writable = false or use holding"
        )
    if accumulator is True and type_ in ("f32", "f64", "str"):
        problems.append(f"{label}: accumulator applies to integer types, not {type_!r}")
    if type_ == "str" and (scale is not None or scale_factor is not None or offset):
        problems.append(f"{label}: a 'str' point takes no scale, scale_factor or offset")
    vendor_address = raw.get("vendor_address")
    if vendor_address is not None and not _is_int(vendor_address):
        problems.append(f"{label}: vendor_address {vendor_address!r} must be an integer")
    for key in ("unit", "description"):
        if not isinstance(raw.get(key, ""), str):
            problems.append(f"{label}: {key} must be a string")
    default = raw.get("default")
    if default is not None:
        expected_text = type_ == "str"
        if expected_text != isinstance(default, str) or not (expected_text or _is_number(default)):
            kind = "text" if expected_text else "a finite number"
            problems.append(f"{label}: default {default!r} must be {kind} for type {type_!r}")

    if len(problems) > start or count is None:
        return None
    return Point(
        name=name,
        address=address,
        function=function,
        type=type_,
        order=order,
        count=count,
        length=length,
        scale=float(scale) if scale is not None else None,
        scale_factor=scale_factor,
        offset=float(offset),
        unit=raw.get("unit", ""),
        min=float(minimum) if minimum is not None else None,
        max=float(maximum) if maximum is not None else None,
        writable=writable,
        accumulator=accumulator,
        description=raw.get("description", ""),
        vendor_address=vendor_address,
        default=default,
    )


def _check_names_and_overlaps(points: list[Point], problems: list[str]) -> None:
    seen_names: set[str] = set()
    for point in points:
        if point.name in seen_names:
            problems.append(f"point {point.name!r}: duplicate name: give each point its own name")
        seen_names.add(point.name)
    for function in FUNCTIONS:
        ordered = sorted((p for p in points if p.function == function), key=lambda p: p.address)
        for before, after in itertools.pairwise(ordered):
            if after.address == before.address:
                problems.append(
                    f"point {after.name!r}: duplicate {function} address {after.address}, "
                    f"also used by {before.name!r}: fix one of the addresses"
                )
            elif after.address < before.end:
                problems.append(
                    f"point {after.name!r} at {function} {after.address} overlaps "
                    f"{before.name!r} ({before.type} at {before.address}..{before.end - 1}): "
                    "fix the address or the type"
                )


def _check_scale_factors(points: list[Point], max_block: int, problems: list[str]) -> None:
    by_name = {p.name: p for p in points}
    for point in points:
        if point.scale_factor is None:
            continue
        sf_point = by_name.get(point.scale_factor)
        if sf_point is None:
            problems.append(
                f"point {point.name!r}: scale_factor {point.scale_factor!r} names no point: "
                "add that i16 point or fix the name"
            )
            continue
        if sf_point.type != "i16":
            problems.append(
                f"point {point.name!r}: scale_factor point {sf_point.name!r} is {sf_point.type!r}, "
                "but a SunSpec scale factor is an i16"
            )
        if sf_point.function != point.function:
            problems.append(
                f"point {point.name!r}: scale_factor point {sf_point.name!r} is a "
                f"{sf_point.function} register, but it must be read in the same request "
                f"({point.function})"
            )
        span = max(point.end, sf_point.end) - min(point.address, sf_point.address)
        if span > max_block:
            problems.append(
                f"point {point.name!r} and its scale factor {sf_point.name!r} span {span} "
                f"registers, more than one read of max_block_regs = {max_block}"
            )
