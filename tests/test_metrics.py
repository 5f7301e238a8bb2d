"""Scoring metrics: demand, ramps, band power, SoC, BMS breaches, energy shares, reaction time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hil import metrics
from hil.metrics import (
    attenuation_db,
    band_power,
    battery_headroom,
    block_means,
    bms_limit_breaches,
    equivalent_full_cycles,
    max_demand_kw,
    ramp_stats,
    reaction_time_s,
    renewable_self_consumption,
    soc_bounds,
    welch_psd,
)

FS_HZ = 1000.0
DT_S = 1.0 / FS_HZ


def _t(duration_s: float, dt_s: float = DT_S) -> np.ndarray:
    return np.arange(round(duration_s / dt_s)) * dt_s


# --------------------------------------------------------------------------- demand


def test_demand_of_step_in_block():
    # 100 kW until 450 s, then 200 kW, for 30 min at 1 s: blocks of 900 s average 150 and 200.
    p = np.where(_t(1800, 1.0) < 450, 100.0, 200.0)
    assert max_demand_kw(p, 1.0) == pytest.approx(200.0)
    np.testing.assert_allclose(block_means(p, 1.0, 900.0), [150.0, 200.0])


def test_demand_step_late_in_block():
    # Step at 1000 s: block 2 holds 100 s at 100 kW and 800 s at 200 kW -> 188.89 kW.
    p = np.concatenate([np.full(900, 100.0), np.full(100, 100.0), np.full(800, 200.0)])
    assert max_demand_kw(p, 1.0) == pytest.approx((100 * 100 + 800 * 200) / 900)
    # A sliding window finds the worst alignment: the last 900 s hold 800 s at 200 kW.
    assert max_demand_kw(p, 1.0, rolling=True) == pytest.approx((100 * 100 + 800 * 200) / 900)


def test_demand_rolling_catches_straddling_peak():
    # A 900 s burst at 300 kW that straddles two billing blocks.
    p = np.full(2700, 100.0)
    p[450:1350] = 300.0
    assert max_demand_kw(p, 1.0) == pytest.approx(200.0)
    assert max_demand_kw(p, 1.0, rolling=True) == pytest.approx(300.0)


def test_demand_short_run_uses_partial_block():
    # A 10-minute run: the one partial block counts with its own mean.
    p = np.concatenate([np.full(300, 800.0), np.full(300, 900.0)])
    assert max_demand_kw(p, 1.0) == pytest.approx(850.0)
    assert max_demand_kw(p, 1.0, rolling=True) == pytest.approx(850.0)


def test_demand_at_1_khz():
    p = np.full(round(1800 / DT_S), 50.0)
    p[: round(900 / DT_S)] = 70.0
    assert max_demand_kw(p, DT_S) == pytest.approx(70.0)


def test_demand_invalid_input_rejected():
    with pytest.raises(ValueError, match="empty"):
        max_demand_kw(np.array([]), 1.0)
    with pytest.raises(ValueError, match="not a whole number"):
        max_demand_kw(np.ones(10), 0.7)


# --------------------------------------------------------------------------- ramps


def test_ramp_of_linear_signal():
    # 10 kW/s for 100 s: every 1-s mean is 10 kW above the last.
    p = 10.0 * _t(100)
    stats = ramp_stats(p, DT_S, limit_kw_per_s=5.0)
    assert stats.max_kw_per_s == pytest.approx(10.0)
    assert stats.p99_kw_per_s == pytest.approx(10.0)
    assert stats.seconds_counted == 99
    assert stats.seconds_above_limit == 99
    assert stats.fraction_above_limit == 1.0


def test_ramp_counts_seconds_above_limit():
    # Flat, then one 30 kW step at 50 s: the 1-s means change by 30 kW once.
    p = np.where(_t(100) < 50, 0.0, 30.0)
    stats = ramp_stats(p, DT_S, limit_kw_per_s=20.0)
    assert stats.max_kw_per_s == pytest.approx(30.0)
    assert stats.seconds_above_limit == 1
    assert stats.fraction_above_limit == pytest.approx(1 / 99)
    # The ramp from second 49's mean to second 50's, named by the second it ends in.
    assert stats.seconds_above == (50,)


def test_ramp_headroom_excludes_seconds():
    p = np.where(_t(100) < 50, 0.0, 30.0)
    headroom = np.ones(100, dtype=bool)
    headroom[50] = False
    stats = ramp_stats(p, DT_S, limit_kw_per_s=20.0, headroom=headroom)
    # The step's ramp (second 49 to 50) and the next (50 to 51) need second 50: both dropped.
    assert stats.seconds_counted == 97
    assert stats.seconds_above_limit == 0


def test_ramp_invalid_input_rejected():
    with pytest.raises(ValueError, match="one per whole second"):
        ramp_stats(np.zeros(5000), DT_S, 1.0, headroom=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="shorter than 2 s"):
        ramp_stats(np.zeros(1500), DT_S, 1.0)


def test_battery_headroom_per_second():
    battery = np.zeros(4000)
    soc = np.full(4000, 50.0)
    battery[1500] = 96.0  # second 1 touches 96 % of 100 kW rating: no headroom
    soc[2500] = 5.0  # second 2 touches the SoC floor
    headroom = battery_headroom(
        battery, soc, DT_S, rated_kw=100.0, soc_min_pct=5.0, soc_max_pct=95.0
    )
    np.testing.assert_array_equal(headroom, [True, False, False, True])


# --------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("freq_hz", [0.2, 0.5, 1.0, 1.8])
def test_band_power_of_sine(freq_hz):
    amplitude = 10.0
    x = 500.0 + amplitude * np.sin(2 * np.pi * freq_hz * _t(600))
    # A sine's power is A^2 / 2 = 50 kW^2, and the offset is removed.
    assert band_power(x, FS_HZ) == pytest.approx(50.0, rel=0.01)


def test_band_power_ignores_out_of_band():
    t = _t(600)
    x = 10.0 * np.sin(2 * np.pi * 0.5 * t) + 30.0 * np.sin(2 * np.pi * 5.0 * t)
    x += 30.0 * np.sin(2 * np.pi * 0.02 * t)
    assert band_power(x, FS_HZ) == pytest.approx(50.0, rel=0.01)
    assert band_power(x, FS_HZ, 4.0, 6.0) == pytest.approx(450.0, rel=0.01)


def test_welch_integrates_to_variance():
    x = np.random.default_rng(5).normal(0.0, 3.0, 120_000)
    freqs, psd = welch_psd(x, FS_HZ, segment_s=10.0)
    assert freqs[1] - freqs[0] == pytest.approx(0.1)
    assert freqs[-1] == pytest.approx(500.0)
    # White noise: flat density of variance / (fs / 2) = 9 / 500 per Hz.
    assert np.sum(psd) * (freqs[1] - freqs[0]) == pytest.approx(9.0, rel=0.02)
    assert np.median(psd[1:-1]) == pytest.approx(9.0 / 500.0, rel=0.1)


def test_welch_odd_segment_length():
    x = np.sin(2 * np.pi * 5.0 * np.arange(999) / 99.0)
    freqs, psd = welch_psd(x, 99.0, segment_s=999 / 99.0)
    assert freqs.size == 500
    assert np.sum(psd) * (freqs[1] - freqs[0]) == pytest.approx(0.5, rel=0.02)


def test_attenuation_db_of_scaled_swing():
    t = _t(300)
    load = 800.0 + 100.0 * np.sin(2 * np.pi * 0.7 * t)
    grid = 800.0 + 10.0 * np.sin(2 * np.pi * 0.7 * t)
    # Amplitude / 10 is power / 100: 20 dB.
    assert attenuation_db(load, grid, FS_HZ) == pytest.approx(20.0, abs=0.01)
    assert attenuation_db(load, np.full(t.size, 800.0), FS_HZ) == math.inf


def test_spectrum_invalid_input_rejected():
    with pytest.raises(ValueError, match="too short"):
        welch_psd(np.ones(4), FS_HZ)
    with pytest.raises(ValueError, match="invalid band"):
        band_power(np.ones(1000), FS_HZ, 2.0, 0.1)


# --------------------------------------------------------------------------- battery


def test_soc_bounds():
    bounds = soc_bounds(np.array([50.0, 4.0, 60.0, 98.0]), lower_pct=5.0, upper_pct=97.0)
    assert bounds.min_pct == 4.0
    assert bounds.max_pct == 98.0
    assert bounds.samples_outside == 2
    assert soc_bounds(np.array([50.0, 60.0])).samples_outside == 0


def test_bms_breaches_found():
    current = np.zeros(10_000)
    current[1000:1500] = 120.0  # 0.5 s of discharge 20 A above a 100 A limit
    current[6000:6010] = -90.0  # 10 ms of charge 10 A beyond an 80 A limit
    breaches = bms_limit_breaches(current, 80.0, 100.0, DT_S)
    assert len(breaches) == 2
    first, second = breaches
    assert (first.direction, first.start_s, first.end_s) == ("discharge", 1.0, 1.5)
    assert first.max_excess_a == pytest.approx(20.0)
    assert (second.direction, second.start_s) == ("charge", 6.0)
    assert second.end_s == pytest.approx(6.01)
    assert second.max_excess_a == pytest.approx(10.0)


def test_bms_breaches_tolerance_and_duration():
    current = np.zeros(10_000)
    current[1000:1500] = 120.0
    current[6000:6010] = -90.0
    assert bms_limit_breaches(current, 80.0, 100.0, DT_S, tolerance_a=25.0) == []
    long_only = bms_limit_breaches(current, 80.0, 100.0, DT_S, min_duration_s=0.1)
    assert [b.direction for b in long_only] == ["discharge"]


def test_bms_breaches_follow_varying_limit():
    current = np.full(1000, 50.0)
    limit = np.full(1000, 100.0)
    limit[500:] = 0.0  # limits fall to zero and the current does not follow
    breaches = bms_limit_breaches(current, limit, limit, DT_S)
    assert len(breaches) == 1
    assert breaches[0].start_s == pytest.approx(0.5)
    assert breaches[0].max_excess_a == pytest.approx(50.0)


def test_self_consumption_cases():
    renewable = np.array([100.0, 100.0, 100.0, 0.0])
    # All used on site.
    assert renewable_self_consumption(renewable, np.array([50.0, 0.0, 10.0, 10.0])) == 1.0
    # 30 + 100 kW exported of 300 kW renewable: 170 / 300 used on site.
    grid = np.array([-30.0, -100.0, 0.0, 0.0])
    assert renewable_self_consumption(renewable, grid) == pytest.approx(170.0 / 300.0)
    # Export beyond the renewable output is battery export and does not count.
    grid = np.array([-150.0, 0.0, 0.0, -50.0])
    assert renewable_self_consumption(renewable, grid) == pytest.approx(200.0 / 300.0)
    assert renewable_self_consumption(np.zeros(3), np.full(3, -5.0)) == 1.0


def test_equivalent_full_cycles():
    # 100 kWh battery: 1 h at -100 kW then 1 h at +100 kW, at 1 s steps, is one cycle.
    battery = np.concatenate([np.full(3600, -100.0), np.full(3600, 100.0)])
    assert equivalent_full_cycles(battery, 1.0, 100.0) == pytest.approx(1.0)
    assert equivalent_full_cycles(battery[:1800], 1.0, 100.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="energy_kwh"):
        equivalent_full_cycles(battery, 1.0, 0.0)


# --------------------------------------------------------------------------- reaction time


def test_reaction_time_of_first_order_response():
    t = _t(10)
    event_s = 2.0
    tau_s = 0.1
    # Power falls from 100 kW to 0 after the event with a 100 ms time constant.
    response = np.where(t < event_s, 100.0, 100.0 * np.exp(-(t - event_s) / tau_s))
    # Within 5 kW of 0 after tau * ln(20) = 299.6 ms, the next 1 ms sample being 300 ms.
    got = reaction_time_s(t, response, event_s, target=0.0, tolerance=5.0)
    assert got == pytest.approx(0.300, abs=1e-9)


def test_reaction_time_needs_hold():
    t = _t(5)
    response = np.full(t.size, 100.0)
    response[(t >= 1.1) & (t < 1.2)] = 0.0  # brief dip to 0
    response[t >= 2.0] = 0.0  # settles at 2.0 s
    assert reaction_time_s(t, response, 1.0, target=0.0, tolerance=1.0) == pytest.approx(0.1)
    settled = reaction_time_s(t, response, 1.0, target=0.0, tolerance=1.0, hold_s=0.5)
    assert settled == pytest.approx(1.0)


def test_reaction_time_never_is_none():
    t = _t(3)
    assert reaction_time_s(t, np.full(t.size, 100.0), 1.0, target=0.0, tolerance=1.0) is None


def test_reaction_time_ignores_before_event():
    t = _t(3)
    response = np.where(t < 0.5, 0.0, 100.0)
    response[t >= 2.5] = 0.0
    got = reaction_time_s(t, response, 1.0, target=0.0, tolerance=1.0)
    assert got == pytest.approx(1.5)


def test_first_event_time():
    t = _t(2)
    assert metrics.first_event_s(t, t > 1.2345) == pytest.approx(1.235)
    assert metrics.first_event_s(t, t > 5.0) is None
