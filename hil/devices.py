"""Simulated site devices that speak the real protocols on real sockets on 127.0.0.1.

Each device is built from the same TOML profile the gateway's drivers use,
so the gateway reaches it by configuration alone:

* :class:`PcsUnit`: one unit of the plant's :class:`~hil.plant.PcsBank`,
  a Modbus TCP server with a PCS profile (``pcs-sunspec``). Writes of the
  profile's ``[pcs]`` points go to the bank; the read-back points are
  refreshed from the plant by :meth:`PcsUnit.publish`.
* :class:`MeterDevice`: a Modbus TCP meter (``meter-3ph``, ``pdu-rack``)
  whose ``[meter]`` power point the caller sets from a plant signal.
* :class:`BmsDevice`: the BMS of one battery string, sending Pylontech-style
  frame sets built from the plant's :class:`~hil.plant.Battery` over slcan
  on a TCP ``socket://`` URL, over python-can's virtual bus, or both.

Every device can carry the faults of :data:`hil.scenario.FaultKind` that
apply to its kind (:data:`FAULT_KINDS`), switched on and off with
:meth:`inject` and :meth:`clear`. Servers listen on 127.0.0.1 only. The
classes are not thread-safe: call them on the event loop that serves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import can
import structlog
from pymodbus.constants import ExcCodes

from drivers.can.pylontech import FRAMES, encode_frame
from drivers.modbus.profile import Profile, load_profile
from drivers.modbus.server import RegisterServer, RegisterWrite
from hil.plant import LFP_OCV_CELL_V, Battery, BmsLimits, PcsMode, Plant
from hil.scenario import Scenario
from hil.slcan_server import SlcanTcpServer, slcan_line

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"

#: Fault kinds each device kind accepts; the gateway's own kinds are handled by the rig.
FAULT_KINDS: dict[str, frozenset[str]] = {
    "meter": frozenset({"delay", "drop", "freeze", "exception", "disconnect", "sentinel"}),
    "pcs": frozenset(
        {"delay", "drop", "freeze", "exception", "disconnect", "sentinel", "pcs_trip"}
    ),
    "bms": frozenset({"freeze", "disconnect", "bms_silent", "bms_alarm", "bms_limits_zero"}),
    "gateway": frozenset({"gateway_sigkill", "gateway_sigterm"}),
}

_KW_PER_UNIT = {"W": 1e-3, "kW": 1.0, "MW": 1e3}


def _kw_per_unit(profile: Profile, point: str) -> float:
    unit = profile.point(point).unit
    if unit not in _KW_PER_UNIT:
        raise ValueError(
            f"profile {profile.name!r}: point {point!r} has unit {unit!r}; a power point "
            f"needs one of {', '.join(_KW_PER_UNIT)}"
        )
    return _KW_PER_UNIT[unit]


class ModbusSim:
    """A Modbus TCP device of the rig: one :class:`RegisterServer` plus the Modbus faults.

    ``disconnect`` stops the server and closes its connections; clearing it
    starts the server again on the same port, as a device that reboots does.
    """

    kind = "meter"

    def __init__(self, name: str, profile: Profile, unit_id: int = 1) -> None:
        self.name = name
        self.profile = profile
        self.unit_id = unit_id
        self.server = RegisterServer(profile, unit_id, on_write=self._on_write)
        self.port: int | None = None
        #: True while a ``sentinel`` fault replaces the published values with "no value".
        self.sentinel = False
        self._listening = False

    async def start(self, port: int = 0) -> int:
        """Serve Modbus TCP on 127.0.0.1 (``port`` 0 picks a free one); return the port."""
        self.port = await self.server.start_tcp(HOST, port)
        self._listening = True
        return self.port

    async def stop(self) -> None:
        self._listening = False
        await self.server.stop()

    def _on_write(self, write: RegisterWrite) -> None:
        """Take a write the server accepted; devices that act on writes override it."""

    def _sentinel_points(self) -> list[str]:
        """Points that a ``sentinel`` fault sets to their "no value" encoding."""
        return []

    async def inject(self, kind: str, value: float = 0.0) -> None:
        """Start a fault: ``value`` is the delay in s for ``delay``, the exception code for
        ``exception`` (default 4, device failure)."""
        faults = self.server.faults
        if kind == "delay":
            faults.delay_s = value
        elif kind == "drop":
            faults.drop_all = True
        elif kind == "freeze":
            faults.frozen = True
        elif kind == "exception":
            code = ExcCodes(int(value)) if value else ExcCodes.DEVICE_FAILURE
            for function in ("holding", "input"):
                points = self.profile.points_for(function)
                if points:
                    first = points[0].address
                    faults.exception_for(first, points[-1].end - first, code, function)
        elif kind == "disconnect":
            await self.stop()
        elif kind == "sentinel":
            self.sentinel = True
            for point in self._sentinel_points():
                self.server.set_point(point, None)
        else:
            raise ValueError(f"{self.name}: fault {kind!r} does not apply to a {self.kind}")

    async def clear(self, kind: str) -> None:
        """End a fault started with :meth:`inject`."""
        faults = self.server.faults
        if kind == "delay":
            faults.delay_s = 0.0
        elif kind == "drop":
            faults.drop_all = False
        elif kind == "freeze":
            faults.frozen = False
        elif kind == "exception":
            faults.exceptions.clear()
        elif kind == "disconnect":
            if not self._listening:
                await self.start(self.port or 0)
        elif kind == "sentinel":
            self.sentinel = False
        else:
            raise ValueError(f"{self.name}: fault {kind!r} does not apply to a {self.kind}")


class MeterDevice(ModbusSim):
    """A power meter whose ``[meter]`` power point is set from a plant signal.

    :meth:`publish` takes the power in the role's sign: import for a grid
    meter, consumption for a load meter, generation for a renewable meter.
    It applies the profile's ``power_sign``, splits the power equally over
    the phase power points that exist and integrates the energy points.
    """

    kind = "meter"
    #: Line-to-neutral voltage published once at start, in V.
    PHASE_VOLTAGE_V = 230.0
    #: Power factor of the simulated load, an assumption: server power supplies with
    #: active power-factor correction run at about 0.95-0.99 under load. The currents, the
    #: apparent and reactive power follow from it; the gateway reads none of them.
    POWER_FACTOR = 0.98

    def __init__(self, name: str, profile: Profile, unit_id: int = 1) -> None:
        settings = profile.meter
        if "power_point" not in settings:
            raise ValueError(
                f"profile {profile.name!r} has no [meter] power_point; a meter simulator needs it"
            )
        super().__init__(name, profile, unit_id)
        self._power_point = settings["power_point"]
        self._raw_per_kw = float(settings.get("power_sign", 1)) / _kw_per_unit(
            profile, self._power_point
        )
        names = {p.name for p in profile.points}
        self._phase_points = [p for p in ("p_l1_kw", "p_l2_kw", "p_l3_kw") if p in names]
        self._import_point = settings.get("energy_import_point")
        self._export_point = settings.get("energy_export_point")
        self.import_kwh = 0.0
        self.export_kwh = 0.0
        self.value_kw = math.nan
        self._last_t_s: float | None = None
        self._names = names
        fixed = {
            "v_l1_v": self.PHASE_VOLTAGE_V,
            "v_l2_v": self.PHASE_VOLTAGE_V,
            "v_l3_v": self.PHASE_VOLTAGE_V,
            "v_avg_v": self.PHASE_VOLTAGE_V,
            "v_l1_l2_v": self.PHASE_VOLTAGE_V * math.sqrt(3),
            "v_l2_l3_v": self.PHASE_VOLTAGE_V * math.sqrt(3),
            "v_l3_l1_v": self.PHASE_VOLTAGE_V * math.sqrt(3),
            "f_hz": 50.0,
        }
        for point, value in fixed.items():
            if point in names:
                self.server.set_point(point, value)

    def _sentinel_points(self) -> list[str]:
        return [self._power_point, *self._phase_points]

    def publish(self, p_kw: float, t_s: float) -> None:
        """Publish ``p_kw`` measured at plant time ``t_s``; NaN publishes nothing."""
        if self._last_t_s is not None and math.isfinite(self.value_kw):
            hours = max(t_s - self._last_t_s, 0.0) / 3600.0
            if self.value_kw >= 0:
                self.import_kwh += self.value_kw * hours
            else:
                self.export_kwh -= self.value_kw * hours
        self._last_t_s = t_s
        if not math.isfinite(p_kw):
            return
        self.value_kw = p_kw
        if self.sentinel:
            return
        server = self.server
        server.set_point(self._power_point, p_kw * self._raw_per_kw)
        for point in self._phase_points:
            server.set_point(point, p_kw * self._raw_per_kw / len(self._phase_points))
        if self._import_point:
            server.set_point(self._import_point, self.import_kwh)
        if self._export_point:
            server.set_point(self._export_point, self.export_kwh)
        self._publish_derived(p_kw)

    def _publish_derived(self, p_kw: float) -> None:
        """Set the currents, power factors and apparent and reactive power that ``p_kw`` implies."""
        pf = self.POWER_FACTOR
        phase_a = abs(p_kw) * 1000.0 / 3 / (self.PHASE_VOLTAGE_V * pf)
        apparent_kva = abs(p_kw) / pf
        derived = {
            "i_l1_a": phase_a,
            "i_l2_a": phase_a,
            "i_l3_a": phase_a,
            "i_sum_a": 3 * phase_a,
            "pf_l1": pf,
            "pf_l2": pf,
            "pf_l3": pf,
            "pf": pf,
            "s_kva": apparent_kva,
            "q_kvar": apparent_kva * math.sqrt(1.0 - pf * pf),
        }
        for point, value in derived.items():
            if point in self._names:
                self.server.set_point(point, value)


@dataclass(frozen=True)
class PcsWrite:
    """One Modbus write a PCS unit received, at plant time ``t_s``."""

    t_s: float
    points: tuple[str, ...]
    #: Setpoint register after the write, in kW (+discharge).
    setpoint_kw: float
    #: Whether the unit follows its setpoint after the write (connected and setpoint enabled).
    following: bool


class PcsUnit(ModbusSim):
    """Unit ``index`` of the plant's PCS bank, served with a PCS profile's registers.

    Writes, by the profile's ``[pcs]`` names (SunSpec model 123 and 64900 in
    ``pcs-sunspec``):

    * ``setpoint_point`` (WSet): the new setpoint, and a kick of the
      command watchdog (the reversion timer counts from the last write);
    * ``enable_point`` (Conn) and ``setpoint_enable_point`` (WSet_Ena): the
      unit follows its setpoint only while both are on, else it goes to 0;
    * ``revert_timer_point`` (WSet_RvrtTms): seconds after the last setpoint
      write at which the unit falls back to 0 kW; 0 means never;
    * ``heartbeat_point`` (HbCnt): once it has changed, the unit opens
      (``enable_point`` off) when it stops changing for
      ``heartbeat_timeout_point`` (HbTmoTms) seconds.

    Read-back (:meth:`publish`): active power (W), status (St as SunSpec
    model 103 codes), the vendor state (StVnd = :class:`hil.plant.PcsMode`),
    the event bits (Evt1), SoC, battery voltage, DC power and charge status.
    """

    kind = "pcs"

    def __init__(
        self,
        name: str,
        plant: Plant,
        index: int,
        profile: Profile,
        *,
        unit_id: int = 1,
        revert_s: float | None = None,
    ) -> None:
        settings = profile.pcs
        missing = [k for k in ("setpoint_point", "active_power_point") if k not in settings]
        if missing:
            raise ValueError(
                f"profile {profile.name!r} has no [pcs] {', '.join(missing)}; "
                "the PCS simulator needs both"
            )
        if not 0 <= index < plant.pcs.units:
            raise ValueError(f"{name}: unit index {index} is not in the bank of {plant.pcs.units}")
        super().__init__(name, profile, unit_id)
        self.plant = plant
        self.index = index
        self.settings = dict(settings)

        self._setpoint_point = settings["setpoint_point"]
        self._kw_per_setpoint = _kw_per_unit(profile, self._setpoint_point) * float(
            settings.get("setpoint_sign", 1)
        )
        self._power_point = settings["active_power_point"]
        self._raw_per_kw = float(settings.get("active_power_sign", 1)) / _kw_per_unit(
            profile, self._power_point
        )
        names = {p.name for p in profile.points}
        self._optional = {point: point in names for point in ("StVnd", "InBatV", "DCW", "ChaSt")}
        self._status_codes = {
            name: int(code) for code, name in settings.get("status_names", {}).items()
        }
        self._fault_bits = list(settings.get("fault_bit_names", []))

        self.writes: list[PcsWrite] = []
        self.last_setpoint_t_s = -math.inf
        self._heartbeat: object = None
        self._heartbeat_t_s: float | None = None
        self._event_bits = 0
        if revert_s is not None and "revert_timer_point" in settings:
            self.server.set_point(settings["revert_timer_point"], math.ceil(revert_s))
        self._apply_revert_timer()

    # -- command path --------------------------------------------------------

    def _point_on(self, key: str, on_key: str | None = None) -> bool:
        point = self.settings.get(key)
        if point is None:
            return True
        on_value = self.settings.get(on_key, 1) if on_key else 1
        return self.server.get_point(point) == on_value

    @property
    def following(self) -> bool:
        """True while the unit is connected and its setpoint is enabled."""
        return self._point_on("enable_point", "enable_on") and self._point_on(
            "setpoint_enable_point"
        )

    @property
    def setpoint_kw(self) -> float:
        raw = self.server.get_point(self._setpoint_point)
        return 0.0 if raw is None else float(raw) * self._kw_per_setpoint

    def _sync(self) -> None:
        """Hand the bank the command in force, timed at the last setpoint write."""
        command_kw = self.setpoint_kw if self.following else 0.0
        self.plant.pcs.command(self.last_setpoint_t_s, command_kw, self.index)

    def _apply_revert_timer(self) -> None:
        point = self.settings.get("revert_timer_point")
        seconds = self.server.get_point(point) if point else None
        revert_s = float(seconds) if seconds else math.inf
        bank = self.plant.pcs
        # NOTE: the bank has one reversion time for all units, so the last
        # unit programmed sets it for every unit. The gateway programs every
        # PCS the same way; a test that programs units differently needs one
        # bank per unit.
        if bank.params.revert_s != revert_s:
            bank.params = replace(bank.params, revert_s=revert_s)
            log.info("pcs reversion timer set", device=self.name, revert_s=revert_s)

    def _on_write(self, write: RegisterWrite) -> None:
        t_s = self.plant.t_s
        names = set(write.point_names)
        s = self.settings
        if s.get("revert_timer_point") in names:
            self._apply_revert_timer()
        if s.get("heartbeat_point") in names:
            value = self.server.get_point(s["heartbeat_point"])
            if value != self._heartbeat:
                self._heartbeat = value
                self._heartbeat_t_s = t_s
        if self._setpoint_point in names:
            self.last_setpoint_t_s = t_s
        if s.get("enable_point") in names and self._point_on("enable_point", "enable_on"):
            # Closing again restarts the heartbeat supervision from now.
            self._heartbeat_t_s = t_s if self._heartbeat_t_s is not None else None
        self._sync()
        self.writes.append(PcsWrite(t_s, write.point_names, self.setpoint_kw, self.following))

    def check_heartbeat(self, t_s: float) -> bool:
        """Open the unit when its heartbeat has stopped for the timeout; True when it opened."""
        point = self.settings.get("enable_point")
        timeout_point = self.settings.get("heartbeat_timeout_point")
        if self._heartbeat_t_s is None or point is None or timeout_point is None:
            return False
        timeout_s = self.server.get_point(timeout_point) or 0
        if not timeout_s or t_s - self._heartbeat_t_s <= timeout_s:
            return False
        self._heartbeat_t_s = None
        self.server.set_point(point, self.settings.get("enable_off", 0))
        self._sync()
        log.warning("pcs heartbeat timeout, unit opened", device=self.name, timeout_s=timeout_s)
        return True

    # -- trips ---------------------------------------------------------------

    def trip(self, reason: str, event_bit: int = 0) -> None:
        """Trip the unit: output 0 at once, St = fault, ``event_bit`` set in the event bits."""
        self.plant.pcs.trip(reason, self.index)
        if 0 <= event_bit < 32:
            self._event_bits |= 1 << event_bit
        log.warning("pcs tripped", device=self.name, reason=reason, event_bit=event_bit)

    def reset_trip(self) -> None:
        """Clear a trip; the unit waits in standby for a fresh setpoint write."""
        self.plant.pcs.reset(self.index)
        self._event_bits = 0
        log.info("pcs trip cleared", device=self.name)

    async def inject(self, kind: str, value: float = 0.0) -> None:
        """Start a fault; ``pcs_trip`` takes the event bit index in ``value`` (default 0)."""
        if kind == "pcs_trip":
            bit = int(value)
            name = self._fault_bits[bit] if bit < len(self._fault_bits) else f"bit {bit}"
            self.trip(f"injected trip ({name})", bit)
        else:
            await super().inject(kind, value)

    async def clear(self, kind: str) -> None:
        if kind == "pcs_trip":
            self.reset_trip()
        else:
            await super().clear(kind)

    def _sentinel_points(self) -> list[str]:
        return [self._power_point]

    # -- read-back -------------------------------------------------------------

    def status_name(self) -> str:
        """SunSpec model 103 operating state of the unit now."""
        mode = int(self.plant.pcs.state.mode[self.index])
        if mode == PcsMode.TRIPPED:
            return "fault"
        if not self._point_on("enable_point", "enable_on"):
            return "off"
        # Model 103 has no separate "running" state; storage inverters report MPPT (4) in
        # normal operation.
        return "mppt" if mode == PcsMode.RUNNING else "standby"

    def publish(self, full: bool = True) -> None:
        """Refresh the read-back registers: active power always, the rest when ``full``."""
        server = self.server
        p_kw = float(self.plant.pcs.state.p_kw[self.index])
        if not self.sentinel:
            server.set_point(self._power_point, p_kw * self._raw_per_kw)
        if not full:
            return
        s = self.settings
        battery = self.plant.battery.state
        units = self.plant.pcs.units
        code = self._status_codes.get(self.status_name())
        if "status_point" in s and code is not None:
            server.set_point(s["status_point"], code)
        if self._optional["StVnd"]:
            server.set_point("StVnd", int(self.plant.pcs.state.mode[self.index]))
        if "fault_point" in s:
            server.set_point(s["fault_point"], self._event_bits)
        if "soc_point" in s:
            server.set_point(s["soc_point"], round(battery.soc_pct, 1))
        if self._optional["InBatV"]:
            server.set_point("InBatV", round(battery.voltage_v, 1))
        if self._optional["DCW"]:
            server.set_point("DCW", battery.p_dc_kw * 1000.0 / units)
        if self._optional["ChaSt"]:
            # SunSpec model 124 ChaSt: 3 discharging, 4 charging, 6 holding.
            server.set_point("ChaSt", 3 if p_kw > 0.5 else 4 if p_kw < -0.5 else 6)


# --------------------------------------------------------------------------- BMS

#: Largest pack voltage the Pylontech 0x356 frame carries: signed 16 bits of 0.01 V.
MAX_PACK_VOLTAGE_V = 327.67
#: Pylontech frames a BMS device sends in one frame set, in order.
FRAME_IDS = (0x351, 0x355, 0x356, 0x359, 0x35C, 0x35E)


class BmsDevice:
    """The BMS of one of ``strings`` identical battery strings behind the plant's battery.

    The plant models one pack; each string is an equal share of it, so a
    string reports the pack's voltage, SoC and temperature, and the pack's
    current and current limits divided by ``strings``. A frame set goes out
    every ``period_s`` (Pylontech BMSs send each frame about once a second),
    the first at plant time ``phase_s``.

    Faults: ``bms_silent`` stops the frames; ``bms_alarm`` sets protection
    bits in 0x359 (``value`` is the 32-bit mask of bytes 0-3 little-endian,
    0 = system error, which blocks both directions); ``bms_limits_zero`` sends
    both current limits as 0 A; ``freeze`` repeats the frame set of the
    fault's start; ``disconnect`` closes the slcan server and its clients.
    """

    kind = "bms"
    #: 0x359 byte 1 bit 3: protection, system error.
    SYSTEM_ERROR_MASK = 1 << 11

    def __init__(
        self,
        name: str,
        battery: Battery,
        *,
        strings: int = 1,
        period_s: float = 1.0,
        phase_s: float = 0.0,
        manufacturer: str = "PYLON",
    ) -> None:
        if strings < 1 or not period_s > 0:
            raise ValueError(f"{name}: strings={strings} and period_s={period_s} must be positive")
        peak_v = battery.params.cells_in_series * float(LFP_OCV_CELL_V.max()) * 1.03
        if peak_v > MAX_PACK_VOLTAGE_V:
            cells_max = math.floor(MAX_PACK_VOLTAGE_V / (float(LFP_OCV_CELL_V.max()) * 1.03))
            raise ValueError(
                f"{name}: {battery.params.cells_in_series} LFP cells in series reach about "
                f"{peak_v:.0f} V, above the {MAX_PACK_VOLTAGE_V} V the Pylontech 0x356 frame "
                f"carries (signed 0.01 V); use at most {cells_max} cells in series"
            )
        self.name = name
        self.battery = battery
        self.strings = strings
        self.period_s = period_s
        self.manufacturer = manufacturer
        self.modules = max(1, round(battery.params.cells_in_series / 16))
        self.next_send_t_s = phase_s
        self.silent = False
        self.protection_mask = 0
        self.limits_zero = False
        self._frozen: list[tuple[int, bool, bytes]] | None = None
        #: Pack limits carried by the last frame set sent (all strings together).
        self.sent_limits: BmsLimits | None = None
        self.frame_sets_sent = 0
        self.slcan: SlcanTcpServer | None = None
        self.buses: list[can.BusABC] = []

    async def start_slcan(self, port: int = 0) -> str:
        """Serve the frames as an slcan adapter on 127.0.0.1; return its ``socket://`` URL."""
        if self.slcan is None:
            self.slcan = SlcanTcpServer(self.name)
        await self.slcan.start(HOST, port)
        return self.slcan.url

    def attach_virtual(self, channel: str) -> can.BusABC:
        """Also send the frames on python-can's virtual bus ``channel`` (same process only)."""
        bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
        self.buses.append(bus)
        return bus

    async def stop(self) -> None:
        if self.slcan is not None:
            await self.slcan.stop()
        for bus in self.buses:
            bus.shutdown()
        self.buses = []

    def frames(self) -> list[tuple[int, bool, bytes]]:
        """Return one frame set, (id, extended, data) per frame, from the battery now."""
        state = self.battery.state
        limits = self.battery.bms_limits()
        n = self.strings
        charge_a = 0.0 if self.limits_zero else limits.charge_current_a / n
        discharge_a = 0.0 if self.limits_zero else limits.discharge_current_a / n
        self.sent_limits = BmsLimits(
            charge_a * n, discharge_a * n, limits.charge_voltage_v, limits.discharge_voltage_v
        )
        status = bytearray(encode_frame(0x359, {"module_count": self.modules}))
        mask = self.protection_mask
        for byte in range(4):
            status[byte] |= (mask >> (8 * byte)) & 0xFF
        # The BMS reports discharge current as negative (the profile's current_sign).
        values = {
            0x351: {
                "charge_voltage_limit_v": limits.charge_voltage_v,
                "charge_current_limit_a": charge_a,
                "discharge_current_limit_a": discharge_a,
                "discharge_voltage_limit_v": limits.discharge_voltage_v,
            },
            0x355: {"soc_pct": round(state.soc_pct), "soh_pct": 100},
            0x356: {
                "pack_voltage_v": min(state.voltage_v, MAX_PACK_VOLTAGE_V),
                "pack_current_a": -state.current_a / n,
                "pack_temperature_c": state.temperature_c,
            },
            0x35C: {"charge_enable": charge_a > 0, "discharge_enable": discharge_a > 0},
            0x35E: {"manufacturer_name": self.manufacturer},
        }
        frames = []
        for frame_id in FRAME_IDS:
            data = bytes(status) if frame_id == 0x359 else encode_frame(frame_id, values[frame_id])
            frames.append((frame_id, FRAMES[frame_id].is_extended, data))
        return frames

    def due(self, t_s: float) -> bool:
        return t_s >= self.next_send_t_s

    def send(self, t_s: float) -> bool:
        """Send the frame set that is due at plant time ``t_s``; False while silent."""
        while self.next_send_t_s <= t_s:
            self.next_send_t_s += self.period_s
        if self.silent:
            return False
        frames = self._frozen if self._frozen is not None else self.frames()
        if self.slcan is not None:
            self.slcan.broadcast(b"".join(slcan_line(i, data, ext) for i, ext, data in frames))
        for bus in self.buses:
            for frame_id, extended, data in frames:
                bus.send(can.Message(arbitration_id=frame_id, is_extended_id=extended, data=data))
        self.frame_sets_sent += 1
        return True

    async def inject(self, kind: str, value: float = 0.0) -> None:
        if kind == "bms_silent":
            self.silent = True
        elif kind == "bms_alarm":
            self.protection_mask = int(value) or self.SYSTEM_ERROR_MASK
        elif kind == "bms_limits_zero":
            self.limits_zero = True
        elif kind == "freeze":
            self._frozen = self.frames()
        elif kind == "disconnect":
            if self.slcan is not None:
                await self.slcan.stop()
        else:
            raise ValueError(f"{self.name}: fault {kind!r} does not apply to a BMS")

    async def clear(self, kind: str) -> None:
        if kind == "bms_silent":
            self.silent = False
        elif kind == "bms_alarm":
            self.protection_mask = 0
        elif kind == "bms_limits_zero":
            self.limits_zero = False
        elif kind == "freeze":
            self._frozen = None
        elif kind == "disconnect":
            if self.slcan is not None:
                await self.slcan.start(HOST, self.slcan.port or 0)
        else:
            raise ValueError(f"{self.name}: fault {kind!r} does not apply to a BMS")


# --------------------------------------------------------------------------- site


class SiteDevices:
    """Every simulated device of a scenario's site, named as the generated configuration names them.

    Meters: ``grid`` (meter-3ph), ``rack-01`` .. (pdu-rack), ``wind`` and
    ``facility`` (meter-3ph, only when the scenario has them). PCS units
    ``pcs-1`` .. with the pcs-sunspec profile, and one BMS ``bms-1`` .. per
    unit. Each BMS sends at 1 s, the strings' phases spread over the second.
    """

    def __init__(self, scenario: Scenario, plant: Plant, bms_period_s: float = 1.0) -> None:
        meter = load_profile("meter-3ph")
        self.grid = MeterDevice("grid", meter)
        self.racks = [
            MeterDevice(f"rack-{i + 1:02d}", load_profile("pdu-rack"))
            for i in range(scenario.racks.count)
        ]
        self.wind = MeterDevice("wind", meter) if scenario.wind.rated_kw > 0 else None
        self.facility = MeterDevice("facility", meter) if scenario.facility.mean_kw > 0 else None
        units = scenario.pcs.units
        pcs_profile = load_profile("pcs-sunspec")
        self.pcs = [
            PcsUnit(f"pcs-{i + 1}", plant, i, pcs_profile, revert_s=scenario.pcs.revert_s)
            for i in range(units)
        ]
        self.bms = [
            BmsDevice(
                f"bms-{i + 1}",
                plant.battery,
                strings=units,
                period_s=bms_period_s,
                phase_s=i * bms_period_s / units,
            )
            for i in range(units)
        ]

    def meters(self) -> dict[str, tuple[str, MeterDevice]]:
        """Meter devices by name, each with its role in the gateway configuration."""
        table = {"grid": ("grid_meter", self.grid)}
        table.update({rack.name: ("rack_meter", rack) for rack in self.racks})
        if self.wind is not None:
            table["wind"] = ("renewable_meter", self.wind)
        if self.facility is not None:
            table["facility"] = ("facility_meter", self.facility)
        return table

    def by_name(self) -> dict[str, ModbusSim | BmsDevice]:
        devices: dict[str, ModbusSim | BmsDevice] = {
            name: device for name, (_, device) in self.meters().items()
        }
        devices.update({unit.name: unit for unit in self.pcs})
        devices.update({string.name: string for string in self.bms})
        return devices

    def kinds(self) -> dict[str, str]:
        """Device kind of every name a fault may target, ``gateway`` included."""
        kinds = {name: device.kind for name, device in self.by_name().items()}
        kinds["gateway"] = "gateway"
        return kinds

    async def start(self) -> None:
        """Start every Modbus server and every BMS slcan server on 127.0.0.1 with free ports."""
        for _, device in self.meters().values():
            await device.start()
        for unit in self.pcs:
            await unit.start()
        for string in self.bms:
            await string.start_slcan()

    async def stop(self) -> None:
        for device in self.by_name().values():
            await device.stop()
