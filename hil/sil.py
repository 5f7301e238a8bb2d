"""Software-in-the-loop replay: a scenario through the control law and the plant model, no sockets.

Each tick of the law's rate runs the same tick as the daemon's fast loop
(the C kernel in its deterministic ``step`` mode, or the numpy reference
when the extension is not built) against :class:`hil.plant.Plant`. The
devices' timing is modelled instead of served over sockets:

- meters publish the mean of their window at their update period, each
  with its own phase (as :class:`hil.plant.Meter` does);
- the PCS read-back is the unit's output sampled at the meter period;
- BMS values arrive once a second, as a Pylontech-style BMS sends them;
- a setpoint reaches the PCS one tick after the law computed it, and the
  PCS model adds its own dead time and time constant.

The replay runs many times faster than real time, so it can score days of
data; on the default scenario its results and the HIL rig's agree within
the tolerance the report states.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gateway.control import law
from gateway.control.layout import empty_inputs
from gateway.control.loop import load_extension
from gateway.control.predictor import PeriodicPredictor, PredictorParams
from hil import plant as plant_model
from hil.evaluate import Capture
from hil.scenario import Scenario
from hil.site import SiteTraces, build_traces

GOOD = 0  # drivers.quality.Quality.GOOD
BMS_PERIOD_S = 1.0
#: The daemon's input cycle: how often it writes the fast loop's inputs.
INPUT_PERIOD_S = 0.01
#: How long the HIL rig keeps the traces' first values while the daemon starts, before run
#: time 0 (READY and the switch to running took 5.3 s in one `make demo`). The daemon's
#: predictor receives that flat stretch first, so the replay feeds it the same.
WARMUP_HOLD_S = 5.0


@dataclass
class SilResult:
    capture: Capture
    #: Per-tick grid target and demand the battery could not cover, in kW.
    target_kw: np.ndarray
    uncovered_kw: np.ndarray
    #: Feed-forward blend gain per tick, 0 when off.
    feedforward_gain: np.ndarray
    kernel: str
    wall_s: float


def law_params(scenario: Scenario) -> law.LawParams:
    """Build the fast-loop parameters that the generated gateway configuration gives."""
    units = scenario.pcs.units
    return law.LawParams(
        rated_kw=np.full(units, scenario.pcs.rated_kw),
        cap_kw=scenario.control.grid_cap_kw,
        floor_kw=scenario.control.grid_floor_kw,
        ramp_kw_per_s=scenario.control.ramp_limit_kw_per_s,
        smoothing_tau_s=scenario.control.smoothing_tau_s,
        unit_slew_kw_per_s=np.full(units, 100_000.0),
        deadband_kw=1.0,
    )


def battery_params(scenario: Scenario) -> plant_model.BatteryParams:
    b = scenario.battery
    return plant_model.BatteryParams(
        energy_kwh=b.energy_kwh,
        soc_initial_pct=b.soc_initial_pct,
        charge_efficiency=b.charge_efficiency,
        discharge_efficiency=b.discharge_efficiency,
        cells_in_series=b.cells_in_series,
        max_current_a=b.max_current_a,
    )


def pcs_params(scenario: Scenario) -> plant_model.PcsParams:
    p = scenario.pcs
    return plant_model.PcsParams(
        rated_kw=p.rated_kw,
        time_constant_s=p.time_constant_ms / 1000.0,
        dead_time_s=p.dead_time_ms / 1000.0,
        ramp_kw_per_s=p.ramp_kw_per_s,
        revert_s=p.revert_s,
    )


def _stepper(params: law.LawParams, use_c: bool) -> tuple[Callable, Callable, str]:
    """Return ``tick``, ``reset`` and the kernel's name.

    ``tick(site, units, now_ns)`` returns (setpoints, target, uncovered,
    latched fault bits, active fault bits); ``reset()`` is the operator's
    fault reset, taken by the next tick.
    """
    extension = load_extension() if use_c else None
    if extension is not None:
        from gateway.control.loop import FastLoop  # noqa: PLC0415 - needs the extension

        loop = FastLoop(None, params=params)

        def tick_c(site: np.ndarray, units: np.ndarray, now_ns: int):
            loop.write_inputs(site, units)
            record = loop.step(now_ns)
            return (
                record["units"]["setpoint_kw"],
                record["target_kw"],
                record["uncovered_kw"],
                int(record["fault_bits"]),
                int(record["active_fault_bits"]),
            )

        return tick_c, loop.reset_faults, "c"

    state = law.LawState.initial(params.n_units)
    resets = 0

    def reset_numpy() -> None:
        nonlocal resets
        resets += 1

    def tick_numpy(site: np.ndarray, units: np.ndarray, now_ns: int):
        nonlocal state
        site["reset_count"] = resets
        state, result = law.step(params, state, site, units, now_ns)
        return (
            result.setpoint_kw,
            result.target_kw,
            result.uncovered_kw,
            int(result.fault_bits),
            int(result.active_fault_bits),
        )

    return tick_numpy, reset_numpy, "numpy"


def run_sil(
    scenario: Scenario, *, use_c: bool = True, traces: SiteTraces | None = None
) -> SilResult:
    """Replay ``scenario`` at its plant step; return the captured plant signals."""
    started = time.perf_counter()
    params = law_params(scenario)
    dt_s = 1.0 / params.rate_hz
    traces = traces if traces is not None else build_traces(scenario, dt_s)
    n = traces.samples
    units_n = scenario.pcs.units
    rng = np.random.default_rng(scenario.run.seed)

    # Load-side meters do not depend on the battery, so they are computed for the whole run.
    update_s = scenario.meters.update_ms / 1000.0
    window_s = scenario.meters.window_ms / 1000.0
    phases = rng.uniform(0.0, update_s, traces.racks_kw.shape[0] + 2)
    measured_racks = np.empty_like(traces.racks_kw)
    for rack in range(measured_racks.shape[0]):
        measured_racks[rack] = plant_model.meter_batch(
            traces.racks_kw[rack], dt_s, window_s, update_s, phases[rack]
        )
    measured_facility = plant_model.meter_batch(
        traces.facility_kw, dt_s, window_s, update_s, phases[-2]
    )
    measured_wind = plant_model.meter_batch(traces.wind_kw, dt_s, window_s, update_s, phases[-1])
    measured_load = measured_racks.sum(axis=0) + measured_facility - measured_wind

    site_plant = plant_model.Plant(pcs_params(scenario), battery_params(scenario), units_n, dt_s)
    grid_meter = plant_model.Meter(dt_s, window_s, update_s, float(rng.uniform(0.0, update_s)))
    tick, reset_faults, kernel = _stepper(params, use_c)

    site, units = empty_inputs(units_n)
    load_kw = traces.load_kw
    grid = np.empty(n)
    battery = np.empty(n)
    soc = np.empty(n)
    current = np.empty(n)
    charge_limit = np.empty(n)
    discharge_limit = np.empty(n)
    target = np.empty(n)
    uncovered = np.empty(n)
    meter_steps = max(round(update_s / dt_s), 1)
    bms_steps = max(round(BMS_PERIOD_S / dt_s), 1)
    setpoints = np.zeros(units_n)
    limits = site_plant.battery.bms_limits()
    started_running = False
    input_steps = max(round(INPUT_PERIOD_S / dt_s), 1)
    predictor = (
        PeriodicPredictor(
            PredictorParams(
                sample_period_s=input_steps * dt_s,
                lead_s=scenario.control.feedforward_lead_ms / 1000.0,
            )
        )
        if scenario.control.feedforward
        else None
    )
    gain = np.zeros(n)
    if predictor is not None:
        held_kw = float(traces.racks_kw[:, 0].sum() + traces.facility_kw[0] - traces.wind_kw[0])
        for _ in range(round(WARMUP_HOLD_S / INPUT_PERIOD_S)):
            predictor.update(held_kw)

    for i in range(n):
        t_s = i * dt_s
        now_ns = i * round(dt_s * 1e9)
        for unit in range(units_n):
            site_plant.pcs.command(t_s, float(setpoints[unit]), unit)
        sample = site_plant.step(float(load_kw[i]), float(traces.wind_kw[i]))
        state = site_plant.battery.state
        grid_value = grid_meter.step(sample.grid_kw)

        if np.isfinite(grid_value):
            site["grid_kw"] = grid_value
            site["grid_t_ns"] = now_ns
            site["grid_quality"] = GOOD
        if i % input_steps == 0 and np.isfinite(measured_load[i]):
            load_input = measured_load[i]
            if predictor is not None:
                load_input = predictor.update(float(measured_load[i]))
            site["load_kw"] = load_input
            site["load_t_ns"] = now_ns
            site["load_quality"] = GOOD
        gain[i] = predictor.gain if predictor is not None else 0.0
        if i % meter_steps == 0:
            units["pcs_p_kw"] = site_plant.pcs.state.p_kw
            units["pcs_t_ns"] = now_ns
            units["pcs_quality"] = GOOD
        if i % bms_steps == 0:
            limits = site_plant.battery.bms_limits()
            units["soc_pct"] = state.soc_pct
            units["bms_voltage_v"] = state.voltage_v
            units["bms_charge_limit_a"] = limits.charge_current_a / units_n
            units["bms_discharge_limit_a"] = limits.discharge_current_a / units_n
            units["bms_t_ns"] = now_ns
            units["bms_quality"] = GOOD

        unit_setpoints, target[i], uncovered[i], latched, active = tick(site, units, now_ns)
        if not started_running and latched and not active:
            # Start-up: every input is stale until its first update, so the
            # interlocks latch. The daemon resets them once on entering
            # running with every input good; later faults stay latched.
            reset_faults()
            started_running = True
        setpoints = np.array(unit_setpoints, dtype=float)

        grid[i] = sample.grid_kw
        battery[i] = sample.battery_kw
        soc[i] = state.soc_pct
        current[i] = state.current_a
        charge_limit[i] = limits.charge_current_a
        discharge_limit[i] = limits.discharge_current_a

    capture = Capture(
        dt_s=dt_s,
        load_kw=load_kw,
        renewable_kw=traces.wind_kw,
        grid_kw=grid,
        battery_kw=battery,
        soc_pct=soc,
        current_a=current,
        charge_limit_a=charge_limit,
        discharge_limit_a=discharge_limit,
    )
    return SilResult(capture, target, uncovered, gain, kernel, time.perf_counter() - started)
