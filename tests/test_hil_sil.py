"""SIL replay of a short default scenario: criteria computed, deterministic per seed, CLI verdicts.

Also the HIL-vs-SIL comparison table, on made-up metric values whose
expected outcome follows from the tolerances in hil.compare.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest

from hil.compare import TOLERANCES, agreement_result, compare_runs
from hil.rig import run_sil_report
from hil.scenario import load_scenario
from hil.sil import run_sil

DEFAULT_CRITERIA = {
    "max_15min_demand_kw",
    "ramp_exceed_fraction",
    "band_attenuation_db",
    "soc_min_pct",
    "soc_max_pct",
    "bms_limit_breaches",
}


def test_sil_report_short_default(tmp_path):
    """A 20 s SIL run of the default scenario judges every default criterion with a value."""
    result = run_sil_report(load_scenario("ai-training-wind"), tmp_path, duration_s=20.0)
    report = json.loads((tmp_path / "report.json").read_text())
    names = {c["name"] for c in report["criteria"]}
    assert names == DEFAULT_CRITERIA
    assert all(c["value"] is not None for c in report["criteria"])
    assert report["mode"] == "sil"
    assert report["metrics"]["duration_s"] == pytest.approx(20.0)
    assert result.verdict == report["verdict"]
    assert (tmp_path / "junit.xml").stat().st_size > 0
    assert (tmp_path / "report.png").stat().st_size > 0


def test_sil_deterministic_for_seed():
    """Two replays with one seed give identical signals; another seed gives another load."""
    scenario = load_scenario("ai-training-wind").with_duration(8.0)
    first = run_sil(scenario).capture
    second = run_sil(scenario).capture
    run = scenario.run.model_copy(update={"seed": scenario.run.seed + 1})
    other = run_sil(scenario.model_copy(update={"run": run})).capture
    assert np.array_equal(first.grid_kw, second.grid_kw)
    assert np.array_equal(first.battery_kw, second.battery_kw)
    assert np.array_equal(first.soc_pct, second.soc_pct)
    assert not np.array_equal(first.load_kw, other.load_kw)


BASE = {
    "max_15min_demand_kw": 600.0,
    "band_attenuation_db": 12.0,
    "grid_ramp_p99_kw_per_s": 40.0,
    "ramp_exceed_fraction": 0.005,
    "soc_min_pct": 55.0,
    "soc_max_pct": 61.0,
    "equivalent_full_cycles": 0.05,
}


@pytest.mark.parametrize(
    ("change", "outside"),
    [
        ({}, set()),
        ({"max_15min_demand_kw": 611.9}, set()),  # +1.98 %, inside 2 %
        ({"max_15min_demand_kw": 612.1}, {"max_15min_demand_kw"}),  # +2.02 %
        ({"band_attenuation_db": 9.1}, set()),  # -2.9 dB, inside 3 dB
        ({"band_attenuation_db": 8.9}, {"band_attenuation_db"}),  # -3.1 dB
        ({"soc_min_pct": 53.9}, {"soc_min_pct"}),  # 1.1 points
        ({"grid_ramp_p99_kw_per_s": math.nan}, {"grid_ramp_p99_kw_per_s"}),
        ({"equivalent_full_cycles": None}, {"equivalent_full_cycles"}),
    ],
)
def test_compare_tolerances(change, outside):
    """Each metric is judged against its own tolerance; a missing value never agrees."""
    hil = {**BASE, **change}
    rows = compare_runs(hil, BASE)
    assert [r.metric for r in rows] == list(TOLERANCES)
    assert {r.metric for r in rows if not r.within} == outside
    result = agreement_result(rows)
    assert result.passed is (not outside)
    assert result.value == len(outside)


def test_compare_relative_override():
    """A scenario's hil_sil_tolerance replaces the relative tolerances only."""
    hil = {**BASE, "max_15min_demand_kw": 630.0, "band_attenuation_db": 8.0}
    rows = {r.metric: r for r in compare_runs(hil, BASE, relative_tolerance=0.1)}
    assert rows["max_15min_demand_kw"].within  # +5 % within the 10 % override
    assert rows["max_15min_demand_kw"].tolerance == 0.1
    assert not rows["band_attenuation_db"].within  # still 3 dB absolute


def _scenario_file(tmp_path, criteria: str):
    text = (resources.files("hil") / "scenarios" / "ai-training-wind.toml").read_text()
    path = tmp_path / "short.toml"
    path.write_text(text.split("[criteria]")[0] + "[criteria]\n" + criteria)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "hil", "run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("criteria", "exit_code", "verdict"),
    [
        ("soc_min_pct = 5.0\nsoc_max_pct = 97.0\n", 0, "pass"),
        ("soc_min_pct = 5.0\nmin_band_attenuation_db = 100.0\n", 1, "fail"),
    ],
)
def test_cli_sil_verdict_exit(tmp_path, criteria, exit_code, verdict):
    """`hil run --sil` exits 0 only when every criterion passes."""
    path = _scenario_file(tmp_path, criteria)
    proc = _cli(str(path), "--sil", "--duration", "5", "--json", "--out", str(tmp_path / "o"))
    assert proc.returncode == exit_code, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["verdict"] == verdict


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-scenario"], "no built-in scenario of that name"),
        (["ai-training-wind", "--duration", "0"], "--duration 0 is invalid"),
        (["ai-training-wind", "--duration", "601"], "--duration 601 is invalid"),
    ],
)
def test_cli_usage_errors(args, message):
    """A bad scenario name or duration exits 2 with the reason, before anything starts."""
    proc = _cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cli_summary_table(tmp_path):
    """Without --json the run prints one row per criterion, the verdict and the report path."""
    path = _scenario_file(tmp_path, "soc_min_pct = 5.0\n")
    out = tmp_path / "o"
    proc = _cli(str(path), "--sil", "--duration", "3", "--out", str(out))
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["criterion", "value", "limit", "result"]
    assert lines[2].split()[0] == "soc_min_pct"
    assert lines[2].split()[-1] == "pass"
    assert "verdict: PASS (sil)" in proc.stdout
    assert f"report: {out / 'report.png'}" in proc.stdout
