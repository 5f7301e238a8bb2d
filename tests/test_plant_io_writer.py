"""PlantIO's PCS writer task: an unexpected error in a cycle faults the PCS but never ends the task.

No device is contacted: the site's hosts are 127.0.0.1 and no link is started,
because the writers under test replace the PCS driver's cycle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from drivers.modbus.link import ModbusLink
from drivers.pcs import PcsDriver
from gateway.config import SiteConfig, read_config_data, validate_config
from gateway.control.layout import empty_inputs
from gateway.measurements import MeasurementStore
from gateway.plant_io import Command, PcsWriter, PlantIO
from tests.modbus_fakes import captured_events, free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "bessgw.example.toml"
PERIOD_S = 0.01


def local_site() -> SiteConfig:
    """Return the example site with every Modbus host on 127.0.0.1 and no planner."""
    data = read_config_data(EXAMPLE)
    for device in data["devices"]:
        if device["transport"]["kind"] == "tcp":
            device["transport"]["host"] = "127.0.0.1"
            device["transport"]["port"] = free_port()
    data.pop("planner", None)
    return validate_config(data)


class GatedWriter(PcsWriter):
    """A writer whose ``apply`` raises ``error`` until ``repaired`` is set."""

    def __init__(self, driver: PcsDriver, error: Exception) -> None:
        super().__init__(driver)
        self.period_s = PERIOD_S
        self.error = error
        self.repaired = asyncio.Event()
        self.calls = 0

    async def apply(self, p_kw: float, enabled: bool) -> None:
        self.calls += 1
        if not self.repaired.is_set():
            raise self.error


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(PERIOD_S)


def pcs_fault_input(plant: PlantIO) -> int:
    site, units = empty_inputs(len(plant.pcs))
    plant.fill_inputs(site, units, time.monotonic())
    return int(units[0]["pcs_fault"])


@pytest.mark.parametrize("source", ["apply", "command"])
async def test_writer_survives_cycle_error(source):
    """A cycle error faults the PCS, is logged once, is retried, and clears when cycles pass."""
    config = local_site()
    device = config.device("pcs-1")
    with captured_events() as events:
        plant = PlantIO(config, MeasurementStore())
        link = ModbusLink.from_transport(device.transport, timeout_s=0.1)
        writer = GatedWriter(PcsDriver.from_config(device, config, link), RuntimeError("map bug"))
        plant._writers = [writer]
        if source == "apply":
            command = lambda index: Command(50.0, True)  # noqa: E731
        else:
            writer.repaired.set()  # apply passes; the command source raises instead
            repaired = asyncio.Event()

            def command(index: int) -> Command:
                if not repaired.is_set():
                    raise KeyError("pcs-1")
                return Command(50.0, True)

        task = asyncio.create_task(plant._write_loop(0, writer, command))
        try:
            await wait_until(lambda: writer._failed_cycles >= 3)  # several failures in a row
            assert writer.faulted
            assert not task.done()
            assert pcs_fault_input(plant) == 1

            if source == "apply":
                writer.repaired.set()
            else:
                repaired.set()
            await wait_until(lambda: not writer.faulted)
            calls = writer.calls
            await wait_until(lambda: writer.calls > calls)  # still cycling after recovery
            assert pcs_fault_input(plant) == 0
        finally:
            plant._writers_stop.set()
            await asyncio.wait_for(task, 2.0)

    failed = [e for e in events if e["event"] == "pcs_cycle_error"]
    recovered = [e for e in events if e["event"] == "pcs_cycle_recovered"]
    assert len(failed) == 1
    assert failed[0]["device"] == "pcs-1"
    assert failed[0]["log_level"] == "error"
    expected = "RuntimeError('map bug')" if source == "apply" else "KeyError('pcs-1')"
    assert failed[0]["error"] == expected
    assert len(recovered) == 1
    assert recovered[0]["device"] == "pcs-1"
    assert recovered[0]["failed_cycles"] >= 3


async def test_writer_cancel_still_ends():
    """Cancellation is not a cycle error: the task ends and the writer is not marked faulted."""
    config = local_site()
    device = config.device("pcs-1")
    plant = PlantIO(config, MeasurementStore())
    link = ModbusLink.from_transport(device.transport, timeout_s=0.1)
    writer = GatedWriter(PcsDriver.from_config(device, config, link), RuntimeError("unused"))
    writer.repaired.set()
    task = asyncio.create_task(plant._write_loop(0, writer, lambda index: Command(0.0, False)))
    await wait_until(lambda: writer.calls >= 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)
    assert writer.cycle_error is None


def test_reset_only_for_driver_fault():
    """An operator reset request reaches the driver only when the driver itself is faulted."""
    config = local_site()
    device = config.device("pcs-1")
    link = ModbusLink.from_transport(device.transport, timeout_s=0.1)
    writer = PcsWriter(PcsDriver.from_config(device, config, link))
    writer.note_cycle_failed(RuntimeError("map bug"))
    assert writer.faulted
    writer.request_reset()
    assert writer._reset_requested is False
