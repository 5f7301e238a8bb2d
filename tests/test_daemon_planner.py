"""The supervisory planner inside the daemon, and its configuration, inputs and guards.

The daemon tests run ``bessgw run`` against the rig of :mod:`daemon_rig`
with the planner every second. The rig's plant: a constant 800 kW load, a
500 kW PCS whose BMS window is 48.66 kW, and a BMS that reports 26 % SoC.
With a 200 kWh battery and a 20 % reserve, the planner has 12 kWh to spend,
so its cap stays near the load forecast's upper quantile, well above the
configured 600 kW. The load forecast is unfitted in these tests (a fit needs
1440 periods), so it is the last mean plus the hinted job power, with a
spread around it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import math
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from daemon_rig import DaemonRig

from drivers.quality import Quality, Reading
from gateway.cli.run_cmd import _planner_line
from gateway.config import ConfigError, load_config, validate_config
from gateway.plan.planner import Plan, PlannerInputs, PlannerState
from gateway.planning import (
    MeanAccumulator,
    PlanError,
    PlannerBusyError,
    PlannerStateError,
    SupervisoryPlanner,
    check_inputs,
    check_plan,
    events_ahead,
    forecast_config,
    load_state,
    planner_config,
    save_state,
)
from gateway.plant_io import SiteReadings
from gateway.service.api import ApiClient, ApiError, DemandResponseParams

EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "bessgw.example.toml"

PLANNER_TABLE = """
[planner]
enabled = true
period_s = 1.0
energy_kwh = 200.0
reserve_soc_pct = 20.0
"""


# -- daemon ------------------------------------------------------------------


async def _start(
    tmp_path: Path, *, metrics: bool = False, hooks: bool = False, extra: str = ""
) -> DaemonRig:
    rig = DaemonRig(tmp_path, metrics=metrics)
    await rig.start_plant()
    rig.write_config(extra=PLANNER_TABLE + extra)
    env = [("BESSGW_TEST_HOOKS", "1")] if hooks else []
    await rig.start_daemon(*env)
    await rig.wait_notify("STATUS=running", 30)
    return rig


async def _call(rig: DaemonRig, method: str, **params) -> dict:
    return await asyncio.to_thread(ApiClient(rig.api_socket).call, method, **params)


async def _until(rig: DaemonRig, predicate, timeout_s: float, what: str) -> dict:
    """Poll the status until ``predicate(status)`` holds; return that status."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        # The notify socket holds only a few datagrams; unread, they block the daemon's sends.
        rig.read_notify()
        status = await _call(rig, "status")
        if predicate(status):
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"timed out after {timeout_s} s waiting for {what}; last status planner: "
        f"{status and status['planner']}\n{rig.log_tail()}"
    )


def _planned(status: dict) -> bool:
    """Return whether a plan with the SoC known exists.

    The first period may end before the BMS has reported. Its plan keeps the
    configured 600 kW, the cap used until a day of history exists.
    """
    return "forecast need" in (status["planner"]["reason"] or "")


def _logged(rig: DaemonRig, event: str) -> list[dict]:
    return [e for e in rig.log_events() if e.get("event") == event]


def _scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exported")


async def test_planner_cap_reaches_loop(tmp_path):
    """The plan's cap and band reach the loop; an override wins until cleared; all is exposed."""
    rig = await _start(tmp_path, metrics=True)
    try:
        status = await _until(rig, _planned, 15, "a first plan")
        planner = status["planner"]
        assert status["cap_kw"] == planner["cap_kw"]
        assert status["soc_band_pct"] == planner["soc_band_pct"]
        # The configured cap is 600 kW; the plan raises it to what 12 kWh can defend.
        assert planner["cap_kw"] > 700.0
        # The band runs from the reserve to the control's soft maximum.
        assert planner["soc_band_pct"] == [20.0, 90.0]
        assert planner["error"] is None
        assert status["headroom_kw"] == planner["headroom_kw"]
        assert status["headroom_kw"] >= 0.0
        # The gauge is set from the plan in force; read it between two equal statuses.
        first = (await _call(rig, "status"))["headroom_kw"]
        gauge = _scrape(rig.metrics_port, "bessgw_headroom_kw")
        second = (await _call(rig, "status"))["headroom_kw"]
        if first == second:
            assert gauge == first

        await _call(rig, "set_cap", cap_kw=650.0, expires_in_s=60.0, operator="test")
        status = await _until(rig, lambda s: s["cap_kw"] == 650.0, 5, "the override cap")
        await asyncio.sleep(2.5)  # two more plans
        rig.read_notify()
        status = await _call(rig, "status")
        assert status["cap_kw"] == 650.0
        assert status["planner"]["cap_kw"] > 700.0
        # Under a lower override the headroom is at most 650 kW minus the 800 kW net load.
        assert status["headroom_kw"] == 0.0

        await _call(rig, "clear_cap", operator="test")
        await _until(rig, lambda s: s["cap_kw"] > 700.0, 5, "the planned cap after the override")

        events = (await _call(rig, "events", limit=1000))["events"]
        decisions = [e for e in events if e["kind"] == "planner_decision"]
        assert any("forecast need" in e["message"] for e in decisions)
        assert _logged(rig, "planner_decision")

        # SIGHUP applies a new reserve at the next plan; a new period needs a restart.
        rig.write_config(
            extra=PLANNER_TABLE.replace("reserve_soc_pct = 20.0", "reserve_soc_pct = 25.0")
        )
        await rig.signal(signal.SIGHUP)
        await _until(
            rig, lambda s: s["soc_band_pct"] == [25.0, 90.0], 5, "the new reserve in the band"
        )
        rig.write_config(extra=PLANNER_TABLE.replace("period_s = 1.0", "period_s = 2.0"))
        await rig.signal(signal.SIGHUP)
        await _until(
            rig,
            lambda s: _logged(rig, "config_reload_rejected"),
            5,
            "the reload with a new period to be rejected",
        )
        assert "planner.period_s" in _logged(rig, "config_reload_rejected")[0]["reason"]
    finally:
        await rig.close()


async def test_planner_hint_and_dr(tmp_path):
    """A job hint raises the planned cap; a demand-response event then lowers it below."""
    rig = await _start(tmp_path)
    try:
        status = await _until(rig, _planned, 15, "a first plan")
        await asyncio.sleep(2.5)
        before = (await _call(rig, "status"))["planner"]["cap_kw"]

        now = time.time()
        await _call(
            rig,
            "add_job_hint",
            job_id="train-1",
            start_utc=now + 300.0,
            end_utc=now + 7200.0,
            nodes=8,
            expected_kw=400.0,
        )
        # The 400 kW job starts inside every forecast horizon, so the forecast, and with it
        # the cap that 12 kWh can defend, rises by about 400 kW.
        status = await _until(
            rig, lambda s: s["planner"]["cap_kw"] > before + 300.0, 10, "the hint to raise the cap"
        )
        hinted = status["planner"]["cap_kw"]
        assert status["cap_kw"] == hinted

        await _call(
            rig,
            "add_dr_event",
            event_id="dr-1",
            start_utc=time.time() - 1.0,
            end_utc=time.time() + 1800.0,
            reduce_kw=300.0,
        )
        # The event's cap is its baseline minus 300 kW. The baseline is the measured or the
        # median forecast net load, which lies below the forecast's upper quantile that set
        # the hinted cap, so the cap falls by at least 300 kW.
        status = await _until(
            rig,
            lambda s: s["planner"]["reason"].startswith("demand response dr-1"),
            10,
            "the demand-response event to set the cap",
        )
        assert status["planner"]["cap_kw"] <= hinted - 300.0
        assert status["cap_kw"] == status["planner"]["cap_kw"]
        # The billing cap, which the headroom counts against, still carries the job.
        assert status["planner"]["billing_cap_kw"] > before + 300.0

        # SIGTERM saves the planner state for the next start.
        await rig.signal(signal.SIGTERM)
        assert await rig.wait_exit(20) == 0
        saved = json.loads((rig.state_dir / "planner_state.json").read_text())
        assert saved["version"] == 1
        assert saved["interval_s"] == 900.0
    finally:
        await rig.close()


async def test_planner_broken_input_keeps_params(tmp_path):
    """A net load 1000 times too large stops planning; the loop keeps the last parameters.

    After the recovery, a job in the scheduler's hint file raises the cap.
    """
    hint_file = tmp_path / "job-hints.json"
    rig = await _start(tmp_path, hooks=True, extra=f'job_hint_file = "{hint_file}"\n')
    try:
        await _until(rig, _planned, 15, "a first plan")
        # 800 kW read as W instead of kW: 800000, beyond 10 x the 2000 kW grid connection.
        await _call(rig, "test_planner_input", field="net_load_kw", value=800_000.0, runs=6)
        failing = await _until(
            rig, lambda s: s["planner"]["error"] is not None, 5, "the planner to fail"
        )
        assert "net_load_kw=800000" in failing["planner"]["error"]
        kept_cap = failing["cap_kw"]
        kept_band = failing["soc_band_pct"]
        kept_planned_utc = failing["planner"]["planned_utc"]

        # Two more failed periods of the six: nothing of the plan in force moves.
        status = await _until(
            rig, lambda s: s["planner"]["failures_in_row"] >= 3, 5, "two more failed periods"
        )
        assert status["planner"]["error"] is not None
        assert status["cap_kw"] == kept_cap
        assert status["soc_band_pct"] == kept_band
        assert status["planner"]["planned_utc"] == kept_planned_utc
        assert status["state"] == "degraded"

        recovered = await _until(
            rig, lambda s: s["planner"]["error"] is None, 10, "the planner to recover"
        )
        assert recovered["planner"]["planned_utc"] > kept_planned_utc
        await _until(rig, lambda s: s["state"] == "running", 5, "the state to return to running")

        # Six failed periods: one error line and one recovery line, not one per period.
        failed = _logged(rig, "planner_failed")
        assert len(failed) == 1
        assert "net_load_kw" in failed[0]["error"]
        recovered_lines = _logged(rig, "planner_recovered")
        assert len(recovered_lines) == 1
        assert recovered_lines[0]["failures"] == 6
        events = (await _call(rig, "events", limit=1000))["events"]
        kinds = [e["kind"] for e in events]
        assert kinds.count("planner_failed") == 1

        # The file did not exist until now: one warning, and the plan went on without it.
        assert len(_logged(rig, "job_hint_file_missing")) == 1
        before = recovered["planner"]["cap_kw"]
        now = time.time()
        jobs = [
            {
                "job_id": "j-7",
                "start_utc": now + 300.0,
                "end_utc": now + 7200.0,
                "expected_kw": 400.0,
            }
        ]
        temporary = tmp_path / "job-hints.json.tmp"
        temporary.write_text(json.dumps({"jobs": jobs}))
        temporary.rename(hint_file)
        await _until(
            rig,
            lambda s: s["planner"]["cap_kw"] > before + 300.0,
            10,
            "the hint file's job to raise the cap",
        )
        assert _logged(rig, "job_hint_file_loaded")[0]["jobs"] == 1
    finally:
        await rig.close()


async def test_planner_api_rejects_long_dr(tmp_path):
    """A demand-response event longer than a day is rejected by the API with the reason."""
    rig = await _start(tmp_path)
    try:
        now = time.time()
        with pytest.raises(ApiError, match="end_utc - start_utc") as error:
            await _call(
                rig,
                "add_dr_event",
                event_id="dr-long",
                start_utc=now,
                end_utc=now + 2 * 86400.0,
                reduce_kw=100.0,
            )
        assert error.value.code == "invalid_params"
        # The test hook is not served without BESSGW_TEST_HOOKS=1.
        with pytest.raises(ApiError) as hook:
            await _call(rig, "test_planner_input", field="soc_pct", value=50.0)
        assert hook.value.code == "unknown_method"
    finally:
        await rig.close()


# -- configuration -----------------------------------------------------------


def _example_text(planner_lines: str = "") -> str:
    return EXAMPLE.read_text().replace("[planner]\nenabled = false\n", planner_lines)


def _validate(tmp_path: Path, text: str):
    path = tmp_path / "site.toml"
    path.write_text(text)
    return load_config(path)


def test_planner_config_example_disabled():
    config = load_config(EXAMPLE)
    assert config.planner.enabled is False
    assert config.planner.energy_kwh == 2000.0


def test_planner_config_example_enabled(tmp_path):
    """Enabling the example's commented table gives a planner of the site's PCS and battery."""
    config = _validate(tmp_path, _example_text("[planner]\nenabled = true\n"))
    built = planner_config(config)
    assert built.battery.energy_kwh == 2000.0
    assert built.battery.discharge_kw == 500.0
    assert built.battery.soc_min_pct == 20.0
    # soc_max_pct is commented out, so the control's soft maximum applies.
    assert built.battery.soc_max_pct == 90.0
    assert built.initial_cap_kw == 1500.0
    assert built.interval_s == 900.0
    assert built.energy_price_per_kwh == ()


@pytest.mark.parametrize(
    ("planner_lines", "message"),
    [
        (
            "[planner]\nenabled = true\nenergy_kwh = 100.0\nrenewable_rated_kw = 1.0\n"
            "period_s = 7.0\n",
            "period_s (7.0) must divide 60 s evenly",
        ),
        (
            "[planner]\nenabled = true\nenergy_kwh = 100.0\nrenewable_rated_kw = 1.0\n"
            "energy_price_per_kwh = [0.1, 0.2]\n",
            "energy_price_per_kwh has 2 values",
        ),
        ("[planner]\nenabled = true\nrenewable_rated_kw = 1.0\n", "without energy_kwh"),
        (
            "[planner]\nenabled = true\nenergy_kwh = 100.0\nrenewable_rated_kw = 1.0\n"
            "reserve_soc_pct = 4.0\n",
            "must be above control.soc_hard_min_pct",
        ),
        (
            "[planner]\nenabled = true\nenergy_kwh = 100.0\nrenewable_rated_kw = 1.0\n"
            "reserve_soc_pct = 88.0\n",
            "at least 5 points below",
        ),
        (
            "[planner]\nenabled = true\nenergy_kwh = 100.0\nrenewable_rated_kw = 1.0\n"
            "soc_max_pct = 98.0\n",
            "must be below control.soc_hard_max_pct",
        ),
        (
            "[planner]\nenabled = true\nenergy_kwh = 100.0\n",
            "planner.renewable_rated_kw is missing",
        ),
        ("[planner]\nenable = true\n", "planner.enable: unknown key"),
    ],
)
def test_planner_config_rejects(tmp_path, planner_lines, message):
    text = EXAMPLE.read_text()
    start = text.index("[planner]")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _validate(tmp_path, text[:start] + planner_lines)


def test_planner_config_disabled_skips_cross_checks(tmp_path):
    """A disabled table may keep values that only an enabled planner would reject."""
    text = EXAMPLE.read_text()
    start = text.index("[planner]")
    config = _validate(tmp_path, text[:start] + "[planner]\nreserve_soc_pct = 2.0\n")
    assert config.planner.reserve_soc_pct == 2.0


def test_planner_config_nan_price(tmp_path):
    text = EXAMPLE.read_text().replace(
        "energy_price_per_kwh = []",
        "energy_price_per_kwh = " + str([0.1] * 23 + ["nan"]).replace("'", ""),
    )
    with pytest.raises(ConfigError, match="energy_price_per_kwh"):
        _validate(tmp_path, text)


# -- inputs and guards -------------------------------------------------------


def _readings(
    grid=None, net=None, battery=None, renewable=None, soc=None, quality=Quality.GOOD
) -> SiteReadings:
    def reading(value):
        if value is None:
            return Reading.bad(Quality.NOT_IMPLEMENTED, 0.0, "kW")
        if quality is not Quality.GOOD:
            return Reading.bad(quality, 0.0, "kW")
        return Reading(value, Quality.GOOD, 0.0, "kW")

    return SiteReadings(
        grid=reading(grid),
        net_load=reading(net),
        battery=reading(battery),
        renewable=reading(renewable),
        soc=reading(soc),
    )


def test_means_of_good_samples():
    means = MeanAccumulator(10.0)
    means.add(_readings(grid=100.0, net=150.0, battery=50.0, soc=40.0))
    means.add(_readings(grid=200.0, net=250.0, battery=50.0, soc=41.0))
    result = means.take(70.0)
    assert result.grid_kw == 150.0
    assert result.net_load_kw == 200.0
    assert result.battery_kw == 50.0
    assert result.soc_pct == 40.5
    # No renewable meter: never GOOD, so no mean.
    assert result.renewable_kw is None
    assert result.period_s == 60.0


def test_means_need_half_good():
    """Two bad samples of three leave no mean; the next period starts empty."""
    means = MeanAccumulator(0.0)
    means.add(_readings(grid=100.0))
    means.add(_readings(grid=900.0, quality=Quality.STALE))
    means.add(_readings(grid=900.0, quality=Quality.COMM_ERROR))
    assert means.take(60.0).grid_kw is None
    means.add(_readings(grid=300.0))
    means.add(_readings(grid=500.0, quality=Quality.STALE))
    second = means.take(120.0)
    # One good sample of two is half: enough.
    assert second.grid_kw == 300.0
    assert second.period_s == 60.0


def test_means_empty_period():
    result = MeanAccumulator(5.0).take(6.0)
    assert result.grid_kw is None
    assert result.soc_pct is None


def _inputs(**values) -> PlannerInputs:
    base = {"grid_kw": 0.0, "net_load_kw": 0.0, "battery_kw": 0.0, "soc_pct": 50.0}
    base.update(values)
    return PlannerInputs(now_utc=0.0, period_s=60.0, **base)


def test_check_inputs_limits():
    check_inputs(_inputs(grid_kw=20_000.0, net_load_kw=-20_000.0, soc_pct=100.0), 20_000.0)
    check_inputs(_inputs(grid_kw=None, soc_pct=None), 20_000.0)
    with pytest.raises(PlanError, match="grid_kw=20001"):
        check_inputs(_inputs(grid_kw=20_001.0), 20_000.0)
    with pytest.raises(PlanError, match="battery_kw=nan"):
        check_inputs(_inputs(battery_kw=math.nan), 20_000.0)
    with pytest.raises(PlanError, match="soc_pct=101"):
        check_inputs(_inputs(soc_pct=101.0), 20_000.0)
    with pytest.raises(PlanError, match="renewable_kw=-inf"):
        check_inputs(_inputs(renewable_kw=-math.inf), 20_000.0)


GOOD_PLAN = Plan(
    cap_kw=900.0,
    floor_kw=0.0,
    ramp_limit_kw_per_s=50.0,
    soc_target_band=(20.0, 90.0),
    billing_cap_kw=900.0,
    headroom_kw=10.0,
    reason="forecast need (forecast need 900 kW)",
)


def test_check_plan_accepts_good():
    check_plan(GOOD_PLAN)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cap_kw": math.inf}, "cap_kw=inf"),
        ({"headroom_kw": math.nan}, "headroom_kw=nan"),
        ({"soc_target_band": (20.0, math.nan)}, "soc band high=nan"),
        ({"cap_kw": 0.0}, "not above its floor"),
        ({"soc_target_band": (90.0, 20.0)}, "SoC band 90.0-20.0"),
        ({"soc_target_band": (-1.0, 20.0)}, "SoC band -1.0-20.0"),
    ],
)
def test_check_plan_rejects(changes, message):
    with pytest.raises(PlanError, match=message):
        check_plan(dataclasses.replace(GOOD_PLAN, **changes))


def test_events_ahead_window():
    """Running and upcoming events within the look-ahead pass, earliest first; others not."""
    events = {
        "later": DemandResponseParams(
            event_id="later", start_utc=3000.0, end_utc=4000.0, reduce_kw=10.0
        ),
        "now": DemandResponseParams(event_id="now", start_utc=900.0, end_utc=1100.0, reduce_kw=5.0),
        "ended": DemandResponseParams(
            event_id="ended", start_utc=0.0, end_utc=1000.0, reduce_kw=5.0
        ),
        "far": DemandResponseParams(
            event_id="far", start_utc=1000.0 + 4 * 3600.0, end_utc=1e6, reduce_kw=5.0
        ),
    }
    ahead = events_ahead(events, 1000.0)
    assert [e.event_id for e in ahead] == ["now", "later"]
    assert ahead[1].reduce_kw == 10.0


def test_forecast_config_short_period():
    """A 1 s period keeps the forecasters' step count; a 60 s period keeps the defaults."""
    short = forecast_config("load", 2000.0, 1.0, use_hints=True)
    assert short.step_s == 1.0
    assert short.steps(short.history_s) == 8 * 1440
    assert short.min_fit_s == 1440.0
    minute = forecast_config("load", 2000.0, 60.0)
    assert minute.history_s == 8 * 86400.0
    assert minute.min_fit_s == 86400.0
    assert minute.refit_every_s == 86400.0


def test_validate_config_planner_defaults():
    """Without a [planner] table the planner is off and the configuration is as before."""
    config = load_config(EXAMPLE)
    data = config.model_dump()
    del data["planner"]
    again = validate_config(data)
    assert again.planner.enabled is False
    assert again.planner.period_s == 60.0


# -- saved state ---------------------------------------------------------------


def _enabled_example(tmp_path: Path):
    return _validate(tmp_path, _example_text("[planner]\nenabled = true\n"))


def _saved_state(config, interval_index: int) -> PlannerState:
    return dataclasses.replace(
        PlannerState(),
        billing_month=(2026, 3),
        billing_peak_kw=1234.5,
        day=20_500,
        discharged_kwh_today=321.0,
        interval_index=interval_index,
        interval_grid_kw_s=600.0 * 300.0,
        interval_net_kw_s=700.0 * 300.0,
        interval_seconds=300.0,
        history_net_kw=(650.0, 700.0),
        history_renewable_kw=(10.0, 0.0),
    )


def test_state_restored_after_restart(tmp_path):
    """A restart within the next interval restores the billing peak, the sums and the history."""
    config = _enabled_example(tmp_path)
    built = planner_config(config)
    path = tmp_path / "planner_state.json"
    index = 1_900_000
    state = _saved_state(built, index)
    save_state(path, built, state, now_utc=index * 900.0 + 10.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        restored = SupervisoryPlanner(
            config, pool, 0.0, state_path=path, now_utc=(index + 1) * 900.0 + 5.0
        ).state
    for name in (
        "billing_month",
        "billing_peak_kw",
        "day",
        "discharged_kwh_today",
        "interval_index",
        "interval_net_kw_s",
        "interval_seconds",
        "history_net_kw",
        "history_renewable_kw",
    ):
        assert getattr(restored, name) == getattr(state, name), name


def test_state_after_long_downtime(tmp_path):
    """Two interval boundaries later the history no longer lines up; only billing data stays."""
    built = planner_config(_enabled_example(tmp_path))
    path = tmp_path / "planner_state.json"
    index = 1_900_000
    save_state(path, built, _saved_state(built, index), now_utc=index * 900.0 + 10.0)
    restored = load_state(path, built, now_utc=(index + 2) * 900.0 + 5.0)
    assert restored.billing_peak_kw == 1234.5
    assert restored.billing_month == (2026, 3)
    assert restored.discharged_kwh_today == 321.0
    assert restored.history_net_kw == ()
    assert restored.interval_index is None
    assert restored.interval_seconds == 0.0


def test_state_missing_file(tmp_path):
    built = planner_config(_enabled_example(tmp_path))
    assert load_state(tmp_path / "none.json", built, now_utc=0.0) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "cannot be read"),
        ('{"version": 99}', "not a planner state of version 1"),
        ('{"version": 1, "interval_s": 1800.0}', "demand interval of 1800.0 s"),
        ('{"version": 1, "interval_s": 900.0, "billing_peak": 5}', None),
        ('{"version": 1, "interval_s": 900.0, "billing_peak_kw": "5"}', "billing_peak_kw='5'"),
        ('{"version": 1, "interval_s": 900.0, "day": 1.5}', "day=1.5"),
        ('{"version": 1, "interval_s": 900.0, "billing_month": [2026]}', "billing_month=.2026."),
        (
            '{"version": 1, "interval_s": 900.0, "interval_index": 0, '
            '"history_net_kw": [1.0, 2.0], "history_renewable_kw": [0.0]}',
            "differ in length",
        ),
        (
            '{"version": 1, "interval_s": 900.0, "interval_index": 0, '
            '"history_net_kw": [1.0, NaN], "history_renewable_kw": [0.0, 0.0]}',
            "history_net_kw=",
        ),
    ],
)
def test_state_bad_file(tmp_path, text, message):
    """A broken or foreign file raises with its path; the planner then starts afresh."""
    config = _enabled_example(tmp_path)
    built = planner_config(config)
    path = tmp_path / "planner_state.json"
    path.write_text(text)
    if message is None:
        # Unknown keys are ignored and missing ones keep their defaults.
        assert load_state(path, built, now_utc=0.0) == PlannerState()
        return
    with pytest.raises(PlannerStateError, match=message):
        load_state(path, built, now_utc=0.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fresh = SupervisoryPlanner(config, pool, 0.0, state_path=path, now_utc=0.0)
    assert fresh.state == PlannerState()


# -- planner runs ----------------------------------------------------------------


def _means_sample(planner: SupervisoryPlanner) -> None:
    planner.sample(_readings(grid=700.0, net=800.0, battery=100.0, renewable=50.0, soc=60.0))


async def test_run_makes_plan(tmp_path):
    """One run on the example site: a plan from the period's means, the state moved on."""
    config = _enabled_example(tmp_path)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        planner = SupervisoryPlanner(config, pool, 0.0)
        _means_sample(planner)
        plan = await planner.run(1_796_000_040.0, 60.0, (), [], timeout_s=30.0)
    assert planner.plan == plan
    assert planner.planned_utc == 1_796_000_040.0
    assert planner.last_means.net_load_kw == 800.0
    assert planner.state.last_plan == plan
    # Without a day of history the configured 1500 kW cap is the lowest cap the planner
    # sets, and 800 kW of net load needs less.
    assert plan.cap_kw == 1500.0
    assert plan.reason.startswith("initial cap")


async def test_run_check_rejects_plan(tmp_path):
    """A plan that the caller's check rejects is not kept, and the state does not move."""
    config = _enabled_example(tmp_path)

    def reject(plan: Plan) -> None:
        raise ValueError(f"cap {plan.cap_kw} rejected by the test")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        planner = SupervisoryPlanner(config, pool, 0.0)
        _means_sample(planner)
        with pytest.raises(ValueError, match="rejected by the test"):
            await planner.run(1_796_000_040.0, 60.0, (), [], timeout_s=30.0, check=reject)
    assert planner.plan is None
    assert planner.state == PlannerState()


async def test_run_timeout_then_busy(tmp_path):
    """A run that outlasts its timeout raises; the next one is rejected while the thread works."""
    config = _enabled_example(tmp_path)
    release = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        planner = SupervisoryPlanner(config, pool, 0.0)
        # The planner thread is blocked, so the run's step waits behind this job.
        pool.submit(release.wait, 10.0)
        with pytest.raises(TimeoutError, match=r"longer than 0\.2 s"):
            await planner.run(1_796_000_040.0, 60.0, (), [], timeout_s=0.2)
        with pytest.raises(PlannerBusyError, match="still busy"):
            await planner.run(1_796_000_100.0, 120.0, (), [], timeout_s=0.2)
        release.set()
        # The abandoned step runs next on the single thread. Awaiting a no-op queued after
        # it lets the event loop see the step finish.
        await asyncio.wait_for(asyncio.wrap_future(pool.submit(lambda: None)), 10.0)
        await asyncio.sleep(0)
        plan = await planner.run(1_796_000_160.0, 180.0, (), [], timeout_s=30.0)
    assert planner.plan == plan


def test_status_planner_line():
    """``bessgw status`` shows the plan, its headroom and a failing planner's error."""
    planner = {
        "cap_kw": 943.4,
        "soc_band_pct": [20.0, 90.0],
        "reason": "forecast need (forecast need 943 kW)",
        "error": None,
        "failures_in_row": 0,
    }
    line = _planner_line(planner, 12.5)
    assert line == (
        "cap 943.4 kW, SoC band 20-90 %, headroom 12.5 kW: forecast need (forecast need 943 kW)"
    )
    failing = {**planner, "error": "PlanError: input soc_pct=120", "failures_in_row": 3}
    assert _planner_line(failing, None).startswith(
        "FAILING (3 periods): PlanError: input soc_pct=120; cap 943.4 kW"
    )
    assert "headroom unknown" in _planner_line(failing, None)
    empty = {**planner, "cap_kw": None, "soc_band_pct": None, "reason": None}
    assert _planner_line(empty, None) == "no plan yet"
