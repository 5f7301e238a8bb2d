"""Fault timeline of a HIL run, and the gateway's reaction to each fault measured from the plant.

A scenario's ``[[faults]]`` entries become :class:`FaultWindow` objects: a
fault starts at ``at_s`` of run time and ends ``duration_s`` later (0 means
it lasts to the end of the run). :func:`check_faults` rejects a fault on an
unknown device or of a kind that does not apply to the device.

Reactions are measured from what the plant did, never from the gateway's
own account. For each fault kind that calls for a safe action:

================================  ==============================================
fault                             reaction time: from the fault's start to ...
================================  ==============================================
meter disconnect, drop,           the bank's total output settling within
exception, sentinel               tolerance of 0 kW (it must stay there until
                                  the fault ends)
PCS disconnect, drop              that unit's output settling at 0 kW (the PCS
                                  reverts on its own when commands stop)
pcs_trip                          the gateway's first write that puts the
                                  tripped unit at 0 kW or disables it
bms_silent, bms_alarm,            the output of the PCS behind that string
bms_limits_zero, BMS disconnect   settling at 0 kW
gateway_sigkill                   the total output settling at 0 kW, by the
                                  PCS reversion timers alone
gateway_sigterm                   the total output settling at 0 kW, provided
                                  the daemon also exited with code 0 in the window
================================  ==============================================

"Settling" means the first sample after which ``|p| <= tolerance`` holds up
to the end of the fault's window. A reaction that never happens is None,
which fails a ``max_fault_reaction_ms`` criterion. ``delay`` and ``freeze``
get no reaction: a delay shorter than the gateway's timeout is harmless,
and frozen values look like valid ones on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hil.devices import FAULT_KINDS, PcsWrite
from hil.scenario import Fault

_TOTAL_KINDS = {"gateway_sigkill", "gateway_sigterm"}
_METER_REACTIVE = {"disconnect", "drop", "exception", "sentinel"}
_PCS_REACTIVE = {"disconnect", "drop"}
_BMS_REACTIVE = {"disconnect", "bms_silent", "bms_alarm", "bms_limits_zero"}


@dataclass
class FaultWindow:
    """One scheduled fault and what happened to it during the run."""

    index: int
    fault: Fault
    #: Device kind: ``meter``, ``pcs``, ``bms`` or ``gateway``.
    device_kind: str
    started: bool = False
    ended: bool = False
    #: Reaction time in ms, None when the gateway never reacted or no reaction applies.
    reaction_ms: float | None = None
    #: Mean absolute output of the reacting PCS (or bank) over the second before the fault.
    output_before_kw: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def start_s(self) -> float:
        return self.fault.at_s

    @property
    def end_s(self) -> float | None:
        """End of the fault in run time; None when it lasts to the end of the run."""
        return self.fault.at_s + self.fault.duration_s if self.fault.duration_s > 0 else None

    @property
    def label(self) -> str:
        return f"{self.fault.kind} {self.fault.device} @{self.fault.at_s:g}s"

    @property
    def reaction(self) -> str | None:
        """What the reaction time measures for this fault, or None when no reaction applies."""
        kind = self.fault.kind
        if kind in _TOTAL_KINDS:
            return "total"
        if self.device_kind == "meter" and kind in _METER_REACTIVE:
            return "total"
        if self.device_kind == "pcs" and kind in _PCS_REACTIVE:
            return "unit"
        if kind == "pcs_trip":
            return "command"
        if self.device_kind == "bms" and kind in _BMS_REACTIVE:
            return "unit"
        return None


def check_faults(faults: Sequence[Fault], device_kinds: Mapping[str, str]) -> list[FaultWindow]:
    """Return the scenario's faults as windows; raise ValueError listing every invalid one."""
    problems = []
    windows = []
    for index, fault in enumerate(faults):
        kind = device_kinds.get(fault.device)
        if kind is None:
            known = ", ".join(sorted(device_kinds))
            problems.append(f"faults[{index}]: no device {fault.device!r}; devices: {known}")
            continue
        if fault.kind not in FAULT_KINDS[kind]:
            allowed = ", ".join(sorted(FAULT_KINDS[kind]))
            problems.append(
                f"faults[{index}]: {fault.kind!r} does not apply to {fault.device!r}, a "
                f"{kind}; use one of {allowed}"
            )
            continue
        if fault.kind == "delay" and not fault.value > 0:
            problems.append(f"faults[{index}]: a delay needs value = seconds > 0")
        windows.append(FaultWindow(index, fault, kind))
    if problems:
        raise ValueError("invalid fault timeline:\n" + "\n".join(problems))
    return windows


def settle_time_s(
    power_kw: np.ndarray, dt_s: float, start: int, end: int, tolerance_kw: float
) -> float | None:
    """Seconds from sample ``start`` until ``|power_kw|`` stays within tolerance up to ``end``.

    None when the last sample of the span is still outside the tolerance or
    the span is empty.
    """
    span = np.abs(power_kw[start:end]) > tolerance_kw
    if span.size == 0 or span[-1]:
        return None
    outside = np.flatnonzero(span)
    first_inside = 0 if outside.size == 0 else int(outside[-1]) + 1
    return first_inside * dt_s


def command_reaction_s(writes: Sequence[PcsWrite], start_s: float, end_s: float) -> float | None:
    """Seconds from ``start_s`` to the first write that stops the unit (0 kW or not following)."""
    for write in writes:
        if start_s <= write.t_s <= end_s and (not write.following or abs(write.setpoint_kw) < 0.05):
            return write.t_s - start_s
    return None


@dataclass(frozen=True)
class ReactionInputs:
    """Inputs of the reaction measurement, all on the capture's time base (run time 0)."""

    dt_s: float
    total_kw: np.ndarray
    #: Shape (units, samples).
    unit_kw: np.ndarray
    total_tolerance_kw: float
    unit_tolerance_kw: float
    #: Setpoint writes per PCS unit, with ``t_s`` in run time.
    writes: Sequence[Sequence[PcsWrite]]
    #: Unit index of each PCS and BMS device name.
    unit_of: Mapping[str, int]
    #: (run time, exit code) of every daemon exit.
    daemon_exits: Sequence[tuple[float, int]]


def measure_reaction(window: FaultWindow, data: ReactionInputs) -> None:
    """Fill ``window.reaction_ms`` and ``window.output_before_kw`` from the captured plant."""
    measured = window.reaction
    if measured is None or not window.started:
        return
    n = data.total_kw.size
    start = min(round(window.start_s / data.dt_s), n)
    end = n if window.end_s is None else min(round(window.end_s / data.dt_s), n)
    before = slice(max(start - round(1.0 / data.dt_s), 0), start)
    if measured == "total":
        signal, tolerance = data.total_kw, data.total_tolerance_kw
    else:
        unit = data.unit_of[window.fault.device]
        signal, tolerance = data.unit_kw[unit], data.unit_tolerance_kw
    if start > before.start:
        window.output_before_kw = float(np.mean(np.abs(signal[before])))

    if measured == "command":
        unit = data.unit_of[window.fault.device]
        end_s = end * data.dt_s
        seconds = command_reaction_s(data.writes[unit], window.start_s, end_s)
    else:
        seconds = settle_time_s(signal, data.dt_s, start, end, tolerance)
    if window.fault.kind == "gateway_sigterm":
        end_s = end * data.dt_s
        exits = [rc for t, rc in data.daemon_exits if window.start_s <= t <= end_s]
        if not exits:
            window.notes.append("the daemon did not exit within the fault's window")
            seconds = None
        elif exits[0] != 0:
            window.notes.append(f"the daemon exited with code {exits[0]}, expected 0")
            seconds = None
    window.reaction_ms = None if seconds is None else seconds * 1000.0
