"""Block planner: group a profile's points into the fewest register reads, then decode them.

A read (FC 03 or FC 04) returns at most 125 contiguous registers. Points a
few registers apart are cheaper to read together, so the planner merges
them when the unused registers between them are at most ``max_gap_regs``;
a device that responds with an exception for unmapped registers gets a gap of 0.

A value and its SunSpec scale factor are always in the same request: a
device may change the factor with the value (a DC power of 590.00 W is
``E678`` at SF -2, and 612.3 W is ``17EB`` at SF -1). Reading them apart, or
caching the factor, pairs a value with the wrong factor. So the planner
keeps every value together with its factor (and every other value sharing
that factor), even where that costs an extra or a larger read::

    addresses   100 101 102 ... 140 141
    points      W   VA  ...      W_SF        gap 38 > max_gap_regs = 10,
    one block  [------------------------]    but W needs W_SF: one read
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from drivers.modbus import codec
from drivers.modbus.profile import MAX_READ_REGISTERS, SCALE_FACTOR_RANGE, Point
from drivers.quality import Quality, Reading


@dataclass(frozen=True)
class ReadBlock:
    """One read request: ``count`` registers of ``function`` from ``address``, and its points."""

    function: str
    address: int
    count: int
    #: Points fully inside the block, by address; their scale factors are among them.
    points: tuple[Point, ...]

    @property
    def function_code(self) -> int:
        """Modbus function code of the read: 3 for holding, 4 for input registers."""
        return 3 if self.function == "holding" else 4


def plan_reads(
    points: Iterable[Point], max_gap_regs: int, max_block_regs: int = MAX_READ_REGISTERS
) -> list[ReadBlock]:
    """Plan the reads that cover ``points``, ordered by function then address.

    Raises ValueError when a limit is out of range, when a point's scale
    factor is not among ``points``, or when a value and its factor cannot fit
    in one read of ``max_block_regs``.
    """
    if not 1 <= max_block_regs <= MAX_READ_REGISTERS:
        raise ValueError(f"max_block_regs {max_block_regs} is invalid: use 1..{MAX_READ_REGISTERS}")
    if max_gap_regs < 0:
        raise ValueError(f"max_gap_regs {max_gap_regs} is invalid: use 0 or more")
    points = list(points)
    by_name = {p.name: p for p in points}
    blocks: list[ReadBlock] = []
    for function in ("holding", "input"):
        selected = [p for p in points if p.function == function]
        groups = _scale_factor_groups(selected, by_name)
        blocks.extend(_merge_groups(function, groups, max_gap_regs, max_block_regs))
    return blocks


def _scale_factor_groups(points: list[Point], by_name: dict[str, Point]) -> list[list[Point]]:
    """Join each value with its scale factor (and every value sharing it) into one group."""
    parent = {p.name: p.name for p in points}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for point in points:
        if point.scale_factor is None:
            continue
        factor = by_name.get(point.scale_factor)
        if factor is None or factor.name not in parent:
            raise ValueError(
                f"point {point.name!r} is scaled by {point.scale_factor!r}, which is not among "
                "the points to plan: plan the scale factor point too"
            )
        parent[root(point.name)] = root(factor.name)

    groups: dict[str, list[Point]] = {}
    for point in points:
        groups.setdefault(root(point.name), []).append(point)
    return sorted(groups.values(), key=lambda group: min(p.address for p in group))


def _merge_groups(
    function: str, groups: list[list[Point]], max_gap_regs: int, max_block_regs: int
) -> list[ReadBlock]:
    """Merge groups left to right while the gap and the block size allow it.

    This gives the fewest reads when groups do not interleave. NOTE: a scale
    factor shared by values far apart makes a wide group that can interleave
    with others; the greedy pass may then use one read more than the optimum.
    """
    blocks: list[ReadBlock] = []
    current: list[Point] = []
    start = end = 0
    for group in groups:
        group_start = min(p.address for p in group)
        group_end = max(p.end for p in group)
        if group_end - group_start > max_block_regs:
            names = ", ".join(p.name for p in group)
            raise ValueError(
                f"points {names} share a scale factor but span {group_end - group_start} "
                f"registers, more than max_block_regs = {max_block_regs}"
            )
        fits = group_start - end <= max_gap_regs and max(end, group_end) - start <= max_block_regs
        if current and fits:
            current.extend(group)
            end = max(end, group_end)
            continue
        if current:
            blocks.append(_block(function, start, end, current))
        current, start, end = list(group), group_start, group_end
    if current:
        blocks.append(_block(function, start, end, current))
    return blocks


def _block(function: str, start: int, end: int, points: list[Point]) -> ReadBlock:
    return ReadBlock(function, start, end - start, tuple(sorted(points, key=lambda p: p.address)))


def decode_block(block: ReadBlock, registers: Sequence[int], t_mono_s: float) -> dict[str, Reading]:
    """Decode every point of ``block`` from the registers one read returned.

    Each value is checked for its type's "no value" sentinel, then scaled
    (``raw * scale + offset``, or ``raw * 10**sf + offset`` with the factor from
    the same read), then range checked. A sentinel or an out-of-range value
    in a scale factor makes every point scaled by it NOT_IMPLEMENTED or
    OUT_OF_RANGE. Raises ValueError when ``registers`` do not fit the block.
    """
    if len(registers) != block.count:
        raise ValueError(
            f"read of {block.function} {block.address}..{block.address + block.count - 1} "
            f"expected {block.count} registers, got {len(registers)}"
        )
    raw_values: dict[str, codec.Value] = {}
    for point in block.points:
        offset = point.address - block.address
        raw_values[point.name] = codec.decode(
            registers[offset : offset + point.count], point.type, point.order
        )
    return {point.name: point_reading(point, raw_values, t_mono_s) for point in block.points}


def point_reading(
    point: Point, raw_values: dict[str, codec.Value], t_mono_s: float
) -> Reading:
    """Turn ``point``'s raw value (and its scale factor's, from ``raw_values``) into a Reading."""
    raw = raw_values[point.name]
    if codec.is_sentinel_value(raw, point.type, point.accumulator):
        return Reading.bad(Quality.NOT_IMPLEMENTED, t_mono_s, point.unit)
    if point.type == "str":
        return Reading(raw, Quality.GOOD, t_mono_s, point.unit)

    if point.scale_factor is not None:
        sf = raw_values[point.scale_factor]
        if codec.is_sentinel_value(sf, "i16"):
            return Reading.bad(Quality.NOT_IMPLEMENTED, t_mono_s, point.unit)
        if not SCALE_FACTOR_RANGE[0] <= sf <= SCALE_FACTOR_RANGE[1]:
            return Reading.bad(Quality.OUT_OF_RANGE, t_mono_s, point.unit)
        value = scale_by_power_of_ten(raw, sf)
    elif point.scale is not None:
        value = apply_scale(raw, point.scale)
    else:
        value = raw
    if point.offset:
        value = value + point.offset
    return Reading.checked(value, t_mono_s, point.unit, point.min, point.max)


def scale_by_power_of_ten(raw: int | float, sf: int) -> int | float:
    """Return ``raw * 10**sf``, dividing for a negative factor so 6123 at -1 is exactly 612.3."""
    if sf >= 0:
        return raw * 10**sf
    return raw / 10 ** (-sf)


def apply_scale(raw: int | float, scale: float) -> float:
    """Return ``raw * scale``, dividing by 1/scale when that is a whole number.

    Dividing makes a decimal scale exact to the last digit: 5207 at 0.01 is
    52.07, where ``5207 * 0.01`` is 52.070000000000004.
    """
    if 0 < abs(scale) < 1:
        divisor = 1 / scale
        if abs(divisor - round(divisor)) < 1e-9 * abs(divisor):
            return raw / round(divisor)
    return raw * scale
