"""Load and wind forecasts: job hints, the hint file, the quantile model, skill on bundled data."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import structlog

from gateway.forecast import (
    ForecastConfig,
    Forecaster,
    HintBook,
    HintError,
    HintFileWatcher,
    JobHint,
    add_hint,
    fit_quantile,
    parse_hint,
)
from hil.cluster import ClusterSpec, generate_jobs, hint_events
from hil.forecast_skill import load_skill, wind_alternatives, wind_skill

T0 = 1_740_000_000.0  # 2025-02-19T21:20:00Z


def _hint(job_id="j1", start=T0 + 600, end=T0 + 4000, nodes=4, kw=40.0) -> dict:
    return {"job_id": job_id, "start_utc": start, "end_utc": end, "nodes": nodes, "expected_kw": kw}


def test_parse_hint_fields():
    hint = parse_hint(_hint())
    assert hint == JobHint("j1", T0 + 600, T0 + 4000, 4, 40.0)
    iso = parse_hint(_hint(start="2025-02-19T21:30:00Z", end=None))
    assert iso.start_utc == T0 + 600
    assert iso.end_utc == math.inf


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"expected_kw": None}, "missing expected_kw"),
        ({"job_id": ""}, "job_id='' must be a string"),
        ({"start_utc": "yesterday"}, "not an ISO 8601 time"),
        ({"start_utc": "2025-02-19T21:30:00"}, "has no time zone"),
        ({"start_utc": True}, "is not a time"),
        ({"end_utc": T0}, "is not after start_utc"),
        ({"nodes": 0}, "nodes=0 must be a whole number"),
        ({"nodes": 2.5}, "nodes=2.5 must be a whole number"),
        ({"expected_kw": -1}, "expected_kw=-1 must be finite"),
        ({"expected_kw": float("nan")}, "must be finite"),
        ({"expected_kw": "40"}, "must be a number of kW"),
        ({"power": 3}, "unknown hint field"),
    ],
)
def test_parse_hint_rejects(change, message):
    with pytest.raises(HintError, match=message):
        parse_hint(_hint() | change)


def test_parse_hint_rejects_non_object():
    with pytest.raises(HintError, match="must be a JSON object"):
        parse_hint(["j1"])


def test_hint_book_power_steps():
    book = HintBook()
    book.add(JobHint("start", T0 + 600, T0 + 10_000, 4, 40.0))  # starts at +10 min
    book.add(JobHint("stop", T0 - 100, T0 + 2000, 2, 25.0))  # runs now, ends at +33 min
    book.add(JobHint("blip", T0 + 100, T0 + 200, 1, 7.0))  # starts and ends inside every span
    book.add(JobHint("steady", T0 - 500, T0 + 99_999, 8, 80.0))  # runs throughout
    steps = book.power_steps_kw(T0, [300.0, 900.0, 3600.0])
    # +5 min: nothing yet. +15 min: "start" is on. +60 min: "start" on and "stop" off.
    assert steps[0].tolist() == [0.0, 40.0, 40.0]
    assert steps[1].tolist() == [0.0, 0.0, 25.0]
    assert book.power_change_kw(T0, [3600.0]).tolist() == [15.0]


def test_hint_book_prune_and_replace():
    book = HintBook()
    add_hint(book, _hint("old", start=T0 - 9000, end=T0 - 4000))
    add_hint(book, _hint("j1"))
    # An epilog update for j1 replaces the earlier hint instead of adding one.
    add_hint(book, _hint("j1", end=T0 + 1200))
    assert len(book) == 2
    assert book.prune(T0) == 1
    assert [h.end_utc for h in book.hints()] == [T0 + 1200]


def test_hint_file_watcher_reloads(tmp_path):
    path = tmp_path / "hints.json"
    book = HintBook()
    add_hint(book, _hint("from-api"))
    watcher = HintFileWatcher(path, book)

    with structlog.testing.capture_logs() as logs:
        assert watcher.poll() is False
        assert watcher.poll() is False
    assert [e["event"] for e in logs] == ["job_hint_file_missing"]

    path.write_text(json.dumps({"jobs": [_hint("a"), _hint("b", kw=10.0)]}), encoding="utf-8")
    assert watcher.poll() is True
    assert sorted(h.job_id for h in book.hints()) == ["a", "b", "from-api"]
    assert watcher.poll() is False  # unchanged file: no reload

    path.write_text(json.dumps([_hint("c")]), encoding="utf-8")
    os.utime(path, ns=(1, 1))  # force a new modification time even on a coarse clock
    assert watcher.poll() is True
    assert sorted(h.job_id for h in book.hints()) == ["c", "from-api"]


def test_hint_file_watcher_keeps_last_good(tmp_path):
    path = tmp_path / "hints.json"
    book = HintBook()
    watcher = HintFileWatcher(path, book)
    path.write_text(json.dumps([_hint("a")]), encoding="utf-8")
    assert watcher.poll() is True

    path.write_text('[{"job_id": "b", "start_utc": 1, "expected_kw": -5}]', encoding="utf-8")
    with structlog.testing.capture_logs() as logs:
        assert watcher.poll() is False
        assert watcher.poll() is False
    assert [h.job_id for h in book.hints()] == ["a"]
    assert len(logs) == 1
    assert logs[0]["event"] == "job_hint_file_invalid"
    assert "entry 0" in logs[0]["error"]
    assert "expected_kw=-5" in logs[0]["error"]

    path.write_text("{not json", encoding="utf-8")
    with structlog.testing.capture_logs() as logs:
        assert watcher.poll() is False
    assert "not valid JSON at line 1" in logs[0]["error"]


def test_forecast_config_rejects():
    with pytest.raises(ValueError, match="horizons_s value 90"):
        ForecastConfig(name="x", scale_kw=1.0, horizons_s=(90.0,))
    with pytest.raises(ValueError, match=r"contain 0\.5"):
        ForecastConfig(name="x", scale_kw=1.0, quantiles=(0.1, 0.9))
    with pytest.raises(ValueError, match="no HintBook"):
        Forecaster(ForecastConfig(name="x", scale_kw=1.0, use_hints=True))


def test_forecaster_time_must_advance():
    forecaster = Forecaster(ForecastConfig(name="load", scale_kw=1000.0))
    forecaster.update(T0, 500.0)
    with pytest.raises(ValueError, match="not at least one step"):
        forecaster.update(T0 + 20.0, 510.0)


def test_forecaster_cold_start_is_persistence_plus_hints():
    book = HintBook()
    config = ForecastConfig(name="load", scale_kw=1000.0, use_hints=True)
    forecaster = Forecaster(config, book)
    book.add(JobHint("j", T0 + 1200, math.inf, 10, 100.0))  # starts 20 min after T0
    forecast = forecaster.update(T0, 500.0)
    assert forecast.method == "persistence"
    # Horizons 15, 30, 45, 60 min: the job is on from the second one.
    assert forecast.point_kw.tolist() == [500.0, 600.0, 600.0, 600.0]
    # Outer quantiles sit 10 % of scale * sqrt(hours) away: 100 kW at 1 h.
    assert forecast.upper_kw[-1] == pytest.approx(700.0)
    assert forecast.lower_kw[-1] == pytest.approx(500.0)


def test_forecaster_gap_and_missing_value():
    forecaster = Forecaster(ForecastConfig(name="load", scale_kw=1000.0))
    forecaster.update(T0, 500.0)
    forecast = forecaster.update(T0 + 180.0, None)  # two steps skipped, then a bad one
    assert forecaster.last_t_utc_s == T0 + 180.0
    assert forecast.method == "persistence"
    # No good last value: the mean of the history, with the whole range as spread.
    assert forecast.point_kw[0] == 500.0
    assert forecast.upper_kw[0] == 1500.0


def test_forecaster_learns_hint_weight():
    """A hinted job changes the forecast by the share of its power that the history showed."""
    rng = np.random.default_rng(1)
    book = HintBook()
    forecaster = Forecaster(ForecastConfig(name="load", scale_kw=1000.0, use_hints=True), book)
    steps = 2 * 1440
    load = np.full(steps + 61, 300.0)
    # Each hinted job of 100 kW raises the load by 70 kW (its nodes' idle draw was already on).
    for start in np.sort(rng.choice(steps - 200, 40, replace=False)):
        load[start : start + 180] += 70.0
        book.add(JobHint(f"j{start}", T0 + start * 60, T0 + (start + 180) * 60, 10, 100.0))
    load += rng.normal(0.0, 3.0, load.size)
    for i in range(steps):
        forecaster.update(T0 + i * 60, load[i])
    assert forecaster.fitted

    # A new job hinted to start in 10 min: the 1-h forecast rises by about 70 kW.
    now = T0 + steps * 60
    quiet = forecaster.update(now, 300.0).point_kw[-1]
    book.add(JobHint("new", now + 60 + 600, now + 60 + 7200, 10, 100.0))
    hinted = forecaster.update(now + 60, 300.0)
    assert hinted.method == "regression"
    assert hinted.point_kw[-1] - quiet == pytest.approx(70.0, abs=8.0)


def test_forecaster_unseen_level_is_persistence():
    """A level the fitted history never visited gets persistence, not an extrapolation."""
    rng = np.random.default_rng(2)
    forecaster = Forecaster(ForecastConfig(name="wind", scale_kw=1000.0, upper_kw=1000.0))
    # Two days swinging between 600 and 900 kW: levels 0 to 0.4 of the scale never occur.
    steps = 2 * 1440
    wind = 750.0 + 150.0 * np.sin(np.arange(steps) * 2 * np.pi / 300) + rng.normal(0, 5, steps)
    for i, value in enumerate(wind):
        forecaster.update(T0 + i * 60, value)
    assert forecaster.fitted
    seen = forecaster.update(T0 + steps * 60, 750.0)
    assert seen.method == "regression"
    calm = forecaster.update(T0 + (steps + 1) * 60, 50.0)
    assert calm.method == "persistence"
    assert calm.point_kw.tolist() == [50.0] * 4


def test_fit_horizon_rejects_model_losing_to_persistence():
    """A fit that loses to persistence on the held-out rows falls back to the change quantiles."""
    forecaster = Forecaster(ForecastConfig(name="load", scale_kw=1000.0))
    rows = 400
    x = np.zeros((rows, 12))
    x[:, 0] = 1.0  # one level column, always fully on
    x[:, 6] = np.where(np.arange(rows) % 2 == 0, 1.0, -1.0)
    # The first 75 % of the rows change by +0.1 * x6, the held-out 25 % by -0.1 * x6: the
    # fitted slope doubles the held-out error (0.2 against persistence's 0.1).
    target = 0.1 * x[:, 6] * np.where(np.arange(rows) < 300, 1.0, -1.0)
    beats, weights = forecaster._fit_horizon(x, target)
    assert not beats
    # Level columns carry the quantiles 0.1, 0.5, 0.9 of the change (half -0.1, half +0.1).
    assert weights[0].tolist() == pytest.approx(np.quantile(target, (0.1, 0.5, 0.9)).tolist())
    assert np.all(weights[6:] == 0.0)

    # The same slope all along: the model wins and keeps it.
    beats, weights = forecaster._fit_horizon(x, 0.1 * x[:, 6])
    assert beats
    assert weights[6, 1] == pytest.approx(0.1, abs=1e-3)


def test_latest_features_match_design():
    forecaster = Forecaster(ForecastConfig(name="wind", scale_kw=1000.0))
    rng = np.random.default_rng(3)
    for i, value in enumerate(np.clip(500 + np.cumsum(rng.normal(0, 20, 300)), 0, 1000)):
        forecaster.update(T0 + i * 60, value)
    y, _ = forecaster._history()
    t0 = forecaster.last_t_utc_s - (y.size - 1) * 60
    design = forecaster._design(y, np.array([y.size - 1]), t0)[0]
    assert np.allclose(design, forecaster._latest_features(y), equal_nan=True)


def test_fit_quantile_uniform_noise():
    rng = np.random.default_rng(5)
    x = np.ones((4000, 1))
    target = rng.uniform(0.0, 1.0, 4000)
    for q in (0.1, 0.5, 0.9):
        assert fit_quantile(x, target, q)[0] == pytest.approx(q, abs=0.03)


def test_cluster_hint_events_order():
    spec = ClusterSpec(nodes=32, node_peak_kw=10.0, sizes_nodes=(1, 4, 16), size_weights=(1, 1, 1))
    jobs = generate_jobs(spec, seed=3, t0_utc_s=T0, duration_s=86400.0, training_period_s=1800.0)
    events = hint_events(jobs, T0)
    assert [t for t, _ in events] == sorted(t for t, _ in events)
    job = next(j for j in jobs if j.hinted and j.hint_at_s < j.start_s)
    mine = [hint for _, hint in events if hint["job_id"] == job.job_id]
    # Announcement, prolog, epilog; the last carries the real end.
    assert len(mine) == 3
    assert mine[1]["start_utc"] == T0 + job.start_s
    assert mine[2]["end_utc"] == T0 + job.end_s
    # The scheduler never runs more nodes than the cluster has.
    edges = sorted([(j.start_s, j.nodes) for j in jobs] + [(j.end_s, -j.nodes) for j in jobs])
    assert max(np.cumsum([n for _, n in edges])) <= spec.nodes


def test_load_skill_with_hints():
    """On 7 scored days the 1-h load forecast with hints beats persistence by 33 % (measured)."""
    result = load_skill(days=14.0, warmup_days=7.0)
    assert result["skill"] >= 0.2
    assert 0.65 <= result["inside_band"] <= 0.9


def test_wind_skill_on_measured_data():
    """On the measured plant output the 1-h wind forecast beats persistence by 2.3 % (measured)."""
    result = wind_skill(start_utc="2014-01-01T00:00:00Z", days=180.0, warmup_days=90.0)
    assert result["skill"] >= 0.015
    assert result["count"] > 12_000


def test_wind_alternatives_near_persistence():
    """Blends, trends, ramp regressions and bins on the plant's history all stay within 2 %."""
    results = wind_alternatives()
    assert set(results) == {
        "climatology_blend",
        "damped_trend",
        "ramp_regression",
        "level_and_mean_bins",
    }
    for name, result in results.items():
        assert result["count"] > 50_000, name
        assert -0.01 < result["skill"] < 0.025, name
    # The richest one does beat persistence a little (1.8 % measured).
    assert results["ramp_regression"]["skill"] > 0.01
