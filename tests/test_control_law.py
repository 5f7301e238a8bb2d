"""The control law, cycle by cycle, through the numpy reference and the C kernel.

Unless a test sets otherwise (see ``make_params``): 100 Hz so dt = 0.01 s,
two 500 kW units, cap 600 kW, floor 0 kW, no smoothing (the target follows
the load), no ramp, slew or deadband in the way, SoC 50 %, BMS limits of
800 V x 1000 A = 800 kW (above the rating). Expected numbers are derived in
the comment above each table.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from control_helpers import IMPLEMENTATIONS, T0_NS, Runner, healthy_inputs, make_params

from gateway.config import load_config
from gateway.control import law
from gateway.control.layout import Fault, Limit, Reaction

EXAMPLE = "systemd/bessgw.example.toml"


@pytest.fixture(params=IMPLEMENTATIONS)
def kind(request):
    return request.param


def run_loads(runner: Runner, loads, **input_changes):
    """Tick once per load value with otherwise healthy inputs; return the records."""
    records = []
    for k, load in enumerate(loads):
        now = T0_NS + k * runner.tick_ns
        site, units = healthy_inputs(runner.n_units, now, load_kw=load, **input_changes)
        records.append(runner.tick(site, units, now))
    return records


def setpoints(record) -> list[float]:
    return [float(x) for x in record["units"]["setpoint_kw"]]


def test_law_cap(kind):
    # target = min(load, 600); demand = load - target; each unit gets
    # demand * 500 / 1000 while demand <= 1000 kW, else 500 and the rest is uncovered.
    table = [
        # load, target, demand, per-unit setpoint, uncovered, CAP bit
        (1000.0, 600.0, 400.0, 200.0, 0.0, False),  # first tick: target starts at clamp(load)
        (1000.0, 600.0, 400.0, 200.0, 0.0, True),
        (1700.0, 600.0, 1100.0, 500.0, 100.0, True),  # 1100 > 1000 kW capability
        (300.0, 300.0, 0.0, 0.0, 0.0, False),  # below the cap: nothing to shave
    ]
    runner = Runner(kind, make_params())
    records = run_loads(runner, [row[0] for row in table])
    for (load, target, demand, sp, uncovered, at_cap), rec in zip(table, records, strict=True):
        assert rec["target_kw"] == target, load
        assert rec["demand_kw"] == demand, load
        assert setpoints(rec) == [sp, sp], load
        assert rec["uncovered_kw"] == uncovered, load
        assert bool(rec["limit_bits"] & Limit.CAP) == at_cap, load
        assert bool(rec["limit_bits"] & Limit.UNCOVERED) == (uncovered != 0), load


def test_law_floor(kind):
    # floor 100 kW: target = max(load, 100); demand = load - 100 is negative,
    # so the units charge demand / 2 each, up to their 500 kW charge capability.
    table = [
        (40.0, 100.0, -60.0, -30.0, 0.0),
        (-200.0, 100.0, -300.0, -150.0, 0.0),  # site exports (wind above load)
        (-1200.0, 100.0, -1300.0, -500.0, -300.0),  # -1300 + 1000 kW cannot be absorbed
    ]
    runner = Runner(kind, make_params(floor_kw=100.0))
    records = run_loads(runner, [row[0] for row in table])
    for (load, target, demand, sp, uncovered), rec in zip(table, records, strict=True):
        assert rec["target_kw"] == target, load
        assert rec["demand_kw"] == demand, load
        assert setpoints(rec) == [sp, sp], load
        assert rec["uncovered_kw"] == uncovered, load
    assert records[1]["limit_bits"] & Limit.FLOOR


def test_law_ramp(kind):
    # 50 kW/s at 100 Hz is 0.5 kW a tick. The load steps from 300 to 400 kW:
    # the target climbs 0.5 kW a tick and the battery covers the rest.
    runner = Runner(kind, make_params(ramp_kw_per_s=50.0))
    records = run_loads(runner, [300.0] + [400.0] * 4)
    expected_targets = [300.0, 300.5, 301.0, 301.5, 302.0]
    for k, (rec, target) in enumerate(zip(records, expected_targets, strict=True)):
        assert rec["target_kw"] == pytest.approx(target, rel=1e-12), k
        assert rec["demand_kw"] == pytest.approx(400.0 - target if k else 0.0, rel=1e-12), k
        assert setpoints(rec) == pytest.approx([(400.0 - target) / 2 if k else 0.0] * 2, rel=1e-12)
    assert all(rec["limit_bits"] & Limit.RAMP for rec in records[1:])


def test_law_smoothing(kind):
    # 1 kHz, tau 1 s: the filter keeps (1 - alpha) = exp(-1 ms / 1 s) of the
    # error each tick, so k ticks after a 100 -> 200 kW step the target is
    # 200 - 100 * exp(-k / 1000) and the battery covers the difference.
    params = make_params(rate_hz=1000.0, smoothing_tau_s=1.0, cap_kw=1000.0)
    runner = Runner(kind, params)
    records = run_loads(runner, [100.0] + [200.0] * 1000)
    for k in (1, 10, 100, 1000):
        target = 200.0 - 100.0 * math.exp(-k / 1000)
        assert records[k]["target_kw"] == pytest.approx(target, rel=1e-9), k
        assert records[k]["demand_kw"] == pytest.approx(200.0 - target, rel=1e-9), k
    # k = 1000 is one time constant: 100 * exp(-1) = 36.79 kW on the battery.
    assert records[1000]["demand_kw"] == pytest.approx(36.787944117144, rel=1e-9)


@pytest.mark.parametrize(
    ("soc_pct", "discharge_cap_kw", "charge_cap_kw"),
    [
        # discharge factor (soc - 5) / (15 - 5), charge factor (97 - soc) / (97 - 90),
        # both clamped to [0, 1], times the 500 kW rating
        (50.0, 500.0, 500.0),
        (15.0, 500.0, 500.0),
        (10.0, 250.0, 500.0),
        (5.0, 0.0, 500.0),  # at the hard limit: no discharge, but no fault either
        (90.0, 500.0, 500.0),
        (93.5, 500.0, 250.0),
        (95.25, 500.0, 125.0),
        (97.0, 500.0, 0.0),
    ],
)
def test_law_soc_derating(kind, soc_pct, discharge_cap_kw, charge_cap_kw):
    runner = Runner(kind, make_params())
    (rec,) = run_loads(runner, [600.0], soc_pct=soc_pct)
    assert rec["units"]["discharge_cap_kw"].tolist() == pytest.approx(
        [discharge_cap_kw] * 2, rel=1e-12
    )
    assert rec["units"]["charge_cap_kw"].tolist() == pytest.approx([charge_cap_kw] * 2, rel=1e-12)
    derated = discharge_cap_kw < 500.0 or charge_cap_kw < 500.0
    assert bool(rec["limit_bits"] & Limit.SOC_DERATE) == derated
    assert rec["active_fault_bits"] == 0


def test_law_bms_limits(kind):
    # Unit 0's BMS allows 250 A discharge and 100 A charge at 800 V: 200 kW and
    # 80 kW, below its 500 kW rating. Unit 1 is limited by its rating.
    runner = Runner(kind, make_params())
    now = T0_NS
    site, units = healthy_inputs(2, now, load_kw=1000.0)
    units["bms_discharge_limit_a"][0] = 250.0
    units["bms_charge_limit_a"][0] = 100.0
    rec = runner.tick(site, units, now)
    # demand 1000 - 600 = 400 kW over 200 + 500 kW: share 4/7.
    assert rec["units"]["discharge_cap_kw"].tolist() == [200.0, 500.0]
    assert setpoints(rec) == pytest.approx([200.0 * 4 / 7, 500.0 * 4 / 7], rel=1e-12)
    assert rec["units"]["limit_bits"][0] & Limit.BMS_LIMIT
    assert not rec["units"]["limit_bits"][1] & Limit.BMS_LIMIT

    # Charging 240 kW over 80 + 500 kW: share 240/580.
    now += runner.tick_ns
    site, units_charge = healthy_inputs(2, now, load_kw=-240.0)
    units_charge["bms_charge_limit_a"][0] = 100.0
    rec = runner.tick(site, units_charge, now)
    assert rec["units"]["charge_cap_kw"].tolist() == [80.0, 500.0]
    assert setpoints(rec) == pytest.approx([-80.0 * 240 / 580, -500.0 * 240 / 580], rel=1e-12)

    # A limit that arrives negative (a BMS sign variant) counts as 0 A, never as more power.
    now += runner.tick_ns
    site, units_negative = healthy_inputs(2, now, load_kw=1000.0)
    units_negative["bms_discharge_limit_a"][0] = -50.0
    rec = runner.tick(site, units_negative, now)
    assert rec["units"]["discharge_cap_kw"].tolist() == [0.0, 500.0]
    assert setpoints(rec) == pytest.approx([0.0, 400.0], rel=1e-12)


def test_law_allocation(kind):
    # Ratings 100 and 300 kW: each unit gets the same fraction of its capability.
    runner = Runner(kind, make_params(rated_kw=np.array([100.0, 300.0]), cap_kw=1000.0))
    table = [
        # load, demand, setpoints, uncovered
        (1200.0, 200.0, [50.0, 150.0], 0.0),  # share 200 / 400
        (1400.0, 400.0, [100.0, 300.0], 0.0),  # share exactly 1
        (1600.0, 600.0, [100.0, 300.0], 200.0),  # 200 kW beyond 400 kW capability
    ]
    records = run_loads(runner, [row[0] for row in table])
    for (load, demand, sps, uncovered), rec in zip(table, records, strict=True):
        assert rec["demand_kw"] == demand, load
        assert setpoints(rec) == sps, load
        assert rec["uncovered_kw"] == uncovered, load


def test_law_deadband(kind):
    # Deadband 5 kW on one unit: the published setpoint moves only by 5 kW or
    # more, except to exactly 0, which is always published.
    runner = Runner(kind, make_params(n_units=1, deadband_kw=5.0))
    table = [
        # load, internal demand, published setpoint, held by the deadband
        (600.0, 0.0, 0.0, False),
        (603.0, 3.0, 0.0, True),  # |3 - 0| < 5
        (606.0, 6.0, 6.0, False),  # |6 - 0| >= 5
        (609.0, 9.0, 6.0, True),  # |9 - 6| < 5
        (600.0, 0.0, 0.0, False),  # exactly 0 is always written
    ]
    records = run_loads(runner, [row[0] for row in table])
    for (load, demand, out, held), rec in zip(table, records, strict=True):
        assert rec["demand_kw"] == demand, load
        assert setpoints(rec) == [out], load
        assert bool(rec["units"]["limit_bits"][0] & Limit.DEADBAND) == held, load


def test_law_deadband_limit_shrink(kind):
    # Deadband 20 kW. The published 50 kW lies outside a new 45 kW BMS limit
    # (800 V x 56.25 A), so it follows although the change is only 5 kW.
    runner = Runner(kind, make_params(n_units=1, deadband_kw=20.0))
    (first,) = run_loads(runner, [650.0])
    assert setpoints(first) == [50.0]
    now = T0_NS + runner.tick_ns
    site, units = healthy_inputs(1, now, load_kw=650.0, discharge_a=56.25)
    rec = runner.tick(site, units, now)
    assert setpoints(rec) == [45.0]
    assert rec["uncovered_kw"] == 5.0


def test_law_slew(kind):
    # Slew 12.5 kW/s at 100 Hz: 0.125 kW a tick toward the 1 kW allocation of
    # each unit, reached after 8 ticks.
    runner = Runner(kind, make_params(unit_slew_kw_per_s=12.5))
    records = run_loads(runner, [602.0] * 10)
    for k, rec in enumerate(records):
        expected = min(0.125 * (k + 1), 1.0)
        assert setpoints(rec) == [expected, expected], k
        assert bool(rec["limit_bits"] & Limit.SLEW) == (k < 7), k


def test_law_recharge(kind):
    # Recharge 50 kW while the mean SoC is below 15 %, until it reaches 15 + 5 %.
    runner = Runner(kind, make_params(recharge_kw=50.0, recharge_hysteresis_pct=5.0))
    table = [
        # load, soc, target, per-unit setpoint, recharging
        (100.0, 12.0, 100.0, 0.0, True),  # first tick: the target starts at the load
        (100.0, 12.0, 150.0, -25.0, True),  # target = load + 50, the battery charges 50
        (580.0, 12.0, 600.0, -10.0, True),  # only 20 kW of headroom under the 600 kW cap
        (580.0, 19.9, 600.0, -10.0, True),  # inside the hysteresis
        (580.0, 20.0, 580.0, 0.0, False),  # reached 15 + 5 %: recharge stops
        (580.0, 14.0, 600.0, -10.0, True),  # below 15 % again
    ]
    records = []
    for k, (load, soc, *_rest) in enumerate(table):
        now = T0_NS + k * runner.tick_ns
        site, units = healthy_inputs(2, now, load_kw=load, soc_pct=soc)
        records.append(runner.tick(site, units, now))
    for (load, soc, target, sp, recharging), rec in zip(table, records, strict=True):
        assert rec["target_kw"] == target, (load, soc)
        assert setpoints(rec) == [sp, sp], (load, soc)
        assert bool(rec["limit_bits"] & Limit.RECHARGE) == recharging, (load, soc)


STALE_MS = 500


@pytest.mark.parametrize(
    ("field", "value", "fault"),
    [
        ("grid_quality", 3, Fault.GRID_STALE),  # COMM_ERROR
        ("grid_t_ns", T0_NS - STALE_MS * 1_000_000 - 1, Fault.GRID_STALE),  # 1 ns past the limit
        ("grid_t_ns", T0_NS + 10_000_001, Fault.GRID_STALE),  # more than a period in the future
        ("grid_kw", float("nan"), Fault.GRID_STALE),
        ("load_quality", 1, Fault.LOAD_STALE),  # NOT_IMPLEMENTED
        ("load_kw", float("inf"), Fault.LOAD_STALE),
        ("bms_quality", 4, Fault.BMS_SILENT),  # OUT_OF_RANGE
        ("soc_pct", float("nan"), Fault.BMS_SILENT),
        ("bms_t_ns", T0_NS - 5_000_000_001, Fault.BMS_SILENT),
        ("pcs_quality", 2, Fault.PCS_LOST),
        ("pcs_p_kw", float("nan"), Fault.PCS_LOST),
    ],
)
def test_law_rejects_bad_input(kind, field, value, fault):
    runner = Runner(kind, make_params())
    site, units = healthy_inputs(2, T0_NS, load_kw=700.0)
    if field in site.dtype.names:
        site[field] = value
    else:
        units[field][0] = value
    rec = runner.tick(site, units, T0_NS)
    assert rec["active_fault_bits"] == fault


@pytest.mark.parametrize(
    "t_ns",
    # exactly at the age limit, and one period in the future
    [T0_NS - STALE_MS * 1_000_000, T0_NS + 10_000_000],
)
def test_law_accepts_edge_ages(kind, t_ns):
    runner = Runner(kind, make_params())
    site, units = healthy_inputs(2, T0_NS, load_kw=700.0)
    site["grid_t_ns"] = t_ns
    rec = runner.tick(site, units, T0_NS)
    assert rec["active_fault_bits"] == 0


def test_law_params_from_config():
    config = load_config(EXAMPLE)
    params = law.LawParams.from_config(config)
    assert params.n_units == 1
    assert params.rated_kw.tolist() == [500.0]
    assert params.cap_kw == 1500.0
    assert params.pcs_stale_ms == 300.0  # the PCS polls every 100 ms: 3 periods
    derived = params.derived
    assert derived.period_ns == 1_000_000
    assert derived.breach_ticks == 500  # 500 ms at 1 kHz
    assert derived.reaction[Fault.PCS_FAULT.bit_length() - 1] == Reaction.DISABLE
    assert derived.reaction[Fault.LOAD_STALE.bit_length() - 1] == Reaction.RAMP_TO_ZERO
    with pytest.raises(ValueError, match="n_units is 3 but the configuration has 1 PCS"):
        law.LawParams.from_config(config, n_units=3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cap_kw": 100.0, "floor_kw": 100.0}, "floor_kw"),
        ({"soc_soft_min_pct": 4.0}, "SoC band"),
        ({"rate_hz": 50.0}, "rate_hz"),
        ({"rated_kw": np.array([500.0, 0.0])}, "rated_kw"),
        ({"ramp_kw_per_s": 0.0}, "ramp_kw_per_s"),
        ({"reactions": {"on_meter_gone": Reaction.HOLD}}, "unknown reaction keys"),
    ],
)
def test_law_params_invalid(changes, message):
    with pytest.raises(ValueError, match=message):
        make_params(**changes)


def test_law_sweep_matches_single_runs():
    # Three caps in one vectorised call give the same results as three runs.
    caps = np.array([500.0, 600.0, 800.0])
    sweep = make_params(cap_kw=caps, ramp_kw_per_s=50.0)
    state = law.LawState.initial(2, (3,))
    singles = [make_params(cap_kw=float(c), ramp_kw_per_s=50.0) for c in caps]
    single_states = [law.LawState.initial(2) for _ in caps]
    for k, load in enumerate([700.0, 900.0, 900.0, 300.0]):
        now = T0_NS + k * sweep.derived.period_ns
        site, units = healthy_inputs(2, now, load_kw=load)
        state, result = law.step(sweep, state, site, units, now)
        for i, params in enumerate(singles):
            single_states[i], single = law.step(params, single_states[i], site, units, now)
            assert result.target_kw[i] == single.target_kw
            assert result.setpoint_kw[i].tolist() == single.setpoint_kw.tolist()
            assert result.uncovered_kw[i] == single.uncovered_kw
