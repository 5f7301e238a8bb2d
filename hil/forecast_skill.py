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
"""

from __future__ import annotations

import numpy as np

from gateway.forecast import ForecastConfig, Forecaster, HintBook, forecast_skill, parse_hint
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
