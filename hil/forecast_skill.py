"""Forecast skill against persistence on the bundled data, for the benchmark and the tests.

Both functions run a :class:`~gateway.forecast.Forecaster` online, as the
daemon does: one value per step, refitting on its own schedule. They score
the median forecast at one horizon against persistence (the last value) on
the same targets. A warm-up, in which the model fits its first weights, is
left out of the score.

* :func:`load_skill`: the site load of a job-scheduled GPU cluster
  (:mod:`hil.cluster`, shaped by the measured H100 training trace) plus the
  facility baseline (BDEW G3), one-minute means, with the scheduler's hints.
* :func:`wind_skill`: the La Haute Borne plant's measured 10-minute output,
  at its own 10-minute step.
* :func:`wind_alternatives`: simpler and richer models on the same plant,
  fitted on 2014 and scored on 2015, to show how far the plant's own history
  can take a 1-hour forecast.
"""

from __future__ import annotations

import numpy as np

from gateway.forecast import (
    ForecastConfig,
    Forecaster,
    HintBook,
    fit_quantile,
    forecast_skill,
    parse_hint,
)
from hil.cluster import ClusterSpec, NodeShape, cluster_power_kw, generate_jobs, hint_events
from hil.traces import (
    FacilityBaseline,
    load_commercial_profile,
    load_h100_training,
    load_wind_plant,
    profile_start_s,
)

#: The benchmark's cluster: 128 nodes of 10 kW, about 35 % busy on average.
BENCH_CLUSTER = ClusterSpec(nodes=128, node_peak_kw=10.0, arrivals_per_hour=2.5)


def site_load_kw(
    spec: ClusterSpec,
    seed: int,
    start_utc: str,
    duration_s: float,
    step_s: float,
    *,
    facility_mean_kw: float = 150.0,
) -> tuple[np.ndarray, list]:
    """Return the site load as step means (cluster plus facility) and the cluster's jobs.

    The cluster is rendered every 10 s and averaged over each step, as a
    meter's minute means would be. Value ``i`` is the mean over
    [``i * step_s``, ``(i + 1) * step_s``).
    """
    t0 = float(np.datetime64(start_utc.removesuffix("Z"), "s").astype(np.int64))
    shape = NodeShape(load_h100_training())
    jobs = generate_jobs(spec, seed, t0, duration_s, shape.period_s)
    per_step = max(round(step_s / 10.0), 1)
    steps = int(duration_s // step_s)
    t = np.arange(steps * per_step) * (step_s / per_step)
    cluster = cluster_power_kw(spec, jobs, t, shape).reshape(steps, per_step).mean(axis=1)
    facility = FacilityBaseline(
        load_commercial_profile("g3"), facility_mean_kw, profile_start_s(start_utc)
    )
    baseline = facility.power_kw(t).reshape(steps, per_step).mean(axis=1)
    return cluster + baseline, jobs


def load_skill(
    *,
    days: float = 28.0,
    warmup_days: float = 7.0,
    seed: int = 11,
    start_utc: str = "2015-01-05T00:00:00Z",
    use_hints: bool = True,
    horizon_s: float = 3600.0,
    spec: ClusterSpec = BENCH_CLUSTER,
) -> dict[str, float]:
    """Score the load forecast at ``horizon_s`` on ``days`` of the simulated site."""
    step_s = 60.0
    load, jobs = site_load_kw(spec, seed, start_utc, days * 86400.0, step_s)
    t0 = float(np.datetime64(start_utc.removesuffix("Z"), "s").astype(np.int64))
    events = hint_events(jobs, t0)
    book = HintBook()
    scale_kw = spec.nodes * spec.node_peak_kw + 300.0
    config = ForecastConfig(name="load", scale_kw=scale_kw, use_hints=use_hints)
    forecaster = Forecaster(config, book)
    column = config.horizons_s.index(horizon_s)
    bands = np.full((3, load.size), np.nan)
    next_event = 0
    for i, value in enumerate(load):
        # Step i ends at (i + 1) * step_s; every hint sent by then is known.
        end_s = (i + 1) * step_s
        while next_event < len(events) and events[next_event][0] <= end_s:
            book.add(parse_hint(events[next_event][1]), "api")
            next_event += 1
        if i % 1440 == 0:
            book.prune(t0 + end_s)
        bands[:, i] = forecaster.update(t0 + end_s, value).values_kw[:, column]
    return _score(load, bands, int(horizon_s // step_s), int(warmup_days * 86400 // step_s))


def wind_skill(
    *,
    start_utc: str = "2014-01-01T00:00:00Z",
    days: float = 730.0,
    warmup_days: float = 365.0,
    horizon_s: float = 3600.0,
    refit_days: float = 30.0,
) -> dict[str, float]:
    """Score the wind forecast at ``horizon_s`` on the measured 10-minute plant output.

    The model is refitted every ``refit_days`` on the last 120 days. Besides
    the errors, the result has ``inside_band``: the share of actuals between
    the 0.1 and 0.9 quantiles (0.8 if they are calibrated).
    """
    record = load_wind_plant()
    first = record.index_at(start_utc)
    steps = int(days * 86400 // record.interval_s)
    values = record.p_kw[first : first + steps]
    t0 = float(record.start_utc.astype(np.int64)) + first * record.interval_s
    config = ForecastConfig(
        name="wind",
        scale_kw=record.rated_kw,
        step_s=record.interval_s,
        horizons_s=(1800.0, 3600.0),
        upper_kw=record.rated_kw,
        history_s=120 * 86400.0,
        min_fit_s=60 * 86400.0,
        refit_every_s=refit_days * 86400.0,
        fit_stride_s=record.interval_s,
    )
    forecaster = Forecaster(config)
    column = config.horizons_s.index(horizon_s)
    bands = np.full((3, values.size), np.nan)
    for i, value in enumerate(values):
        forecast = forecaster.update(t0 + (i + 1) * record.interval_s, value)
        bands[:, i] = forecast.values_kw[:, column]
    warmup = int(warmup_days * 86400 // record.interval_s)
    return _score(values, bands, int(horizon_s // record.interval_s), warmup)


def _score(values: np.ndarray, bands: np.ndarray, horizon: int, warmup: int) -> dict[str, float]:
    """Score the median (row 1 of ``bands``) and the share of actuals inside rows 0 to 2."""
    actual = values[warmup + horizon :]
    low, point, high = bands[:, warmup : values.size - horizon]
    persistence = values[warmup : values.size - horizon]
    result = forecast_skill(actual, point, persistence)
    known = np.isfinite(actual) & np.isfinite(low)
    inside = (low[known] <= actual[known]) & (actual[known] <= high[known])
    result["inside_band"] = float(inside.mean())
    return result


def wind_alternatives(*, horizon_s: float = 3600.0) -> dict[str, dict[str, float]]:
    """Score other 1-hour wind forecasts on the plant record: fitted on 2014, scored on 2015.

    Every model uses only the plant's own 10-minute history up to the
    forecast time. Free parameters (blend weight, damping) are chosen on
    2014 by mean absolute error. The models:

    * ``climatology_blend``: persistence blended with the 2014 mean power of
      the same UTC hour;
    * ``damped_trend``: persistence plus the last 30 minutes' trend, damped;
    * ``ramp_regression``: a linear median regression on the level, the
      changes over 10, 30 and 60 minutes, the gap to the 1-hour and 6-hour
      means and the nacelle wind speed (and its square and cube);
    * ``level_and_mean_bins``: the median change seen in 2014 in the same cell
      of 20 level bins by 8 bins of the gap to the 1-hour mean, a model-free
      check of what those two inputs hold.
    """
    record = load_wind_plant()
    power = record.p_kw
    rated = record.rated_kw
    steps = int(horizon_s // record.interval_s)
    n = power.size
    split = record.index_at("2015-01-01T00:00:00Z")
    target = np.full(n, np.nan)
    target[:-steps] = power[steps:]
    fit_rows = np.arange(n) < split
    scored = ~fit_rows & np.isfinite(target) & np.isfinite(power)

    def lagged(values: np.ndarray, k: int) -> np.ndarray:
        out = np.full(n, np.nan)
        out[k:] = values[:-k]
        return out

    def trailing_mean(values: np.ndarray, k: int) -> np.ndarray:
        """Mean of the last ``k`` values; NaN unless at least half of them are known."""
        valid = np.isfinite(values)
        sums = np.concatenate(([0.0], np.cumsum(np.where(valid, values, 0.0))))
        counts = np.concatenate(([0], np.cumsum(valid)))
        out = np.full(n, np.nan)
        count = counts[k:] - counts[:-k]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k - 1 :] = np.where(count >= k / 2, (sums[k:] - sums[:-k]) / count, np.nan)
        return out

    def score(forecast_kw: np.ndarray) -> dict[str, float]:
        good = scored & np.isfinite(forecast_kw)
        return forecast_skill(target[good], np.clip(forecast_kw[good], 0.0, rated), power[good])

    def best_on_2014(candidates: dict[float, np.ndarray]) -> np.ndarray:
        good = fit_rows & np.isfinite(target) & np.isfinite(power)
        errors = {
            key: np.nanmean(np.abs(np.clip(values[good], 0.0, rated) - target[good]))
            for key, values in candidates.items()
        }
        return candidates[min(errors, key=errors.get)]

    t_s = np.arange(n) * record.interval_s + float(record.start_utc.astype(np.int64))
    hour = ((t_s % 86400.0) // 3600.0).astype(int)
    hourly = np.array([np.nanmean(power[fit_rows & (hour == h)]) for h in range(24)])
    blends = {w: (1.0 - w) * power + w * hourly[hour] for w in (0.0, 0.01, 0.02, 0.05, 0.1)}
    trend = (power - lagged(power, 3)) / 3.0 * steps
    damped = {phi: power + phi * trend for phi in (0.0, 0.1, 0.2, 0.4)}

    unit = power / rated
    columns = [np.maximum(1.0 - np.abs(unit - knot) / 0.2, 0.0) for knot in np.linspace(0, 1, 6)]
    columns += [(power - lagged(power, k)) / rated for k in (1, 3, 6)]
    columns += [(trailing_mean(power, k) - power) / rated for k in (6, 36)]
    speed = record.wind_speed_mps / 15.0
    columns += [speed, speed**2, speed**3]
    x = np.column_stack(columns)
    change = (target - power) / rated
    train = fit_rows & np.all(np.isfinite(x), axis=1) & np.isfinite(change)
    weights = fit_quantile(x[train][::2], change[train][::2], 0.5)
    regression = power + rated * (x @ weights)

    gap = trailing_mean(power, 6) - power
    cells = np.full(n, -1)
    known = np.isfinite(power) & np.isfinite(gap)
    level_edges = np.nanquantile(power[fit_rows], np.linspace(0, 1, 21)[1:-1])
    gap_edges = np.nanquantile(gap[fit_rows], np.linspace(0, 1, 9)[1:-1])
    cells[known] = (
        np.searchsorted(level_edges, power[known]) * 8 + np.searchsorted(gap_edges, gap[known])
    )
    binned = power.copy()
    learn = fit_rows & known & np.isfinite(change)
    for cell in np.unique(cells[learn]):
        inside = learn & (cells == cell)
        if inside.sum() >= 30:
            binned[cells == cell] = power[cells == cell] + rated * np.median(change[inside])

    return {
        "climatology_blend": score(best_on_2014(blends)),
        "damped_trend": score(best_on_2014(damped)),
        "ramp_regression": score(regression),
        "level_and_mean_bins": score(binned),
    }
