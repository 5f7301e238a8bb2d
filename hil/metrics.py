"""Scoring of a run: demand, ramps, swing band power, SoC, BMS limits, energy shares, reaction time.

Every function takes numpy arrays sampled evenly at ``dt_s`` from run time 0
(the HIL capture at 1 kHz, or the SIL replay's step) and returns plain
numbers or small dataclasses that ``hil.report`` writes out. Signs follow the
project: grid positive is import, battery positive is discharge, load
positive is consumption, and BMS current positive is discharge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _check_dt(dt_s: float) -> None:
    if not dt_s > 0:
        raise ValueError(f"dt_s={dt_s} must be > 0")


def _samples_per(period_s: float, dt_s: float) -> int:
    """Return how many samples of ``dt_s`` make ``period_s``; the ratio must be a whole number."""
    _check_dt(dt_s)
    ratio = period_s / dt_s
    count = round(ratio)
    if count < 1 or abs(ratio - count) > 1e-6 * ratio:
        raise ValueError(
            f"period {period_s} s is not a whole number of {dt_s} s samples; "
            "resample the signal to a step that divides it"
        )
    return count


def block_means(x: np.ndarray, dt_s: float, period_s: float, partial: bool = False) -> np.ndarray:
    """Return the mean of each consecutive ``period_s`` block of ``x``.

    A shorter block left at the end is dropped, or with ``partial`` averaged
    over the samples it has.
    """
    x = np.asarray(x, dtype=float)
    size = _samples_per(period_s, dt_s)
    whole = x.size // size
    means = x[: whole * size].reshape(whole, size).mean(axis=1)
    if partial and x.size > whole * size:
        means = np.append(means, x[whole * size :].mean())
    return means


# --------------------------------------------------------------------------- demand


def max_demand_kw(
    grid_kw: np.ndarray, dt_s: float, interval_s: float = 900.0, rolling: bool = False
) -> float:
    """Return the maximum demand: the largest mean grid import over one demand interval.

    By default the intervals are the billing blocks a utility meter uses,
    aligned to run time 0, and a last block shorter than ``interval_s``
    counts with its own mean, so a 10-minute run still gets a figure. With
    ``rolling`` the window slides sample by sample, which is the worst
    alignment of billing blocks, and a run shorter than one interval gives
    its overall mean.
    """
    x = np.asarray(grid_kw, dtype=float)
    if x.size == 0:
        raise ValueError("grid_kw is empty; a demand needs at least one sample")
    size = _samples_per(interval_s, dt_s)
    if not rolling:
        return float(np.max(block_means(x, dt_s, interval_s, partial=True)))
    if x.size <= size:
        return float(x.mean())
    csum = np.concatenate(([0.0], np.cumsum(x)))
    return float(np.max((csum[size:] - csum[:-size]) / size))


# --------------------------------------------------------------------------- ramps


@dataclass(frozen=True)
class RampStats:
    """Ramp rates of a signal between consecutive 1-second means, in kW/s."""

    max_kw_per_s: float
    p99_kw_per_s: float
    limit_kw_per_s: float
    #: Seconds whose ramp counted: all, or those in which the battery had headroom.
    seconds_counted: int
    seconds_above_limit: int
    #: Run second k of each counted ramp above the limit (the ramp from second k-1 to k),
    #: so that a test engineer can find it on the report's time axis.
    seconds_above: tuple[int, ...] = ()

    @property
    def fraction_above_limit(self) -> float:
        return self.seconds_above_limit / self.seconds_counted if self.seconds_counted else 0.0


def ramps_kw_per_s(x_kw: np.ndarray, dt_s: float) -> np.ndarray:
    """Return the ramp between consecutive whole-second means, one per second after the first."""
    return np.diff(block_means(x_kw, dt_s, 1.0))


def ramp_stats(
    grid_kw: np.ndarray, dt_s: float, limit_kw_per_s: float, headroom: np.ndarray | None = None
) -> RampStats:
    """Measure the grid ramp on 1-second means against ``limit_kw_per_s``.

    ``headroom`` has one boolean per whole second (see
    :func:`battery_headroom`). A ramp between seconds k-1 and k counts only
    when the battery had headroom in both, because in other seconds the
    battery could not have held the grid back.
    """
    ramps = np.abs(ramps_kw_per_s(grid_kw, dt_s))
    if ramps.size == 0:
        raise ValueError("the signal is shorter than 2 s; ramps need at least two whole seconds")
    counted = np.ones(ramps.size, dtype=bool)
    if headroom is not None:
        headroom = np.asarray(headroom, dtype=bool)
        if headroom.size != ramps.size + 1:
            raise ValueError(
                f"headroom has {headroom.size} entries, "
                f"expected one per whole second ({ramps.size + 1})"
            )
        counted = headroom[1:] & headroom[:-1]
    return RampStats(
        max_kw_per_s=float(ramps.max()),
        p99_kw_per_s=float(np.percentile(ramps, 99)),
        limit_kw_per_s=float(limit_kw_per_s),
        seconds_counted=int(counted.sum()),
        seconds_above_limit=int((ramps[counted] > limit_kw_per_s).sum()),
        seconds_above=tuple(int(k) + 1 for k in np.flatnonzero(counted & (ramps > limit_kw_per_s))),
    )


def battery_headroom(
    battery_kw: np.ndarray,
    soc_pct: np.ndarray,
    dt_s: float,
    *,
    rated_kw: float,
    soc_min_pct: float,
    soc_max_pct: float,
    margin: float = 0.05,
) -> np.ndarray:
    """Return, per whole second, whether the battery could still have moved its power.

    A second has headroom when the battery's power stayed within
    (1 - ``margin``) of ``rated_kw`` in both directions and the SoC stayed
    strictly inside (``soc_min_pct``, ``soc_max_pct``) throughout it.
    """
    size = _samples_per(1.0, dt_s)
    whole = np.asarray(battery_kw).size // size
    power = (
        np.abs(np.asarray(battery_kw, dtype=float)[: whole * size]).reshape(whole, size).max(axis=1)
    )
    soc = np.asarray(soc_pct, dtype=float)[: whole * size].reshape(whole, size)
    inside = (soc.min(axis=1) > soc_min_pct) & (soc.max(axis=1) < soc_max_pct)
    return (power < (1.0 - margin) * rated_kw) & inside


# --------------------------------------------------------------------------- spectra


def welch_psd(
    x: np.ndarray, fs_hz: float, segment_s: float = 60.0
) -> tuple[np.ndarray, np.ndarray]:
    """Estimate the one-sided power spectral density of ``x`` in units²/Hz.

    Welch's method: Hann-windowed segments of ``segment_s`` (cut to the
    signal if it is shorter), 50 % overlap, each segment's mean removed,
    density scaling so that integrating the PSD over frequency gives the
    variance. It gives the same result, to 1e-10 relative, as scipy 1.17.1
    ``scipy.signal.welch(x, fs_hz, nperseg=n, noverlap=n // 2)`` with
    ``n = round(segment_s * fs_hz)`` and scipy's default Hann window,
    constant detrend and density scaling; scipy is not a dependency.
    Returns (frequencies in Hz, PSD).
    """
    x = np.asarray(x, dtype=float)
    if not fs_hz > 0:
        raise ValueError(f"fs_hz={fs_hz} must be > 0")
    nperseg = min(round(segment_s * fs_hz), x.size)
    if nperseg < 8:
        raise ValueError(f"signal of {x.size} samples is too short for a spectrum; need at least 8")
    step = nperseg - nperseg // 2  # overlap of nperseg // 2 samples, as scipy
    window = np.hanning(nperseg + 1)[:-1]  # periodic Hann, as scipy uses
    scale = 1.0 / (fs_hz * np.sum(window**2))
    starts = range(0, x.size - nperseg + 1, step)
    psd = np.zeros(nperseg // 2 + 1)
    for start in starts:
        segment = x[start : start + nperseg]
        spectrum = np.fft.rfft((segment - segment.mean()) * window)
        psd += np.abs(spectrum) ** 2
    psd *= scale / len(starts)
    # One-sided: double every bin except DC and, for even lengths, Nyquist.
    if nperseg % 2 == 0:
        psd[1:-1] *= 2.0
    else:
        psd[1:] *= 2.0
    return np.fft.rfftfreq(nperseg, 1.0 / fs_hz), psd


def band_power(
    x: np.ndarray, fs_hz: float, f_lo_hz: float = 0.1, f_hi_hz: float = 2.0, segment_s: float = 60.0
) -> float:
    """Return the power of ``x`` in [``f_lo_hz``, ``f_hi_hz``], in units² (kW² for a power signal).

    A sine of amplitude A inside the band gives A²/2. Resolution is
    1/``segment_s``; a band edge falls between bins, so tones within about
    two bins of an edge are partly counted.
    """
    if not 0 <= f_lo_hz < f_hi_hz:
        raise ValueError(f"invalid band {f_lo_hz}-{f_hi_hz} Hz; need 0 <= low < high")
    freqs, psd = welch_psd(x, fs_hz, segment_s)
    inside = (freqs >= f_lo_hz) & (freqs <= f_hi_hz)
    return float(np.sum(psd[inside]) * (freqs[1] - freqs[0]))


def attenuation_db(
    load_kw: np.ndarray,
    grid_kw: np.ndarray,
    fs_hz: float,
    *,
    f_lo_hz: float = 0.1,
    f_hi_hz: float = 2.0,
    segment_s: float = 60.0,
) -> float:
    """Return how far the grid's band power lies below the load's, in dB; positive is smoother."""
    load = band_power(load_kw, fs_hz, f_lo_hz, f_hi_hz, segment_s)
    grid = band_power(grid_kw, fs_hz, f_lo_hz, f_hi_hz, segment_s)
    if grid == 0:
        return math.inf
    if load == 0:
        return -math.inf
    return 10.0 * math.log10(load / grid)


# --------------------------------------------------------------------------- battery


@dataclass(frozen=True)
class SocBounds:
    min_pct: float
    max_pct: float
    #: Samples outside [lower, upper] when checked against bounds, else 0.
    samples_outside: int


def soc_bounds(
    soc_pct: np.ndarray, lower_pct: float | None = None, upper_pct: float | None = None
) -> SocBounds:
    """Return the SoC range of a run and how many samples left [``lower_pct``, ``upper_pct``]."""
    soc = np.asarray(soc_pct, dtype=float)
    outside = np.zeros(soc.size, dtype=bool)
    if lower_pct is not None:
        outside |= soc < lower_pct
    if upper_pct is not None:
        outside |= soc > upper_pct
    return SocBounds(float(soc.min()), float(soc.max()), int(outside.sum()))


@dataclass(frozen=True)
class Breach:
    """One continuous stretch in which the battery current exceeded a BMS limit."""

    start_s: float
    end_s: float
    #: ``charge`` or ``discharge``.
    direction: str
    #: Largest excess over the limit during the stretch, in A.
    max_excess_a: float


def bms_limit_breaches(
    current_a: np.ndarray,
    charge_limit_a: np.ndarray,
    discharge_limit_a: np.ndarray,
    dt_s: float,
    *,
    tolerance_a: float = 0.0,
    min_duration_s: float = 0.0,
) -> list[Breach]:
    """Find the stretches in which the current went past a BMS limit by more than ``tolerance_a``.

    Discharge current above ``discharge_limit_a`` or charge current (negative)
    beyond ``charge_limit_a`` is a breach. Limits are non-negative magnitudes,
    per sample or scalar. Stretches shorter than ``min_duration_s`` are not
    reported.
    """
    _check_dt(dt_s)
    current = np.asarray(current_a, dtype=float)
    breaches = []
    for direction, excess in (
        ("discharge", current - np.asarray(discharge_limit_a, dtype=float)),
        ("charge", -current - np.asarray(charge_limit_a, dtype=float)),
    ):
        over = np.broadcast_to(excess, current.shape) > tolerance_a
        edges = np.diff(over.astype(np.int8), prepend=0, append=0)
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        for start, end in zip(starts, ends, strict=True):
            if (end - start) * dt_s < min_duration_s:
                continue
            worst = float(np.max(np.broadcast_to(excess, current.shape)[start:end]))
            breaches.append(Breach(start * dt_s, end * dt_s, direction, worst))
    return sorted(breaches, key=lambda b: b.start_s)


def renewable_self_consumption(renewable_kw: np.ndarray, grid_kw: np.ndarray) -> float:
    """Return the share of renewable energy used on site rather than exported.

    At each sample the export is the negative part of the grid power, and at
    most the renewable output is counted as renewable export (the rest would
    be battery export). Returns 1.0 when there was no renewable output.
    """
    renewable = np.clip(np.asarray(renewable_kw, dtype=float), 0.0, None)
    export = np.clip(-np.asarray(grid_kw, dtype=float), 0.0, None)
    total = renewable.sum()
    if total == 0:
        return 1.0
    return float(1.0 - np.minimum(export, renewable).sum() / total)


def equivalent_full_cycles(battery_kw: np.ndarray, dt_s: float, energy_kwh: float) -> float:
    """Return the battery throughput in equivalent full cycles.

    One cycle is one capacity charged and one discharged: (energy charged +
    energy discharged) / (2 * ``energy_kwh``), from the battery's power.
    """
    _check_dt(dt_s)
    if not energy_kwh > 0:
        raise ValueError(f"energy_kwh={energy_kwh} must be > 0")
    throughput_kwh = np.abs(np.asarray(battery_kw, dtype=float)).sum() * dt_s / 3600.0
    return float(throughput_kwh / (2.0 * energy_kwh))


# --------------------------------------------------------------------------- faults


def reaction_time_s(
    t_s: np.ndarray,
    response: np.ndarray,
    event_t_s: float,
    *,
    target: float,
    tolerance: float,
    hold_s: float = 0.0,
) -> float | None:
    """Return how long after ``event_t_s`` ``response`` came within ``tolerance`` of ``target``.

    With ``hold_s`` the response must also stay within tolerance for that
    long (or until the record ends, if sooner); otherwise the first sample
    inside counts. Returns None when the response never got there, which a
    criterion must treat as a failure.
    """
    t = np.asarray(t_s, dtype=float)
    y = np.asarray(response, dtype=float)
    after = t >= event_t_s
    inside = after & (np.abs(y - target) <= tolerance)
    edges = np.diff(inside.astype(np.int8), prepend=0, append=0)
    run_starts, run_ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    # Only the first sample of a run can start the earliest hold: later samples of the
    # same run end at the same place.
    for start, end in zip(run_starts, run_ends, strict=True):
        held_to_end = end == t.size
        if hold_s <= 0 or held_to_end or t[end - 1] - t[start] >= hold_s:
            return float(t[start] - event_t_s)
    return None


def first_event_s(t_s: np.ndarray, condition: np.ndarray) -> float | None:
    """Return the time of the first sample where ``condition`` is true, or None."""
    index = np.flatnonzero(np.asarray(condition, dtype=bool))
    return float(np.asarray(t_s)[index[0]]) if index.size else None
