"""Safety state machine and measurement store of the daemon."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from drivers.quality import Quality, Reading
from gateway.measurements import MeasurementStore
from gateway.states import Conditions, Mode, State, StateMachine

OK = Conditions(mode=Mode.AUTO, loop_healthy=True, devices_answered=True)


def _cond(**changes) -> Conditions:
    fields = {
        "mode": OK.mode,
        "loop_healthy": OK.loop_healthy,
        "devices_answered": OK.devices_answered,
        "fault_causes": (),
        "degraded_causes": (),
    }
    fields.update(changes)
    return Conditions(**fields)


# Each row: the observation fed in, and the state after it. The machine
# makes at most one transition per observation, so init reaches running
# through standby, and fault returns through standby.
SEQUENCE = [
    (_cond(loop_healthy=False, devices_answered=False), State.INIT),
    (_cond(devices_answered=False), State.INIT),
    (OK, State.STANDBY),
    (OK, State.RUNNING),
    (_cond(degraded_causes=("devices down: wind",)), State.DEGRADED),
    (OK, State.RUNNING),
    (_cond(fault_causes=("site faults GRID_STALE",)), State.FAULT),
    (_cond(fault_causes=("site faults GRID_STALE",)), State.FAULT),
    (OK, State.STANDBY),
    (OK, State.RUNNING),
    (_cond(mode=Mode.STANDBY), State.STANDBY),
    (_cond(mode=Mode.MANUAL), State.RUNNING),
    (_cond(loop_healthy=False), State.FAULT),
    (OK, State.STANDBY),
]


def test_state_sequence():
    machine = StateMachine()
    for step, (conditions, expected) in enumerate(SEQUENCE):
        machine.update(conditions)
        assert machine.state is expected, f"step {step}"


def test_state_transition_causes():
    machine = StateMachine()
    machine.update(OK)
    transition = machine.update(_cond(fault_causes=("site faults ESTOP",)))
    assert transition is not None
    assert transition.old is State.STANDBY
    assert transition.new is State.FAULT
    assert transition.cause == "site faults ESTOP"
    assert machine.update(_cond(fault_causes=("site faults ESTOP",))) is None


def test_state_stalled_loop_cause():
    machine = StateMachine()
    machine.update(OK)
    transition = machine.update(_cond(loop_healthy=False, fault_causes=("x",)))
    assert transition.cause == "fast loop stalled, x"


def test_state_fault_during_init():
    machine = StateMachine()
    transition = machine.update(_cond(fault_causes=("every PCS faulted",)))
    assert transition.new is State.FAULT


def test_state_stopping_final():
    machine = StateMachine()
    machine.update(OK)
    transition = machine.stop("SIGTERM")
    assert transition.new is State.STOPPING
    assert machine.stop("again") is None
    assert machine.update(OK) is None
    assert machine.state is State.STOPPING


def test_measurements_stale_and_health():
    """A reading ages to STALE at the device's stale time; a quiet device goes down once."""
    store = MeasurementStore()
    store.add_device("grid", "grid_meter", stale_s=0.5)
    assert store.reading("grid", "p_kw", 0.0).quality is Quality.STALE
    assert store.waiting_for() == ["grid"]

    store.update("grid", {"p_kw": Reading(10.0, Quality.GOOD, 100.0, "kW")}, 100.0)
    store.mark_ok("grid", 100.0)
    assert store.all_answered()
    assert store.reading("grid", "p_kw", 100.4).value == 10.0
    assert store.reading("grid", "p_kw", 100.6).quality is Quality.STALE

    store.check_stale(100.4)
    assert store.health("grid").up
    store.check_stale(100.6)
    assert not store.health("grid").up
    assert store.health("grid").errors == 1
    store.check_stale(100.7)
    assert store.health("grid").errors == 1


def test_measurements_bad_input():
    store = MeasurementStore()
    store.add_device("grid", "grid_meter", stale_s=1.0)
    with pytest.raises(ValueError, match="already"):
        store.add_device("grid", "grid_meter", stale_s=1.0)
    with pytest.raises(ValueError, match="positive"):
        store.add_device("pcs", "pcs", stale_s=0.0)
    with pytest.raises(KeyError, match="known: grid"):
        store.reading("wind", "p_kw", 0.0)


def test_measurements_log_down_only_after_up():
    # A link that is still connecting at start is not an error: the first
    # failure before any good read logs at info, a failure after one at error,
    # and a device that stays down logs nothing more.
    store = MeasurementStore()
    store.add_device("grid", "grid_meter", 0.5)
    with capture_logs() as logs:
        store.mark_error("grid", "link is still connecting", 0.0)
        store.mark_error("grid", "link is still connecting", 0.1)
        store.mark_ok("grid", 0.2)
        store.mark_error("grid", "timed out", 0.3)
        store.mark_error("grid", "timed out", 0.4)
    events = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("device_")]
    assert events == [
        ("device_not_answered_yet", "info"),
        ("device_up", "info"),
        ("device_down", "error"),
    ]
