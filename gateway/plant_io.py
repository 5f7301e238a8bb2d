"""The daemon's connection to the plant: pollers, CAN readers, PCS writers, and loop inputs.

:class:`PlantIO` builds from the site configuration, with the drivers in
``drivers/``:

* one :class:`~drivers.modbus.link.ModbusLink` per physical link (devices
  that share a TCP endpoint or a serial device share its link), and one
  :class:`~drivers.modbus.device.ModbusDevice` poller per Modbus device;
* one :class:`~drivers.can.bms.BmsString` per BMS, fed by a
  :class:`~drivers.can.reader.CanReader` per CAN link;
* one PCS writer task per PCS, which sends the setpoint that the daemon's
  ``command(index)`` returns, at the PCS's own rate.

:meth:`PlantIO.fill_inputs` turns the newest readings into the fast loop's
input records. Signs: grid +import, load +consumption, PCS +discharge. The
site load passed to the loop is ``racks + facility - renewables``. A site
without rack meters derives it from the balance ``grid + sum(PCS power)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from drivers.can.bms import BmsString, BmsStringConfig, Severity
from drivers.can.reader import CanLink, CanReader
from drivers.can.reader import LinkState as CanLinkState
from drivers.modbus.device import DeviceState, ModbusDevice
from drivers.modbus.errors import ModbusError
from drivers.modbus.link import LinkState, ModbusLink
from drivers.modbus.profile import Profile, load_profile
from drivers.pcs import PcsDriver, PcsError
from drivers.quality import Quality, Reading
from gateway.config import Device, SiteConfig
from gateway.measurements import MeasurementStore

log = structlog.get_logger(__name__)

#: Multipliers from a point's unit to kW.
_TO_KW = {"W": 1e-3, "kW": 1.0, "MW": 1e3}


@dataclass(frozen=True, slots=True)
class Command:
    """Order for one PCS: ``p_kw`` (+discharge) and whether it is enabled."""

    p_kw: float
    enabled: bool


CommandSource = Callable[[int], Command]


@dataclass(frozen=True, slots=True)
class SiteReadings:
    """Site powers in kW at one moment (signs as in the module docstring), and the mean SoC."""

    grid: Reading
    #: Load minus renewable output, as the fast loop receives it.
    net_load: Reading
    #: Sum of the measured PCS powers, +discharge.
    battery: Reading
    #: On-site generation, +generation; NOT_IMPLEMENTED on a site without a renewable meter.
    renewable: Reading
    soc: Reading


class PlantIO:
    """Devices of one site; see the module docstring."""

    def __init__(self, config: SiteConfig, measurements: MeasurementStore) -> None:
        self.config = config
        self.measurements = measurements
        self.profiles: dict[str, Profile] = {}
        self.links: dict[str, ModbusLink] = {}
        self.devices: dict[str, ModbusDevice] = {}
        self.bms: dict[str, BmsString] = {}
        #: Each CAN reader with the BMS strings whose frames it carries.
        self._can_strings: list[tuple[CanReader, list[BmsString]]] = []
        self.pcs: list[Device] = [d for d in config.devices if d.role == "pcs"]
        self.pcs_names = tuple(d.name for d in self.pcs)
        self.pcs_bms = pair_bms(config)
        self._tasks: list[asyncio.Task[None]] = []
        self._writer_tasks: list[asyncio.Task[None]] = []
        self._writers_stop = asyncio.Event()
        self._writers: list[PcsWriter] = []
        for device in config.devices:
            measurements.add_device(device.name, device.role, device.effective_stale_ms / 1000)
            if device.role == "bms":
                self.bms[device.name] = BmsString(BmsStringConfig.from_site(device, config.safety))
            else:
                self.profiles[device.name] = load_profile(device.profile)

    async def start(self, command: CommandSource) -> None:
        """Open every link and start the pollers, CAN readers and PCS writers."""
        for device in self.config.devices:
            if device.role == "bms":
                continue
            key = _link_key(device)
            link = self.links.get(key)
            if link is None:
                link = ModbusLink.from_transport(
                    device.transport, timeout_s=device.timeout_ms / 1000
                )
                self.links[key] = link
                await link.start()
            self.devices[device.name] = ModbusDevice(
                device.name,
                self.profiles[device.name],
                link,
                device.unit_id,
                device.poll_period_ms / 1000,
                device.timeout_ms / 1000,
                device.effective_stale_ms / 1000,
            )
        for name, poller in self.devices.items():
            self._tasks.append(asyncio.create_task(poller.run(self._on_poll), name=f"poll {name}"))
        self._start_can()
        for index, device in enumerate(self.pcs):
            link = self.links[_link_key(device)]
            writer = _make_writer(device, link, self.profiles[device.name], self.config)
            self._writers.append(writer)
            self._writer_tasks.append(
                asyncio.create_task(
                    self._write_loop(index, writer, command), name=f"pcs {device.name}"
                )
            )
        self._tasks.append(asyncio.create_task(self._watch_bms(), name="bms"))

    def _start_can(self) -> None:
        by_link: dict[tuple[str, str], list[BmsString]] = {}
        links: dict[tuple[str, str], CanLink] = {}
        for device in self.config.devices:
            if device.role != "bms":
                continue
            link = CanLink.from_transport(device.transport)
            key = (link.interface, link.channel)
            links[key] = link
            by_link.setdefault(key, []).append(self.bms[device.name])
        for key, strings in by_link.items():

            def sink(message: Any, t_mono_s: float, strings: list[BmsString] = strings) -> None:
                for string in strings:
                    string.on_message(message, t_mono_s)

            reader = CanReader(links[key], sink)
            reader.start()
            self._can_strings.append((reader, strings))

    async def stop(self) -> None:
        await _cancel([*self._writer_tasks, *self._tasks])
        self._writer_tasks = []
        self._tasks = []
        for reader, _ in self._can_strings:
            await asyncio.to_thread(reader.stop)
        self._can_strings = []
        for link in self.links.values():
            with contextlib.suppress(Exception):
                await link.close()
        self.links = {}

    def reset_faults(self) -> None:
        """Request the operator reset of every PCS driver whose write fault is latched."""
        for writer in self._writers:
            writer.request_reset()

    async def shutdown_pcs(self, timeout_s: float) -> dict[str, bool]:
        """Stop the writer cycles, then command 0 kW and disable every PCS.

        Returns, per PCS, whether both were confirmed by read-back. The
        cycles stop first, each at the end of its current cycle, because a
        driver takes one call at a time and a request cancelled half-way
        would leave its link waiting for a response. A shutdown that is not
        confirmed is tried once more.
        """
        self._writers_stop.set()
        _done, late = (
            await asyncio.wait(self._writer_tasks, timeout=timeout_s)
            if self._writer_tasks
            else (set(), set())
        )
        await _cancel(list(late))
        self._writer_tasks = []
        results: dict[str, bool] = {}
        for device, writer in zip(self.pcs, self._writers, strict=True):
            results[device.name] = False
            for attempt in (1, 2):
                try:
                    await asyncio.wait_for(writer.shutdown(), timeout_s)
                except Exception as err:
                    # One line with the reason; a traceback adds nothing for a failed write.
                    log.error(  # noqa: TRY400
                        "pcs_shutdown_unconfirmed",
                        device=device.name,
                        attempt=attempt,
                        error=repr(err),
                    )
                    continue
                results[device.name] = True
                break
        return results

    # -- polling -----------------------------------------------------------

    def _on_poll(self, name: str, readings: dict[str, Reading]) -> None:
        now = time.monotonic()
        device = self.devices[name]
        self.measurements.update(name, readings, now)
        if device.state is DeviceState.ONLINE:
            self.measurements.mark_ok(name, now)
        else:
            self.measurements.mark_error(name, str(device.last_error or device.state.value), now)

    async def _watch_bms(self) -> None:
        """Copy BMS snapshots into the measurement store at 10 Hz."""
        while True:
            now = time.monotonic()
            for reader, strings in self._can_strings:
                state = reader.health().state
                if state in (CanLinkState.DOWN, CanLinkState.BUS_OFF):
                    for string in strings:
                        string.link_down(f"{reader.link.describe()} is {state.value}", now)
            for name, string in self.bms.items():
                snapshot = string.snapshot(now)
                self.measurements.update(name, dict(snapshot.readings), now)
                if snapshot.power_allowed:
                    self.measurements.mark_ok(name, now)
                else:
                    self.measurements.mark_error(name, snapshot.reason or snapshot.state.value, now)
            await asyncio.sleep(0.1)

    async def _write_loop(self, index: int, writer: PcsWriter, command: CommandSource) -> None:
        """Apply the command every ``period_s`` until ``_writers_stop`` is set, between cycles.

        A cycle that raises anything but cancellation marks the writer faulted,
        which the fast loop latches as PCS_FAULT (PCS_LOST while the PCS's
        power reading is not good), and the next cycle tries again. Until a
        write succeeds, the PCS's own reversion timer takes it to 0 kW.
        """
        while not self._writers_stop.is_set():
            try:
                order = command(index)
                await writer.apply(order.p_kw, order.enabled)
            except Exception as err:  # the task must outlive any error of one cycle
                writer.note_cycle_failed(err)
            else:
                writer.note_cycle_ok()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._writers_stop.wait(), writer.period_s)

    # -- loop inputs -------------------------------------------------------

    def fill_inputs(self, site: np.ndarray, units: np.ndarray, now_mono_s: float) -> None:
        """Write the newest readings into the loop's site and unit input records."""
        grid = self._meter_sum("grid_meter", now_mono_s)
        _put(site, "grid", grid)
        _put(site, "load", self._net_load(grid, now_mono_s))
        for i, device in enumerate(self.pcs):
            self._fill_unit(units[i : i + 1], device, now_mono_s)

    def renewable_power(self, now_mono_s: float) -> Reading:
        """Return the summed on-site generation, +generation; NOT_IMPLEMENTED without a meter."""
        return self._meter_sum("renewable_meter", now_mono_s)

    def site_readings(self, now_mono_s: float) -> SiteReadings:
        """Return the site's powers and mean SoC now, for the supervisory planner.

        The battery power is the sum of the measured PCS powers, and the SoC
        the mean over every BMS string. Either is bad as soon as one of its
        parts is not GOOD.
        """
        grid = self._meter_sum("grid_meter", now_mono_s)
        battery = _sum([self._pcs_power(d, now_mono_s) for d in self.pcs], now_mono_s)
        socs = [self.bms[name].snapshot(now_mono_s).readings.get("soc_pct") for name in self.bms]
        if not socs:
            soc = Reading.bad(Quality.NOT_IMPLEMENTED, now_mono_s, "%")
        elif all(r is not None and r.good for r in socs):
            mean = sum(float(r.value) for r in socs) / len(socs)
            soc = Reading(mean, Quality.GOOD, min(r.t_mono_s for r in socs), "%")
        else:
            soc = Reading.bad(Quality.STALE, now_mono_s, "%")
        return SiteReadings(
            grid=grid,
            net_load=self._net_load(grid, now_mono_s),
            battery=battery,
            renewable=self.renewable_power(now_mono_s),
            soc=soc,
        )

    def _meter_power(self, device: Device, now: float) -> Reading:
        settings = self.profiles[device.name].meter
        point = settings.get("power_point", "p_kw")
        sign = float(settings.get("power_sign", 1))
        return _scaled(self.measurements.reading(device.name, point, now), sign)

    def _meter_sum(self, role: str, now: float) -> Reading:
        readings = [self._meter_power(d, now) for d in self.config.devices if d.role == role]
        return _sum(readings, now)

    def _net_load(self, grid: Reading, now: float) -> Reading:
        racks = [d for d in self.config.devices if d.role == "rack_meter"]
        if not racks:
            pcs = [self._pcs_power(d, now) for d in self.pcs]
            return _sum([grid, *pcs], now)
        parts = [self._meter_power(d, now) for d in racks]
        parts += [
            self._meter_power(d, now) for d in self.config.devices if d.role == "facility_meter"
        ]
        renewables = [
            _scaled(self._meter_power(d, now), -1.0)
            for d in self.config.devices
            if d.role == "renewable_meter"
        ]
        return _sum(parts + renewables, now)

    def _pcs_power(self, device: Device, now: float) -> Reading:
        settings = self.profiles[device.name].pcs
        point = settings.get("active_power_point", "W")
        sign = float(settings.get("active_power_sign", 1))
        return _scaled(self.measurements.reading(device.name, point, now), sign)

    def _fill_unit(self, unit: np.ndarray, device: Device, now: float) -> None:
        power = self._pcs_power(device, now)
        unit["pcs_p_kw"] = power.value if power.good else np.nan
        unit["pcs_quality"] = int(power.quality)
        unit["pcs_t_ns"] = round(power.t_mono_s * 1e9)
        writer_faulted = bool(self._writers) and self._writers[self.pcs.index(device)].faulted
        unit["pcs_fault"] = int(self._pcs_faulted(device, now) or writer_faulted)

        bms_name = self.pcs_bms.get(device.name)
        if bms_name is None:
            unit["bms_quality"] = int(Quality.STALE)
            return
        snapshot = self.bms[bms_name].snapshot(now)
        soc = snapshot.readings.get("soc_pct")
        voltage = snapshot.readings.get("pack_voltage_v")
        charge_kw, discharge_kw = snapshot.power_window_kw()
        good = bool(
            snapshot.power_allowed
            and soc is not None
            and soc.good
            and voltage is not None
            and voltage.good
        )
        unit["soc_pct"] = soc.value if good else np.nan
        unit["bms_voltage_v"] = voltage.value if good else np.nan
        volts = float(voltage.value) if good else np.nan
        # The loop takes limits in A; the window in kW already fails closed on
        # enable flags and alarms, so convert it back at the pack voltage.
        unit["bms_charge_limit_a"] = charge_kw * 1000 / volts if good else np.nan
        unit["bms_discharge_limit_a"] = discharge_kw * 1000 / volts if good else np.nan
        unit["bms_quality"] = int(Quality.GOOD if good else Quality.STALE)
        unit["bms_t_ns"] = round(snapshot.t_mono_s * 1e9)
        unit["bms_protection"] = int(
            any(a.severity >= Severity.PROTECTION for a in snapshot.alarms)
        )

    def _pcs_faulted(self, device: Device, now: float) -> bool:
        settings = self.profiles[device.name].pcs
        point = settings.get("status_point")
        if point is None:
            return False
        status = self.measurements.reading(device.name, point, now)
        return bool(status.good and status.value in settings.get("status_fault_values", []))


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def pair_bms(config: SiteConfig) -> dict[str, str]:
    """Pair each PCS with the BMS of its battery: its ``bms`` key, else in file order.

    Pairing by order applies only when no PCS names a BMS and the counts
    match. A PCS left without a BMS gets STALE BMS inputs, so the loop's
    BMS interlock keeps it at 0 kW.
    """
    pcs = [d for d in config.devices if d.role == "pcs"]
    bms = [d.name for d in config.devices if d.role == "bms"]
    if any(p.bms is not None for p in pcs):
        pairs = {p.name: p.bms for p in pcs if p.bms is not None}
    elif len(bms) == len(pcs):
        pairs = {p.name: b for p, b in zip(pcs, bms, strict=True)}
    else:
        pairs = {}
    for device in pcs:
        if device.name not in pairs:
            log.warning(
                "pcs_without_bms",
                device=device.name,
                hint="set bms = NAME on the PCS; until then its BMS interlock holds it at 0 kW",
            )
    return pairs


def _link_key(device: Device) -> str:
    transport = device.transport
    if transport.kind == "tcp":
        return f"tcp {transport.host}:{transport.port}"
    return f"rtu {transport.device}"


def _scaled(reading: Reading, factor: float) -> Reading:
    if not reading.good:
        return reading
    multiplier = _TO_KW.get(reading.unit, 1.0) * factor
    return Reading(float(reading.value) * multiplier, Quality.GOOD, reading.t_mono_s, "kW")


def _sum(readings: list[Reading], now: float) -> Reading:
    """Sum readings; any one not GOOD makes the sum that quality, with the oldest time."""
    if not readings:
        return Reading.bad(Quality.NOT_IMPLEMENTED, now, "kW")
    bad = [r for r in readings if not r.good]
    oldest = min(r.t_mono_s for r in readings)
    if bad:
        return Reading.bad(max(r.quality for r in bad), oldest, "kW")
    return Reading(sum(float(r.value) for r in readings), Quality.GOOD, oldest, "kW")


def _put(site: np.ndarray, name: str, reading: Reading) -> None:
    site[f"{name}_kw"] = reading.value if reading.good else np.nan
    site[f"{name}_quality"] = int(reading.quality)
    site[f"{name}_t_ns"] = round(reading.t_mono_s * 1e9)


class PcsWriter:
    """The daemon's side of one :class:`~drivers.pcs.PcsDriver`: start, enable, step, stop.

    :meth:`apply` runs every ``period_s`` (the driver's minimum write
    interval). It starts the driver once the PCS responds, retrying every
    ``START_RETRY_S`` and logging one line per failure streak, then enables
    or disables it as the command requests and steps the setpoint. A fault that
    the driver latches is left latched (the driver has already commanded
    0 kW and disabled the PCS) until :meth:`request_reset`.
    """

    START_RETRY_S = 1.0

    def __init__(self, driver: PcsDriver) -> None:
        self.driver = driver
        self.name = driver.name
        self.period_s = driver.policy.settings.min_write_interval_s
        self._next_start_mono_s = 0.0
        self._start_failing = False
        self._reset_requested = False
        #: The error of the last cycle when it raised outside the driver's fault handling.
        self.cycle_error: Exception | None = None
        self._failed_cycles = 0

    @property
    def faulted(self) -> bool:
        """Whether the driver has latched a fault or the last cycle raised an unexpected error."""
        return self.driver.fault is not None or self.cycle_error is not None

    def request_reset(self) -> None:
        """Ask for the driver's operator reset at the next cycle; only a faulted driver resets."""
        self._reset_requested = self.driver.fault is not None

    def note_cycle_failed(self, err: Exception) -> None:
        """Mark the writer faulted after a cycle raised ``err``; log the first failure in a row."""
        self._failed_cycles += 1
        if self.cycle_error is None:
            log.error(
                "pcs_cycle_error",
                device=self.name,
                error=repr(err),
                hint="the PCS is held faulted and the cycle is retried every period",
                exc_info=err,
            )
        self.cycle_error = err

    def note_cycle_ok(self) -> None:
        """Clear the cycle error after a cycle that completed; log the recovery once."""
        if self.cycle_error is not None:
            log.info("pcs_cycle_recovered", device=self.name, failed_cycles=self._failed_cycles)
        self.cycle_error = None
        self._failed_cycles = 0

    async def apply(self, p_kw: float, enabled: bool) -> None:
        driver = self.driver
        try:
            if self._reset_requested:
                self._reset_requested = False
                await driver.reset()
            if not driver.started and not await self._start():
                return
            if driver.fault is not None:
                return
            if enabled and not driver.enabled:
                await driver.enable()
            elif not enabled and driver.enabled:
                await driver.disable()
            await driver.step(p_kw if enabled else 0.0)
        except PcsError as err:
            # A latched fault: the driver has logged it and brought the PCS to 0 kW.
            log.debug("pcs_cycle_failed", device=self.name, error=str(err))

    async def _start(self) -> bool:
        now = time.monotonic()
        if now < self._next_start_mono_s:
            return False
        if self.driver.link.state is LinkState.CONNECTING:
            # The first connect has not finished; a start now fails for no reason worth logging.
            return False
        try:
            await self.driver.start()
        except (PcsError, ModbusError) as err:
            self._next_start_mono_s = now + self.START_RETRY_S
            if not self._start_failing:
                self._start_failing = True
                # The error text names host, unit and the fix; no traceback needed.
                log.error("pcs_start_failed", device=self.name, error=str(err))  # noqa: TRY400
            return False
        if self._start_failing:
            self._start_failing = False
            log.info("pcs_start_recovered", device=self.name)
        return True

    async def shutdown(self) -> None:
        """Command 0 kW and disable; raise ``PcsError`` when a step was not verified."""
        if not self.driver.started:
            raise PcsError(f"PCS {self.name!r} never started, so it was not commanded")
        if not await self.driver.disable():
            raise PcsError(f"PCS {self.name!r}: 0 kW and disable were not both verified")


def _make_writer(
    device: Device, link: ModbusLink, profile: Profile, config: SiteConfig
) -> PcsWriter:
    return PcsWriter(PcsDriver.from_config(device, config, link, profile))
