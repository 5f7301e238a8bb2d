"""``bessgw plan optimum`` and ``bessgw plan replay`` on short scenarios written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.cli import main
from gateway.cli.plan_cmd import REPLAY_KEYS
from gateway.plan.optimum import optimal_peak
from hil.plan_replay import CoarseLaw, build_site, planner_config
from hil.scenario import load_scenario

NORDIC = Path(__file__).resolve().parents[1] / "hil" / "scenarios" / "nordic-week.toml"


def _short_scenario(tmp_path: Path, extra: str = "") -> Path:
    """The shipped nordic-week with a one-day warm-up and a 6-hour run."""
    text = NORDIC.read_text(encoding="utf-8")
    text = text.replace("duration_s = 604800.0", "duration_s = 21600.0")
    text = text.replace("warmup_days = 7.0", "warmup_days = 1.0")
    text = text.replace("history_days = 7.0", "history_days = 1.0")
    # The shipped event falls outside 6 hours; move it into the run.
    text = text.replace("start_s = 226800.0", "start_s = 7200.0")
    text = text.replace("end_s = 234000.0", "end_s = 9000.0")
    path = tmp_path / "short.toml"
    path.write_text(text + extra, encoding="utf-8")
    return path


def test_shipped_nordic_week_loads():
    scenario = load_scenario("nordic-week")
    assert scenario.run.duration_s == 7 * 86400
    assert scenario.cluster is not None
    assert scenario.criteria.min_capture_ratio == 0.9
    assert scenario.criteria.min_self_consumption_gain == 2.0
    assert scenario.demand_response[0].reduce_kw == 300.0


def test_plan_optimum_json_matches_direct(tmp_path, capsys):
    path = _short_scenario(tmp_path)
    assert main(["plan", "optimum", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    scenario = load_scenario(path)
    site = build_site(scenario, scenario.run.duration_s)
    warm = site.warmup_samples
    net = site.load_kw[warm:] - site.wind_kw[warm:]
    direct = optimal_peak(net, 1.0, planner_config(scenario).battery, 80.0)
    assert result["peak_kw_optimum"] == pytest.approx(direct.peak_kw)
    assert result["peak_kw_without_battery"] == pytest.approx(direct.peak_kw_without_battery)
    assert result["peak_kw_optimum"] <= result["peak_kw_without_battery"]
    assert result["duration_s"] == 21600.0
    assert result["battery"]["soc_min_pct"] == 20.0


def test_plan_optimum_text(tmp_path, capsys):
    assert main(["plan", "optimum", str(_short_scenario(tmp_path)), "--duration-s", "3600"]) == 0
    out = capsys.readouterr().out
    assert "0.04 days" in out
    assert "optimum" in out
    assert "peak without battery" in out


def test_plan_optimum_rig_scenario(capsys):
    """A scenario without a job stream is scored on the HIL rig's traces."""
    assert main(["plan", "optimum", "ai-training-wind", "--json", "--duration-s", "120"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["duration_s"] == 120.0
    assert result["peak_kw_optimum"] <= result["peak_kw_without_battery"]


def test_plan_replay_json(tmp_path, capsys):
    path = _short_scenario(tmp_path)
    code = main(["plan", "replay", str(path), "--json", "--duration-s", "10800"])
    result = json.loads(capsys.readouterr().out)
    for key in REPLAY_KEYS:
        assert key in result, key
    assert result["duration_s"] == 10800.0
    assert result["intervals"] == 12
    # The optimum is a lower bound for any schedule, the planner's included.
    assert result["peak_kw_optimum"] <= result["peak_kw_with_bessgw"] + 0.02
    assert 0.2 <= result["soc_min_pct"] <= result["soc_max_pct"] <= 100.0
    assert result["verdict"] in ("pass", "fail")
    assert code == (0 if result["verdict"] == "pass" else 1)
    names = [c["name"] for c in result["criteria"]]
    assert names == ["min_capture_ratio", "min_self_consumption_gain"]


def test_plan_replay_text(tmp_path, capsys):
    path = _short_scenario(tmp_path)
    main(["plan", "replay", str(path), "--duration-s", "3600"])
    out = capsys.readouterr().out
    assert "15-min peak, kW" in out
    assert "renewable self-consumption" in out
    assert "capture ratio" in out
    assert "verdict:" in out


def test_plan_replay_needs_cluster(capsys):
    assert main(["plan", "replay", "ai-training-wind", "--duration-s", "60"]) == 2
    err = capsys.readouterr().err
    assert "no [cluster] table" in err


def test_plan_rejects_bad_input(tmp_path, capsys):
    assert main(["plan", "optimum", "no-such-scenario"]) == 2
    assert "no built-in scenario of that name" in capsys.readouterr().err
    assert main(["plan", "optimum", str(_short_scenario(tmp_path)), "--duration-s", "0"]) == 2
    assert "--duration-s 0.0 must be > 0" in capsys.readouterr().err
    broken = _short_scenario(tmp_path, extra="\n[planner]\nstep_s = 7.0\n")
    assert main(["plan", "replay", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "not valid TOML" in err or "planner" in err
    bad_step = tmp_path / "bad.toml"
    bad_step.write_text(
        NORDIC.read_text(encoding="utf-8").replace("step_s = 1.0", "step_s = 7.0"),
        encoding="utf-8",
    )
    assert main(["plan", "replay", str(bad_step)]) == 2
    assert "step_s=7.0 must divide a minute evenly" in capsys.readouterr().err


def test_coarse_law_cap_and_derating():
    """The coarse fast loop keeps the cap, charges from surplus and derates near the reserve."""
    law = CoarseLaw(
        rated_kw=500.0,
        step_s=1.0,
        smoothing_tau_s=0.0,
        soc_hard_min_pct=20.0,
        soc_hard_max_pct=97.0,
        recharge_kw=100.0,
    )
    from gateway.plan.planner import Plan  # noqa: PLC0415

    plan = Plan(800.0, 0.0, 1e9, (30.0, 95.0), 800.0, 0.0, "test")
    # Load 1000 kW over an 800 kW cap: discharge 200 kW at full capability.
    assert law.step(1000.0, 60.0, 1000.0, 1000.0, plan) == pytest.approx(200.0)
    # At 25 % SoC, halfway between the 20 % hard and 30 % soft edge: capability 250 kW.
    assert law.step(1400.0, 25.0, 1000.0, 1000.0, plan) == pytest.approx(250.0)
    # Surplus of 300 kW (net -300) with the floor at 0: charge 300 kW.
    assert law.step(-300.0, 60.0, 1000.0, 1000.0, plan) == pytest.approx(-300.0)
    # Below the band: recharge 100 kW from the grid while the load leaves room under the cap.
    assert law.step(400.0, 25.0, 1000.0, 1000.0, plan) == pytest.approx(-100.0)
    # Near the top: charging derates from 95 % to 0 at 97 %.
    assert law.step(-300.0, 96.0, 1000.0, 1000.0, plan) == pytest.approx(-250.0)
    assert np.isfinite(law.target_kw)
