"""Plant physics for the HIL rig and the SIL replay: PCS units, battery, meters, grid balance.

Everything steps at a fixed ``dt_s``: 1 ms in the HIL rig, and the SIL replay
may use a coarser step. State lives in explicit dataclasses, so a run can be
paused, copied with :func:`copy.deepcopy` and resumed. The PCS units of a
bank share one parameter set and step together as numpy arrays.

Signs follow the project's convention: PCS and battery power positive is
discharge into the site, load positive is consumption, renewable output
positive is generation, and grid power positive is import::

    grid_kw = load_kw - renewable_kw - battery_kw

Per step, :meth:`Plant.step` runs: battery limits -> PCS response ->
battery energy, voltage and temperature -> grid balance.
"""

from __future__ import annotations

import bisect
import enum
import math
from dataclasses import dataclass, field

import numpy as np

# --------------------------------------------------------------------------- PCS

_STANDBY, _RUNNING, _REVERTED, _TRIPPED = 0, 1, 2, 3


class PcsMode(enum.IntEnum):
    """Operating state of one PCS unit; the integer codes are what a simulator publishes."""

    #: No command received since start or reset; output goes to ``revert_kw``.
    STANDBY = 0
    #: Following the last command, selected is younger than ``revert_s``.
    RUNNING = 1
    #: Commands stopped for ``revert_s``; output goes to ``revert_kw`` until the next command.
    REVERTED = 2
    #: Tripped (fault or protection); output is 0 at once and stays 0 until :meth:`PcsBank.reset`.
    TRIPPED = 3


@dataclass(frozen=True)
class PcsParams:
    """One PCS unit's response. Powers are AC at the unit's terminals."""

    rated_kw: float
    #: First-order time constant of the power response after the dead time.
    time_constant_s: float = 0.03
    #: Delay between a setpoint and the start of the response.
    dead_time_s: float = 0.01
    #: Slew limit of the internal setpoint, before the first-order response.
    ramp_kw_per_s: float = math.inf
    #: One-way AC/DC conversion efficiency.
    efficiency: float = 0.98
    #: Command watchdog: with no command or heartbeat for this long the unit reverts.
    revert_s: float = 2.0
    revert_kw: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not self.rated_kw > 0:
            problems.append(f"rated_kw={self.rated_kw} must be > 0")
        if self.time_constant_s < 0 or self.dead_time_s < 0:
            problems.append("time_constant_s and dead_time_s must be >= 0")
        if not self.ramp_kw_per_s > 0:
            problems.append(f"ramp_kw_per_s={self.ramp_kw_per_s} must be > 0")
        if not 0 < self.efficiency <= 1:
            problems.append(f"efficiency={self.efficiency} must be in (0, 1]")
        if not self.revert_s > 0:
            problems.append(f"revert_s={self.revert_s} must be > 0")
        if abs(self.revert_kw) > self.rated_kw:
            problems.append(f"revert_kw={self.revert_kw} exceeds rated_kw={self.rated_kw}")
        if problems:
            raise ValueError("invalid PCS parameters: " + "; ".join(problems))


@dataclass
class PcsState:
    """State of a bank of PCS units; each array has one entry per unit."""

    #: AC output power.
    p_kw: np.ndarray
    #: Internal setpoint after the dead time and the ramp limit, before the first-order response.
    ramped_kw: np.ndarray
    #: Last commanded setpoint, as written (not yet clamped).
    command_kw: np.ndarray
    #: Run time of the last command or heartbeat; -inf before the first.
    last_command_s: np.ndarray
    mode: np.ndarray
    #: Setpoints waiting out the dead time, oldest at ``delay_index``.
    delay_line: np.ndarray
    delay_index: int = 0
    #: Why each unit tripped; empty while not tripped.
    trip_reason: list[str] = field(default_factory=list)


class PcsBank:
    """Identical PCS units that step together.

    Each step, per unit: the target is the last command (or ``revert_kw``
    when the watchdog has expired, or 0 when tripped), clamped to the rating
    and to what the battery can deliver or take. The target waits out the
    dead time, is slew-limited to ``ramp_kw_per_s`` and then followed with
    the time constant. The discrete response is exact at each step: after
    the dead time a step setpoint reaches 63.2 % at ``time_constant_s``.
    """

    def __init__(self, params: PcsParams, units: int, dt_s: float) -> None:
        if units < 1 or not dt_s > 0:
            raise ValueError(f"invalid PCS bank: units={units}, dt_s={dt_s}; both must be positive")
        self.params = params
        self.units = units
        self.dt_s = float(dt_s)
        self._alpha = (
            1.0 if params.time_constant_s == 0 else 1.0 - math.exp(-dt_s / params.time_constant_s)
        )
        self._ramp_step_kw = params.ramp_kw_per_s * dt_s
        delay_steps = round(params.dead_time_s / dt_s)
        zeros = np.zeros(units)
        self.state = PcsState(
            p_kw=zeros.copy(),
            ramped_kw=zeros.copy(),
            command_kw=zeros.copy(),
            last_command_s=np.full(units, -math.inf),
            mode=np.full(units, int(PcsMode.STANDBY), dtype=np.int8),
            delay_line=np.zeros((max(delay_steps, 1), units)),
            trip_reason=[""] * units,
        )
        self._delay_steps = delay_steps
        self._ramp_limited = math.isfinite(params.ramp_kw_per_s)
        self._stale = True

    def _units(self, unit: int | None) -> slice | int:
        if unit is None:
            return slice(None)
        if not 0 <= unit < self.units:
            raise IndexError(
                f"PCS unit {unit} does not exist; the bank has units 0 to {self.units - 1}"
            )
        return unit

    def command(self, t_s: float, setpoint_kw: float, unit: int | None = None) -> None:
        """Write a setpoint, selected also feeds the unit's command watchdog.

        A tripped unit stores the setpoint but keeps its output at 0 until reset.
        """
        if not math.isfinite(setpoint_kw):
            raise ValueError(f"setpoint_kw={setpoint_kw} is not a finite number")
        s = self.state
        selected = self._units(unit)
        s.command_kw[selected] = setpoint_kw
        s.last_command_s[selected] = t_s
        s.mode[selected] = np.where(
            s.mode[selected] == PcsMode.TRIPPED, PcsMode.TRIPPED, PcsMode.RUNNING
        )
        self._stale = True

    def heartbeat(self, t_s: float, unit: int | None = None) -> None:
        """Feed the command watchdog without changing the setpoint."""
        s = self.state
        selected = self._units(unit)
        s.last_command_s[selected] = t_s
        s.mode[selected] = np.where(
            s.mode[selected] == PcsMode.REVERTED, PcsMode.RUNNING, s.mode[selected]
        )
        self._stale = True

    def trip(self, reason: str, unit: int | None = None) -> None:
        """Trip a unit (or all): output drops to 0 on the next step and stays there until reset."""
        s = self.state
        selected = self._units(unit)
        s.mode[selected] = PcsMode.TRIPPED
        self._stale = True
        for index in range(self.units)[selected] if isinstance(selected, slice) else [selected]:
            s.trip_reason[index] = reason

    def reset(self, unit: int | None = None) -> None:
        """Clear a trip. The unit returns to standby and needs a fresh command to run."""
        s = self.state
        selected = self._units(unit)
        tripped = s.mode[selected] == PcsMode.TRIPPED
        s.mode[selected] = np.where(tripped, PcsMode.STANDBY, s.mode[selected])
        s.command_kw[selected] = np.where(tripped, 0.0, s.command_kw[selected])
        self._stale = True
        for index in range(self.units)[selected] if isinstance(selected, slice) else [selected]:
            if s.mode[index] == PcsMode.STANDBY:
                s.trip_reason[index] = ""

    def _refresh_targets(self, t_s: float) -> None:
        """Apply watchdog expiry and recompute each unit's target before the battery clamp.

        Runs only after a command, heartbeat, trip or reset, or when the
        earliest watchdog expires, so the per-step path stays short.
        """
        p = self.params
        s = self.state
        expired = t_s - s.last_command_s > p.revert_s
        s.mode[(s.mode == _RUNNING) & expired] = _REVERTED
        following = s.mode == _RUNNING
        self._tripped = s.mode == _TRIPPED
        self._any_tripped = bool(self._tripped.any())
        targets = np.where(following, s.command_kw, p.revert_kw)
        targets = np.clip(targets, -p.rated_kw, p.rated_kw)
        targets[self._tripped] = 0.0
        self._targets = targets
        self._targets_max = float(targets.max())
        self._targets_min = float(targets.min())
        live = s.last_command_s[following]
        self._next_expiry_s = float(live.min()) + p.revert_s if live.size else math.inf
        self._stale = False

    def step(self, t_s: float, discharge_max_kw: float, charge_max_kw: float) -> np.ndarray:
        """Advance one step to run time ``t_s`` and return each unit's AC output in kW.

        ``discharge_max_kw`` and ``charge_max_kw`` (both >= 0) are what the
        battery can deliver and take at the bank's AC side right now, shared
        equally by the units.
        """
        p = self.params
        s = self.state
        if self._stale or t_s > self._next_expiry_s:
            self._refresh_targets(t_s)

        upper = min(p.rated_kw, discharge_max_kw / self.units)
        lower = -min(p.rated_kw, charge_max_kw / self.units)
        limited = upper < p.rated_kw or lower > -p.rated_kw
        target = self._targets
        if self._targets_max > upper or self._targets_min < lower:
            target = np.clip(target, lower, upper)

        if self._delay_steps > 0:
            delayed = s.delay_line[s.delay_index].copy()
            s.delay_line[s.delay_index] = target
            s.delay_index = (s.delay_index + 1) % self._delay_steps
        else:
            delayed = target.copy()

        if self._ramp_limited:
            s.ramped_kw += np.clip(delayed - s.ramped_kw, -self._ramp_step_kw, self._ramp_step_kw)
        else:
            s.ramped_kw = delayed
        s.p_kw += self._alpha * (s.ramped_kw - s.p_kw)
        if limited:
            np.clip(s.p_kw, lower, upper, out=s.p_kw)
        if self._any_tripped:
            # A trip opens the unit's breaker: no dead time, no ramp, no lag.
            tripped = self._tripped
            s.p_kw[tripped] = 0.0
            s.ramped_kw[tripped] = 0.0
            s.delay_line[:, tripped] = 0.0
        return s.p_kw

    def dc_power_kw(self, total_ac_kw: float) -> float:
        """Return the battery-side power of the bank's total AC output (positive = discharge)."""
        eff = self.params.efficiency
        return total_ac_kw / eff if total_ac_kw >= 0 else total_ac_kw * eff


# --------------------------------------------------------------------------- battery

#: Open-circuit voltage of one LFP (LiFePO4/graphite) cell against SoC at 25 °C.
#: NOTE: a representative LFP shape, not a datasheet curve: steep below 10 % and
#: above 95 %, and a plateau of 3.26-3.34 V between. It sets the pack voltage and
#: the BMS frames; its flatness is why SoC cannot be read from voltage.
LFP_OCV_SOC_PCT = np.array(
    [0.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 98.0, 100.0]
)
LFP_OCV_CELL_V = np.array(
    [2.80, 3.00, 3.12, 3.20, 3.26, 3.28, 3.29, 3.30, 3.31, 3.32, 3.33, 3.34, 3.36, 3.40, 3.50]
)
_OCV_SOC = LFP_OCV_SOC_PCT.tolist()
_OCV_CELL = LFP_OCV_CELL_V.tolist()


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Interpolate linearly like ``np.interp`` for one value, at a fraction of its call cost."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x) - 1
    return ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])


#: Charge and discharge voltage limits of one LFP cell, as a BMS reports them.
LFP_CHARGE_LIMIT_CELL_V = 3.55
LFP_DISCHARGE_LIMIT_CELL_V = 2.80


@dataclass(frozen=True)
class BatteryParams:
    """A battery pack seen through its BMS.

    Losses are counted once, through the charge and discharge efficiencies,
    and all of them become heat. The internal resistance only shapes the
    terminal voltage. The thermal defaults are assumptions for an
    air-cooled LFP container: 7 kJ/K per kWh of heat capacity (7 kg per kWh
    of pack at 1 kJ/(kg K)) and a cooling conductance that keeps the pack 15 K
    above ambient at full-current losses.
    """

    energy_kwh: float
    soc_initial_pct: float = 60.0
    charge_efficiency: float = 0.96
    discharge_efficiency: float = 0.96
    cells_in_series: int = 16
    #: BMS current limit in each direction at normal SoC and temperature.
    max_current_a: float = 100.0
    #: Pack internal resistance; None gives a 3 % voltage drop at ``max_current_a``
    #: and nominal voltage.
    resistance_ohm: float | None = None
    ambient_c: float = 25.0
    temperature_initial_c: float = 25.0
    #: Heat capacity; None means 7,000 J/K per kWh.
    heat_capacity_j_per_k: float | None = None
    #: Cooling conductance to ambient; None means full-current losses warm the pack by 15 K.
    cooling_w_per_k: float | None = None
    #: Pack temperature at selected the BMS limits reach 0 and the PCS trips.
    trip_temperature_c: float = 60.0

    def __post_init__(self) -> None:
        problems = []
        if not self.energy_kwh > 0:
            problems.append(f"energy_kwh={self.energy_kwh} must be > 0")
        if not 0 <= self.soc_initial_pct <= 100:
            problems.append(f"soc_initial_pct={self.soc_initial_pct} must be in [0, 100]")
        for name in ("charge_efficiency", "discharge_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                problems.append(f"{name}={getattr(self, name)} must be in (0, 1]")
        if self.cells_in_series < 1 or not self.max_current_a > 0:
            problems.append("cells_in_series must be >= 1 and max_current_a > 0")
        for name in ("resistance_ohm", "heat_capacity_j_per_k", "cooling_w_per_k"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append(f"{name}={value} must be > 0 (or unset for the default)")
        if problems:
            raise ValueError("invalid battery parameters: " + "; ".join(problems))

    def ocv_v(self, soc_pct: float) -> float:
        """Return the pack's open-circuit voltage at ``soc_pct``."""
        return self.cells_in_series * _interp(soc_pct, _OCV_SOC, _OCV_CELL)

    @property
    def nominal_v(self) -> float:
        return self.ocv_v(50.0)

    @property
    def pack_resistance_ohm(self) -> float:
        if self.resistance_ohm is not None:
            return self.resistance_ohm
        return 0.03 * self.nominal_v / self.max_current_a

    @property
    def pack_heat_capacity_j_per_k(self) -> float:
        if self.heat_capacity_j_per_k is not None:
            return self.heat_capacity_j_per_k
        return 7000.0 * self.energy_kwh

    @property
    def pack_cooling_w_per_k(self) -> float:
        if self.cooling_w_per_k is not None:
            return self.cooling_w_per_k
        full_kw = self.max_current_a * self.nominal_v / 1000.0
        loss_w = full_kw * 1000.0 * (1.0 / self.discharge_efficiency - 1.0)
        return max(loss_w, 1.0) / 15.0


@dataclass
class BatteryState:
    """Battery state; current and power are positive when discharging."""

    energy_kwh: float
    soc_pct: float
    voltage_v: float
    current_a: float
    #: Battery-side (DC) power.
    p_dc_kw: float
    temperature_c: float


@dataclass(frozen=True)
class BmsLimits:
    """Limits a Pylontech-style BMS publishes; currents are non-negative magnitudes."""

    charge_current_a: float
    discharge_current_a: float
    charge_voltage_v: float
    discharge_voltage_v: float


class Battery:
    """Energy, SoC, terminal voltage, temperature and BMS limits of one pack."""

    def __init__(self, params: BatteryParams) -> None:
        self.params = params
        energy = params.energy_kwh * params.soc_initial_pct / 100.0
        self.state = BatteryState(
            energy_kwh=energy,
            soc_pct=params.soc_initial_pct,
            voltage_v=params.ocv_v(params.soc_initial_pct),
            current_a=0.0,
            p_dc_kw=0.0,
            temperature_c=params.temperature_initial_c,
        )
        self._resistance = params.pack_resistance_ohm
        self._heat_capacity = params.pack_heat_capacity_j_per_k
        self._cooling = params.pack_cooling_w_per_k

    def available_kw(self, dt_s: float) -> tuple[float, float]:
        """Return (discharge, charge) DC power in kW that one step of ``dt_s`` can take.

        This is the physical end of the battery (empty or full), not the BMS limits,
        selected the gateway must respect and the metrics check.
        """
        p = self.params
        s = self.state
        hours = dt_s / 3600.0
        discharge = s.energy_kwh * p.discharge_efficiency / hours
        charge = (p.energy_kwh - s.energy_kwh) / p.charge_efficiency / hours
        return max(discharge, 0.0), max(charge, 0.0)

    def step(self, dt_s: float, p_dc_kw: float) -> BatteryState:
        """Draw ``p_dc_kw`` (positive = discharge) for ``dt_s`` and update the state."""
        p = self.params
        s = self.state
        hours = dt_s / 3600.0
        if p_dc_kw >= 0:
            stored_kw = -p_dc_kw / p.discharge_efficiency
            loss_kw = p_dc_kw / p.discharge_efficiency - p_dc_kw
        else:
            stored_kw = -p_dc_kw * p.charge_efficiency
            loss_kw = -p_dc_kw * (1.0 - p.charge_efficiency)
        s.energy_kwh = min(max(s.energy_kwh + stored_kw * hours, 0.0), p.energy_kwh)
        s.soc_pct = 100.0 * s.energy_kwh / p.energy_kwh

        # Terminal voltage V = OCV - I R with P = V I, solved for I (positive = discharge).
        ocv = p.ocv_v(s.soc_pct)
        watts = p_dc_kw * 1000.0
        r = self._resistance
        discriminant = max(ocv * ocv - 4.0 * r * watts, 0.0)
        s.current_a = (ocv - math.sqrt(discriminant)) / (2.0 * r)
        s.voltage_v = ocv - s.current_a * r
        s.p_dc_kw = p_dc_kw

        heat_w = loss_kw * 1000.0 - self._cooling * (s.temperature_c - p.ambient_c)
        s.temperature_c += heat_w * dt_s / self._heat_capacity
        return s

    def bms_limits(self) -> BmsLimits:
        """Return the limits the BMS would publish now.

        The derating is assumed, typical of LFP BMSs:

        - full current between 10 % and 90 % SoC and between 10 °C and 45 °C;
        - charge tapers to 0 from 90 % to 100 % SoC, and is 0 below 0 °C;
        - discharge tapers to 0 from 10 % to 0 % SoC;
        - both taper to 0 from 45 °C to ``trip_temperature_c``.
        """
        p = self.params
        s = self.state
        hot = _interp(s.temperature_c, [45.0, p.trip_temperature_c], [1.0, 0.0])
        cold_charge = _interp(s.temperature_c, [0.0, 10.0], [0.0, 1.0])
        charge = p.max_current_a * _interp(s.soc_pct, [90.0, 100.0], [1.0, 0.0])
        discharge = p.max_current_a * _interp(s.soc_pct, [0.0, 10.0], [0.0, 1.0])
        return BmsLimits(
            charge_current_a=charge * hot * cold_charge,
            discharge_current_a=discharge * hot,
            charge_voltage_v=p.cells_in_series * LFP_CHARGE_LIMIT_CELL_V,
            discharge_voltage_v=p.cells_in_series * LFP_DISCHARGE_LIMIT_CELL_V,
        )


# --------------------------------------------------------------------------- meter


class Meter:
    """A power meter that averages over a window and publishes at a fixed period.

    At every ``update_period_s`` (first at step ``phase_steps``) the published
    value becomes the mean of the last ``window_s`` of samples, and it is held
    until the next update. Before the first update the value is NaN, because
    a real meter has nothing to report yet. :func:`meter_batch` computes the
    same output for a whole array at once.
    """

    def __init__(
        self, dt_s: float, window_s: float, update_period_s: float, phase_s: float = 0.0
    ) -> None:
        self.window_steps, self.update_steps, self.phase_steps = _meter_steps(
            dt_s, window_s, update_period_s, phase_s
        )
        self._buffer = np.zeros(self.window_steps)
        self._count = 0
        self.value = math.nan

    def step(self, sample: float) -> float:
        """Take one sample and return the published value."""
        self._buffer[self._count % self.window_steps] = sample
        self._count += 1
        if (
            self._count - 1 - self.phase_steps
        ) % self.update_steps == 0 and self._count > self.phase_steps:
            filled = min(self._count, self.window_steps)
            self.value = float(np.sum(self._buffer[:filled]) / filled)
        return self.value


def _meter_steps(
    dt_s: float, window_s: float, update_period_s: float, phase_s: float
) -> tuple[int, int, int]:
    if not (dt_s > 0 and window_s > 0 and update_period_s > 0 and phase_s >= 0):
        raise ValueError(
            f"invalid meter timing: dt_s={dt_s}, window_s={window_s}, "
            f"update_period_s={update_period_s}, phase_s={phase_s}; all must be positive"
        )
    window = max(round(window_s / dt_s), 1)
    update = max(round(update_period_s / dt_s), 1)
    phase = round(phase_s / dt_s) % update
    return window, update, phase


def meter_batch(
    samples: np.ndarray, dt_s: float, window_s: float, update_period_s: float, phase_s: float = 0.0
) -> np.ndarray:
    """Return what :class:`Meter` publishes for every sample of ``samples`` (last axis is time)."""
    window, update, phase = _meter_steps(dt_s, window_s, update_period_s, phase_s)
    x = np.asarray(samples, dtype=float)
    n = x.shape[-1]
    csum = np.concatenate((np.zeros((*x.shape[:-1], 1)), np.cumsum(x, axis=-1)), axis=-1)
    updates = np.arange(phase, n, update)
    lo = np.maximum(updates + 1 - window, 0)
    means = (csum[..., updates + 1] - csum[..., lo]) / (updates + 1 - lo)
    out = np.full(x.shape, np.nan)
    if updates.size == 0:
        return out
    selected = np.searchsorted(updates, np.arange(n), side="right") - 1
    valid = selected >= 0
    out[..., valid] = means[..., selected[valid]]
    return out


# --------------------------------------------------------------------------- plant


@dataclass
class PlantSample:
    """Plant signals after one step, in kW unless named otherwise."""

    t_s: float
    load_kw: float
    renewable_kw: float
    #: Total AC output of the PCS bank (positive = discharge).
    battery_kw: float
    grid_kw: float


class Plant:
    """A site: load, renewables, a PCS bank and its battery, stepped at a fixed ``dt_s``.

    The PCS trips (every unit, reason ``battery over-temperature``) when the
    pack reaches ``trip_temperature_c``. Meters are separate
    :class:`Meter` objects that the caller feeds from :class:`PlantSample`.
    """

    def __init__(
        self, pcs: PcsParams, battery: BatteryParams, units: int = 1, dt_s: float = 0.001
    ) -> None:
        self.dt_s = float(dt_s)
        self.pcs = PcsBank(pcs, units, dt_s)
        self.battery = Battery(battery)
        self.t_s = 0.0
        self.steps = 0
        self.last = PlantSample(0.0, 0.0, 0.0, 0.0, 0.0)

    def step(self, load_kw: float, renewable_kw: float) -> PlantSample:
        """Advance one ``dt_s`` with the given site load and renewable output."""
        self.steps += 1
        self.t_s = self.steps * self.dt_s
        eff = self.pcs.params.efficiency
        discharge_dc, charge_dc = self.battery.available_kw(self.dt_s)
        ac_kw = self.pcs.step(self.t_s, discharge_dc * eff, charge_dc / eff)
        battery_kw = float(ac_kw.sum())
        self.battery.step(self.dt_s, self.pcs.dc_power_kw(battery_kw))
        if (
            self.battery.state.temperature_c >= self.battery.params.trip_temperature_c
            and not np.all(self.pcs.state.mode == PcsMode.TRIPPED)
        ):
            self.pcs.trip("battery over-temperature")
        grid_kw = load_kw - renewable_kw - battery_kw
        self.last = PlantSample(self.t_s, load_kw, renewable_kw, battery_kw, grid_kw)
        return self.last
