"""The daemon's safety state machine.

::

    init --devices respond, loop ticking---> standby <--mode standby-- running
                                              |   ^                    |  ^
                                  mode auto or|   |fault cleared       |  |cause gone
                                  manual      v   |and reset           v  |
                                            running ---any fault---> fault  degraded

``fault`` is entered from any state but ``stopping`` as soon as a fault
cause exists, and left only to ``standby`` once every cause has cleared
(latched fault bits need an operator reset first). ``degraded`` is
``running`` with a cause that does not stop the plant, such as a meter that
feeds no interlock being down or the store failing to write.
``stopping`` is final.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(str, enum.Enum):
    INIT = "init"
    STANDBY = "standby"
    RUNNING = "running"
    DEGRADED = "degraded"
    FAULT = "fault"
    STOPPING = "stopping"


class Mode(str, enum.Enum):
    """Operating mode set by the operator through the API."""

    AUTO = "auto"
    MANUAL = "manual"
    STANDBY = "standby"


@dataclass(frozen=True, slots=True)
class Conditions:
    """Observations of one supervision cycle, from which the state follows."""

    mode: Mode
    loop_healthy: bool
    devices_answered: bool
    #: Causes that force ``fault``, for example ``"fault_bits=GRID_STALE"``.
    fault_causes: tuple[str, ...] = ()
    #: Causes that make ``running`` into ``degraded``.
    degraded_causes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Transition:
    old: State
    new: State
    cause: str


class StateMachine:
    """Derive the state from :class:`Conditions`, one transition per :meth:`update` at most."""

    def __init__(self) -> None:
        self.state = State.INIT

    def update(self, c: Conditions) -> Transition | None:
        """Apply one observation; return the transition it caused, or None."""
        if self.state is State.STOPPING:
            return None
        new, cause = self._next(c)
        if new is self.state:
            return None
        transition = Transition(self.state, new, cause)
        self.state = new
        return transition

    def stop(self, cause: str) -> Transition | None:
        if self.state is State.STOPPING:
            return None
        transition = Transition(self.state, State.STOPPING, cause)
        self.state = State.STOPPING
        return transition

    def _next(self, c: Conditions) -> tuple[State, str]:
        causes = list(c.fault_causes)
        if not c.loop_healthy and self.state is not State.INIT:
            causes.insert(0, "fast loop stalled")
        if causes and self.state is not State.INIT:
            return State.FAULT, ", ".join(causes)
        if self.state is State.INIT:
            if not c.loop_healthy:
                return State.INIT, "fast loop not ticking yet"
            if not c.devices_answered:
                return State.INIT, "waiting for devices"
            if causes:
                return State.FAULT, ", ".join(causes)
            return State.STANDBY, "devices answered and the fast loop runs"
        if self.state is State.FAULT:
            return State.STANDBY, "every fault cause has cleared"
        if c.mode is Mode.STANDBY:
            return State.STANDBY, "mode standby"
        if c.degraded_causes:
            return State.DEGRADED, ", ".join(c.degraded_causes)
        if self.state is State.DEGRADED:
            return State.RUNNING, "degraded causes cleared"
        return State.RUNNING, f"mode {c.mode.value}"
