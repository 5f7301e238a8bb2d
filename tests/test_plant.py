"""Plant physics: PCS response, watchdog revert, trips, battery energy and voltage, heat, meters."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from hil.plant import (
    LFP_OCV_CELL_V,
    Battery,
    BatteryParams,
    Meter,
    PcsBank,
    PcsMode,
    PcsParams,
    Plant,
    meter_batch,
)

DT_S = 0.001
BIG = 1e9  # battery headroom that never limits


def _bank(**changes) -> PcsBank:
    params = {"rated_kw": 500.0, "time_constant_s": 0.03, "dead_time_s": 0.01} | changes
    return PcsBank(PcsParams(**params), units=1, dt_s=DT_S)


def _run(bank: PcsBank, steps: int, start_step: int = 1) -> np.ndarray:
    out = np.empty(steps)
    for k in range(steps):
        out[k] = bank.step((start_step + k) * DT_S, BIG, BIG)[0]
    return out


# --------------------------------------------------------------------------- PCS response


@pytest.mark.parametrize(("tau_s", "dead_s"), [(0.03, 0.01), (0.05, 0.0), (0.1, 0.02), (0.03, 0.1)])
def test_pcs_first_order_step(tau_s, dead_s):
    bank = _bank(time_constant_s=tau_s, dead_time_s=dead_s)
    bank.command(0.0, 100.0)
    p = _run(bank, 1000)
    # p[k] is the output at t = (k + 1) ms.
    dead_steps = round(dead_s / DT_S)
    assert np.all(p[:dead_steps] == 0.0)
    assert p[dead_steps] > 0.0
    at_tau = round((dead_s + tau_s) / DT_S) - 1
    assert p[at_tau] == pytest.approx(100.0 * (1 - math.exp(-1)), rel=1e-9)
    at_3tau = round((dead_s + 3 * tau_s) / DT_S) - 1
    assert p[at_3tau] == pytest.approx(100.0 * (1 - math.exp(-3)), rel=1e-9)


def test_pcs_ramp_limit():
    bank = _bank(time_constant_s=0.0, dead_time_s=0.0, ramp_kw_per_s=200.0)
    bank.command(0.0, 100.0)
    p = _run(bank, 1000)
    # 200 kW/s reaches 100 kW after 0.5 s, rising 0.2 kW per step.
    np.testing.assert_allclose(np.diff(p[:400]), 0.2, rtol=1e-9)
    assert p[498] == pytest.approx(99.8)
    assert p[499] == pytest.approx(100.0)
    assert p[600] == pytest.approx(100.0)


def test_pcs_clamped_to_rating():
    bank = _bank(time_constant_s=0.0, dead_time_s=0.0)
    bank.command(0.0, 2000.0)
    assert _run(bank, 5)[-1] == 500.0
    bank.command(0.005, -2000.0)
    assert _run(bank, 5, start_step=6)[-1] == -500.0


def test_pcs_clamped_to_battery():
    bank = PcsBank(PcsParams(rated_kw=500.0, time_constant_s=0.0, dead_time_s=0.0), 2, DT_S)
    bank.command(0.0, 300.0)
    # 400 kW available to the bank: 200 kW per unit.
    np.testing.assert_array_equal(bank.step(0.001, 400.0, BIG), [200.0, 200.0])
    bank.command(0.001, -300.0)
    np.testing.assert_array_equal(bank.step(0.002, BIG, 100.0), [-50.0, -50.0])


def test_pcs_rejects_nan_command():
    with pytest.raises(ValueError, match="not a finite number"):
        _bank().command(0.0, math.nan)


def test_pcs_unknown_unit_rejected():
    with pytest.raises(IndexError, match="units 0 to 0"):
        _bank().command(0.0, 10.0, unit=1)


# --------------------------------------------------------------------------- watchdog and trips


def test_pcs_reverts_after_silence():
    bank = _bank(revert_s=2.0)
    bank.command(0.0, 100.0)
    assert bank.state.mode[0] == PcsMode.RUNNING
    p = _run(bank, 3000)
    # Still following at 2.000 s, the last moment the command is young enough.
    assert p[1999] == pytest.approx(100.0)
    assert bank.state.mode[0] == PcsMode.REVERTED
    # Reverted at 2.001 s; after dead time and five time constants it is at 0.
    assert abs(p[2001 + 10 + 150]) < 100.0 * math.exp(-5) + 1e-9
    assert p[-1] == pytest.approx(0.0, abs=1e-9)


def test_pcs_heartbeat_keeps_running():
    bank = _bank(revert_s=0.5)
    bank.command(0.0, 100.0)
    for k in range(1, 3001):
        t_s = k * DT_S
        if k % 400 == 0:
            bank.heartbeat(t_s)
        bank.step(t_s, BIG, BIG)
    assert bank.state.mode[0] == PcsMode.RUNNING
    assert bank.state.p_kw[0] == pytest.approx(100.0)


def test_pcs_command_after_revert_resumes():
    bank = _bank(revert_s=0.1, time_constant_s=0.0, dead_time_s=0.0)
    bank.command(0.0, 100.0)
    _run(bank, 200)
    assert bank.state.mode[0] == PcsMode.REVERTED
    bank.command(0.2, 50.0)
    assert bank.step(0.201, BIG, BIG)[0] == 50.0
    assert bank.state.mode[0] == PcsMode.RUNNING


def test_pcs_standby_outputs_revert_kw():
    bank = _bank(time_constant_s=0.0, dead_time_s=0.0, revert_kw=-20.0)
    assert bank.state.mode[0] == PcsMode.STANDBY
    assert _run(bank, 3)[-1] == -20.0


def test_pcs_trip_drops_output_at_once():
    bank = _bank()
    bank.command(0.0, 100.0)
    _run(bank, 500)
    bank.trip("injected trip")
    assert bank.step(0.501, BIG, BIG)[0] == 0.0
    # Commands do not restart a tripped unit.
    bank.command(0.502, 100.0)
    assert np.all(_run(bank, 200, start_step=502) == 0.0)
    assert bank.state.mode[0] == PcsMode.TRIPPED
    assert bank.state.trip_reason[0] == "injected trip"


def test_pcs_reset_needs_new_command():
    bank = _bank(time_constant_s=0.0, dead_time_s=0.0)
    bank.command(0.0, 100.0)
    bank.trip("injected trip")
    _run(bank, 10)
    bank.reset()
    assert bank.state.mode[0] == PcsMode.STANDBY
    assert bank.state.trip_reason[0] == ""
    # The old setpoint is forgotten: a reset unit stays at 0 until commanded.
    assert _run(bank, 10, start_step=11)[-1] == 0.0
    bank.command(0.021, 40.0)
    assert _run(bank, 1, start_step=22)[-1] == 40.0


def test_pcs_trip_one_unit():
    bank = PcsBank(PcsParams(rated_kw=100.0, time_constant_s=0.0, dead_time_s=0.0), 3, DT_S)
    bank.command(0.0, 50.0)
    bank.trip("unit 1 fault", unit=1)
    np.testing.assert_array_equal(bank.step(0.001, BIG, BIG), [50.0, 0.0, 50.0])
    assert bank.state.trip_reason == ["", "unit 1 fault", ""]


@pytest.mark.parametrize(
    "changes",
    [
        {"rated_kw": 0.0},
        {"time_constant_s": -1.0},
        {"efficiency": 1.2},
        {"revert_s": 0.0},
        {"revert_kw": 600.0},
        {"ramp_kw_per_s": 0.0},
    ],
)
def test_pcs_params_invalid_rejected(changes):
    with pytest.raises(ValueError, match="invalid PCS parameters"):
        PcsParams(**({"rated_kw": 500.0} | changes))


# --------------------------------------------------------------------------- battery


def _plant(**battery_changes) -> Plant:
    battery = {"energy_kwh": 100.0, "soc_initial_pct": 50.0} | battery_changes
    pcs = PcsParams(
        rated_kw=100.0, time_constant_s=0.0, dead_time_s=0.0, efficiency=0.98, revert_s=1e6
    )
    return Plant(pcs, BatteryParams(**battery), units=1, dt_s=1.0)


def test_battery_discharge_energy():
    plant = _plant(discharge_efficiency=0.95)
    plant.pcs.command(0.0, 10.0)
    for _ in range(3600):
        plant.step(0.0, 0.0)
    # 10 kWh AC out for 1 h: 10 / 0.98 kWh DC, 10 / 0.98 / 0.95 kWh from storage.
    used_kwh = 50.0 - plant.battery.state.energy_kwh
    assert used_kwh == pytest.approx(10.0 / 0.98 / 0.95, rel=1e-9)
    assert plant.battery.state.soc_pct == pytest.approx(50.0 - used_kwh, rel=1e-9)


def test_battery_charge_energy():
    plant = _plant(charge_efficiency=0.9)
    plant.pcs.command(0.0, -10.0)
    for _ in range(3600):
        plant.step(0.0, 0.0)
    # 10 kWh AC in: 9.8 kWh DC, 8.82 kWh stored.
    assert plant.battery.state.energy_kwh - 50.0 == pytest.approx(10.0 * 0.98 * 0.9, rel=1e-9)


def test_battery_empty_stops_discharge():
    plant = _plant(soc_initial_pct=1.0)
    plant.pcs.command(0.0, 100.0)
    powers = [plant.step(0.0, 0.0).battery_kw for _ in range(100)]
    assert plant.battery.state.soc_pct == pytest.approx(0.0, abs=1e-9)
    assert powers[0] == 100.0
    assert powers[-1] == pytest.approx(0.0, abs=1e-9)
    # Never more energy out than was stored: 1 kWh stored at 0.96 and 0.98 efficiency.
    assert sum(powers) / 3600 == pytest.approx(1.0 * 0.96 * 0.98, rel=1e-6)


def test_battery_full_stops_charge():
    plant = _plant(soc_initial_pct=99.0)
    plant.pcs.command(0.0, -100.0)
    for _ in range(200):
        plant.step(0.0, 0.0)
    assert plant.battery.state.soc_pct == pytest.approx(100.0)
    assert plant.last.battery_kw == pytest.approx(0.0, abs=1e-9)


def test_battery_voltage_from_ocv_curve():
    params = BatteryParams(energy_kwh=10.0, soc_initial_pct=50.0, cells_in_series=16)
    battery = Battery(params)
    # At rest the pack sits at 16 cells x 3.30 V at 50 % SoC.
    assert battery.state.voltage_v == pytest.approx(16 * 3.30)
    assert params.ocv_v(100.0) == pytest.approx(16 * LFP_OCV_CELL_V[-1])
    assert params.ocv_v(0.0) == pytest.approx(16 * LFP_OCV_CELL_V[0])
    battery.step(1.0, 2.0)
    state = battery.state
    resistance = params.pack_resistance_ohm
    # Terminal voltage drops by I R, and V I is the drawn power.
    assert state.current_a > 0
    assert state.voltage_v == pytest.approx(
        params.ocv_v(state.soc_pct) - state.current_a * resistance
    )
    assert state.voltage_v * state.current_a == pytest.approx(2000.0, rel=1e-9)
    battery.step(1.0, -2.0)
    assert battery.state.current_a < 0
    assert battery.state.voltage_v > params.ocv_v(battery.state.soc_pct)


def test_battery_default_resistance():
    params = BatteryParams(energy_kwh=10.0, cells_in_series=16, max_current_a=100.0)
    # 3 % of 52.8 V nominal at 100 A.
    assert params.pack_resistance_ohm == pytest.approx(0.03 * 52.8 / 100.0)


def test_battery_heats_to_steady_state():
    params = BatteryParams(energy_kwh=10.0, cells_in_series=16, max_current_a=100.0)
    battery = Battery(params)
    full_kw = 100.0 * params.nominal_v / 1000.0
    for _ in range(2000):
        battery.step(60.0, full_kw)
        battery.state.energy_kwh = 5.0  # hold SoC so the run can last hours
    # By construction the default cooling keeps the pack 15 K above ambient at full current.
    assert battery.state.temperature_c == pytest.approx(25.0 + 15.0, abs=0.5)


def test_battery_overtemperature_trips_pcs():
    plant = _plant(temperature_initial_c=59.99, cooling_w_per_k=1.0, heat_capacity_j_per_k=100.0)
    plant.pcs.command(0.0, 50.0)
    plant.step(0.0, 0.0)
    assert np.all(plant.pcs.state.mode == PcsMode.TRIPPED)
    assert plant.pcs.state.trip_reason[0] == "battery over-temperature"
    assert plant.step(0.0, 0.0).battery_kw == 0.0


@pytest.mark.parametrize(
    ("soc_pct", "temperature_c", "charge_a", "discharge_a"),
    [
        (50.0, 25.0, 100.0, 100.0),
        (95.0, 25.0, 50.0, 100.0),
        (100.0, 25.0, 0.0, 100.0),
        (5.0, 25.0, 100.0, 50.0),
        (50.0, -5.0, 0.0, 100.0),
        (50.0, 5.0, 50.0, 100.0),
        (50.0, 52.5, 50.0, 50.0),
        (50.0, 60.0, 0.0, 0.0),
    ],
)
def test_bms_limits_derating(soc_pct, temperature_c, charge_a, discharge_a):
    battery = Battery(BatteryParams(energy_kwh=10.0, max_current_a=100.0, cells_in_series=16))
    battery.state.soc_pct = soc_pct
    battery.state.temperature_c = temperature_c
    limits = battery.bms_limits()
    assert limits.charge_current_a == pytest.approx(charge_a)
    assert limits.discharge_current_a == pytest.approx(discharge_a)
    assert limits.charge_voltage_v == pytest.approx(16 * 3.55)
    assert limits.discharge_voltage_v == pytest.approx(16 * 2.80)


@pytest.mark.parametrize(
    "changes",
    [
        {"energy_kwh": 0.0},
        {"soc_initial_pct": 101.0},
        {"charge_efficiency": 0.0},
        {"resistance_ohm": -1.0},
    ],
)
def test_battery_params_invalid_rejected(changes):
    with pytest.raises(ValueError, match="invalid battery parameters"):
        BatteryParams(**({"energy_kwh": 10.0} | changes))


# --------------------------------------------------------------------------- meters


def test_meter_step_response():
    meter = Meter(DT_S, window_s=0.1, update_period_s=0.2)
    samples = np.where(np.arange(1000) >= 150, 100.0, 0.0)
    out = np.array([meter.step(x) for x in samples])
    # Updates at samples 0, 200, 400 ...; held in between.
    assert out[0] == 0.0
    assert np.all(out[:200] == 0.0)
    # At sample 200 the window contains samples 101..200: 51 of them at 100.
    assert out[200] == pytest.approx(51.0)
    assert np.all(out[200:400] == out[200])
    assert out[400] == pytest.approx(100.0)


def test_meter_nan_before_first_update():
    meter = Meter(DT_S, window_s=0.1, update_period_s=0.1, phase_s=0.05)
    out = [meter.step(5.0) for _ in range(60)]
    assert all(math.isnan(v) for v in out[:50])
    assert out[50] == 5.0


def test_meter_batch_equals_stream():
    samples = np.random.default_rng(3).normal(100.0, 20.0, 5000)
    for window_s, update_s, phase_s in [(0.1, 0.1, 0.0), (0.2, 0.1, 0.033), (0.15, 0.25, 0.2)]:
        meter = Meter(DT_S, window_s, update_s, phase_s)
        stream = np.array([meter.step(x) for x in samples])
        batch = meter_batch(samples, DT_S, window_s, update_s, phase_s)
        np.testing.assert_allclose(batch, stream, rtol=1e-12, equal_nan=True)


def test_meter_batch_many_channels():
    samples = np.vstack([np.arange(1000.0), -np.arange(1000.0)])
    out = meter_batch(samples, DT_S, 0.1, 0.1)
    assert out.shape == (2, 1000)
    # Sample 100's window is 1..100, mean 50.5.
    assert out[0, 100] == pytest.approx(50.5)
    assert out[1, 100] == pytest.approx(-50.5)


def test_meter_invalid_timing_rejected():
    with pytest.raises(ValueError, match="invalid meter timing"):
        Meter(DT_S, window_s=0.0, update_period_s=0.1)


# --------------------------------------------------------------------------- plant


def test_plant_grid_balance_signs():
    pcs = PcsParams(rated_kw=100.0, time_constant_s=0.0, dead_time_s=0.0)
    plant = Plant(pcs, BatteryParams(energy_kwh=100.0), units=2, dt_s=DT_S)
    plant.pcs.command(0.0, 30.0)
    sample = plant.step(load_kw=500.0, renewable_kw=120.0)
    # Import = load - renewables - battery discharge = 500 - 120 - 60.
    assert sample.battery_kw == 60.0
    assert sample.grid_kw == 320.0
    plant.pcs.command(0.001, -50.0)
    sample = plant.step(load_kw=100.0, renewable_kw=300.0)
    # Charging adds load: 100 - 300 + 100 = -100 kW, an export.
    assert sample.grid_kw == -100.0
    assert sample.t_s == pytest.approx(0.002)


def test_plant_snapshot_resumes_identically():
    pcs = PcsParams(rated_kw=100.0)
    plant = Plant(pcs, BatteryParams(energy_kwh=10.0), units=2, dt_s=DT_S)
    plant.pcs.command(0.0, 80.0)
    for _ in range(25):
        plant.step(200.0, 10.0)
    snapshot = copy.deepcopy(plant)
    first = [plant.step(200.0, 10.0).grid_kw for _ in range(100)]
    second = [snapshot.step(200.0, 10.0).grid_kw for _ in range(100)]
    assert first == second
    assert snapshot.battery.state == plant.battery.state
