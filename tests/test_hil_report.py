"""Report writers: report.json, junit.xml and report.png."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from hil.evaluate import summary_lines
from hil.report import (
    CriterionResult,
    ReportSignals,
    judge,
    plot_report,
    verdict,
    write_junit_xml,
    write_report_json,
)


def _results() -> list[CriterionResult]:
    return [
        judge("band attenuation", 12.5, 10.0, ">=", "dB"),
        judge("max 15-min demand", 870.0, 850.0, "<=", "kW"),
    ]


def test_judge_compares_both_ways():
    assert judge("a", 10.0, 10.0, ">=").passed
    assert not judge("a", 9.99, 10.0, ">=").passed
    assert judge("b", 5.0, 5.0, "<=").passed
    assert not judge("b", 5.01, 5.0, "<=").passed
    result = judge("max 15-min demand", 870.0, 850.0, "<=", "kW")
    assert result.message == "max 15-min demand: 870 kW (limit <= 850 kW) FAILED"


def test_judge_unmeasured_fails():
    result = judge("fault reaction", None, 500.0, "<=", "ms")
    assert not result.passed
    assert result.value is None
    assert "not measured" in result.message
    assert not judge("x", float("nan"), 1.0, "<=").passed


def test_judge_invalid_comparison_rejected():
    with pytest.raises(ValueError, match="comparison"):
        judge("x", 1.0, 1.0, "<")


def test_verdict_needs_all_passed():
    passed = judge("a", 1.0, 2.0, "<=")
    failed = judge("b", 3.0, 2.0, "<=")
    assert verdict([passed]) == "pass"
    assert verdict([passed, failed]) == "fail"
    assert verdict([]) == "fail"


def test_report_json_contents(tmp_path):
    path = tmp_path / "report.json"
    metrics_values = {
        "attenuation_db": np.float64(12.5),
        "ramp": float("inf"),
        "soc": np.array([1.0]),
    }
    written = write_report_json(path, "ai-training-wind", _results(), metrics_values, {"seed": 7})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == written
    assert data["scenario"] == "ai-training-wind"
    assert data["verdict"] == "fail"
    assert data["seed"] == 7
    assert [c["name"] for c in data["criteria"]] == ["band attenuation", "max 15-min demand"]
    assert data["criteria"][0]["passed"] is True
    assert data["metrics"] == {"attenuation_db": 12.5, "ramp": None, "soc": [1.0]}


def test_report_json_extra_clash_rejected(tmp_path):
    with pytest.raises(ValueError, match="verdict"):
        write_report_json(tmp_path / "r.json", "s", _results(), {}, {"verdict": "pass"})


def test_junit_xml_counts_failures(tmp_path):
    path = tmp_path / "junit.xml"
    write_junit_xml(path, "ai-training-wind", _results(), duration_s=601.5)
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite.get("name") == "ai-training-wind"
    assert suite.get("tests") == "2"
    assert suite.get("failures") == "1"
    assert suite.get("time") == "601.500"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["band attenuation", "max 15-min demand"]
    assert cases[0].find("failure") is None
    failure = cases[1].find("failure")
    assert failure.get("message") == "max 15-min demand: 870 kW (limit <= 850 kW) FAILED"
    assert json.loads(failure.text)["value"] == 870.0


def test_plot_report_writes_png(tmp_path):
    dt_s = 0.01
    t = np.arange(0.0, 120.0, dt_s)
    load = 800.0 + 200.0 * (np.sin(2 * np.pi * t / 1.5) > 0)
    battery = load - 850.0
    signals = ReportSignals(
        dt_s=dt_s,
        load_kw=load,
        grid_kw=load - battery,
        battery_kw=battery,
        soc_pct=60.0 - t / 100.0,
        renewable_kw=np.full(t.size, 50.0),
        cap_kw=900.0,
        events=[(30.0, "meter loss"), (80.0, "PCS trip")],
        soc_min_pct=5.0,
        soc_max_pct=97.0,
    )
    path = tmp_path / "report.png"
    plot_report(path, "test run", signals, summary=["line one", "line two"])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # 13 x 9 inches at 100 dpi.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1300, 900)


def test_summary_names_seconds_over_ramp_limit():
    values = {
        "max_15min_demand_kw": 650.0,
        "max_15min_demand_without_battery_kw": 700.0,
        "band_attenuation_db": 13.0,
        "grid_ramp_p99_kw_per_s": 80.0,
        "load_ramp_p99_kw_per_s": 270.0,
        "ramp_exceed_fraction": 8 / 599,
        "ramp_exceed_seconds": [1, 2, 120, 121, 240, 338, 465, 500],
        "soc_min_pct": 57.0,
        "soc_max_pct": 60.0,
        "bms_limit_breaches": 0,
    }
    line = next(x for x in summary_lines(values) if x.startswith("seconds over"))
    assert line == "seconds over ramp limit: 1.34 % (s 1, 2, 120, 121, 240, 338 and 2 more)"
    values["ramp_exceed_seconds"] = []
    values["ramp_exceed_fraction"] = 0.0
    line = next(x for x in summary_lines(values) if x.startswith("seconds over"))
    assert line == "seconds over ramp limit: 0.00 %"
