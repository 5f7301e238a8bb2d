"""Periodic feed-forward of the load: period estimate, prediction and gating."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.control.predictor import PeriodicPredictor, PredictorParams

DT_S = 0.01


def square_wave(t_s: np.ndarray, period_s: float, low_kw: float, high_kw: float) -> np.ndarray:
    """A GPU-like iteration swing: high for 70 % of each period, low for the rest."""
    phase = np.mod(t_s, period_s) / period_s
    return np.where(phase < 0.7, high_kw, low_kw)


def feed(predictor: PeriodicPredictor, values: np.ndarray) -> np.ndarray:
    return np.array([predictor.update(float(v)) for v in values])


def test_predictor_finds_period():
    predictor = PeriodicPredictor(PredictorParams(sample_period_s=DT_S, lead_s=0.0))
    t = np.arange(0, 20, DT_S)
    feed(predictor, square_wave(t, 1.5, 300.0, 800.0))
    assert predictor.period_s == pytest.approx(1.5, abs=DT_S)
    assert predictor.periodicity > 0.95
    assert predictor.gain > 0.95


def test_predictor_never_takes_a_multiple_of_the_period():
    # A clean square wave correlates as well at 3.0 s as at 1.5 s; every
    # estimate must name the period itself.
    predictor = PeriodicPredictor(PredictorParams(sample_period_s=DT_S, lead_s=0.0))
    t = np.arange(0, 30, DT_S)
    periods = []
    for value in square_wave(t, 1.5, 300.0, 800.0):
        predictor.update(float(value))
        if predictor.period_s is not None and predictor.gain > 0:
            periods.append(predictor.period_s)
    assert len(periods) > 2000
    assert max(abs(np.array(periods) - 1.5)) < 2 * DT_S


def test_predictor_warms_up_within_three_periods():
    # From a cold start (or a reset) the gain must open before the 8 s window
    # fills: the estimate runs on the history there is.
    predictor = PeriodicPredictor(PredictorParams(sample_period_s=DT_S))
    t = np.arange(0, 8, DT_S)
    first_open = None
    for k, value in enumerate(square_wave(t, 1.5, 300.0, 800.0)):
        predictor.update(float(value))
        if first_open is None and predictor.gain > 0.9:
            first_open = t[k]
    assert first_open is not None
    assert first_open < 4.5


def test_predictor_warms_up_after_a_flat_start():
    # The HIL rig keeps the load flat while the daemon starts; the swings that
    # follow must still be found well before the window has forgotten the flat part.
    t = np.arange(0, 12, DT_S)
    x = square_wave(t, 1.5, 300.0, 800.0)
    x[t < 3.0] = 800.0
    predictor = PeriodicPredictor(PredictorParams(sample_period_s=DT_S))
    first_open = None
    for k, value in enumerate(x):
        predictor.update(float(value))
        if first_open is None and predictor.gain > 0.9:
            first_open = t[k]
    assert first_open is not None
    assert first_open < 3.0 + 3.5


def test_predictor_leads_by_lead_time():
    # With a clean periodic input the output at t equals the input at t + lead:
    # the prediction is the value one period ago shifted forward by the lead.
    lead_s = 0.15
    predictor = PeriodicPredictor(PredictorParams(sample_period_s=DT_S, lead_s=lead_s))
    t = np.arange(0, 20, DT_S)
    x = 500.0 + 200.0 * np.sin(2 * np.pi * t / 1.2)
    out = feed(predictor, x)
    tail = slice(round(15 / DT_S), round(19 / DT_S))
    shift = round(lead_s / DT_S)
    expected = x[tail.start + shift : tail.stop + shift]
    assert np.max(np.abs(out[tail] - expected)) < 2.0


def test_predictor_off_for_aperiodic_load():
    # Random steps every few seconds (job starts and stops) are not periodic:
    # the gain stays low and the output is the measured load itself.
    rng = np.random.default_rng(3)
    levels = rng.uniform(200.0, 900.0, 12)
    x = np.repeat(levels, round(2.7 / DT_S))
    predictor = PeriodicPredictor(PredictorParams(sample_period_s=DT_S))
    out = feed(predictor, x)
    assert predictor.gain < 0.2
    assert np.max(np.abs(out[-200:] - x[-200:])) < 0.2 * np.ptp(x)


def test_predictor_gates_off_within_a_period_at_checkpoint():
    # A checkpoint replaces the swing by a flat dip at t = 20 s. The agreement
    # factor must cut the gain within one period, long before the next
    # autocorrelation estimate could.
    t = np.arange(0, 24, DT_S)
    x = square_wave(t, 1.5, 300.0, 800.0)
    x[t >= 20.0] = 350.0
    predictor = PeriodicPredictor(PredictorParams(sample_period_s=DT_S))
    gains = []
    for value in x:
        predictor.update(float(value))
        gains.append(predictor.gain)
    gains = np.array(gains)
    assert gains[round(19.9 / DT_S)] > 0.9
    assert gains[round(21.5 / DT_S)] < 0.1


def test_predictor_nan_resets():
    predictor = PeriodicPredictor(PredictorParams(sample_period_s=DT_S))
    t = np.arange(0, 12, DT_S)
    feed(predictor, square_wave(t, 1.5, 300.0, 800.0))
    assert predictor.period_s is not None
    assert math.isnan(predictor.update(math.nan))
    assert predictor.period_s is None
    assert predictor.gain == 0.0
    assert predictor.update(420.0) == 420.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lead_s": 0.5}, "lead_s=0.5"),
        ({"window_s": 4.0}, "window_s=4.0"),
        ({"gate_low": 0.9, "gate_high": 0.8}, "gate_low"),
        ({"sample_period_s": 0.0}, "sample_period_s=0.0"),
        ({"warmup_estimate_every_s": 2.0}, "warmup_estimate_every_s=2.0"),
    ],
)
def test_predictor_params_invalid(changes, message):
    with pytest.raises(ValueError, match=message):
        PredictorParams(**changes)
