"""Safety interlocks: each fault's reaction, its timing in ticks, latching and reset.

Both implementations run every case. Set-up, unless a test sets otherwise:
100 Hz (10 ms ticks), two 500 kW units, cap 600 kW, load 800 kW, so each
unit discharges 100 kW before the fault. ``ramp_to_zero`` runs at 100 kW/s,
1 kW a tick. Inputs are fresh up to tick 4; a test changes them from tick 5.
"""

from __future__ import annotations

import pytest
from control_helpers import IMPLEMENTATIONS, T0_NS, Runner, healthy_inputs, make_params

from gateway.control.layout import Fault, Reaction, empty_inputs

TICK_NS = 10_000_000
FAULT_TICK = 5


@pytest.fixture(params=IMPLEMENTATIONS)
def kind(request):
    return request.param


def run(runner: Runner, n_ticks: int, change=None, reset_at: tuple[int, ...] = ()):
    """Tick n_ticks times; ``change(k, site, units)`` edits the inputs of tick k."""
    records = []
    for k in range(n_ticks):
        now = T0_NS + k * TICK_NS
        site, units = healthy_inputs(2, now, load_kw=800.0)
        if change is not None:
            change(k, site, units)
        if k in reset_at:
            runner.reset_faults()
        records.append(runner.tick(site, units, now))
    return records


def sp(record, unit: int) -> float:
    return float(record["units"]["setpoint_kw"][unit])


def freeze_after(k: int, array, field: str, index=None) -> None:
    """Keep the receive time of tick 4 from tick 5 on: the reading stops arriving."""
    if k >= FAULT_TICK:
        if index is None:
            array[field] = T0_NS + (FAULT_TICK - 1) * TICK_NS
        else:
            array[field][index] = T0_NS + (FAULT_TICK - 1) * TICK_NS


def test_interlock_meter_stale_ramp(kind):
    # The load's last receive time is tick 4 (40 ms). The limit is 500 ms, so
    # tick 54 (age 500 ms) still uses it and tick 55 (age 510 ms) is stale:
    # the ramp starts on that same tick, 1 kW a tick, and reaches 0 at tick 154.
    runner = Runner(kind, make_params())
    records = run(runner, 160, lambda k, site, units: freeze_after(k, site, "load_t_ns"))
    assert records[54]["fault_bits"] == 0
    assert sp(records[54], 0) == 100.0
    assert records[55]["fault_bits"] == Fault.LOAD_STALE
    assert records[55]["units"]["reaction"].tolist() == [Reaction.RAMP_TO_ZERO] * 2
    assert sp(records[55], 0) == pytest.approx(99.0, rel=1e-12)
    assert sp(records[56], 0) == pytest.approx(98.0, rel=1e-12)
    assert sp(records[153], 0) == pytest.approx(1.0, abs=1e-9)
    assert sp(records[154], 0) == 0.0
    assert records[154]["units"]["enabled"].tolist() == [1, 1]


@pytest.mark.parametrize(
    ("reaction", "sp_at_fault", "enabled"),
    [("hold", 100.0, 1), ("ramp_to_zero", 99.0, 1), ("disable", 0.0, 0)],
)
def test_interlock_grid_stale_reactions(kind, reaction, sp_at_fault, enabled):
    params = make_params(reactions={"on_meter_stale": Reaction[reaction.upper()]})
    runner = Runner(kind, params)
    records = run(runner, 70, lambda k, site, units: freeze_after(k, site, "grid_t_ns"))
    assert records[54]["fault_bits"] == 0
    assert records[55]["fault_bits"] == Fault.GRID_STALE
    assert sp(records[55], 1) == pytest.approx(sp_at_fault, rel=1e-12)
    assert records[55]["units"]["enabled"].tolist() == [enabled] * 2
    if reaction == "hold":
        assert sp(records[69], 1) == 100.0


def test_interlock_bms_silent_one_unit(kind):
    # Unit 0's BMS stops at tick 4; 5000 ms later, at tick 505, it is silent.
    # Only unit 0 ramps; unit 1 takes the whole 200 kW demand on that tick.
    runner = Runner(kind, make_params())
    records = run(runner, 507, lambda k, site, units: freeze_after(k, units, "bms_t_ns", 0))
    assert records[504]["fault_bits"] == 0
    assert records[505]["units"]["fault_bits"].tolist() == [Fault.BMS_SILENT, 0]
    assert records[505]["units"]["reaction"].tolist() == [Reaction.RAMP_TO_ZERO, Reaction.NONE]
    assert sp(records[505], 0) == pytest.approx(99.0, rel=1e-12)
    assert sp(records[505], 1) == 200.0


def test_interlock_bms_protection(kind):
    def protect(k, site, units):
        if k >= FAULT_TICK:
            units["bms_protection"][1] = 1

    records = run(Runner(kind, make_params()), 7, protect)
    assert records[4]["fault_bits"] == 0
    assert records[5]["units"]["fault_bits"].tolist() == [0, Fault.BMS_PROTECTION]
    assert sp(records[5], 1) == pytest.approx(99.0, rel=1e-12)


@pytest.mark.parametrize("soc_pct", [4.9, 97.1])
def test_interlock_soc_hard_limit(kind, soc_pct):
    def soc(k, site, units):
        if k >= FAULT_TICK:
            units["soc_pct"][0] = soc_pct

    records = run(Runner(kind, make_params()), 7, soc)
    assert records[4]["fault_bits"] == 0
    assert records[5]["units"]["fault_bits"].tolist() == [Fault.SOC_HARD, 0]
    assert sp(records[5], 0) == pytest.approx(99.0, rel=1e-12)


def test_interlock_limit_breach(kind):
    # breach_ms 30 at 100 Hz = 3 ticks. Unit 0 measures 520 kW > 500 + 10 kW
    # from tick 5: counts 1, 2, 3 at ticks 5, 6, 7, so the fault latches at tick 7.
    # A dip to 505 kW at tick 11 restarts the count; 12, 13, 14 latch it again.
    def overdrive(k, site, units):
        if k >= FAULT_TICK:
            units["pcs_p_kw"][0] = 505.0 if k == 11 else 520.0

    runner = Runner(kind, make_params())
    records = run(runner, 16, overdrive, reset_at=(9,))
    assert records[6]["fault_bits"] == 0
    assert records[7]["fault_bits"] == Fault.LIMIT_BREACH
    assert sp(records[7], 0) == pytest.approx(99.0, rel=1e-12)
    # The reset at tick 9 finds the breach still active, so the fault stays.
    assert records[9]["fault_bits"] == Fault.LIMIT_BREACH
    assert records[11]["active_fault_bits"] == 0
    assert records[13]["active_fault_bits"] == 0
    assert records[14]["active_fault_bits"] == Fault.LIMIT_BREACH


def test_interlock_breach_count_restarts(kind):
    def overdrive(k, site, units):
        if k >= FAULT_TICK:
            units["pcs_p_kw"][1] = -505.0 if k == 7 else -520.0  # charging beyond 500 kW

    records = run(Runner(kind, make_params()), 12, overdrive)
    assert records[6]["fault_bits"] == 0  # counts 1, 2
    assert records[9]["fault_bits"] == 0  # reset at 7, then 1, 2
    assert records[10]["fault_bits"] == Fault.LIMIT_BREACH  # 3


def test_interlock_pcs_fault_disables(kind):
    # A PCS fault disables its unit on the same tick; the other unit takes the demand.
    def fault(k, site, units):
        if k >= FAULT_TICK:
            units["pcs_fault"][0] = 1

    records = run(Runner(kind, make_params()), 7, fault)
    assert records[5]["units"]["fault_bits"].tolist() == [Fault.PCS_FAULT, 0]
    assert records[5]["units"]["enabled"].tolist() == [0, 1]
    assert sp(records[5], 0) == 0.0
    assert sp(records[5], 1) == 200.0


def test_interlock_pcs_lost(kind):
    runner = Runner(kind, make_params())
    records = run(runner, 57, lambda k, site, units: freeze_after(k, units, "pcs_t_ns", 1))
    assert records[54]["fault_bits"] == 0
    assert records[55]["units"]["fault_bits"].tolist() == [0, Fault.PCS_LOST]
    assert records[55]["units"]["enabled"].tolist() == [1, 0]


def test_interlock_estop_latch_and_reset(kind):
    # E-stop pressed at ticks 5-9. It disables both units at once and stays
    # latched after release. A reset at tick 8 (still pressed) changes
    # nothing. The reset at tick 12 clears it, and the units return at once
    # because slew is unlimited here.
    def estop(k, site, units):
        site["estop"] = 1 if FAULT_TICK <= k < 10 else 0

    runner = Runner(kind, make_params())
    records = run(runner, 14, estop, reset_at=(8, 12))
    assert records[4]["fault_bits"] == 0
    assert records[5]["fault_bits"] == Fault.ESTOP
    assert [sp(records[5], 0), sp(records[5], 1)] == [0.0, 0.0]
    assert records[5]["units"]["enabled"].tolist() == [0, 0]
    assert records[8]["fault_bits"] == Fault.ESTOP
    assert records[11]["fault_bits"] == Fault.ESTOP
    assert records[11]["active_fault_bits"] == 0
    assert records[12]["fault_bits"] == 0
    assert [sp(records[12], 0), sp(records[12], 1)] == [100.0, 100.0]
    assert records[12]["units"]["enabled"].tolist() == [1, 1]


def test_interlock_strongest_reaction(kind):
    # Load stale (ramp_to_zero) and e-stop (disable) together: disable wins.
    def both(k, site, units):
        freeze_after(k, site, "load_t_ns")
        site["estop"] = 1 if k >= 55 else 0

    records = run(Runner(kind, make_params()), 56, both)
    assert records[55]["fault_bits"] == Fault.LOAD_STALE | Fault.ESTOP
    assert records[55]["units"]["reaction"].tolist() == [Reaction.DISABLE] * 2


def test_interlock_inputs_start_stale(kind):
    # Before the first inputs arrive every reading is STALE: the site faults
    # latch on tick 0 and only a reset after good inputs clears them.
    runner = Runner(kind, make_params())
    first = runner.tick(*empty_inputs(runner.n_units), T0_NS)
    assert first["fault_bits"] & Fault.LOAD_STALE
    assert first["units"]["enabled"].tolist() == [0, 0]
    records = run(runner, 3, reset_at=(2,))
    assert records[1]["fault_bits"] & Fault.LOAD_STALE
    assert records[2]["fault_bits"] == 0
