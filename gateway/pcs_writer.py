"""The daemon's PCS writer: programs a PCS at start, sends setpoints, keeps it alive, stops it.

It performs the writes that :class:`drivers.pcs_policy.SetpointPolicy`
decides (deadband, write rate, retry budget, fault latch), through the
PCS's :class:`~drivers.modbus.device.ModbusDevice`, whose ``write_point``
reads every write back. Point names and signs come from the profile's
``[pcs]`` table.

NOTE: this is the daemon's own thin writer, built while the full PCS
command path (``drivers/pcs.py``) was not available; once that lands, the
daemon should drive it instead and this module should go.
"""

from __future__ import annotations

import math
import time
from typing import Any

import structlog

from drivers.modbus.device import ModbusDevice
from drivers.modbus.errors import ModbusError
from drivers.pcs_policy import PolicySettings, SetpointPolicy
from gateway.config import Device, SiteConfig

log = structlog.get_logger(__name__)

#: Shortest time between two setpoint writes to one PCS (20 writes/s).
MIN_WRITE_INTERVAL_S = 0.05
#: The register's resolution (WSet in 100 W steps on the SunSpec profile) plus margin.
READBACK_TOLERANCE_KW = 0.2


class PcsWriter:
    """Write path of one PCS; ``apply`` is called every ``period_s`` by the daemon."""

    def __init__(self, device: Device, poller: ModbusDevice, config: SiteConfig) -> None:
        self.name = device.name
        self.device = poller
        self.settings: dict[str, Any] = dict(poller.profile.pcs)
        if "setpoint_point" not in self.settings:
            raise ValueError(
                f"PCS {device.name!r}: profile {poller.profile.name!r} has no [pcs] "
                "setpoint_point; the daemon cannot command it"
            )
        self.sign = float(self.settings.get("setpoint_sign", 1))
        self.unit_kw = {"W": 1e-3, "kW": 1.0}.get(
            poller.profile.point(self.settings["setpoint_point"]).unit, 1.0
        )
        safety = config.safety
        revert_s = safety.pcs_revert_s
        self.revert_timer_s = max(1, math.ceil(revert_s))
        self.policy = SetpointPolicy(
            PolicySettings(
                rated_kw=float(device.rated_kw or 0.0),
                deadband_kw=config.control.deadband_kw,
                min_write_interval_s=MIN_WRITE_INTERVAL_S,
                readback_tolerance_kw=READBACK_TOLERANCE_KW,
                write_budget=safety.pcs_write_budget,
                # Rewrite before the PCS's own reversion timer can expire.
                refresh_interval_s=max(MIN_WRITE_INTERVAL_S * 2, self.revert_timer_s / 3),
                heartbeat_period_s=max(MIN_WRITE_INTERVAL_S * 2, 1.0)
                if "heartbeat_point" in self.settings
                else None,
            )
        )
        self.period_s = MIN_WRITE_INTERVAL_S
        self.enabled: bool | None = None
        self.prepared = False
        self._fault_logged = False

    async def prepare(self) -> None:
        """Program the reversion timer and the setpoint enable; raises on a failed write."""
        s = self.settings
        if "revert_timer_point" in s:
            await self.device.write_point(s["revert_timer_point"], self.revert_timer_s)
        if "setpoint_enable_point" in s:
            await self.device.write_point(s["setpoint_enable_point"], 1)
        self.prepared = True
        log.info("pcs_prepared", device=self.name, revert_timer_s=self.revert_timer_s)

    async def apply(self, p_kw: float, enabled: bool) -> None:
        """Send what the policy says is due for this request; failures count toward the budget."""
        now = time.monotonic()
        if self.policy.faulted:
            self._log_fault()
            return
        try:
            if not self.prepared:
                await self.prepare()
            if enabled != self.enabled:
                await self._set_enabled(enabled)
        except (ModbusError, ValueError) as err:
            self.policy.record_result("enable", now, False, str(err))
            return
        decision = self.policy.decide(now, p_kw if enabled else 0.0)
        if decision.p_kw is not None:
            readback: float | None = decision.p_kw
            try:
                raw = decision.p_kw * self.sign / self.unit_kw
                await self.device.write_point(self.settings["setpoint_point"], raw)
            except (ModbusError, ValueError) as err:
                readback = None
                log.debug("pcs_write_failed", device=self.name, error=str(err))
            self.policy.record_setpoint("p", now, decision.p_kw, readback)
        if decision.heartbeat is not None:
            try:
                await self.device.write_point(self.settings["heartbeat_point"], decision.heartbeat)
                self.policy.record_heartbeat(now, decision.heartbeat, True)
            except (ModbusError, ValueError) as err:
                self.policy.record_heartbeat(now, decision.heartbeat, False, str(err))

    async def shutdown(self) -> None:
        """Command 0 kW and disable; raises when a write is not confirmed."""
        await self.device.write_point(self.settings["setpoint_point"], 0)
        await self._set_enabled(False)

    async def _set_enabled(self, enabled: bool) -> None:
        s = self.settings
        if "enable_point" in s:
            value = s.get("enable_on", 1) if enabled else s.get("enable_off", 0)
            await self.device.write_point(s["enable_point"], value)
        self.enabled = enabled
        log.info("pcs_enabled" if enabled else "pcs_disabled", device=self.name)

    def _log_fault(self) -> None:
        if not self._fault_logged:
            fault = self.policy.fault
            log.error(
                "pcs_write_fault_latched",
                device=self.name,
                target=fault.target if fault else None,
                detail=fault.detail if fault else None,
            )
            self._fault_logged = True

    @property
    def faulted(self) -> bool:
        return self.policy.faulted

    def reset(self) -> None:
        """Operator reset: clear the latched write fault and program the PCS again."""
        self.policy.reset()
        self.prepared = False
        self.enabled = None
        self._fault_logged = False
