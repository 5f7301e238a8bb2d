"""Bundled HIL data and its loaders: files, licences, wind, facility and rack shapes."""

from __future__ import annotations

import numpy as np
import pytest

from hil import traces
from hil.traces import (
    DATA_DIR,
    FacilityBaseline,
    RackEnvelope,
    TraceError,
    WindProfile,
    interpolate_even,
    load_commercial_profile,
    load_h100_training,
    load_h200_inference,
    load_wind_plant,
    profile_start_s,
)

WEEK_START = "2015-02-02T00:00:00Z"


@pytest.fixture(scope="module")
def wind_record():
    return load_wind_plant()


# --------------------------------------------------------------------------- files and licences


def test_data_folder_under_8_mb():
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert total < 8 * 1024 * 1024


@pytest.mark.parametrize(
    ("folder", "required"),
    [
        ("gpu", ["Apache License", "Version 2.0, January 2004", "MLCommons", "not MLPerf results"]),
        ("wind", ["Open Licence 2.0", "ENGIE", "9 October 2019", "meter_net_power_kw"]),
        ("loads", ["MIT License", "Copyright (c) oemof developer group", "demandlib 0.2.2"]),
    ],
)
def test_data_readme_carries_attribution(folder, required):
    text = (DATA_DIR / folder / "README.md").read_text(encoding="utf-8")
    for phrase in required:
        assert phrase in text, f"{folder}/README.md lacks {phrase!r}"
    assert "## Changes made for bessgw" in text


def test_every_data_file_has_readme():
    for csv in DATA_DIR.rglob("*.csv"):
        readme = (csv.parent / "README.md").read_text(encoding="utf-8")
        assert csv.name in readme


# --------------------------------------------------------------------------- GPU traces


def test_h100_trace_matches_readme():
    trace = load_h100_training()
    assert trace.p_w.size == 877
    train = trace.p_w[trace.phase == "train"]
    assert train.size == 722
    assert train.mean() == pytest.approx(7177, abs=1)
    assert train.max() == 7355
    assert np.all(np.diff(trace.t_s) > 0)


def test_h200_trace_matches_readme():
    trace = load_h200_inference()
    assert trace.p_w.size == 3056
    window = trace.p_w[trace.phase == "window"]
    assert window.size == 2500
    assert np.median(window) == pytest.approx(6298, abs=1)
    assert window.max() == pytest.approx(6389.5)


def test_trace_segment_starts_at_zero():
    segment = load_h100_training().segment(("train", "eval"))
    assert segment.t_s[0] == 0.0
    assert set(np.unique(segment.phase)) == {"train", "eval"}


def test_gpu_trace_unknown_name_rejected():
    with pytest.raises(TraceError, match="unknown GPU trace"):
        traces.load_gpu_trace("a100")


def test_loader_missing_file_raises(tmp_path):
    with pytest.raises(TraceError, match="not found"):
        load_h100_training(tmp_path / "absent.csv")


def test_loader_malformed_file_raises(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("time_s,time_utc,power_w,phase\n0.0,x,abc,init\n", encoding="utf-8")
    with pytest.raises(TraceError, match="malformed"):
        load_h100_training(bad)


# --------------------------------------------------------------------------- wind


def test_wind_record_shape(wind_record):
    assert wind_record.p_kw.size == 105_120
    assert wind_record.start_utc == np.datetime64("2014-01-01T00:00:00")
    assert int(np.isnan(wind_record.p_kw).sum()) == 400
    # First row: 4 turbines reporting, 2256.61 kW, kept as is.
    assert wind_record.p_kw[0] == pytest.approx(2256.61)


def test_wind_partial_rows_scaled_to_plant(wind_record):
    partial = np.flatnonzero(
        (wind_record.turbines_reporting > 0) & (wind_record.turbines_reporting < 4)
    )
    assert partial.size == 959 + 20 + 6
    raw = np.loadtxt(
        traces.WIND_PLANT_CSV, delimiter=",", skiprows=1, usecols=(1,), max_rows=partial[0] + 1
    )
    index = partial[0]
    expected = raw[index] * 4 / wind_record.turbines_reporting[index]
    assert wind_record.p_kw[index] == pytest.approx(expected)


def test_wind_irregular_grid_rejected(tmp_path):
    bad = tmp_path / "wind.csv"
    bad.write_text(
        "time_utc,power_kw,wind_speed_mps,turbines_reporting\n"
        "2014-01-01T00:00:00Z,1.0,5.0,4\n2014-01-01T00:20:00Z,1.0,5.0,4\n",
        encoding="utf-8",
    )
    with pytest.raises(TraceError, match="regular 10-minute grid"):
        load_wind_plant(bad)


@pytest.mark.parametrize("method", ["linear", "pchip"])
def test_wind_interpolation_preserves_means(wind_record, method):
    rated_kw = 600.0
    profile = WindProfile(wind_record, WEEK_START, 7 * 86400, rated_kw, method=method)
    t = np.arange(0.0, 7 * 86400, 1.0) + 0.5
    means = profile.power_kw(t).reshape(-1, 600).mean(axis=1)
    expected = profile.interval_means_kw(0.0, means.size)
    # Source means scaled from 8,200 kW to 600 kW.
    index = wind_record.index_at(WEEK_START)
    assert expected[0] == pytest.approx(wind_record.p_kw[index] * rated_kw / 8200.0)
    error = np.abs(means - expected)
    assert error.max() < 0.01 * rated_kw
    assert np.percentile(error, 99) < 0.002 * rated_kw


@pytest.mark.parametrize("method", ["linear", "pchip"])
def test_wind_stays_within_rating(wind_record, method):
    profile = WindProfile(wind_record, WEEK_START, 7 * 86400, 600.0, method=method)
    p = profile.power_kw(np.arange(0.0, 7 * 86400, 5.0))
    assert p.max() <= 600.0
    assert p.min() >= profile.min_kw
    assert p.max() > 590.0


def test_wind_chunks_equal_whole(wind_record):
    profile = WindProfile(
        wind_record, WEEK_START, 3600, 600.0, method="pchip", turbulence_fraction=0.05, seed=4
    )
    t = np.arange(0.0, 3600.0, 0.01)
    whole = profile.power_kw(t)
    chunks = np.concatenate([profile.power_kw(part) for part in np.array_split(t, 7)])
    np.testing.assert_array_equal(whole, chunks)


def test_wind_turbulence_keeps_means(wind_record):
    plain = WindProfile(wind_record, WEEK_START, 86400, 600.0, method="pchip")
    gusty = WindProfile(
        wind_record, WEEK_START, 86400, 600.0, method="pchip", turbulence_fraction=0.1, seed=1
    )
    again = WindProfile(
        wind_record, WEEK_START, 86400, 600.0, method="pchip", turbulence_fraction=0.1, seed=1
    )
    t = np.arange(0.0, 86400.0, 1.0) + 0.5
    p_plain, p_gusty = plain.power_kw(t), gusty.power_kw(t)
    np.testing.assert_array_equal(p_gusty, again.power_kw(t))
    assert np.std(p_gusty - p_plain) > 2.0
    means = p_gusty.reshape(-1, 600).mean(axis=1)
    assert np.abs(means - gusty.interval_means_kw(0.0, means.size)).max() < 0.01 * 600.0


def test_wind_zero_rating_is_zero(wind_record):
    profile = WindProfile(wind_record, WEEK_START, 600, 0.0)
    assert np.all(profile.power_kw(np.arange(0.0, 600.0, 1.0)) == 0.0)


def test_wind_outside_record_rejected(wind_record):
    with pytest.raises(TraceError, match="outside the wind record"):
        WindProfile(wind_record, "2016-06-01T00:00:00Z", 600, 600.0)
    with pytest.raises(TraceError, match="outside the wind record"):
        WindProfile(wind_record, "2015-12-31T23:55:00Z", 3600, 600.0)


def test_wind_invalid_time_rejected(wind_record):
    with pytest.raises(TraceError, match="invalid UTC time"):
        WindProfile(wind_record, "yesterday", 600, 600.0)


def test_wind_gap_filled(wind_record):
    gap = int(np.flatnonzero(np.isnan(wind_record.p_kw))[0])
    start = wind_record.start_utc + np.timedelta64(gap * 600 - 3600, "s")
    profile = WindProfile(wind_record, start, 7200, 8200.0)
    p = profile.power_kw(np.arange(0.0, 7200.0, 10.0))
    assert np.all(np.isfinite(p))


def test_pchip_monotone_no_overshoot():
    y = np.array([0.0, 0.0, 1.0, 10.0, 10.0, 10.0, 2.0])
    x = np.linspace(0.0, 6.0, 601)
    values = interpolate_even(0.0, 1.0, y, x, "pchip")
    assert values.min() >= 0.0
    assert values.max() <= 10.0 + 1e-9
    # Monotone data stays monotone between the nodes.
    rising = values[(x >= 1.0) & (x <= 3.0)]
    assert np.all(np.diff(rising) >= -1e-12)
    np.testing.assert_allclose(interpolate_even(0.0, 1.0, y, np.arange(7.0), "pchip"), y)


def test_interpolation_unknown_method_rejected():
    with pytest.raises(TraceError, match="unknown interpolation"):
        interpolate_even(0.0, 1.0, np.arange(3.0), np.array([0.5]), "spline")


# --------------------------------------------------------------------------- facility


def test_profile_integrates_to_one_gwh():
    profile = load_commercial_profile("g3")
    assert profile.kw_per_gwh_yr.size == 35_040
    assert profile.kw_per_gwh_yr.sum() * 0.25 == pytest.approx(1e6, rel=1e-5)


def test_profile_unknown_column_rejected():
    with pytest.raises(TraceError, match="unknown load profile"):
        load_commercial_profile("h0")


def test_facility_scaled_to_mean():
    baseline = FacilityBaseline(load_commercial_profile("g1"), 150.0)
    year = baseline.power_kw(np.arange(0.0, 365 * 86400.0, 900.0))
    assert year.mean() == pytest.approx(150.0, rel=1e-4)


def test_facility_held_within_slot():
    profile = load_commercial_profile("g0")
    baseline = FacilityBaseline(profile, traces.PROFILE_MEAN_KW_PER_GWH, start_s=900.0)
    values = baseline.power_kw(np.array([0.0, 450.0, 899.999, 900.0]))
    # Scaled by 1, so the values are the file's own: slot 1, slot 1, slot 1, slot 2.
    np.testing.assert_allclose(values, profile.kw_per_gwh_yr[[1, 1, 1, 2]])


def test_facility_wraps_year_end():
    profile = load_commercial_profile("g3")
    baseline = FacilityBaseline(profile, 100.0, start_s=365 * 86400.0 - 900.0)
    first, wrapped = baseline.power_kw(np.array([0.0, 900.0]))
    assert first == pytest.approx(
        profile.kw_per_gwh_yr[-1] * 100.0 / traces.PROFILE_MEAN_KW_PER_GWH
    )
    assert wrapped == pytest.approx(
        profile.kw_per_gwh_yr[0] * 100.0 / traces.PROFILE_MEAN_KW_PER_GWH
    )


def test_profile_start_keeps_weekday():
    # 2015-02-03 is the Tuesday of ISO week 6; in 2025 that is 4 February, day 34 from 1 January.
    assert profile_start_s("2015-02-03T12:00:00Z") == 34 * 86400 + 12 * 3600
    # 2015-01-01 is the Thursday of week 1; in 2025 that is 2 January.
    assert profile_start_s("2015-01-01T00:00:00Z") == 1 * 86400


def test_facility_negative_mean_rejected():
    with pytest.raises(TraceError, match="mean_kw"):
        FacilityBaseline(load_commercial_profile("g3"), -1.0)


# --------------------------------------------------------------------------- racks


def test_rack_envelope_peak_and_offset():
    envelope = RackEnvelope(load_h100_training(), 4, 100.0, 17.0)
    t = np.arange(0.0, 600.0, 0.5)
    p = envelope.power_kw(t)
    assert p.shape == (4, t.size)
    assert p.max() <= 100.0
    # The run segment's largest reading maps to exactly peak_kw.
    whole = envelope.power_kw(envelope.segment.t_s)
    assert whole[0].max() == pytest.approx(100.0)
    # Rack 2 reads the trace 34 s after rack 0.
    np.testing.assert_allclose(p[2, :-68], p[0, 68:])


def test_rack_envelope_repeats():
    envelope = RackEnvelope(load_h100_training(), 1, 50.0, 0.0)
    t = np.array([10.0, 123.4])
    np.testing.assert_allclose(envelope.power_kw(t), envelope.power_kw(t + envelope.period_s))


def test_rack_envelope_shows_measured_dip():
    # The training run's first long dip: about 2.8 kW of 7.355 kW, 6-12 s after run start.
    envelope = RackEnvelope(load_h100_training(), 1, 7.355, 0.0)
    p = envelope.power_kw(np.array([2.0, 9.0]))[0]
    assert p[0] == pytest.approx(7.198, abs=0.05)
    assert p[1] == pytest.approx(2.843, abs=0.05)


def test_rack_envelope_invalid_rejected():
    with pytest.raises(TraceError, match="invalid rack envelope"):
        RackEnvelope(load_h100_training(), 0, 100.0, 1.0)
