"""When to write a PCS setpoint, and when a PCS counts as faulted.

:class:`SetpointPolicy` holds no I/O and reads no clock: every call takes a
monotonic ``now_s``, so a test can drive it cycle by cycle. The PCS driver in
:mod:`drivers.pcs` calls :meth:`SetpointPolicy.decide` in each cycle, performs
the writes and read-backs, and records each result in the policy.

A cycle looks like this::

    decision = policy.decide(now_s, p_kw, q_kvar)
    if decision.p_kw is not None:       # write, read back, then:
        policy.record_setpoint("p", now_s, decision.p_kw, readback_kw)
    if decision.heartbeat is not None:  # write the counter, then:
        policy.record_result("heartbeat", now_s, ok)

Rules, in the order :meth:`SetpointPolicy.decide` applies them per setpoint:

1. Nothing is written while the policy is faulted.
2. No write is attempted sooner than ``min_write_interval_s`` after the
   previous attempt on the same setpoint; retries obey this limit too.
3. A write is due when no value has been verified yet, when the last attempt
   failed (retry), when the request is exactly 0 and the verified value is
   not (so a small residue inside the deadband never stays on the PCS), when
   the request differs from the verified value by more than the deadband, or
   when ``refresh_interval_s`` has passed since the last verified write (so
   the PCS's reversion timer never expires while the gateway is alive).

A write is verified when the read-back lies within ``readback_tolerance`` of
the commanded value. Each write target (``"p"``, ``"q"``, ``"heartbeat"``,
``"enable"``, ``"revert_timer"`` and so on) counts its failures in a row
separately, and a success resets that target's count. When any target
reaches ``write_budget`` failures in a row the fault latches, and only
:meth:`SetpointPolicy.reset` clears it. Separate counts stop a healthy
heartbeat from hiding a setpoint that never takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Write targets whose values are setpoints with a deadband.
SETPOINT_TARGETS = ("p", "q")

#: Slack on interval comparisons, so that 1.0 - 0.8 counts as 0.2 s although
#: floating-point subtraction gives 0.19999999999999996.
_TIME_SLACK_S = 1e-9


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Limits of one PCS unit, validated when built. Powers in kW, reactive power in kvar."""

    #: Largest magnitude of active power commanded; larger requests are clamped.
    rated_kw: float
    #: Changes of the request no larger than this (kW or kvar) are not written.
    deadband_kw: float
    #: Shortest time between two write attempts on one setpoint.
    min_write_interval_s: float
    #: Largest difference between commanded and read-back value that counts as applied.
    readback_tolerance_kw: float
    #: Failures in a row on one target that latch the fault.
    write_budget: int
    #: Rewrite an unchanged setpoint this often; ``None`` when the PCS has no reversion timer.
    refresh_interval_s: float | None = None
    #: Period of the heartbeat counter write; ``None`` when the PCS has no heartbeat.
    heartbeat_period_s: float | None = None
    #: The heartbeat counter counts 1, 2, ... ``heartbeat_modulo - 1``, 0, 1, ...
    heartbeat_modulo: int = 65536
    #: Largest magnitude of reactive power commanded; ``None`` when the PCS has no Q setpoint.
    rated_kvar: float | None = None

    def __post_init__(self) -> None:
        positive = {
            "rated_kw": self.rated_kw,
            "min_write_interval_s": self.min_write_interval_s,
            "readback_tolerance_kw": self.readback_tolerance_kw,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"PCS policy: {name} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.deadband_kw) and self.deadband_kw >= 0):
            raise ValueError(f"PCS policy: deadband_kw must be >= 0, got {self.deadband_kw!r}")
        if self.write_budget < 1:
            raise ValueError(f"PCS policy: write_budget must be >= 1, got {self.write_budget!r}")
        if self.heartbeat_modulo < 2:
            raise ValueError(
                f"PCS policy: heartbeat_modulo must be >= 2, got {self.heartbeat_modulo!r}"
            )
        if self.rated_kvar is not None and not (
            math.isfinite(self.rated_kvar) and self.rated_kvar > 0
        ):
            raise ValueError(f"PCS policy: rated_kvar must be > 0, got {self.rated_kvar!r}")
        for name in ("refresh_interval_s", "heartbeat_period_s"):
            period_s = getattr(self, name)
            if period_s is not None and not (
                math.isfinite(period_s) and period_s > self.min_write_interval_s
            ):
                raise ValueError(
                    f"PCS policy: {name} ({period_s!r}) must be longer than "
                    f"min_write_interval_s ({self.min_write_interval_s}), or the rate limit "
                    "would hold back the write that keeps the PCS alive"
                )


@dataclass(frozen=True, slots=True)
class Decision:
    """Writes due in one cycle; ``None`` means no write."""

    p_kw: float | None = None
    q_kvar: float | None = None
    heartbeat: int | None = None


@dataclass(slots=True)
class _TargetState:
    last_attempt_s: float | None = None
    last_ok_s: float | None = None
    #: Last value read back within tolerance of its command (setpoints only).
    verified: float | None = None
    failures_in_row: int = 0


@dataclass(frozen=True, slots=True)
class Fault:
    """A latched PCS fault: which target failed, when, and the last failure's detail."""

    target: str
    t_mono_s: float
    detail: str


@dataclass(slots=True)
class SetpointPolicy:
    """Deadband, write rate, retry budget and fault latch of one PCS unit."""

    settings: PolicySettings
    _targets: dict[str, _TargetState] = field(default_factory=dict)
    _heartbeat_value: int = 0
    _fault: Fault | None = None
    #: Failed attempts on every target since start; never reset.
    total_failures: int = 0

    @property
    def fault(self) -> Fault | None:
        return self._fault

    @property
    def faulted(self) -> bool:
        return self._fault is not None

    @property
    def heartbeat_value(self) -> int:
        """Last heartbeat value the PCS accepted (0 before the first)."""
        return self._heartbeat_value

    def failures_in_row(self, target: str) -> int:
        return self._state(target).failures_in_row

    def verified(self, target: str) -> float | None:
        """Return the last value of a setpoint target that was read back within tolerance."""
        return self._state(target).verified

    def last_ok_s(self, target: str) -> float | None:
        return self._state(target).last_ok_s

    def decide(self, now_s: float, p_kw: float, q_kvar: float | None = None) -> Decision:
        """Return the writes due at ``now_s`` for the requested setpoints.

        A request above the rating is clamped to it. A NaN or infinite request
        becomes 0, because a broken upstream value must stop the battery rather
        than reach the PCS. ``q_kvar`` is ignored when the PCS has no Q setpoint.
        """
        if self._fault is not None:
            return Decision()
        settings = self.settings
        p_target = _clamp(p_kw, settings.rated_kw)
        p_write = p_target if self._setpoint_due("p", now_s, p_target) else None

        q_write = None
        if q_kvar is not None and settings.rated_kvar is not None:
            q_target = _clamp(q_kvar, settings.rated_kvar)
            q_write = q_target if self._setpoint_due("q", now_s, q_target) else None

        heartbeat = None
        if settings.heartbeat_period_s is not None and self._heartbeat_due(now_s):
            heartbeat = (self._heartbeat_value + 1) % settings.heartbeat_modulo
        return Decision(p_write, q_write, heartbeat)

    def record_setpoint(
        self,
        target: str,
        now_s: float,
        commanded: float,
        readback: float | None,
        error: str = "",
    ) -> bool:
        """Record a setpoint write and its read-back; return whether it was verified.

        ``readback`` is ``None`` when the write or the read-back failed, and
        ``error`` then gives the reason, which becomes the fault's detail.
        """
        if target not in SETPOINT_TARGETS:
            raise ValueError(
                f"not a setpoint target: {target!r}; expected one of {SETPOINT_TARGETS}"
            )
        tolerance = self.settings.readback_tolerance_kw
        ok = (
            readback is not None
            and math.isfinite(readback)
            and abs(readback - commanded) <= tolerance
        )
        if ok:
            detail = ""
        elif readback is None:
            detail = error or f"write of {commanded:g} failed or was not read back"
        else:
            detail = (
                f"commanded {commanded:g}, read back {readback:g}, "
                f"difference beyond the tolerance of {tolerance:g}"
            )
        self.record_result(target, now_s, ok, detail)
        if ok:
            self._state(target).verified = commanded
        return ok

    def record_result(self, target: str, now_s: float, ok: bool, detail: str = "") -> Fault | None:
        """Record one write attempt on ``target``; return the fault if this attempt latched it."""
        state = self._state(target)
        state.last_attempt_s = now_s
        if ok:
            state.last_ok_s = now_s
            state.failures_in_row = 0
            return None
        self.total_failures += 1
        state.failures_in_row += 1
        if self._fault is None and state.failures_in_row >= self.settings.write_budget:
            self._fault = Fault(
                target,
                now_s,
                f"{state.failures_in_row} failed writes in a row: {detail or 'no detail'}",
            )
            return self._fault
        return None

    def record_heartbeat(self, now_s: float, value: int, ok: bool, detail: str = "") -> None:
        """Record a heartbeat write; the counter advances only when the PCS accepted it."""
        if ok:
            self._heartbeat_value = value
        self.record_result("heartbeat", now_s, ok, detail)

    def reset(self) -> None:
        """Clear the fault and every target's history, so the next cycle rewrites every setpoint.

        This is the operator reset. The caller must program the PCS again
        (reversion timer, enable) before it commands power.
        """
        self._fault = None
        self._targets.clear()

    def _state(self, target: str) -> _TargetState:
        state = self._targets.get(target)
        if state is None:
            state = self._targets[target] = _TargetState()
        return state

    def _rate_allows(self, state: _TargetState, now_s: float) -> bool:
        return (
            state.last_attempt_s is None
            or now_s - state.last_attempt_s >= self.settings.min_write_interval_s - _TIME_SLACK_S
        )

    def _setpoint_due(self, target: str, now_s: float, value: float) -> bool:
        state = self._state(target)
        if not self._rate_allows(state, now_s):
            return False
        if state.verified is None or state.failures_in_row > 0:
            return True
        if value == 0.0 and state.verified != 0.0:
            return True
        if abs(value - state.verified) > self.settings.deadband_kw:
            return True
        refresh_s = self.settings.refresh_interval_s
        return (
            refresh_s is not None
            and state.last_ok_s is not None
            and now_s - state.last_ok_s >= refresh_s - _TIME_SLACK_S
        )

    def _heartbeat_due(self, now_s: float) -> bool:
        state = self._state("heartbeat")
        if state.last_attempt_s is None:
            return True
        if state.failures_in_row > 0:
            return self._rate_allows(state, now_s)
        period_s = self.settings.heartbeat_period_s
        return period_s is not None and now_s - state.last_attempt_s >= period_s - _TIME_SLACK_S


def _clamp(value: float, limit: float) -> float:
    if not math.isfinite(value):
        return 0.0
    return max(-limit, min(limit, value))
