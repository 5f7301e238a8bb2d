"""GPU training load generator: determinism, swing depth, edges, checkpoints, ramps, desync."""

from __future__ import annotations

import numpy as np
import pytest

from hil.loadgen import TrainingLoadGenerator, TrainingLoadParams
from hil.traces import RackEnvelope, load_h100_training

DT_S = 0.001
PEAK_KW = 100.0


def _t(start_s: float, stop_s: float, dt_s: float = DT_S) -> np.ndarray:
    return start_s + np.arange(round((stop_s - start_s) / dt_s)) * dt_s


def _crossings(x: np.ndarray, level: float, rising: bool) -> np.ndarray:
    above = x > level
    change = np.diff(above.astype(np.int8))
    return np.flatnonzero(change == (1 if rising else -1)) + 1


def _no_checkpoint(**changes) -> TrainingLoadParams:
    return TrainingLoadParams(checkpoint_every_s=10_000.0, job_ramp_s=0.0, **changes)


def test_generator_same_seed_same_load():
    t = _t(0.0, 30.0)
    first = TrainingLoadGenerator(TrainingLoadParams(), 4, PEAK_KW, 60.0, seed=3).power_kw(t)
    second = TrainingLoadGenerator(TrainingLoadParams(), 4, PEAK_KW, 60.0, seed=3).power_kw(t)
    other = TrainingLoadGenerator(TrainingLoadParams(), 4, PEAK_KW, 60.0, seed=4).power_kw(t)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_generator_chunks_equal_whole():
    generator = TrainingLoadGenerator(TrainingLoadParams(), 3, PEAK_KW, 60.0, seed=1)
    t = _t(0.0, 60.0)
    whole = generator.power_kw(t)
    chunks = np.concatenate([generator.power_kw(part) for part in np.array_split(t, 9)], axis=1)
    np.testing.assert_array_equal(whole, chunks)


def test_generator_any_rate():
    generator = TrainingLoadGenerator(TrainingLoadParams(), 2, PEAK_KW, 20.0, seed=1)
    fast = generator.power_kw(_t(0.0, 20.0, 0.001))
    slow = generator.power_kw(_t(0.0, 20.0, 0.01))
    np.testing.assert_allclose(slow, fast[:, ::10])


@pytest.mark.parametrize("low", [0.2, 0.3, 0.4])
def test_swing_depth(low):
    params = _no_checkpoint(swing_low_fraction=low)
    p = TrainingLoadGenerator(params, 2, PEAK_KW, 30.0, seed=2).power_kw(_t(5.0, 30.0))
    for rack in p:
        assert rack.max() == pytest.approx(PEAK_KW)
        assert rack.min() == pytest.approx(low * PEAK_KW)


def test_swing_mean_fraction():
    params = _no_checkpoint()
    p = TrainingLoadGenerator(params, 1, PEAK_KW, 400.0, seed=2).power_kw(_t(0.0, 400.0))[0]
    # 0.7 of each iteration at 1.0 and 0.3 at 0.35: 0.805 of the peak.
    assert params.swing_mean_fraction == pytest.approx(0.805)
    assert p.mean() == pytest.approx(0.805 * PEAK_KW, rel=0.01)


def test_edges_under_100_ms():
    params = _no_checkpoint()
    p = TrainingLoadGenerator(params, 1, PEAK_KW, 60.0, seed=5).power_kw(_t(0.0, 60.0))[0]
    low, high = params.swing_low_fraction * PEAK_KW, PEAK_KW
    at10 = low + 0.1 * (high - low)
    at90 = low + 0.9 * (high - low)
    rise_10 = _crossings(p, at10, rising=True)
    rise_90 = _crossings(p, at90, rising=True)
    count = min(rise_10.size, rise_90.size)
    assert count > 30
    rise_s = (rise_90[:count] - rise_10[:count]) * DT_S
    # A raised-cosine edge of 40 ms rises from 10 % to 90 % in 0.59 of it: 23.6 ms.
    assert np.all(rise_s < 0.1)
    assert np.median(rise_s) == pytest.approx(0.0236, abs=0.002)
    fall_90 = _crossings(p, at90, rising=False)
    fall_10 = _crossings(p, at10, rising=False)
    count = min(fall_90.size, fall_10.size)
    assert np.all((fall_10[:count] - fall_90[:count]) * DT_S < 0.1)


def test_iteration_period():
    params = _no_checkpoint(iteration_period_s=2.0)
    p = TrainingLoadGenerator(params, 1, PEAK_KW, 200.0, seed=5).power_kw(_t(0.0, 200.0))[0]
    rises = _crossings(p, 0.5 * (1 + params.swing_low_fraction) * PEAK_KW, rising=True) * DT_S
    # The run starts part-way through an iteration, and a start inside an edge
    # counts as a crossing; the first whole period begins after one period.
    rises = rises[rises > params.iteration_period_s]
    periods = np.diff(rises)
    assert np.mean(periods) == pytest.approx(2.0, rel=0.01)
    # 2 % jitter: the periods vary, but stay within about four standard deviations.
    assert np.std(periods) == pytest.approx(0.04, rel=0.4)
    assert np.all(np.abs(periods - 2.0) < 0.2)


def test_checkpoint_dips():
    params = TrainingLoadParams(checkpoint_every_s=60.0, checkpoint_length_s=8.0, job_ramp_s=0.0)
    generator = TrainingLoadGenerator(params, 1, PEAK_KW, 300.0, seed=6)
    p = generator.power_kw(_t(0.0, 300.0))[0]
    one_second = p.reshape(-1, 1000).mean(axis=1)
    dip = one_second < 0.5 * PEAK_KW
    starts = _crossings(dip.astype(float), 0.5, rising=True)
    ends = _crossings(dip.astype(float), 0.5, rising=False)
    assert starts.size >= 4
    assert np.all(np.diff(starts) == pytest.approx(60, abs=1))
    lengths = ends[: starts.size] - starts[: ends.size]
    assert np.all(np.abs(lengths - 8) <= 1)
    # Inside a dip the load sits at the checkpoint level, with no iteration swing.
    middle = int((starts[0] + 4) * 1000)
    np.testing.assert_allclose(p[middle - 1000 : middle + 1000], 0.39 * PEAK_KW)


def test_job_start_and_stop_ramps():
    params = TrainingLoadParams(
        job_start_s=10.0, job_stop_s=40.0, job_ramp_s=3.0, checkpoint_every_s=1000.0
    )
    p = TrainingLoadGenerator(params, 2, PEAK_KW, 60.0, seed=8).power_kw(_t(0.0, 60.0))
    idle_kw = 0.33 * PEAK_KW
    np.testing.assert_allclose(p[:, :10_000], idle_kw)
    # Each rack lags its job clock by up to 0.15 s, so its stop ramp ends by 43.15 s.
    np.testing.assert_allclose(p[:, 43_200:], idle_kw)
    # Halfway up the start ramp the swing is scaled halfway between idle and full.
    half = p[:, 11_000:12_000]
    assert half.max() < 0.5 * (idle_kw + PEAK_KW) + 0.2 * PEAK_KW
    # After the ramp the full swing runs.
    assert p[:, 14_000:39_000].max() == pytest.approx(PEAK_KW)
    # The ramps are continuous: no step larger than an iteration edge allows.
    steps = np.abs(np.diff(p[:, 9_000:14_000], axis=1))
    assert steps.max() < 0.1 * PEAK_KW


def test_lockstep_racks_identical():
    params = _no_checkpoint(desync=0.0)
    generator = TrainingLoadGenerator(params, 4, PEAK_KW, 30.0, seed=9)
    p = generator.power_kw(_t(0.0, 30.0))
    assert np.all(generator.rack_lag_s == 0.0)
    for rack in p[1:]:
        np.testing.assert_array_equal(rack, p[0])


def test_desync_spreads_racks():
    t = _t(0.0, 60.0)
    spread = []
    for desync in (0.1, 1.0):
        generator = TrainingLoadGenerator(_no_checkpoint(desync=desync), 8, PEAK_KW, 60.0, seed=9)
        assert np.all(generator.rack_lag_s <= desync * 1.5)
        total = generator.power_kw(t).sum(axis=0)
        spread.append(np.std(total))
    # Racks out of step cancel part of each other's swing.
    assert spread[1] < 0.6 * spread[0]


def test_jobs_have_own_periods():
    params = _no_checkpoint(jobs=2, desync=0.0)
    generator = TrainingLoadGenerator(params, 4, PEAK_KW, 120.0, seed=11)
    p = generator.power_kw(_t(0.0, 120.0))
    np.testing.assert_array_equal(p[0], p[2])
    np.testing.assert_array_equal(p[1], p[3])
    level = 0.5 * (1 + params.swing_low_fraction) * PEAK_KW
    first = np.mean(np.diff(_crossings(p[0], level, rising=True)))
    second = np.mean(np.diff(_crossings(p[1], level, rising=True)))
    assert abs(first - second) > 0.01 * first


def test_envelope_mean_preserved():
    envelope = RackEnvelope(load_h100_training(), 2, PEAK_KW, 17.0)
    t = _t(0.0, 120.0)
    shape = envelope.power_kw(t)
    params = TrainingLoadParams(desync=0.0, period_jitter=0.0)
    p = TrainingLoadGenerator(params, 2, PEAK_KW, 120.0, seed=12).power_kw(t, shape)
    # Without jitter each 1.5 s block contains one iteration, so its mean is the envelope's.
    block = 1500
    got = p[:, : t.size // block * block].reshape(2, -1, block).mean(axis=2)
    want = shape[:, : t.size // block * block].reshape(2, -1, block).mean(axis=2)
    blocks = shape[:, : t.size // block * block].reshape(2, -1, block)
    # Where the envelope itself moves within a block the product of the two shapes
    # no longer averages out exactly, so compare on the steady plateau.
    steady = blocks.max(axis=2) - blocks.min(axis=2) < 0.01 * PEAK_KW
    plateau = (want > 0.9 * PEAK_KW) & steady
    assert plateau.sum() > 100
    np.testing.assert_allclose(got[plateau], want[plateau], rtol=0.005)
    # On the plateau the swing peaks at envelope / 0.805 and dips to 0.35 of that.
    assert p.max() == pytest.approx(PEAK_KW / 0.805, rel=0.01)


def test_envelope_idle_has_no_swing():
    t = _t(0.0, 10.0)
    idle = np.full((1, t.size), 0.33 * PEAK_KW)
    p = TrainingLoadGenerator(TrainingLoadParams(), 1, PEAK_KW, 10.0, seed=1).power_kw(t, idle)
    np.testing.assert_allclose(p, idle)


def test_envelope_wrong_shape_rejected():
    generator = TrainingLoadGenerator(TrainingLoadParams(), 2, PEAK_KW, 10.0)
    with pytest.raises(ValueError, match="expected"):
        generator.power_kw(_t(0.0, 1.0), np.ones((3, 1000)))


@pytest.mark.parametrize(
    "changes",
    [
        {"iteration_period_s": 0.0},
        {"swing_low_fraction": 1.5},
        {"compute_fraction": 1.0},
        {"edge_s": 0.3},
        {"job_start_s": 10.0, "job_stop_s": 5.0},
        {"jobs": 0},
        {"period_jitter": 0.6},
        {"checkpoint_every_s": 8.5, "checkpoint_length_s": 8.0},
    ],
)
def test_params_invalid_rejected(changes):
    with pytest.raises(ValueError, match="invalid training load parameters"):
        TrainingLoadParams(**changes)


def test_generator_invalid_size_rejected():
    with pytest.raises(ValueError, match="invalid generator"):
        TrainingLoadGenerator(TrainingLoadParams(), 0, PEAK_KW, 10.0)


def test_generator_shorter_run_is_prefix():
    # A scenario shortened with --duration must score the same load as the
    # first seconds of the full run, so the draws may not depend on duration_s.
    params = TrainingLoadParams(jobs=2)
    full = TrainingLoadGenerator(params, racks=4, peak_kw=100.0, duration_s=600.0, seed=11)
    short = TrainingLoadGenerator(params, racks=4, peak_kw=100.0, duration_s=90.0, seed=11)
    t = np.arange(0.0, 90.0, 0.001)
    np.testing.assert_array_equal(short.power_kw(t), full.power_kw(t))
