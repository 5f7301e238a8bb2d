"""Loaders and resamplers for the bundled data: GPU server power, wind farm output, facility load.

Every loader reads a CSV under ``hil/data`` with numpy only and returns plain
arrays in the units of their names. The ``*Profile`` classes are built once
for a run (start, duration, scaling, seed) and then evaluated at any time
step, in one call or in chunks. The same ``t_s`` gives the same value either
way, so the real-time HIL and the SIL replay see identical inputs.

Times passed to the profiles are seconds from the start of the run. Powers
follow the project's signs: load positive is consumption, and wind output is
positive generation.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"

H100_TRAINING_CSV = DATA_DIR / "gpu" / "smc-h100-sxm-80gbx8-llama2-70b-lora-training-power-2s.csv"
H200_INFERENCE_CSV = (
    DATA_DIR / "gpu" / "nvidia-h200-sxm-141gbx8-maxq-llama2-70b-server-power-1s.csv"
)
WIND_PLANT_CSV = DATA_DIR / "wind" / "la-haute-borne-plant-10min.csv"
COMMERCIAL_PROFILE_CSV = DATA_DIR / "loads" / "bdew-commercial-2025-calendar-15min.csv"

#: La Haute Borne: 4 Senvion MM82 turbines of 2,050 kW each.
WIND_PLANT_RATED_KW = 4 * 2050.0
WIND_PLANT_TURBINES = 4
WIND_INTERVAL_S = 600.0
PROFILE_INTERVAL_S = 900.0
PROFILE_YEAR = 2025
#: Every BDEW profile column integrates to 1 GWh over 2025, so its mean is this many kW.
PROFILE_MEAN_KW_PER_GWH = 1e6 / (365 * 24)
PROFILE_COLUMNS = ("g0", "g1", "g3", "g25")


class TraceError(ValueError):
    """A data file is missing or malformed, or a request falls outside the data."""


# --------------------------------------------------------------------------- loaders


def _read_csv(path: Path, usecols: tuple[int, ...], dtype: object) -> np.ndarray:
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, usecols=usecols, dtype=dtype, ndmin=2)
    except FileNotFoundError as err:
        raise TraceError(
            f"data file {path} not found; reinstall bessgw so that hil/data is present"
        ) from err
    except ValueError as err:
        raise TraceError(f"data file {path} is malformed: {err}") from err


@dataclass(frozen=True)
class GpuTrace:
    """One measured server power trace."""

    #: Seconds since the first reading; strictly increasing, not evenly spaced.
    t_s: np.ndarray
    p_w: np.ndarray
    #: Per reading: ``init``, ``train``, ``eval`` or ``after_run`` (training trace);
    #: ``idle`` or ``window`` (inference trace: inside the benchmark's power window or not).
    phase: np.ndarray
    name: str

    def segment(self, phases: tuple[str, ...]) -> GpuTrace:
        """Return the contiguous readings from the first to the last reading in ``phases``."""
        index = np.flatnonzero(np.isin(self.phase, phases))
        if index.size == 0:
            raise TraceError(f"trace {self.name} has no reading in phases {phases}")
        cut = slice(index[0], index[-1] + 1)
        t_s = self.t_s[cut] - self.t_s[index[0]]
        return GpuTrace(t_s, self.p_w[cut], self.phase[cut], self.name)


def load_h100_training(path: Path = H100_TRAINING_CSV) -> GpuTrace:
    """Load the 8-GPU H100 Llama-2-70B LoRA training trace (about one reading per 2 s, 30 min)."""
    numbers = _read_csv(path, (0, 2), float)
    phase = _read_csv(path, (3,), str)[:, 0]
    return GpuTrace(numbers[:, 0], numbers[:, 1], phase, "h100-training")


def load_h200_inference(path: Path = H200_INFERENCE_CSV) -> GpuTrace:
    """Load the 8-GPU H200 Llama-2-70B inference trace (1 reading per s, 51 min)."""
    numbers = _read_csv(path, (0, 2, 18), float)
    phase = np.where(numbers[:, 2] > 0, "window", "idle")
    return GpuTrace(numbers[:, 0], numbers[:, 1], phase, "h200-inference")


def load_gpu_trace(name: str) -> GpuTrace:
    """Load a GPU trace by its scenario name, ``h100-training`` or ``h200-inference``."""
    if name == "h100-training":
        return load_h100_training()
    if name == "h200-inference":
        return load_h200_inference()
    raise TraceError(f"unknown GPU trace {name!r}; expected 'h100-training' or 'h200-inference'")


@dataclass(frozen=True)
class WindRecord:
    """The wind farm's 10-minute means on a regular grid.

    Each timestamp is taken as the start of its 10-minute interval. The source
    does not say whether it labels the start or the end, so the record may be
    10 minutes early. That shift does not matter to the HIL rig, which only
    needs a realistic wind shape.
    """

    #: UTC start of the first interval.
    start_utc: np.datetime64
    #: Plant power, corrected to all four turbines (see ``load_wind_plant``).
    #: NaN where no turbine reported.
    p_kw: np.ndarray
    wind_speed_mps: np.ndarray
    turbines_reporting: np.ndarray
    rated_kw: float = WIND_PLANT_RATED_KW
    interval_s: float = WIND_INTERVAL_S

    def index_at(self, when_utc: str | np.datetime64) -> int:
        """Return the index of the interval that contains ``when_utc``."""
        when = _to_datetime64(when_utc)
        offset_s = (when - self.start_utc) / np.timedelta64(1, "s")
        index = int(offset_s // self.interval_s)
        if not 0 <= index < self.p_kw.size:
            end = self.start_utc + np.timedelta64(int(self.p_kw.size * self.interval_s), "s")
            raise TraceError(
                f"time {when_utc} is outside the wind record ({self.start_utc}Z to {end}Z); "
                "pick a start_utc in 2014 or 2015"
            )
        return index


def _to_datetime64(when_utc: str | np.datetime64) -> np.datetime64:
    if isinstance(when_utc, np.datetime64):
        return when_utc.astype("datetime64[s]")
    text = when_utc.removesuffix("Z")
    try:
        return np.datetime64(text, "s")
    except ValueError as err:
        raise TraceError(
            f"invalid UTC time {when_utc!r}; expected ISO 8601 like 2015-02-03T12:00:00Z"
        ) from err


def load_wind_plant(path: Path = WIND_PLANT_CSV) -> WindRecord:
    """Load the La Haute Borne plant record, two years of 10-minute means.

    Where only some turbines reported, ``power_kw`` counts only those, so the
    plant power is scaled by 4 / reporting. This assumes that the missing
    turbines produced like the ones that reported. Rows where no turbine reported are
    NaN, which :class:`WindProfile` fills by linear interpolation.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            next(handle)
            rows = [line.rstrip("\n").split(",") for line in handle if line.strip()]
        times = np.array([r[0].removesuffix("Z") for r in rows], dtype="datetime64[s]")
        p_kw = np.array([float(r[1]) if r[1] else np.nan for r in rows])
        wind_mps = np.array([float(r[2]) if r[2] else np.nan for r in rows])
        reporting = np.array([int(r[3]) for r in rows])
    except FileNotFoundError as err:
        raise TraceError(
            f"data file {path} not found; reinstall bessgw so that hil/data is present"
        ) from err
    except (ValueError, IndexError, StopIteration) as err:
        raise TraceError(f"data file {path} is malformed: {err}") from err

    steps_s = np.diff(times) / np.timedelta64(1, "s")
    irregular = np.flatnonzero(steps_s != WIND_INTERVAL_S)
    if irregular.size:
        row = int(irregular[0]) + 1
        raise TraceError(
            f"data file {path} is not on a regular 10-minute grid: data row {row + 1} "
            f"({times[row]}Z) follows the previous one by {steps_s[row - 1]} s, expected 600 s"
        )

    with np.errstate(divide="ignore", invalid="ignore"):
        full_kw = np.where(reporting > 0, p_kw * WIND_PLANT_TURBINES / reporting, np.nan)
    return WindRecord(times[0], full_kw, wind_mps, reporting)


@dataclass(frozen=True)
class CommercialProfile:
    """A BDEW commercial load profile on the 2025 calendar, 15-minute slot means."""

    column: str
    #: Mean power of each 15-minute slot, in kW for a consumer of 1 GWh per year.
    kw_per_gwh_yr: np.ndarray
    interval_s: float = PROFILE_INTERVAL_S


def load_commercial_profile(
    column: str = "g3", path: Path = COMMERCIAL_PROFILE_CSV
) -> CommercialProfile:
    """Load one profile column (``g0``, ``g1``, ``g3`` or ``g25``) of the 2025 calendar file."""
    if column not in PROFILE_COLUMNS:
        raise TraceError(
            f"unknown load profile {column!r}; expected one of {', '.join(PROFILE_COLUMNS)}"
        )
    index = 2 + PROFILE_COLUMNS.index(column)
    values = _read_csv(path, (index,), float)[:, 0]
    return CommercialProfile(column, values)


# --------------------------------------------------------------------------- interpolation


def pchip_slopes(y: np.ndarray, h: float) -> np.ndarray:
    """Compute Fritsch-Carlson monotone slopes for evenly spaced points ``y`` with spacing ``h``.

    Interior slopes are the harmonic mean of the neighbouring secants, or 0
    where the secants change sign, so the curve never overshoots between two
    points. End slopes use the one-sided three-point formula, limited the
    same way.
    """
    secant = np.diff(y) / h
    slopes = np.zeros_like(y, dtype=float)
    if y.size < 2:
        return slopes
    if y.size == 2:
        slopes[:] = secant[0]
        return slopes
    left, right = secant[:-1], secant[1:]
    same_sign = left * right > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        harmonic = np.where(same_sign, 2.0 * left * right / (left + right), 0.0)
    slopes[1:-1] = harmonic
    slopes[0] = _pchip_end_slope(secant[0], secant[1])
    slopes[-1] = _pchip_end_slope(secant[-1], secant[-2])
    return slopes


def _pchip_end_slope(near: float, far: float) -> float:
    slope = (3.0 * near - far) / 2.0
    if np.sign(slope) != np.sign(near):
        return 0.0
    if np.sign(near) != np.sign(far) and abs(slope) > abs(3.0 * near):
        return 3.0 * near
    return slope


def interpolate_even(x0: float, h: float, y: np.ndarray, x: np.ndarray, method: str) -> np.ndarray:
    """Interpolate points ``y`` at ``x0 + k h`` to ``x``, holding the end values outside.

    ``method`` is ``linear`` or ``pchip`` (monotone piecewise cubic Hermite).
    """
    position = np.clip((np.asarray(x, dtype=float) - x0) / h, 0.0, y.size - 1)
    k = np.minimum(np.floor(position).astype(np.int64), y.size - 2)
    u = position - k
    if method == "linear":
        return y[k] + (y[k + 1] - y[k]) * u
    if method != "pchip":
        raise TraceError(f"unknown interpolation {method!r}; expected 'linear' or 'pchip'")
    d = pchip_slopes(y, h) * h
    u2, u3 = u * u, u * u * u
    return (
        (2 * u3 - 3 * u2 + 1) * y[k]
        + (u3 - 2 * u2 + u) * d[k]
        + (-2 * u3 + 3 * u2) * y[k + 1]
        + (u3 - u2) * d[k + 1]
    )


def mean_preserving_nodes(
    means: np.ndarray, interval_s: float, method: str, iterations: int = 12, samples: int = 60
) -> np.ndarray:
    """Find node values at interval centres whose interpolant has the given interval means.

    Interpolating straight through the means would smear each peak into its
    neighbours: a lone 10-minute peak loses a quarter of its excess with
    linear interpolation. Each iteration measures the interpolant's mean over
    every interval (on ``samples`` midpoints) and moves each node by the
    error. For linear interpolation the error at least halves per iteration
    (the interval means are (1, 6, 1) / 8 of the nodes). PCHIP is not linear
    in the nodes, but the tests show the same convergence on the wind data.
    """
    nodes = means.astype(float).copy()
    offsets = (np.arange(samples) + 0.5) / samples * interval_s
    centre0 = interval_s / 2.0
    x = (np.arange(means.size)[:, None] * interval_s + offsets[None, :]).ravel()
    for _ in range(iterations):
        values = interpolate_even(centre0, interval_s, nodes, x, method)
        achieved = values.reshape(means.size, samples).mean(axis=1)
        nodes += means - achieved
    return nodes


def _fill_gaps(values: np.ndarray) -> np.ndarray:
    good = np.isfinite(values)
    if good.all():
        return values
    if not good.any():
        raise TraceError("no valid value in the requested span of the record; pick another start")
    index = np.arange(values.size)
    return np.interp(index, index[good], values[good])


# --------------------------------------------------------------------------- wind


class WindProfile:
    """Wind farm output scaled to a site rating, at any time step of a run.

    Method: the 10-minute means are scaled by ``rated_kw`` / 8,200 kW and
    turned into node values at each interval's centre
    (:func:`mean_preserving_nodes`), which are joined by linear or monotone
    cubic (PCHIP) interpolation. The result is clipped to
    [``min_kw``, ``rated_kw``]. Each 10-minute mean is kept to within 1 % of
    the rating, except where the clip cuts a peak.

    Turbulence (off by default): ``turbulence_fraction`` adds a Gauss-Markov
    process with correlation time ``turbulence_tau_s``, scaled to that
    fraction of the momentary power, with its mean removed per 10-minute
    interval so that the means still hold. It is an assumed model of the
    seconds-to-minutes variation that the 10-minute data averages away; it is
    not fitted to any measurement in this repository.
    """

    def __init__(
        self,
        record: WindRecord,
        start_utc: str | np.datetime64,
        duration_s: float,
        rated_kw: float,
        *,
        method: str = "pchip",
        turbulence_fraction: float = 0.0,
        turbulence_tau_s: float = 30.0,
        seed: int = 0,
    ) -> None:
        if rated_kw < 0 or duration_s <= 0:
            raise TraceError(
                f"invalid wind profile: rated_kw={rated_kw}, duration_s={duration_s}; "
                "both must be positive (rated_kw may be 0 for no wind)"
            )
        if turbulence_fraction < 0 or turbulence_tau_s <= 0:
            raise TraceError(
                f"invalid turbulence: fraction={turbulence_fraction}, tau_s={turbulence_tau_s}; "
                "the fraction must be >= 0 and the time constant > 0"
            )
        self.rated_kw = float(rated_kw)
        self.duration_s = float(duration_s)
        self.method = method
        # Three spare intervals each side keep the record's edges out of the run.
        margin = 3
        first = record.index_at(start_utc)
        last = record.index_at(
            _to_datetime64(start_utc) + np.timedelta64(int(np.ceil(duration_s)), "s")
        )
        lo = max(first - margin, 0)
        hi = min(last + margin + 1, record.p_kw.size)
        start_offset_s = (_to_datetime64(start_utc) - record.start_utc) / np.timedelta64(1, "s")
        #: Run time of the start of interval ``lo``.
        self._t0_s = lo * record.interval_s - start_offset_s
        self.interval_s = record.interval_s
        scale = self.rated_kw / record.rated_kw
        #: 10-minute means over the span, scaled to the site, in kW.
        self.means_kw = _fill_gaps(record.p_kw[lo:hi]) * scale
        self.min_kw = min(float(np.min(self.means_kw)), 0.0)
        self._nodes = mean_preserving_nodes(self.means_kw, self.interval_s, method)
        self._turbulence = None
        if turbulence_fraction > 0 and self.rated_kw > 0:
            self._turbulence = self._make_turbulence(turbulence_fraction, turbulence_tau_s, seed)

    def _smooth_kw(self, t_s: np.ndarray) -> np.ndarray:
        return interpolate_even(
            self._t0_s + self.interval_s / 2, self.interval_s, self._nodes, t_s, self.method
        )

    def _make_turbulence(
        self, fraction: float, tau_s: float, seed: int
    ) -> tuple[np.ndarray, float]:
        step_s = min(1.0, tau_s / 10.0)
        count = int(np.ceil(self.means_kw.size * self.interval_s / step_s)) + 1
        rng = np.random.default_rng(seed)
        a = np.exp(-step_s / tau_s)
        shocks = rng.standard_normal(count) * np.sqrt(1.0 - a * a)
        z = np.empty(count)
        z[0] = rng.standard_normal()
        for n in range(1, count):
            z[n] = a * z[n - 1] + shocks[n]
        t_grid = self._t0_s + np.arange(count) * step_s
        component = fraction * self._smooth_kw(t_grid) * z
        interval = np.minimum(
            ((t_grid - self._t0_s) // self.interval_s).astype(np.int64), self.means_kw.size - 1
        )
        sums = np.bincount(interval, component, self.means_kw.size)
        counts = np.bincount(interval, None, self.means_kw.size)
        component -= (sums / np.maximum(counts, 1))[interval]
        return component, step_s

    def power_kw(self, t_s: np.ndarray | float) -> np.ndarray:
        """Return the site's wind output in kW at run times ``t_s`` (seconds from the start)."""
        t = np.asarray(t_s, dtype=float)
        p = self._smooth_kw(t)
        if self._turbulence is not None:
            component, step_s = self._turbulence
            p = p + np.interp(t, self._t0_s + np.arange(component.size) * step_s, component)
        return np.clip(p, self.min_kw, self.rated_kw)

    def interval_means_kw(self, start_s: float, count: int) -> np.ndarray:
        """Return the scaled 10-minute means of ``count`` intervals from run time ``start_s`` on."""
        first = round((start_s - self._t0_s) / self.interval_s)
        return self.means_kw[first : first + count]


# --------------------------------------------------------------------------- facility


def profile_start_s(start_utc: str | np.datetime64) -> float:
    """Return the offset into the 2025 profile that matches ``start_utc`` by ISO week and weekday.

    The wind record is 2014-2015 and the load calendar is 2025, so a date is
    moved to the 2025 day with the same ISO week number and weekday, which
    keeps workdays on workdays. The time of day is kept as is: the profile is
    on the German local clock, so it is 1 to 2 hours off UTC, which this
    ignores. Week 53 maps to week 52.
    """
    when = _to_datetime64(start_utc).astype(dt.datetime)
    _, week, weekday = when.isocalendar()
    week = min(week, 52)
    day = dt.date.fromisocalendar(PROFILE_YEAR, week, weekday)
    day = max(day, dt.date(PROFILE_YEAR, 1, 1))
    seconds_into_day = when.hour * 3600 + when.minute * 60 + when.second
    return (day - dt.date(PROFILE_YEAR, 1, 1)).days * 86400.0 + seconds_into_day


class FacilityBaseline:
    """Facility load from a commercial profile, scaled to a yearly mean power.

    Each 15-minute value is a slot mean, so it is held constant over its slot
    (zero-order hold), which keeps every slot's energy exact. The profile
    wraps from 31 December back to 1 January.
    """

    def __init__(self, profile: CommercialProfile, mean_kw: float, start_s: float = 0.0) -> None:
        if mean_kw < 0:
            raise TraceError(f"invalid facility mean_kw={mean_kw}; it must be >= 0")
        self.profile = profile
        self.start_s = float(start_s)
        self._kw = profile.kw_per_gwh_yr * (mean_kw / PROFILE_MEAN_KW_PER_GWH)

    def power_kw(self, t_s: np.ndarray | float) -> np.ndarray:
        """Return the facility load in kW at run times ``t_s``."""
        t = np.asarray(t_s, dtype=float) + self.start_s
        slot = np.floor(t / self.profile.interval_s).astype(np.int64) % self._kw.size
        return self._kw[slot]


# --------------------------------------------------------------------------- racks


class RackEnvelope:
    """Each rack's slow power shape from a measured GPU server trace.

    The trace's segment ``phases`` is scaled so that its largest reading is
    ``peak_kw`` and is repeated end to end. Rack ``r`` reads the trace
    ``r * rack_offset_s`` later than rack 0, so the racks' dips and job
    phases do not line up. Readings are joined linearly; the training trace
    has three gaps of 11-19 s that this bridges with a straight line.
    """

    def __init__(
        self,
        trace: GpuTrace,
        count: int,
        peak_kw: float,
        rack_offset_s: float,
        phases: tuple[str, ...] | None = None,
    ) -> None:
        if count < 1 or peak_kw <= 0 or rack_offset_s < 0:
            raise TraceError(
                f"invalid rack envelope: count={count}, peak_kw={peak_kw}, "
                f"rack_offset_s={rack_offset_s}; need count >= 1, peak_kw > 0, offset >= 0"
            )
        if phases is None:
            phases = ("train", "eval") if trace.name == "h100-training" else ("window",)
        self.segment = trace.segment(phases)
        self.count = count
        self.peak_kw = float(peak_kw)
        self.rack_offset_s = float(rack_offset_s)
        # One mean spacing past the last reading before the loop restarts.
        spacing = float(np.median(np.diff(self.segment.t_s)))
        self.period_s = float(self.segment.t_s[-1]) + spacing
        self._t = np.append(self.segment.t_s, self.period_s)
        self._kw = np.append(self.segment.p_w, self.segment.p_w[0]) * (
            self.peak_kw / float(np.max(self.segment.p_w))
        )

    def power_kw(self, t_s: np.ndarray | float) -> np.ndarray:
        """Return an array of shape (racks, len(t_s)) with each rack's envelope in kW."""
        t = np.atleast_1d(np.asarray(t_s, dtype=float))
        shifted = t[None, :] + self.rack_offset_s * np.arange(self.count)[:, None]
        return np.interp(np.mod(shifted, self.period_s), self._t, self._kw)
