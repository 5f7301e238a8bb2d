"""The supervisory planner: billing cap terms, demand response, job hints, SoC band, draining."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import structlog

from gateway.forecast import Forecast, ForecastConfig, Forecaster, HintBook, JobHint
from gateway.plan.battery import BatterySpec
from gateway.plan.events import EventBook, EventError, add_event, parse_event
from gateway.plan.planner import (
    PlannerConfig,
    PlannerInputs,
    PlannerState,
    plan_step,
    seed_history,
)

T0 = 1_738_540_800.0  # 2025-02-03T00:00:00Z, a Monday, on a 15-minute boundary
HORIZONS = (900.0, 1800.0, 2700.0, 3600.0)


def _config(**changes) -> PlannerConfig:
    values = {
        "battery": BatterySpec(energy_kwh=100.0, discharge_kw=1000.0, charge_kw=1000.0),
        "initial_cap_kw": 800.0,
        "fallback_hold_s": 0.0,
        "self_consumption": False,
    }
    values.update(changes)
    return PlannerConfig(**values)


def _forecast(load_kw, upper_kw=None, t=T0) -> Forecast:
    """A forecast with the given median per horizon and upper quantile (default: the median)."""
    point = np.asarray(load_kw, dtype=float)
    upper = point if upper_kw is None else np.asarray(upper_kw, dtype=float)
    values = np.stack([point, point, upper])
    return Forecast(t, HORIZONS, (0.1, 0.5, 0.9), values, float(point[0]), "regression")


def _inputs(now=T0, net=500.0, soc=100.0, **changes) -> PlannerInputs:
    values = {
        "now_utc": now,
        "period_s": 60.0,
        "grid_kw": net,
        "net_load_kw": net,
        "battery_kw": 0.0,
        "soc_pct": soc,
    }
    values.update(changes)
    return PlannerInputs(**values)


def test_plan_cold_start_uses_initial_cap():
    plan, state = plan_step(_config(), PlannerState(), _inputs())
    assert plan.cap_kw == 800.0
    assert plan.billing_cap_kw == 800.0
    assert plan.reason.startswith("initial cap")
    assert state.last_plan == plan


def test_plan_forecast_need_raises_cap():
    # Upper forecast 1500 kW for the hour and 100 kWh above the reserve: the battery covers
    # (1500 - C) kW for 1 h, so C = 1500 - 100 = 1400 kW.
    inputs = _inputs(load_forecast=_forecast([1500.0] * 4))
    plan, _ = plan_step(_config(), PlannerState(), inputs)
    assert plan.reason.startswith("forecast need")
    assert plan.billing_cap_kw == pytest.approx(1400.0, abs=0.6)


def test_plan_billing_peak_ratchet():
    config = _config()
    state = PlannerState()
    # 15 minutes at 950 kW of grid import, then the next minute closes the interval.
    for minute in range(1, 16):
        _, state = plan_step(config, state, _inputs(now=T0 + 60 * minute, net=950.0))
    plan, state = plan_step(config, state, _inputs(now=T0 + 60 * 16, net=300.0))
    assert state.billing_peak_kw == pytest.approx(950.0)
    assert plan.billing_cap_kw == pytest.approx(950.0)
    assert plan.reason.startswith("billing peak so far")


def test_plan_billing_month_resets_peak():
    config = _config()
    state = PlannerState(billing_month=(2025, 1), billing_peak_kw=1200.0)
    plan, state = plan_step(config, state, _inputs(now=T0 + 60))
    assert state.billing_month == (2025, 2)
    assert state.billing_peak_kw == 0.0
    assert plan.billing_cap_kw == 800.0


def test_plan_history_optimum():
    # One day of history: flat 500 kW with one hour at 1000 kW. 100 kWh shave that hour
    # to 900 kW, so the history optimum is 900 kW.
    history = np.full(96, 500.0)
    history[40:44] = 1000.0
    config = _config(history_floor=True)
    state = seed_history(config, PlannerState(), history, last_index=int(T0 // 900) - 1)
    plan, state = plan_step(config, state, _inputs(now=T0 + 60))
    assert state.prior_cap_kw == pytest.approx(900.0, abs=0.6)
    assert plan.billing_cap_kw == pytest.approx(900.0, abs=0.6)


def _state_with_history(config, now, history):
    """State one minute into an interval, whose history ends with the interval before it."""
    last_index = int(now // 900) - 1
    state = seed_history(config, PlannerState(), np.asarray(history), last_index=last_index)
    return replace(state, prior_cap_kw=config.initial_cap_kw, prior_at_utc=now)


def test_plan_need_from_past_days():
    """Each past day is a scenario; the need is the chosen quantile of their caps."""
    # Yesterday ran at 1000 kW from 10:00 to 12:00, else 500 kW; the day before at 500 kW
    # all day, and so did today until now (09:01). Today matches both days (no anomaly),
    # and the forecast hour is quiet. One more interval in front lets the oldest day's
    # anomaly compare 08:45 with 08:45.
    busy = np.full(96, 500.0)
    busy[40:48] = 1000.0
    history = np.concatenate([[500.0], np.full(96, 500.0), busy, np.full(36, 500.0)])
    now = T0 + 9 * 3600.0 + 60.0
    inputs = _inputs(now=now, load_forecast=_forecast([500.0] * 4, t=now))
    needs = {}
    for quantile in (0.0, 1.0):
        config = _config(initial_cap_kw=400.0, need_quantile=quantile)
        plan, _ = plan_step(config, _state_with_history(config, now, history), inputs)
        assert plan.reason.startswith("forecast need")
        needs[quantile] = plan.billing_cap_kw
    # Yesterday's scenario: 100 kWh over the 2 h at 1000 kW holds 950 kW.
    assert needs[1.0] == pytest.approx(950.0, abs=0.6)
    # The quiet day's: 100 kWh spread over the outlook's 24 h at 500 kW: 500 - 100 / 24 kW.
    assert needs[0.0] == pytest.approx(500.0 - 100.0 / 24.0, abs=0.6)


def test_plan_need_adds_anomaly():
    """A day running above its past days shifts their scenarios by the difference."""
    busy = np.full(96, 500.0)
    busy[40:48] = 1000.0
    # Today's last interval (08:45) ran at 700 kW against yesterday's 500 kW: an anomaly
    # of +200 kW, which a very long time constant keeps for the whole outlook.
    history = np.concatenate([busy, np.full(35, 500.0), [700.0]])
    now = T0 + 9 * 3600.0 + 60.0
    config = _config(initial_cap_kw=400.0, anomaly_tau_s=1e12)
    inputs = _inputs(now=now, net=700.0, load_forecast=_forecast([700.0] * 4, t=now))
    plan, _ = plan_step(config, _state_with_history(config, now, history), inputs)
    # The scenario: 1200 kW for 2 h, 700 kW otherwise; 100 kWh over 2 h holds 1150 kW.
    assert plan.billing_cap_kw == pytest.approx(1150.0, abs=0.6)

    # With the default 4-h time constant, interval j of the day (0 = the current one) carries
    # 200 * exp(-(j + 1) / 16) kW of it. The block is intervals 4 to 11, so the cap C solves
    # sum((1000 + 200 * exp(-(j + 1) / 16) - C) * 0.25 h) = 100 kWh over them.
    expected = (sum(1000.0 + 200.0 * math.exp(-(j + 1) / 16) for j in range(4, 12)) - 400.0) / 8
    faded, _ = plan_step(
        _config(initial_cap_kw=400.0), _state_with_history(config, now, history), inputs
    )
    assert faded.billing_cap_kw == pytest.approx(expected, abs=0.6)


def test_plan_drain_keeps_busiest_day_energy():
    """An expensive-hour drain leaves what the most demanding past day would need."""
    prices = [0.1] * 24
    prices[2] = 0.05
    prices[18] = 0.3
    # Yesterday ran at 1100 kW from 20:00 to 22:00, else 500 kW; the day before at 500 kW.
    busy = np.full(96, 500.0)
    busy[80:88] = 1100.0
    history = np.concatenate([[500.0], np.full(96, 500.0), busy, np.full(72, 500.0)])
    now = T0 + 18 * 3600.0 + 60.0
    inputs = _inputs(now=now, soc=50.0, load_forecast=_forecast([500.0] * 4, t=now))

    caps = {}
    for quantile in (0.0, 1.0):
        config = _config(
            battery=BatterySpec(1000.0, 500.0, 500.0),
            initial_cap_kw=400.0,
            energy_price_per_kwh=prices,
            energy_quantile=quantile,
        )
        state = _state_with_history(config, now, history)
        state = replace(state, billing_month=(2025, 2), billing_peak_kw=900.0)
        plan, _ = plan_step(config, state, inputs)
        assert plan.billing_cap_kw == 900.0
        assert plan.reason.startswith("expensive hour")
        caps[quantile] = plan.cap_kw
    # The busy day needs (1100 - 900) kW for 2 h = 400 kWh at the 900 kW billing cap (no
    # recharge configured). 500 kWh are stored, so 100 kWh may go in the 1-h drain time:
    # the cap drops 100 kW below the 500 kW load.
    assert caps[1.0] == pytest.approx(400.0)
    # Planning for the quiet day alone, all 500 kWh would go at the PCS's 500 kW.
    assert caps[0.0] == pytest.approx(1.0)


def test_plan_demand_response_event():
    """An active event lowers the cap to its baseline minus the reduction."""
    config = _config()
    history = np.full(96, 700.0)
    state = seed_history(config, PlannerState(), history, last_index=int(T0 // 900) - 1)
    book = EventBook()
    event = add_event(
        book, {"event_id": "dr1", "start_utc": T0, "end_utc": T0 + 7200, "reduce_kw": 200.0}
    )
    plan, state = plan_step(config, state, _inputs(now=T0 + 60, net=700.0, events=(event,)))
    # Baseline: mean net load of the last hour of history, 700 kW; 700 - 200 = 500 kW.
    assert plan.cap_kw == pytest.approx(500.0)
    assert plan.reason.startswith("demand response dr1")
    assert state.dr_baselines == {"dr1": 700.0}
    # While the load is above the event's cap the band drops to the reserve, so the
    # battery is not derated.
    assert plan.soc_target_band[0] == 0.0

    # The baseline stays fixed for the event even when the history moves on.
    plan, state = plan_step(config, state, _inputs(now=T0 + 120, net=900.0, events=(event,)))
    assert plan.cap_kw == pytest.approx(500.0)


def test_plan_upcoming_event_charges_ahead():
    """An event in the next hours raises the band's lower edge to charge its energy ahead."""
    config = _config(battery=BatterySpec(1000.0, 500.0, 500.0), initial_cap_kw=900.0)
    quiet, _ = plan_step(config, PlannerState(), _inputs(net=300.0, soc=30.0))
    event = parse_event(
        {"event_id": "dr2", "start_utc": T0 + 3600, "end_utc": T0 + 5400, "reduce_kw": 400.0}
    )
    ahead, _ = plan_step(config, PlannerState(), _inputs(net=300.0, soc=30.0, events=(event,)))
    # 400 kW for 0.5 h = 200 kWh of 1000 kWh: the lower edge rises by 20 points.
    assert quiet.soc_target_band[0] == 0.0
    assert ahead.soc_target_band[0] == pytest.approx(20.0)
    assert ahead.cap_kw == quiet.cap_kw


def test_plan_job_hint_lowers_headroom():
    """A hinted job start lowers the headroom published to the scheduler by its power."""
    # A battery without power, so the headroom is the cap minus the upper forecast.
    config = _config(battery=BatterySpec(100.0, 0.0, 1000.0), initial_cap_kw=1000.0)
    book = HintBook()
    forecaster = Forecaster(ForecastConfig(name="load", scale_kw=1000.0, use_hints=True), book)
    quiet = forecaster.update(T0, 500.0)
    plan_quiet, _ = plan_step(config, PlannerState(), _inputs(load_forecast=quiet))

    book.add(JobHint("train-7", T0 + 60 + 1200, math.inf, 32, 300.0))
    hinted = forecaster.update(T0 + 60, 500.0)
    plan_hinted, _ = plan_step(config, PlannerState(), _inputs(now=T0 + 60, load_forecast=hinted))
    # Unfitted model: persistence plus the hint, upper = +100 kW at 1 h (10 % of scale).
    assert plan_quiet.headroom_kw == pytest.approx(1000.0 - 600.0, abs=1.0)
    assert plan_hinted.headroom_kw == pytest.approx(1000.0 - 900.0, abs=1.0)


def test_plan_surplus_first():
    """Renewable surplus expected within the hour lowers the recharge target."""
    config = _config(battery=BatterySpec(1000.0, 500.0, 500.0), initial_cap_kw=900.0)
    load = _forecast([500.0, 1100.0, 1100.0, 1100.0])
    wind_none = _forecast([0.0] * 4)
    windy = _forecast([0.0, 1300.0, 1300.0, 0.0])
    calm, _ = plan_step(
        config,
        PlannerState(),
        _inputs(net=300.0, soc=30.0, load_forecast=load, renewable_forecast=wind_none),
    )
    breezy, _ = plan_step(
        config,
        PlannerState(),
        _inputs(net=300.0, soc=30.0, load_forecast=load, renewable_forecast=windy),
    )
    # Calm: 3 intervals at 1100 kW need (1100 - 900) kW * 0.75 h = 150 kWh, 15 % of 1000 kWh.
    assert calm.soc_target_band[0] == pytest.approx(15.0, abs=0.1)
    # Breezy: 1 interval at 1100 kW needs 50 kWh, and 2 intervals of 200 kW surplus bring
    # 100 kWh, so nothing is recharged from the grid.
    assert breezy.soc_target_band[0] == pytest.approx(0.0, abs=0.1)


def test_plan_drains_for_expected_surplus():
    config = _config(
        battery=BatterySpec(1000.0, 500.0, 500.0), initial_cap_kw=900.0, self_consumption=True
    )
    windy = _forecast([1000.0] * 4)
    load = _forecast([400.0] * 4)
    inputs = _inputs(net=400.0, soc=90.0, load_forecast=load, renewable_forecast=windy)
    plan, _ = plan_step(config, PlannerState(), inputs)
    # Surplus 600 kW for 1 h = 600 kWh; room at 90 % is 100 kWh, so 500 kWh must go. Over
    # the 1-h drain time that is 500 kW, the PCS maximum: the cap drops to 400 - 500 < 0,
    # clamped to the floor plus 1 kW.
    assert plan.reason.startswith("self-consumption")
    assert plan.cap_kw == pytest.approx(1.0)
    assert plan.billing_cap_kw == 900.0


def test_plan_time_of_use():
    prices = [0.1] * 24
    prices[2] = 0.05
    prices[18] = 0.3
    config = _config(
        battery=BatterySpec(1000.0, 500.0, 500.0), initial_cap_kw=900.0, energy_price_per_kwh=prices
    )
    cheap, _ = plan_step(config, PlannerState(), _inputs(now=T0 + 2 * 3600 + 60, soc=50.0))
    assert cheap.soc_target_band == (95.0, 100.0)
    assert "time-of-use charge" in cheap.reason
    dear, _ = plan_step(config, PlannerState(), _inputs(now=T0 + 18 * 3600 + 60, soc=50.0))
    # 500 kWh stored and none needed: 500 kW drained, the cap falls below the 500 kW load.
    assert dear.reason.startswith("expensive hour")
    assert dear.cap_kw == pytest.approx(1.0)


def test_plan_cycle_budget_stops_draining():
    prices = [0.1] * 24
    prices[18] = 0.3
    config = _config(
        battery=BatterySpec(1000.0, 500.0, 500.0),
        initial_cap_kw=900.0,
        energy_price_per_kwh=prices,
        daily_cycle_budget=0.5,
    )
    state = PlannerState(day=int((T0 + 18 * 3600) // 86400), discharged_kwh_today=500.0)
    plan, _ = plan_step(config, state, _inputs(now=T0 + 18 * 3600 + 60, soc=50.0))
    assert plan.cap_kw == 900.0
    assert "daily cycle budget used" in plan.reason


def test_plan_soc_unavailable_holds_last_cap():
    config = _config()
    plan, state = plan_step(config, PlannerState(), _inputs(load_forecast=_forecast([1500.0] * 4)))
    held, _ = plan_step(config, state, _inputs(now=T0 + 60, soc=None))
    assert held.billing_cap_kw == plan.billing_cap_kw
    assert "SoC unavailable" in held.reason
    nan, _ = plan_step(config, state, _inputs(now=T0 + 60, soc=float("nan")))
    assert nan.billing_cap_kw == plan.billing_cap_kw


def test_plan_logs_changes_only():
    config = _config()
    state = PlannerState()
    with structlog.testing.capture_logs() as logs:
        for minute in range(5):
            _, state = plan_step(config, state, _inputs(now=T0 + 60 * minute))
        _, state = plan_step(
            config, state, _inputs(now=T0 + 300, load_forecast=_forecast([1500.0] * 4))
        )
    changes = [e for e in logs if e["event"] == "plan_changed"]
    assert len(changes) == 2
    assert changes[1]["reason"].startswith("forecast need")


def test_planner_config_rejects():
    with pytest.raises(ValueError, match="24"):
        _config(energy_price_per_kwh=(0.1, 0.2))
    with pytest.raises(ValueError, match="initial_cap_kw=0"):
        _config(initial_cap_kw=0.0)


def test_event_parse_rejects():
    good = {"event_id": "e", "start_utc": T0, "end_utc": T0 + 600, "reduce_kw": 50.0}
    for change, message in [
        ({"reduce_kw": 0.0}, "reduce_kw=0.0 must be > 0"),
        ({"end_utc": T0}, "must be in"),
        ({"end_utc": T0 + 2 * 86400}, "must be in"),
        ({"start_utc": "soon"}, "must be a number"),
        ({"extra": 1}, "unknown field"),
        ({"event_id": None}, "missing"),
    ]:
        with pytest.raises(EventError, match=message):
            parse_event(good | change)
    book = EventBook()
    add_event(book, good)
    add_event(book, good | {"reduce_kw": 80.0})
    assert len(book) == 1
    assert book.relevant(T0 - 3600, 7200)[0].reduce_kw == 80.0
    assert book.prune(T0 + 600) == 1
