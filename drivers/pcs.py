"""PCS command path: write active-power setpoints to a PCS over Modbus and verify them.

One :class:`PcsDriver` drives one PCS unit; a :class:`PcsGroup` drives the
several units of one gateway. The decisions (deadband, write rate, refresh,
heartbeat, retry budget, fault latch) live in
:class:`~drivers.pcs_policy.SetpointPolicy`; this module does the I/O.

The points and settings of a PCS come from its profile's ``[pcs]`` table,
described in :mod:`drivers.pcs_map`.

Every write is checked by reading the register back, so a commanded value is
never assumed applied. The setpoint and its scale factor are read in one
request and the next write uses the factor from that read, so a factor that
the PCS changes at run time is picked up one write later. A mismatch then
counts as a failed write and is retried.

Nothing fails open. A target that fails ``pcs_write_budget`` times in a row
latches the fault. The driver then writes 0 kW and disables the PCS as far as
the link still allows, and it writes nothing else until :meth:`PcsDriver.reset`.
When the gateway goes silent, the PCS's own reversion timer and heartbeat
timeout bring it to 0 kW.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog

from drivers.modbus import codec
from drivers.modbus.device import DeviceState, ModbusDevice
from drivers.modbus.errors import ModbusError
from drivers.modbus.link import ModbusLink
from drivers.modbus.planner import ReadBlock, decode_block, plan_reads
from drivers.modbus.profile import Point, Profile, load_profile
from drivers.pcs_map import (
    INTEGER_TYPES,
    PERCENT,
    POWER_UNITS_KW,
    REACTIVE_UNITS_KVAR,
    TIME_UNITS_S,
    PcsConfigError,
    PcsError,
    PcsMap,
)
from drivers.pcs_policy import Decision, Fault, PolicySettings, SetpointPolicy
from drivers.quality import Quality, Reading

log = structlog.get_logger(__name__)

#: Default read-back tolerance as a fraction of rated_kw.
_DEFAULT_TOLERANCE_FRACTION = 0.001


class PcsStartError(PcsError):
    """The PCS could not be read or programmed at start (reversion timer, nameplate)."""


class PcsFaultError(PcsError):
    """A command was refused because the PCS fault is latched, or the command latched it."""


@dataclass(frozen=True)
class PcsStatus:
    """One read of a PCS, plus what the driver recorded about its own writes.

    Power values use the gateway's sign: positive discharges the battery.
    """

    name: str
    #: ``tcp HOST:PORT`` or ``rtu DEVICE``, and the unit id, for messages.
    link: str
    unit_id: int
    device_state: str
    #: Measured active power.
    p_kw: Reading
    #: The setpoint register as read back.
    setpoint_kw: Reading
    #: True when the run command and the setpoint enable both read as on; None when unreadable.
    enabled: bool | None
    #: Raw operating state, its name from the profile, and whether it is a fault state.
    state_code: int | None
    state_name: str
    state_fault: bool
    #: Names of the event bits that are set (``bit N`` for unnamed bits).
    events: tuple[str, ...]
    #: Reversion timer as read from the PCS; None when unreadable or absent.
    revert_timer_s: float | None
    #: Whether this driver programmed the timer and read it back correctly.
    revert_timer_programmed: bool
    heartbeat: int | None
    #: ``time.monotonic()`` of the last verified setpoint write.
    last_write_mono_s: float | None
    #: Failed write attempts since start, all targets together.
    write_failures: int
    #: The latched gateway-side fault, if any.
    fault: Fault | None


class PcsDriver:
    """Command one PCS unit: setpoints, enable and disable, heartbeat and reversion timer.

    Build it with :meth:`from_config`, or directly with validated settings.
    The constructor does no I/O. Call :meth:`start` once the link is up,
    then :meth:`enable`, then :meth:`step` in every writer cycle. All methods
    belong on the event loop's thread and must not run concurrently on one
    driver.
    """

    def __init__(
        self,
        name: str,
        profile: Profile,
        link: ModbusLink,
        unit_id: int,
        *,
        rated_kw: float,
        revert_s: float,
        write_budget: int,
        deadband_kw: float,
        timeout_s: float,
        min_write_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.profile = profile
        self.link = link
        self.unit_id = unit_id
        self.map = PcsMap.from_profile(profile)

        self.rated_kw = rated_kw
        self.revert_s = revert_s
        self.timeout_s = timeout_s
        self._clock = clock

        interval_s = self.map.min_write_interval_s or min_write_interval_s
        tolerance_kw = self.map.readback_tolerance_kw or _DEFAULT_TOLERANCE_FRACTION * rated_kw
        # NOTE: reactive power is limited to rated_kw (in kvar), because the
        # configuration has no kVA or kvar rating; a smaller Q limit needs one.
        self.policy = SetpointPolicy(
            PolicySettings(
                rated_kw=rated_kw,
                deadband_kw=deadband_kw,
                min_write_interval_s=interval_s,
                readback_tolerance_kw=tolerance_kw,
                write_budget=write_budget,
                heartbeat_modulo=_heartbeat_modulo(self.map.heartbeat),
                rated_kvar=rated_kw if self.map.reactive_setpoint is not None else None,
            )
        )

        points = self.map.points()
        names = {p.name for p in points}
        scale_factors = [
            profile.point(p.scale_factor)
            for p in points
            if p.scale_factor is not None and p.scale_factor not in names
        ]
        subset = tuple({p.name: p for p in [*points, *scale_factors]}.values())
        #: Reads the points the map names; also does the verified one-off writes.
        self.device = ModbusDevice(
            name,
            replace(profile, points=subset),
            link,
            unit_id,
            poll_period_s=max(interval_s, 0.1),
            timeout_s=timeout_s,
            rejected_block_retry_s=0.0,
        )

        self._setpoint_blocks = {
            "p": self._plan_block(self.map.setpoint),
            "q": self._plan_block(self.map.reactive_setpoint),
        }
        #: Multiplier (10**sf or scale) per setpoint, from the last read of its block.
        self._multipliers: dict[str, float] = {}

        #: Nameplate power read at start; the base of a percent setpoint.
        self.nameplate_kw: float | None = None
        self.revert_timer_programmed = False
        self.started = False
        self.enabled = False
        self._safe_stopped = False
        self._log = log.bind(pcs=name, link=link.name, unit=unit_id)

    @classmethod
    def from_config(
        cls, device: Any, config: Any, link: ModbusLink, profile: Profile | None = None
    ) -> PcsDriver:
        """Build the driver of a configured PCS device (``gateway.config.Device``).

        ``config`` is the whole ``SiteConfig``: its ``[safety]`` table gives
        the reversion time and the write budget, its ``[control]`` table the
        deadband. The profile is loaded from ``device.profile`` unless given.
        """
        if device.role != "pcs" or device.rated_kw is None:
            raise PcsConfigError(
                f"device {device.name!r}",
                [f"has role {device.role!r}; only a device with role 'pcs' and rated_kw is a PCS"],
            )
        return cls(
            device.name,
            profile if profile is not None else load_profile(device.profile),
            link,
            device.unit_id,
            rated_kw=device.rated_kw,
            revert_s=config.safety.pcs_revert_s,
            write_budget=config.safety.pcs_write_budget,
            deadband_kw=config.control.deadband_kw,
            timeout_s=device.timeout_ms / 1000,
            min_write_interval_s=device.poll_period_ms / 1000,
        )

    @property
    def where(self) -> str:
        """``PCS NAME (tcp HOST:PORT unit N)``, the prefix of every message."""
        return f"PCS {self.name!r} ({self.link.name} unit {self.unit_id})"

    @property
    def fault(self) -> Fault | None:
        return self.policy.fault

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Read the PCS, check its nameplate, and program and verify its reversion timer.

        Raises PcsStartError when the PCS does not respond or the timer write
        fails within the write budget (the fault is then latched), and
        PcsConfigError when ``rated_kw`` is above the PCS's nameplate.
        Raises PcsFaultError while a fault is latched: call :meth:`reset`.
        """
        self._require_not_faulted()
        readings = await self.device.poll_once()
        if self.device.state is not DeviceState.ONLINE:
            raise PcsStartError(
                f"{self.where}: no response at start: {self.device.last_error}; check that the PCS "
                "is powered, its host, port and unit id in the configuration, and the network"
            ) from self.device.last_error
        self._check_nameplate(readings)
        for target in self._setpoint_blocks:
            if self._setpoint_blocks[target] is not None:
                await self._refresh_multiplier(target)
        if self.map.revert_timer is not None:
            try:
                await self._program_revert_timer()
            except PcsFaultError as err:
                raise PcsStartError(str(err)) from err
        self._set_heartbeat_period(readings)
        self.started = True
        self._log.info(
            "pcs started",
            rated_kw=self.rated_kw,
            nameplate_kw=self.nameplate_kw,
            revert_s=self.programmed_revert_s,
            heartbeat_period_s=self.policy.settings.heartbeat_period_s,
            min_write_interval_s=self.policy.settings.min_write_interval_s,
        )

    @property
    def programmed_revert_s(self) -> float | None:
        """Reversion time written to the PCS: ``revert_s`` rounded up to the timer's resolution."""
        timer = self.map.revert_timer
        if timer is None:
            return None
        step_s = (timer.scale or 1.0) * TIME_UNITS_S[timer.unit]
        # Round up, never down: a timer of 0 means "never revert" on SunSpec PCSs.
        return max(1, math.ceil(self.revert_s / step_s - 1e-9)) * step_s

    def _check_nameplate(self, readings: Mapping[str, Reading]) -> None:
        point = self.map.rated_power
        if point is None:
            return
        reading = readings[point.name]
        if not reading.good or not isinstance(reading.value, (int, float)):
            self._log.warning(
                "pcs nameplate unreadable", point=point.name, quality=reading.quality.name
            )
            return
        self.nameplate_kw = float(reading.value) * POWER_UNITS_KW[point.unit]
        if self.rated_kw > self.nameplate_kw * (1 + 1e-9):
            raise PcsConfigError(
                self.where,
                [
                    f"rated_kw {self.rated_kw:g} in the configuration is above the PCS nameplate "
                    f"{point.name} = {self.nameplate_kw:g} kW; set rated_kw to at most "
                    f"{self.nameplate_kw:g}"
                ],
            )

    async def _program_revert_timer(self) -> None:
        timer = self.map.revert_timer
        assert timer is not None
        revert_s = self.programmed_revert_s
        assert revert_s is not None
        value = revert_s / TIME_UNITS_S[timer.unit]
        await self._write_verified("revert_timer", timer, value)
        self.revert_timer_programmed = True
        # Rewrite an unchanged setpoint three times per reversion time, so two
        # lost writes in a row still do not let the timer expire.
        refresh_s = revert_s / 3
        self._update_settings(refresh_interval_s=refresh_s, name="revert timer")
        self._log.info("pcs revert timer programmed", point=timer.name, revert_s=revert_s)

    def _set_heartbeat_period(self, readings: Mapping[str, Reading]) -> None:
        if self.map.heartbeat is None:
            return
        period_s = self.map.heartbeat_period_s
        timeout_point = self.map.heartbeat_timeout
        timeout_s = None
        if timeout_point is not None:
            reading = readings[timeout_point.name]
            if reading.good and isinstance(reading.value, (int, float)) and reading.value > 0:
                timeout_s = float(reading.value) * TIME_UNITS_S[timeout_point.unit]
        if period_s is None:
            # Three writes per timeout: two may be lost before the PCS trips.
            period_s = timeout_s / 3 if timeout_s is not None else 1.0
        if timeout_s is not None and period_s >= timeout_s:
            raise PcsConfigError(
                self.where,
                [
                    f"heartbeat period {period_s:g} s is not shorter than the PCS's heartbeat "
                    f"timeout {timeout_s:g} s; lower heartbeat_period_ms in the profile"
                ],
            )
        self._update_settings(heartbeat_period_s=period_s, name="heartbeat")

    def _update_settings(self, name: str, **changes: float) -> None:
        try:
            self.policy.settings = replace(self.policy.settings, **changes)
        except ValueError as err:
            raise PcsConfigError(
                self.where,
                [f"{name}: {err}; lower min_write_interval_ms in the profile or poll_period_ms"],
            ) from err

    # ------------------------------------------------------------------ commands

    async def enable(self) -> None:
        """Command 0 kW, then turn on the setpoint enable and the run command, each verified.

        Raises PcsFaultError when the fault is latched already or latches
        here. In the second case the PCS is first commanded to 0 kW and
        disabled as far as the link allows.
        """
        self._require_started()
        self._require_not_faulted()
        await self._command_zero()
        if self.map.setpoint_enable is not None:
            await self._write_verified("setpoint_enable", self.map.setpoint_enable, 1)
        if self.map.enable is not None:
            await self._write_verified("enable", self.map.enable, self.map.enable_on)
        if not self.enabled:
            self.enabled = True
            self._log.info("pcs enabled")

    async def disable(self) -> bool:
        """Command 0 kW, then turn off the run command and the setpoint enable.

        Tries every step even when one fails, because this is also the path
        taken after a fault. Returns whether every step was verified.
        """
        ok = True
        point = self.map.setpoint
        try:
            words, _ = self._encode_setpoint("p", 0.0)
            await self._write_words(point, words)
            readback = await self._read_setpoint("p")
            ok = readback is not None and readback == 0.0
        except (ModbusError, ValueError) as err:
            ok = False
            self._log.warning("pcs zero setpoint failed", error=str(err))
        for point, value in (
            (self.map.enable, self.map.enable_off),
            (self.map.setpoint_enable, 0),
        ):
            if point is None:
                continue
            try:
                await self.device.write_point(point.name, value)
            except (ModbusError, ValueError) as err:
                ok = False
                self._log.warning("pcs disable step failed", point=point.name, error=str(err))
        if self.enabled or ok:
            self._log.info("pcs disabled", verified=ok)
        self.enabled = False
        return ok

    async def step(self, p_kw: float, q_kvar: float | None = None) -> Decision:
        """Run one writer cycle: perform the writes the policy decides are due, and read them back.

        ``p_kw`` is clamped to ``rated_kw``. Device errors do not raise: they
        count against the write budget, and a latched fault brings the PCS
        to 0 kW and disabled (see :attr:`fault`). Returns the writes decided.
        """
        self._require_started()
        was_faulted = self.policy.faulted
        now_s = self._clock()
        decision = self.policy.decide(now_s, p_kw, q_kvar)
        if decision.p_kw is not None:
            await self._write_setpoint("p", now_s, decision.p_kw)
        if decision.q_kvar is not None:
            await self._write_setpoint("q", now_s, decision.q_kvar)
        if decision.heartbeat is not None:
            await self._write_heartbeat(now_s, decision.heartbeat)
        if self.policy.faulted and not was_faulted:
            await self._on_fault()
        return decision

    async def reset(self) -> None:
        """Clear a latched fault (operator reset) and program the PCS again, as at start.

        The PCS stays disabled; call :meth:`enable` to command power again.
        """
        fault = self.policy.fault
        self.policy.reset()
        self._safe_stopped = False
        self.revert_timer_programmed = False
        self.started = False
        if fault is not None:
            self._log.info("pcs fault cleared", target=fault.target)
        await self.start()

    async def _command_zero(self) -> None:
        """Write 0 kW and verify it, retrying within the write budget."""
        for _ in range(self.policy.settings.write_budget):
            if await self._write_setpoint("p", self._clock(), 0.0):
                return
            if self.policy.faulted:
                break
            await asyncio.sleep(self.policy.settings.min_write_interval_s)
        await self._raise_fault()

    async def _write_verified(self, target: str, point: Point, value: float) -> None:
        """Write a one-off point through ModbusDevice, retrying within the write budget."""
        for _ in range(self.policy.settings.write_budget):
            try:
                await self.device.write_point(point.name, value)
            except (ModbusError, ValueError) as err:
                self.policy.record_result(target, self._clock(), False, str(err))
                if self.policy.faulted:
                    break
                await asyncio.sleep(self.policy.settings.min_write_interval_s)
                continue
            self.policy.record_result(target, self._clock(), True)
            return
        await self._raise_fault()

    async def _raise_fault(self) -> None:
        await self._on_fault()
        fault = self.policy.fault
        detail = fault.detail if fault else "unknown"
        target = fault.target if fault else "unknown"
        raise PcsFaultError(
            f"{self.where}: write of {target} failed: {detail}; the PCS was commanded to 0 kW "
            "and disabled as far as the link allows. Check the PCS's own fault log and its "
            "local/remote switch, then reset"
        )

    async def _on_fault(self) -> None:
        if self._safe_stopped:
            return
        self._safe_stopped = True
        fault = self.policy.fault
        self._log.error(
            "pcs fault latched",
            target=fault.target if fault else None,
            detail=fault.detail if fault else None,
        )
        await self.disable()

    def _require_started(self) -> None:
        if not self.started:
            raise PcsError(f"{self.where}: not started; call start() first")

    def _require_not_faulted(self) -> None:
        fault = self.policy.fault
        if fault is not None:
            raise PcsFaultError(
                f"{self.where}: fault latched ({fault.target}: {fault.detail}); "
                "find and clear the cause, then reset the PCS"
            )

    # ------------------------------------------------------------------ setpoint I/O

    def _plan_block(self, point: Point | None) -> ReadBlock | None:
        if point is None:
            return None
        points = [point]
        if point.scale_factor is not None:
            points.append(self.profile.point(point.scale_factor))
        (block,) = plan_reads(points, self.profile.max_gap_regs, self.profile.max_block_regs)
        return block

    def _setpoint_point(self, target: str) -> tuple[Point, int, float]:
        """Return the point, the sign and the kW (or kvar) per engineering unit of ``target``."""
        if target == "p":
            point, sign, units = self.map.setpoint, self.map.setpoint_sign, POWER_UNITS_KW
        else:
            point = self.map.reactive_setpoint
            assert point is not None
            sign, units = self.map.reactive_sign, REACTIVE_UNITS_KVAR
        if point.unit == PERCENT:
            base_kw = self.nameplate_kw or self.rated_kw
            return point, sign, base_kw / 100
        return point, sign, units[point.unit]

    async def _refresh_multiplier(self, target: str) -> None:
        try:
            await self._read_setpoint(target)
        except ModbusError as err:
            raise PcsStartError(
                f"{self.where}: reading the setpoint register failed: {err}"
            ) from err
        if target not in self._multipliers:
            point, _, _ = self._setpoint_point(target)
            raise PcsStartError(
                f"{self.where}: the scale factor {point.scale_factor!r} of {point.name!r} is "
                "invalid or not implemented, so no setpoint can be written; check the PCS's "
                "SunSpec map"
            )

    def _encode_setpoint(self, target: str, value_kw: float) -> tuple[list[int], float]:
        """Return the registers for ``value_kw`` and the kW those registers stand for.

        The second value differs from ``value_kw`` by the register's
        resolution (100 W for a W point with scale factor 2).
        """
        point, sign, kw_per_unit = self._setpoint_point(target)
        multiplier = self._multipliers.get(target)
        if multiplier is None:
            raise ValueError(f"no valid scale factor read yet for {point.name!r}")
        engineering = sign * value_kw / kw_per_unit
        if (point.min is not None and engineering < point.min) or (
            point.max is not None and engineering > point.max
        ):
            raise ValueError(
                f"{value_kw:g} kW is {engineering:g} {point.unit} for {point.name!r}, outside "
                f"its range {point.min}..{point.max}"
            )
        raw: float = (engineering - point.offset) / multiplier
        if point.type in INTEGER_TYPES or point.type in ("u64", "i64"):
            raw = round(raw)
            if raw == codec.SENTINELS[point.type]:
                raise ValueError(
                    f"{value_kw:g} kW encodes as {raw}, the 'no value' marker of {point.type}"
                )
        words = codec.encode(raw, point.type, point.order, point.length)
        applied_kw = sign * (raw * multiplier + point.offset) * kw_per_unit
        return words, applied_kw

    async def _write_words(self, point: Point, words: list[int]) -> None:
        if len(words) == 1:
            await self.link.write_register(self.unit_id, point.address, words[0], self.timeout_s)
        else:
            await self.link.write_registers(self.unit_id, point.address, words, self.timeout_s)

    async def _read_setpoint(self, target: str) -> float | None:
        """Read a setpoint with its scale factor; return kW (kvar), None when not GOOD."""
        block = self._setpoint_blocks[target]
        assert block is not None
        registers = await self.link.read(
            self.unit_id, block.function_code, block.address, block.count, self.timeout_s
        )
        readings = decode_block(block, registers, self._clock())
        point, sign, kw_per_unit = self._setpoint_point(target)
        if point.scale_factor is not None:
            factor = readings[point.scale_factor]
            if factor.good and isinstance(factor.value, int):
                self._multipliers[target] = 10.0**factor.value
            else:
                self._multipliers.pop(target, None)
        else:
            self._multipliers[target] = point.scale if point.scale is not None else 1.0
        reading = readings[point.name]
        if not reading.good or not isinstance(reading.value, (int, float)):
            return None
        return sign * reading.value * kw_per_unit

    async def _write_setpoint(self, target: str, now_s: float, value_kw: float) -> bool:
        """Write one setpoint, read it back, and record the result in the policy."""
        try:
            words, applied_kw = self._encode_setpoint(target, value_kw)
        except ValueError as err:
            return self.policy.record_setpoint(
                target, now_s, value_kw, None, f"cannot encode {value_kw:g}: {err}"
            )
        try:
            await self._write_words(self._setpoint_point(target)[0], words)
            readback = await self._read_setpoint(target)
        except ModbusError as err:
            return self.policy.record_setpoint(target, now_s, applied_kw, None, str(err))
        if readback is None:
            detail = "the setpoint read back is invalid or not implemented"
            return self.policy.record_setpoint(target, now_s, applied_kw, None, detail)
        return self.policy.record_setpoint(target, now_s, applied_kw, readback)

    async def _write_heartbeat(self, now_s: float, value: int) -> None:
        point = self.map.heartbeat
        assert point is not None
        try:
            await self._write_words(point, codec.encode(value, point.type, point.order))
        except ModbusError as err:
            self.policy.record_heartbeat(now_s, value, False, str(err))
            return
        # The write response echoes address and value (function 6) or count (16),
        # which the link checks; a separate read-back would double the traffic.
        self.policy.record_heartbeat(now_s, value, True)

    # ------------------------------------------------------------------ status

    async def read_status(self) -> PcsStatus:
        """Read the PCS once and return its status; device errors become reading qualities."""
        readings = await self.device.poll_once()
        map_ = self.map
        now_s = self._clock()

        def value(point: Point | None) -> float | int | None:
            if point is None:
                return None
            reading = readings[point.name]
            return reading.value if reading.good else None  # type: ignore[return-value]

        p_kw = _power_reading(readings, map_.active_power, map_.active_power_sign, now_s)
        setpoint_kw = self._setpoint_reading(readings, now_s)
        enable_values = [
            value(p) == on
            for p, on in ((map_.enable, map_.enable_on), (map_.setpoint_enable, 1))
            if p is not None
        ]
        unreadable = any(
            p is not None and value(p) is None for p in (map_.enable, map_.setpoint_enable)
        )
        enabled = None if unreadable or not enable_values else all(enable_values)
        state_code = value(map_.status)
        state_code = int(state_code) if state_code is not None else None
        events = _event_names(value(map_.fault), map_.fault_bit_names)
        timer_value = value(map_.revert_timer)
        revert_timer_s = (
            float(timer_value) * TIME_UNITS_S[map_.revert_timer.unit]
            if timer_value is not None and map_.revert_timer is not None
            else None
        )
        heartbeat = value(map_.heartbeat)
        return PcsStatus(
            name=self.name,
            link=self.link.name,
            unit_id=self.unit_id,
            device_state=self.device.state.value,
            p_kw=p_kw,
            setpoint_kw=setpoint_kw,
            enabled=enabled,
            state_code=state_code,
            state_name=_state_name(state_code, map_.status_names),
            state_fault=state_code in map_.status_fault_values,
            events=events,
            revert_timer_s=revert_timer_s,
            revert_timer_programmed=self.revert_timer_programmed,
            heartbeat=int(heartbeat) if heartbeat is not None else None,
            last_write_mono_s=self.policy.last_ok_s("p"),
            write_failures=self.policy.total_failures,
            fault=self.policy.fault,
        )

    def _setpoint_reading(self, readings: Mapping[str, Reading], now_s: float) -> Reading:
        point, sign, kw_per_unit = self._setpoint_point("p")
        reading = readings[point.name]
        if not reading.good or not isinstance(reading.value, (int, float)):
            return Reading.bad(
                reading.quality if not reading.good else Quality.OUT_OF_RANGE, now_s, "kW"
            )
        return Reading(sign * reading.value * kw_per_unit, Quality.GOOD, reading.t_mono_s, "kW")


def _power_reading(
    readings: Mapping[str, Reading], point: Point | None, sign: int, now_s: float
) -> Reading:
    if point is None:
        return Reading.bad(Quality.NOT_IMPLEMENTED, now_s, "kW")
    reading = readings[point.name]
    if not reading.good or not isinstance(reading.value, (int, float)):
        quality = reading.quality if not reading.good else Quality.OUT_OF_RANGE
        return Reading.bad(quality, now_s, "kW")
    kw = sign * reading.value * POWER_UNITS_KW[point.unit]
    return Reading(kw, Quality.GOOD, reading.t_mono_s, "kW")


def _state_name(code: int | None, names: Mapping[int, str]) -> str:
    if code is None:
        return "unknown"
    return names.get(code, f"state {code}")


def _event_names(bits: float | int | None, names: tuple[str, ...]) -> tuple[str, ...]:
    if bits is None:
        return ()
    word = int(bits)
    return tuple(
        names[bit] if bit < len(names) else f"bit {bit}"
        for bit in range(word.bit_length())
        if word >> bit & 1
    )


def _heartbeat_modulo(point: Point | None) -> int:
    """Return the counter's modulo: its largest value, so it never writes the type's sentinel."""
    if point is None:
        return 65535
    return {"u16": 0xFFFF, "i16": 0x7FFF, "u32": 0xFFFF_FFFF, "i32": 0x7FFF_FFFF}[point.type]


class PcsGroup:
    """The PCS units of one gateway, started, stepped and disabled together.

    Units on separate links run concurrently. Units that share a link queue
    their requests on it, as the link allows one request in flight at a time.
    """

    def __init__(self, drivers: Iterable[PcsDriver]) -> None:
        self.drivers = {driver.name: driver for driver in drivers}

    async def start(self) -> None:
        """Start every unit; raise the first error after every unit was tried."""
        results = await asyncio.gather(
            *(driver.start() for driver in self.drivers.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def step(self, p_kw: Mapping[str, float]) -> dict[str, Decision]:
        """Step every unit with its setpoint; a unit missing from ``p_kw`` is commanded 0 kW."""
        names = list(self.drivers)
        decisions = await asyncio.gather(
            *(self.drivers[name].step(p_kw.get(name, 0.0)) for name in names)
        )
        return dict(zip(names, decisions, strict=True))

    async def disable(self) -> dict[str, bool]:
        """Disable every unit; return per unit whether every step was verified."""
        names = list(self.drivers)
        results = await asyncio.gather(*(self.drivers[name].disable() for name in names))
        return dict(zip(names, results, strict=True))

    @property
    def faults(self) -> dict[str, Fault]:
        return {
            name: driver.fault for name, driver in self.drivers.items() if driver.fault is not None
        }


__all__ = [
    "PcsConfigError",
    "PcsDriver",
    "PcsError",
    "PcsFaultError",
    "PcsGroup",
    "PcsMap",
    "PcsStartError",
    "PcsStatus",
]
