"""Perfect-foresight billing peak: hand-derived traces and properties of the bisection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.plan.battery import BatterySpec
from gateway.plan.optimum import (
    hold_cap,
    interval_means_kw,
    optimal_peak,
    optimal_peaks,
    required_energy_kwh,
)

HOUR = 3600.0


def _blocks(*pairs: tuple[float, float], dt_s: float = 60.0) -> np.ndarray:
    """Build a trace from (kW, hours) blocks sampled every ``dt_s``."""
    return np.concatenate([np.full(round(hours * HOUR / dt_s), kw) for kw, hours in pairs])


def test_interval_means_spike_inside_interval():
    # A 5-min spike of 1200 kW in a 15-min interval at 600 kW: (5*1200 + 10*600) / 15 = 800.
    trace = _blocks((1200, 5 / 60), (600, 10 / 60))
    assert interval_means_kw(trace, 60.0) == pytest.approx([800.0])


def test_interval_means_partial_last_interval():
    # 20 min at 100 kW: one full interval at 100, then 5 minutes averaged on their own.
    trace = _blocks((100, 15 / 60), (400, 5 / 60))
    assert interval_means_kw(trace, 60.0) == pytest.approx([100.0, 400.0])


def test_interval_means_rejects_bad_input():
    with pytest.raises(ValueError, match="whole multiple"):
        interval_means_kw(np.ones(10), 7.0)
    with pytest.raises(ValueError, match="non-finite value at sample 2"):
        interval_means_kw(np.array([1.0, 2.0, np.nan]), 60.0)
    with pytest.raises(ValueError, match="non-empty"):
        interval_means_kw(np.array([]), 60.0)


def test_optimum_energy_limited():
    # 1 h at 1000 kW between 500 kW; 100 kWh spread over the hour lowers it by 100 kW.
    battery = BatterySpec(energy_kwh=100, discharge_kw=1000, charge_kw=1000)
    trace = _blocks((500, 1), (1000, 1), (500, 1))
    result = optimal_peak(trace, 60.0, battery, soc_initial_pct=100)
    assert result.peak_kw_without_battery == 1000.0
    assert result.peak_kw == pytest.approx(900.0, abs=0.02)
    assert result.reduction_kw == pytest.approx(100.0, abs=0.02)


def test_optimum_power_limited():
    # 1000 kWh would allow 1000 kW of shaving for an hour, but the PCS gives only 200 kW.
    battery = BatterySpec(energy_kwh=1000, discharge_kw=200, charge_kw=200)
    trace = _blocks((500, 1), (1000, 1), (500, 1))
    assert optimal_peak(trace, 60.0, battery, 100).peak_kw == pytest.approx(800.0, abs=0.02)


def test_optimum_discharge_efficiency():
    # Half of the 100 stored kWh reaches the site: 50 kWh over 1 h lowers the peak by 50 kW.
    battery = BatterySpec(
        energy_kwh=100, discharge_kw=1000, charge_kw=1000, discharge_efficiency=0.5
    )
    trace = _blocks((500, 1), (1000, 1), (500, 1))
    assert optimal_peak(trace, 60.0, battery, 100).peak_kw == pytest.approx(950.0, abs=0.02)


def test_optimum_reserve_band():
    # soc_min 40 % of 200 kWh leaves 120 kWh from a full start: 1000 - 120 = 880 kW.
    battery = BatterySpec(energy_kwh=200, discharge_kw=1000, charge_kw=1000, soc_min_pct=40)
    trace = _blocks((500, 1), (1000, 1), (500, 1))
    assert optimal_peak(trace, 60.0, battery, 100).peak_kw == pytest.approx(880.0, abs=0.02)


def test_optimum_recharge_between_peaks():
    # Two 1-h peaks at 1000 kW, 1 h at 800 kW between them, 200 kWh starting full.
    # With cap C: after peak 1 the battery has 200 - (1000 - C) = C - 800 kWh; the gap
    # recharges C - 800 more (import headroom under the cap), so 2 (C - 800) >= 1000 - C
    # for peak 2, which gives C = 2600 / 3 = 866.67 kW.
    battery = BatterySpec(energy_kwh=200, discharge_kw=1000, charge_kw=1000)
    trace = _blocks((1000, 1), (800, 1), (1000, 1))
    result = optimal_peak(trace, 60.0, battery, 100)
    assert result.peak_kw == pytest.approx(2600 / 3, abs=0.02)


def test_optimum_initial_soc_counts():
    # Starting half full (50 kWh) before an immediate peak of 1 h: 1000 - 50 = 950 kW.
    battery = BatterySpec(energy_kwh=100, discharge_kw=1000, charge_kw=1000)
    trace = _blocks((1000, 1), (500, 1))
    assert optimal_peak(trace, 60.0, battery, 50).peak_kw == pytest.approx(950.0, abs=0.02)


def test_optimum_charge_efficiency_and_limit():
    # Empty start; 1 h at 500 kW with a 100 kW charger and 0.8 efficiency stores 80 kWh.
    # The following 1-h peak at 1000 kW drops by 80 kW, and the charging itself lifts
    # the first hour to 600 kW, below the 920 kW peak.
    battery = BatterySpec(energy_kwh=500, discharge_kw=1000, charge_kw=100, charge_efficiency=0.8)
    trace = _blocks((500, 1), (1000, 1))
    result = optimal_peak(trace, 60.0, battery, 0)
    assert result.peak_kw == pytest.approx(920.0, abs=0.02)


def test_hold_cap_reports_first_break():
    battery = BatterySpec(energy_kwh=100, discharge_kw=1000, charge_kw=1000)
    means = np.array([500.0, 1000.0, 1000.0, 1000.0, 1000.0, 500.0])
    schedule = hold_cap(means, 850.0, battery, 100)
    assert not schedule.feasible
    # 850 kW needs 150 kW = 37.5 kWh per interval: intervals 1 and 2 use 75 kWh, interval 3
    # has 25 kWh left and breaks.
    assert schedule.first_break == 3
    assert schedule.grid_kw[3] == pytest.approx(1000.0 - 100.0)
    assert schedule.energy_kwh[3] == pytest.approx(0.0)


def test_battery_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="energy_kwh=0"):
        BatterySpec(energy_kwh=0, discharge_kw=1, charge_kw=1)
    with pytest.raises(ValueError, match=r"charge_efficiency=1\.5"):
        BatterySpec(energy_kwh=1, discharge_kw=1, charge_kw=1, charge_efficiency=1.5)
    with pytest.raises(ValueError, match="SoC band 50-50"):
        BatterySpec(energy_kwh=1, discharge_kw=1, charge_kw=1, soc_min_pct=50, soc_max_pct=50)
    battery = BatterySpec(energy_kwh=1, discharge_kw=1, charge_kw=1)
    with pytest.raises(ValueError, match="invalid SoC 120"):
        optimal_peak(np.ones(15), 60.0, battery, 120)


@settings(max_examples=60, deadline=None)
@given(
    loads=st.lists(st.floats(0, 2000), min_size=1, max_size=24),
    energy=st.floats(1, 2000),
    power=st.floats(0, 1500),
    efficiency=st.floats(0.5, 1.0),
    soc=st.floats(0, 100),
)
def test_optimum_is_tight(loads, energy, power, efficiency, soc):
    """The cap found is feasible, 2 tolerances lower is not, and more energy never hurts."""
    battery = BatterySpec(energy, power, power, efficiency, efficiency)
    means = np.asarray(loads)
    result = optimal_peak(means, 900.0, battery, soc)
    assert result.schedule.feasible
    assert result.peak_kw <= result.peak_kw_without_battery + 1e-9
    lower = result.schedule.cap_kw - 2 * result.tolerance_kw
    if lower > result.peak_kw_without_battery - power:
        assert not hold_cap(means, lower, battery, soc).feasible
    bigger = BatterySpec(2 * energy, power, power, efficiency, efficiency)
    assert optimal_peak(means, 900.0, bigger, soc).peak_kw <= result.peak_kw + result.tolerance_kw


def test_optimal_peaks_rows():
    # Row 0: the energy-limited hour (900 kW, see above); row 1: two peaks with recharge
    # between them (2600 / 3 kW). Interval means of 15 minutes.
    small = BatterySpec(energy_kwh=100, discharge_kw=1000, charge_kw=1000)
    rows = np.array(
        [[500.0] * 4 + [1000.0] * 4 + [500.0] * 4, [1000.0] * 4 + [800.0] * 4 + [1000.0] * 4]
    )
    two = BatterySpec(energy_kwh=200, discharge_kw=1000, charge_kw=1000)
    assert optimal_peaks(rows[:1], small, 100)[0] == pytest.approx(900.0, abs=0.5)
    assert optimal_peaks(rows[1:], two, 100)[0] == pytest.approx(2600 / 3, abs=0.5)
    both = optimal_peaks(rows, two, 100)
    assert both[0] == pytest.approx(800.0, abs=0.5)
    assert both[1] == pytest.approx(2600 / 3, abs=0.5)


def test_optimal_peaks_rejects_bad_input():
    battery = BatterySpec(energy_kwh=100, discharge_kw=100, charge_kw=100)
    with pytest.raises(ValueError, match="finite"):
        optimal_peaks(np.array([[1.0, np.nan]]), battery, 50)
    with pytest.raises(ValueError, match="non-empty"):
        optimal_peaks(np.empty((1, 0)), battery, 50)
    with pytest.raises(ValueError, match="tolerance_kw=0"):
        optimal_peaks(np.ones((1, 4)), battery, 50, tolerance_kw=0.0)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats(0, 2000), min_size=6, max_size=6), min_size=1, max_size=4
    ),
    energy=st.floats(1, 2000),
    power=st.floats(0, 1500),
    efficiency=st.floats(0.5, 1.0),
    soc=st.floats(0, 100),
    offset=st.floats(-50, 50),
)
def test_optimal_peaks_match_bisection(rows, energy, power, efficiency, soc, offset):
    """Each row's result is feasible and within the tolerance of the bisection's, guessed or not."""
    battery = BatterySpec(energy, power, power, efficiency, efficiency)
    means = np.asarray(rows)
    exact = np.array([optimal_peak(row, 900.0, battery, soc, tolerance_kw=0.01).schedule.cap_kw
                      for row in means])
    for guess in (None, exact + offset):
        found = optimal_peaks(means, battery, soc, guess_kw=guess)
        for row, cap in zip(means, found, strict=True):
            assert hold_cap(row, cap, battery, soc).feasible
        assert np.all(found >= exact - 0.02)
        assert np.all(found <= exact + 0.5 + 0.02)


def test_required_energy_with_recharge():
    # Two 1-h peaks at 1000 kW with 1 h at 800 kW between them, cap 2600 / 3 kW: each peak
    # takes 133.3 kWh. When recharging may use the room under the cap, the gap refills
    # 66.7 kWh, so 200 kWh must be stored now. Without recharge both peaks come from
    # storage: 266.7 kWh, more than a 200 kWh band has, so the need stops at 200.
    battery = BatterySpec(energy_kwh=200, discharge_kw=1000, charge_kw=1000)
    row = np.array([1000.0] * 4 + [800.0] * 4 + [1000.0] * 4)
    assert required_energy_kwh(row, 2600 / 3, battery, 1000.0)[0] == pytest.approx(200.0)
    big = BatterySpec(energy_kwh=400, discharge_kw=1000, charge_kw=1000)
    assert required_energy_kwh(row, 2600 / 3, big, 0.0)[0] == pytest.approx(800.0 / 3)
    # A 40 kW recharge over the 1-h gap refills 40 kWh.
    assert required_energy_kwh(row, 2600 / 3, big, 40.0)[0] == pytest.approx(800.0 / 3 - 40.0)
    # Below the cap all day: nothing to store.
    assert required_energy_kwh(row, 1000.0, big, 40.0)[0] == 0.0


def test_recharge_limit_per_interval():
    # Two 1-h peaks at 1000 kW around 1 h at 800 kW, 200 kWh: with recharge between them the
    # cap is 2600 / 3 kW (see above). Forbidding recharge in the gap leaves 200 kWh for both
    # peaks, 100 kWh each: 1000 - 100 = 900 kW. A 40 kW limit refills 40 kWh: the cap C
    # then solves 2 * (1000 - C) = 200 + 40, so C = 880 kW.
    battery = BatterySpec(energy_kwh=200, discharge_kw=1000, charge_kw=1000)
    row = np.array([[1000.0] * 4 + [800.0] * 4 + [1000.0] * 4])
    assert optimal_peaks(row, battery, 100)[0] == pytest.approx(2600 / 3, abs=0.5)
    assert optimal_peaks(row, battery, 100, recharge_limit_kw=0.0)[0] == pytest.approx(
        900.0, abs=0.5
    )
    assert optimal_peaks(row, battery, 100, recharge_limit_kw=40.0)[0] == pytest.approx(
        880.0, abs=0.5
    )
    # Per interval: recharge allowed only in the gap's last 15 minutes, at up to 1000 kW. It
    # stores (C - 800) * 0.25 kWh there, so 2 * (1000 - C) = 200 + 0.25 * (C - 800), which
    # gives C = 2000 / 2.25 = 888.9 kW.
    limit = np.zeros((1, 12))
    limit[0, 7] = 1000.0
    found = optimal_peaks(row, battery, 100, recharge_limit_kw=limit)[0]
    assert found == pytest.approx(2000 / 2.25, abs=0.5)
