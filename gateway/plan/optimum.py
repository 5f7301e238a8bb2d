"""The lowest billing peak a battery can reach on a known trace (perfect foresight).

The billing peak is the largest mean grid import over fixed demand
intervals (15 minutes by default, aligned to the start of the trace). A cap
``C`` on that mean is feasible when some battery schedule keeps every
interval's mean grid import at or below ``C``. Feasibility is monotone in
``C``, so :func:`optimal_peak` bisects on it.

Why one pass per cap is exact: only each interval's mean counts, so within an
interval the battery only has to move a net energy, and its power limit
bounds that energy by ``power * interval``. Charging or discharging as little
as the cap allows, and recharging as much as it allows, keeps the stored
energy as high as possible at every interval boundary. A higher stored energy
never hurts later intervals because grid export is not limited here, so no
interval ever has to absorb a surplus. If that greedy pass fails, every
schedule fails.

Model limits: export is allowed without limit (no grid floor), the battery
may end the trace empty, and the battery's own losses beyond the two
efficiencies (self-discharge, auxiliaries) are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gateway.plan.battery import BatterySpec

DEMAND_INTERVAL_S = 900.0


@dataclass(frozen=True)
class CapSchedule:
    """The greedy battery schedule for one cap, interval by interval."""

    cap_kw: float
    feasible: bool
    #: Mean grid import per interval after the battery; positive is import.
    grid_kw: np.ndarray
    #: Mean battery power per interval; positive is discharge.
    battery_kw: np.ndarray
    #: Stored energy at the end of each interval.
    energy_kwh: np.ndarray
    #: First interval the cap could not be held in, or -1.
    first_break: int


@dataclass(frozen=True)
class OptimumResult:
    """The lowest feasible billing peak and the schedule that reaches it."""

    peak_kw: float
    peak_kw_without_battery: float
    schedule: CapSchedule
    interval_s: float
    #: Bisection stops when the feasible and infeasible caps are this close.
    tolerance_kw: float

    @property
    def reduction_kw(self) -> float:
        return self.peak_kw_without_battery - self.peak_kw


def interval_means_kw(
    power_kw: np.ndarray, dt_s: float, interval_s: float = DEMAND_INTERVAL_S
) -> np.ndarray:
    """Average a power trace sampled every ``dt_s`` over consecutive demand intervals.

    ``interval_s`` must be a whole multiple of ``dt_s``. A last, partial
    interval is averaged over the samples it has, so a trace that stops
    mid-interval still counts its final minutes.
    """
    samples = np.asarray(power_kw, dtype=float)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"power trace must be a non-empty 1-D array; got shape {samples.shape}")
    if not np.all(np.isfinite(samples)):
        bad = int(np.flatnonzero(~np.isfinite(samples))[0])
        raise ValueError(
            f"power trace has a non-finite value at sample {bad}; fill or cut gaps first"
        )
    if not dt_s > 0:
        raise ValueError(f"dt_s={dt_s} must be > 0")
    per_interval = interval_s / dt_s
    if abs(per_interval - round(per_interval)) > 1e-9 or round(per_interval) < 1:
        raise ValueError(
            f"interval_s={interval_s} is not a whole multiple of dt_s={dt_s}; "
            "resample the trace or change the interval"
        )
    per_interval = round(per_interval)
    full = samples.size // per_interval
    means = samples[: full * per_interval].reshape(full, per_interval).mean(axis=1)
    if samples.size > full * per_interval:
        means = np.append(means, samples[full * per_interval :].mean())
    return means


def hold_cap(
    interval_kw: np.ndarray,
    cap_kw: float,
    battery: BatterySpec,
    soc_initial_pct: float,
    interval_s: float = DEMAND_INTERVAL_S,
) -> CapSchedule:
    """Run the greedy schedule that keeps each interval's mean import at or below ``cap_kw``.

    Above the cap the battery discharges just enough; below it, it recharges
    as much as the cap, its power limit and ``soc_max_pct`` allow. When an
    interval needs more than the battery can give, the schedule gives what
    it can, marks the cap infeasible and carries on, so ``grid_kw`` shows the
    peak that this cap actually yields.
    """
    hours = interval_s / 3600.0
    energy = battery.energy_at_kwh(soc_initial_pct)
    e_min, e_max = battery.e_min_kwh, battery.e_max_kwh
    grid = np.empty(len(interval_kw))
    power = np.empty(len(interval_kw))
    stored = np.empty(len(interval_kw))
    first_break = -1
    for index, load_kw in enumerate(interval_kw):
        excess_kw = load_kw - cap_kw
        if excess_kw > 0:
            available_kw = max(energy - e_min, 0.0) * battery.discharge_efficiency / hours
            battery_kw = min(excess_kw, battery.discharge_kw, available_kw)
            if battery_kw < excess_kw - 1e-9 and first_break < 0:
                first_break = index
            energy -= battery_kw * hours / battery.discharge_efficiency
        else:
            room_kw = max(e_max - energy, 0.0) / battery.charge_efficiency / hours
            battery_kw = -min(-excess_kw, battery.charge_kw, room_kw)
            energy -= battery_kw * hours * battery.charge_efficiency
        grid[index] = load_kw - battery_kw
        power[index] = battery_kw
        stored[index] = energy
    return CapSchedule(cap_kw, first_break < 0, grid, power, stored, first_break)


def feasible_caps(
    interval_kw: np.ndarray,
    caps_kw: np.ndarray,
    battery: BatterySpec,
    soc_initial_pct: float,
    *,
    interval_s: float = DEMAND_INTERVAL_S,
    recharge_limit_kw: float | np.ndarray | None = None,
    recharge_ceiling_kw: float = math.inf,
) -> np.ndarray:
    """Return, for each row of ``interval_kw`` and each of its caps, whether the cap holds.

    ``interval_kw`` has shape (rows, intervals) and ``caps_kw`` shape (rows,
    caps). Each entry runs the same greedy pass as :func:`hold_cap`, all at
    once with numpy, so many traces and caps cost one loop over the intervals.
    ``recharge_limit_kw`` (a number, or one per row and interval) bounds the
    recharge below the cap further than the battery's ``charge_kw`` does. An
    interval recharges only if its load plus that limit stays at or below the
    cap or ``recharge_ceiling_kw``, whichever is higher: the way a fast loop
    recharges at a fixed power, and only under the peak already paid for.
    """
    hours = interval_s / 3600.0
    e_min, e_max = battery.e_min_kwh, battery.e_max_kwh
    # Interval first, so that each step of the loop reads contiguous memory.
    loads_kw = interval_kw.T[:, :, None]
    excess_kw = loads_kw - caps_kw[None, :, :]
    charge_kw = _charge_limit_kw(battery, recharge_limit_kw, interval_kw.shape).T[:, :, None]
    room = loads_kw + charge_kw <= np.maximum(caps_kw[None, :, :], recharge_ceiling_kw)
    # Per interval, the battery power that holding the cap requests in kW: discharge above
    # the cap (within the PCS rating), recharge below it.
    discharge_request_kw = np.clip(excess_kw, 0.0, battery.discharge_kw)
    charge_request_kw = np.where(room, np.minimum(np.maximum(-excess_kw, 0.0), charge_kw), 0.0)
    unmet_kw = excess_kw - discharge_request_kw
    out_per_kwh = battery.discharge_efficiency / hours
    in_per_kwh = 1.0 / (battery.charge_efficiency * hours)
    energy = np.full(caps_kw.shape, battery.energy_at_kwh(soc_initial_pct))
    given_kw = np.empty(caps_kw.shape)
    taken_kw = np.empty(caps_kw.shape)
    shortfall_kw = np.max(unmet_kw, axis=0)
    for out_kw, in_kw in zip(discharge_request_kw, charge_request_kw, strict=True):
        # The maximum the battery can give, and take, in this interval, as a mean power.
        np.maximum(energy - e_min, 0.0, out=given_kw)
        np.minimum(out_kw, given_kw * out_per_kwh, out=given_kw)
        np.maximum(shortfall_kw, out_kw - given_kw, out=shortfall_kw)
        np.maximum(e_max - energy, 0.0, out=taken_kw)
        np.minimum(in_kw, taken_kw * in_per_kwh, out=taken_kw)
        energy -= given_kw / out_per_kwh
        energy += taken_kw / in_per_kwh
    return shortfall_kw <= 1e-9


def _charge_limit_kw(
    battery: BatterySpec, recharge_limit_kw: float | np.ndarray | None, shape: tuple[int, ...]
) -> np.ndarray:
    """Return the recharge limit per row and interval: the battery's, or lower where given."""
    if recharge_limit_kw is None:
        return np.full(shape, battery.charge_kw)
    return np.minimum(np.broadcast_to(recharge_limit_kw, shape), battery.charge_kw)


def optimal_peaks(
    interval_kw: np.ndarray,
    battery: BatterySpec,
    soc_initial_pct: float,
    *,
    interval_s: float = DEMAND_INTERVAL_S,
    tolerance_kw: float = 0.5,
    grid_points: int = 64,
    guess_kw: np.ndarray | None = None,
    recharge_limit_kw: float | np.ndarray | None = None,
    recharge_ceiling_kw: float = math.inf,
) -> np.ndarray:
    """Find the lowest cap the battery can hold on each row of ``interval_kw`` (interval means).

    The result is at most ``tolerance_kw`` above each row's optimum, like
    :func:`optimal_peak` gives for one trace. Instead of bisecting, each pass
    tries ``grid_points`` caps spread over every row's bracket and keeps the
    step in which the lowest feasible one lies, so the bracket shrinks by
    ``grid_points - 1`` per pass. ``guess_kw``, one value per row (such as
    the last minute's result), puts the first pass's caps within
    ``grid_points / 2 * tolerance_kw`` of it, so a guess that close ends the
    search in one pass. ``recharge_limit_kw`` and ``recharge_ceiling_kw``
    are passed to :func:`feasible_caps`. The planner calls this every minute
    on a few traces of a day each.
    """
    rows = np.atleast_2d(np.asarray(interval_kw, dtype=float))
    if rows.size == 0 or not np.all(np.isfinite(rows)):
        raise ValueError("interval_kw must be a non-empty array of finite interval means")
    if not tolerance_kw > 0 or grid_points < 4:
        raise ValueError(
            f"tolerance_kw={tolerance_kw} must be > 0 and grid_points={grid_points} >= 4"
        )
    high = rows.max(axis=1)
    # No cap below "peak minus full discharge power" is feasible; the row's peak always is.
    low = high - battery.discharge_kw
    index = np.arange(rows.shape[0])
    caps = None
    if guess_kw is not None and np.shape(guess_kw) == high.shape:
        # The bracket's ends, and between them caps one tolerance apart around the guess.
        steps = (np.arange(grid_points - 2) - (grid_points - 3) / 2.0) * tolerance_kw
        near = np.clip(np.asarray(guess_kw, dtype=float)[:, None] + steps[None, :], low[:, None],
                       high[:, None])
        caps = np.concatenate([low[:, None], near, high[:, None]], axis=1)
    fractions = np.linspace(0.0, 1.0, grid_points)
    while np.any(high - low > tolerance_kw):
        if caps is None:
            caps = low[:, None] + (high - low)[:, None] * fractions[None, :]
        feasible = feasible_caps(
            rows,
            caps,
            battery,
            soc_initial_pct,
            interval_s=interval_s,
            recharge_limit_kw=recharge_limit_kw,
            recharge_ceiling_kw=recharge_ceiling_kw,
        )
        # The last cap (the bracket's top) is feasible, so argmax finds a feasible one.
        first = np.argmax(feasible, axis=1)
        high = caps[index, first]
        low = np.where(first == 0, high, caps[index, np.maximum(first - 1, 0)])
        caps = None
    return high


def required_energy_kwh(
    interval_kw: np.ndarray,
    cap_kw: float,
    battery: BatterySpec,
    recharge_limit_kw: float | np.ndarray,
    interval_s: float = DEMAND_INTERVAL_S,
) -> np.ndarray:
    """Return the stored energy above ``soc_min_pct`` that each row needs now to hold ``cap_kw``.

    ``interval_kw`` has shape (rows, intervals); ``recharge_limit_kw`` is a
    number or one value per row and interval. The pass runs backwards: an
    interval above the cap adds what the battery gives there, and one below
    it takes off what recharging at up to ``recharge_limit_kw`` under the cap
    stores there. The need never drops below zero, and never rises above
    the usable band, which is where a cap that cannot be held ends up.
    """
    rows = np.atleast_2d(np.asarray(interval_kw, dtype=float))
    hours = interval_s / 3600.0
    usable_kwh = battery.e_max_kwh - battery.e_min_kwh
    charge_kw = _charge_limit_kw(battery, recharge_limit_kw, rows.shape)
    excess_kw = rows - cap_kw
    drawn = np.clip(excess_kw, 0.0, battery.discharge_kw) * (hours / battery.discharge_efficiency)
    stored = np.clip(-excess_kw, 0.0, charge_kw) * (hours * battery.charge_efficiency)
    change_kwh = np.ascontiguousarray((drawn - stored).T)
    need = np.zeros(rows.shape[0])
    for step_kwh in change_kwh[::-1]:
        need += step_kwh
        np.maximum(need, 0.0, out=need)
        np.minimum(need, usable_kwh, out=need)
    return need


def optimal_peak(
    power_kw: np.ndarray,
    dt_s: float,
    battery: BatterySpec,
    soc_initial_pct: float,
    *,
    interval_s: float = DEMAND_INTERVAL_S,
    tolerance_kw: float = 0.01,
) -> OptimumResult:
    """Find the lowest billing peak that ``battery`` can hold on the net load ``power_kw``.

    ``power_kw`` is the site's net load before the battery (load minus
    on-site generation, positive is import), sampled every ``dt_s``. The
    result is within ``tolerance_kw`` above the true optimum.
    """
    if not tolerance_kw > 0:
        raise ValueError(f"tolerance_kw={tolerance_kw} must be > 0")
    means = interval_means_kw(power_kw, dt_s, interval_s)
    without = float(means.max())
    # No cap below "peak minus full discharge power" is feasible; the unshaved peak always is.
    low = without - battery.discharge_kw
    high = without
    best = hold_cap(means, high, battery, soc_initial_pct, interval_s)
    candidate = hold_cap(means, low, battery, soc_initial_pct, interval_s)
    if candidate.feasible:
        best, high = candidate, low
    iterations = math.ceil(math.log2(max(high - low, tolerance_kw) / tolerance_kw)) + 1
    for _ in range(iterations):
        if high - low <= tolerance_kw:
            break
        middle = (low + high) / 2.0
        candidate = hold_cap(means, middle, battery, soc_initial_pct, interval_s)
        if candidate.feasible:
            best, high = candidate, middle
        else:
            low = middle
    return OptimumResult(float(best.grid_kw.max()), without, best, interval_s, tolerance_kw)
