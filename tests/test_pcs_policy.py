"""SetpointPolicy cycle by cycle: deadband, write rate, refresh, heartbeat, budget and fault latch.

Each table row is one cycle: the time, the request, the write the policy must
decide (``None`` = no write) and the read-back the test feeds back. The
comment on each row derives the expected write from the settings below.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from drivers.pcs_policy import Decision, PolicySettings, SetpointPolicy

# Rated 100 kW, deadband 1 kW, at most one attempt per 0.2 s per target.
# The read-back must match within 0.5 kW, and 3 failures in a row latch the
# fault. An unchanged setpoint is rewritten 1 s after its last verified write.
SETTINGS = PolicySettings(
    rated_kw=100.0,
    deadband_kw=1.0,
    min_write_interval_s=0.2,
    readback_tolerance_kw=0.5,
    write_budget=3,
    refresh_interval_s=1.0,
)

ECHO = "echo"  # the read-back equals the commanded value


def _run(policy: SetpointPolicy, rows: list[tuple[float, float, float | None, object]]) -> None:
    for now_s, request_kw, expected_kw, readback in rows:
        decision = policy.decide(now_s, request_kw)
        assert decision.p_kw == expected_kw, f"t={now_s} request={request_kw}"
        if decision.p_kw is not None:
            value = decision.p_kw if readback == ECHO else readback
            policy.record_setpoint("p", now_s, decision.p_kw, value)


def test_policy_deadband_rate_refresh():
    policy = SetpointPolicy(SETTINGS)
    rows = [
        (0.0, 10.0, 10.0, ECHO),   # nothing verified yet: write
        (0.1, 20.0, None, ECHO),   # 0.1 s after the last attempt < 0.2 s: rate limit
        (0.2, 20.0, 20.0, ECHO),   # |20 - 10| = 10 > 1 and 0.2 s passed
        (0.3, 20.5, None, ECHO),   # rate limit (0.1 s)
        (0.4, 20.5, None, ECHO),   # |20.5 - 20| = 0.5 <= 1: inside the deadband
        (0.5, 21.0, None, ECHO),   # |21 - 20| = 1.0 is not beyond the deadband
        (0.6, 21.01, 21.01, ECHO),  # |21.01 - 20| = 1.01 > 1
        (0.8, 0.4, 0.4, ECHO),     # |0.4 - 21.01| > 1
        (1.0, 0.0, 0.0, ECHO),     # 0.4 -> 0 is inside the deadband, but 0 is always written
        (1.2, 0.0, None, ECHO),    # unchanged, 0.2 s since the verified write < 1 s refresh
        (1.99, 0.0, None, ECHO),   # 0.99 s < 1 s refresh
        (2.0, 0.0, 0.0, ECHO),     # 1.0 s since the verified write at 1.0 s: refresh
        (2.2, 500.0, 100.0, ECHO),  # clamped to +rated_kw
        (2.4, -500.0, -100.0, ECHO),  # clamped to -rated_kw
        (2.6, math.nan, 0.0, ECHO),  # a NaN request commands 0 kW
        (2.8, math.inf, None, ECHO),  # +inf also commands 0 kW, and 0 kW is verified already
    ]
    _run(policy, rows)
    assert policy.verified("p") == 0.0
    assert policy.total_failures == 0
    assert not policy.faulted


def test_policy_readback_mismatch_latches():
    policy = SetpointPolicy(SETTINGS)
    rows = [
        (0.0, 50.0, 50.0, 0.0),    # read back 0 kW: |50 - 0| > 0.5, failure 1 of 3
        (0.1, 50.0, None, None),   # a retry is due but the rate limit delays it
        (0.2, 50.0, 50.0, None),   # retry; the read-back failed: failure 2
        (0.4, 50.0, 50.0, 40.0),   # retry; |50 - 40| > 0.5: failure 3 latches the fault
        (0.6, 50.0, None, None),   # faulted: nothing is written
        (5.0, 0.0, None, None),    # still faulted, even for 0 kW and after the refresh time
    ]
    _run(policy, rows)
    assert policy.faulted
    assert policy.fault is not None
    assert policy.fault.target == "p"
    assert policy.fault.t_mono_s == 0.4
    assert "commanded 50, read back 40" in policy.fault.detail
    assert policy.total_failures == 3
    assert policy.verified("p") is None


def test_policy_tolerance_boundary():
    policy = SetpointPolicy(SETTINGS)
    assert policy.record_setpoint("p", 0.0, 50.0, 50.5)  # |0.5| <= 0.5 is applied
    assert not policy.record_setpoint("p", 0.2, 50.0, 50.51)  # 0.51 > 0.5 is not
    assert not policy.record_setpoint("p", 0.4, 50.0, math.nan)  # NaN read-back never matches
    assert policy.failures_in_row("p") == 2


def test_policy_success_resets_budget():
    policy = SetpointPolicy(SETTINGS)
    # fail, fail, succeed, fail, fail: never 3 in a row, so no fault.
    for now_s, readback in [(0.0, None), (0.2, None), (0.4, 30.0), (0.6, None), (0.8, None)]:
        policy.record_setpoint("p", now_s, 30.0, readback)
    assert not policy.faulted
    assert policy.failures_in_row("p") == 2
    assert policy.total_failures == 4


def test_policy_retry_writes_new_request():
    policy = SetpointPolicy(SETTINGS)
    assert policy.decide(0.0, 10.0).p_kw == 10.0
    policy.record_setpoint("p", 0.0, 10.0, None)
    # The retry carries the request of its own cycle, not the failed value.
    assert policy.decide(0.2, 10.3).p_kw == 10.3


def test_policy_budget_of_one():
    policy = SetpointPolicy(replace(SETTINGS, write_budget=1))
    assert policy.decide(0.0, 5.0).p_kw == 5.0
    fault = policy.record_result("p", 0.0, False, "timed out")
    assert fault is not None
    assert fault.detail == "1 failed writes in a row: timed out"
    assert policy.decide(0.2, 5.0) == Decision()


def test_policy_reset_clears_fault():
    policy = SetpointPolicy(SETTINGS)
    for now_s in (0.0, 0.2, 0.4):
        policy.record_setpoint("p", now_s, 20.0, None)
    assert policy.faulted
    policy.reset()
    assert not policy.faulted
    # History is gone too: the next cycle writes at once, without waiting for the rate limit.
    assert policy.decide(0.41, 20.0).p_kw == 20.0


def test_policy_heartbeat_sequence():
    policy = SetpointPolicy(replace(SETTINGS, heartbeat_period_s=0.5))
    # (now, expected counter, does the write succeed)
    rows = [
        (0.0, 1, True),      # first cycle: write 0 + 1
        (0.2, None, True),   # 0.2 s since the attempt < 0.5 s period
        (0.5, 2, True),      # 0.5 s since 0.0
        (1.0, 3, False),     # due; this write fails, the counter stays at 2
        (1.1, None, True),   # retry waits for the 0.2 s rate limit
        (1.2, 3, True),      # retry of 3 (not 4): the PCS never saw 3
        (1.6, None, True),   # 0.4 s since 1.2
        (1.7, 4, True),      # 0.5 s since 1.2
    ]
    for now_s, expected, ok in rows:
        decision = policy.decide(now_s, 0.0)
        assert decision.heartbeat == expected, f"t={now_s}"
        if decision.heartbeat is not None:
            policy.record_heartbeat(now_s, decision.heartbeat, ok, "timed out")
    assert policy.heartbeat_value == 4
    assert not policy.faulted


def test_policy_heartbeat_wraps():
    policy = SetpointPolicy(replace(SETTINGS, heartbeat_period_s=1.0, heartbeat_modulo=3))
    values = []
    for cycle in range(5):
        now_s = float(cycle)
        value = policy.decide(now_s, 0.0).heartbeat
        assert value is not None
        policy.record_heartbeat(now_s, value, True)
        values.append(value)
    assert values == [1, 2, 0, 1, 2]


def test_policy_heartbeat_failures_latch():
    policy = SetpointPolicy(replace(SETTINGS, heartbeat_period_s=0.5))
    # The setpoint keeps succeeding; the heartbeat fails 3 times in a row.
    for now_s in (0.0, 0.2, 0.4):
        decision = policy.decide(now_s, 10.0 * (now_s + 1))
        if decision.p_kw is not None:
            policy.record_setpoint("p", now_s, decision.p_kw, decision.p_kw)
        assert decision.heartbeat is not None
        policy.record_heartbeat(now_s, decision.heartbeat, False, "exception 0x02")
    assert policy.fault is not None
    assert policy.fault.target == "heartbeat"
    assert policy.failures_in_row("p") == 0


def test_policy_reactive_power():
    policy = SetpointPolicy(replace(SETTINGS, rated_kvar=40.0))
    decision = policy.decide(0.0, 10.0, q_kvar=60.0)
    assert decision.q_kvar == 40.0  # clamped to rated_kvar
    policy.record_setpoint("q", 0.0, 40.0, 40.0)
    assert policy.decide(0.2, 10.0, q_kvar=40.9).q_kvar is None  # inside the deadband
    # Without a Q rating the request is ignored.
    assert SetpointPolicy(SETTINGS).decide(0.0, 10.0, q_kvar=5.0).q_kvar is None


def test_policy_settings_rejected():
    # replace() runs __post_init__ again, so each bad field raises.
    with pytest.raises(ValueError, match="refresh_interval_s"):
        replace(SETTINGS, refresh_interval_s=0.2)
    with pytest.raises(ValueError, match="heartbeat_period_s"):
        replace(SETTINGS, heartbeat_period_s=0.1)
    with pytest.raises(ValueError, match="write_budget"):
        replace(SETTINGS, write_budget=0)
    with pytest.raises(ValueError, match="rated_kw"):
        replace(SETTINGS, rated_kw=math.nan)
    with pytest.raises(ValueError, match="deadband_kw"):
        replace(SETTINGS, deadband_kw=-1.0)
    with pytest.raises(ValueError, match="setpoint target"):
        SetpointPolicy(SETTINGS).record_setpoint("heartbeat", 0.0, 1.0, 1.0)
