"""HIL simulators respond to the real drivers and mbpoll over real sockets on 127.0.0.1.

Plant time is stepped by hand here (``advance``), so every expected number
follows from the plant parameters: a 150 kW unit with a 10 ms dead time and
a 30 ms time constant is within 0.1 % of a step after 10 ms + 7 tau = 220 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from can_support import no_reader_threads, wait_until  # noqa: F401 - autouse fixture

from drivers.can.bms import BmsState, BmsString, BmsStringConfig
from drivers.can.profile import load_bms_profile
from drivers.can.pylontech import decode_frame
from drivers.can.reader import CanLink, CanReader
from drivers.modbus.device import ModbusDevice
from drivers.modbus.link import ModbusLink
from drivers.modbus.profile import load_profile
from drivers.quality import Quality
from gateway.config import load_config
from hil import plant as plant_model
from hil.devices import BmsDevice, MeterDevice, PcsUnit, SiteDevices
from hil.faults import check_faults, settle_time_s
from hil.gateway_config import write_bms_profile, write_gateway_config
from hil.scenario import Fault, load_scenario
from hil.sil import battery_params, pcs_params

DT_S = 0.001


def make_plant(units: int = 1, revert_s: float = 2.0) -> plant_model.Plant:
    pcs = plant_model.PcsParams(
        rated_kw=150.0, time_constant_s=0.03, dead_time_s=0.01, revert_s=revert_s
    )
    battery = plant_model.BatteryParams(energy_kwh=250.0, cells_in_series=90, max_current_a=1200.0)
    return plant_model.Plant(pcs, battery, units, DT_S)


def advance(plant: plant_model.Plant, seconds: float) -> None:
    for _ in range(round(seconds / DT_S)):
        plant.step(0.0, 0.0)


async def driver_for(device, poll_s: float = 0.05) -> tuple[ModbusLink, ModbusDevice]:
    link = ModbusLink.tcp("127.0.0.1", device.port, timeout_s=0.5)
    await link.start()
    await link.wait_connected(5.0)
    poller = ModbusDevice(device.name, device.profile, link, device.unit_id, poll_s, 0.5)
    return link, poller


@contextlib.asynccontextmanager
async def served_pcs(units: int = 1):
    plant = make_plant(units)
    unit = PcsUnit("pcs-1", plant, 0, load_profile("pcs-sunspec"), revert_s=2.0)
    await unit.start()
    link, poller = await driver_for(unit)
    try:
        yield plant, unit, poller
    finally:
        await link.close()
        await unit.stop()


async def start_unit(poller: ModbusDevice, setpoint_w: float) -> None:
    await poller.write_point("Conn", 1)
    await poller.write_point("WSet_Ena", 1)
    await poller.write_point("WSet", setpoint_w)


# --------------------------------------------------------------------------- PCS


async def test_pcs_setpoint_reaches_plant():
    """A setpoint written through the PCS driver drives the plant; W reads it back."""
    async with served_pcs() as (plant, unit, poller):
        await start_unit(poller, 120_000.0)
        advance(plant, 0.22)
        unit.publish()
        readings = await poller.poll_once()
    assert plant.pcs.state.p_kw[0] == pytest.approx(120.0, abs=0.15)
    # W is an i16 with W_SF = 2: 100 W steps.
    assert readings["W"].quality is Quality.GOOD
    assert readings["W"].value == pytest.approx(120_000.0, abs=100.0)
    assert readings["St"].value == 4  # SunSpec MPPT: in operation
    assert readings["StVnd"].value == int(plant_model.PcsMode.RUNNING)
    assert unit.writes[-1].setpoint_kw == pytest.approx(120.0)
    assert unit.writes[-1].following is True


async def test_pcs_negative_setpoint_charges():
    """A negative WSet charges the battery; the read-back keeps the sign."""
    async with served_pcs() as (plant, unit, poller):
        await start_unit(poller, -80_000.0)
        advance(plant, 0.22)
        unit.publish()
        readings = await poller.poll_once()
    assert plant.pcs.state.p_kw[0] == pytest.approx(-80.0, abs=0.1)
    assert readings["W"].value == pytest.approx(-80_000.0, abs=100.0)
    assert plant.battery.state.current_a < 0


async def test_pcs_reverts_without_writes():
    """With no setpoint write for the 2 s reversion timer, the unit falls back to 0 kW."""
    async with served_pcs() as (plant, unit, poller):
        await start_unit(poller, 100_000.0)
        advance(plant, 1.9)
        running_kw = float(plant.pcs.state.p_kw[0])
        advance(plant, 0.4)
        unit.publish()
        readings = await poller.poll_once()
    assert running_kw == pytest.approx(100.0, abs=0.1)
    assert plant.pcs.state.p_kw[0] == pytest.approx(0.0, abs=0.1)
    assert readings["St"].value == 8  # standby
    assert readings["WSet_RvrtTms"].value == 2


async def test_pcs_revert_timer_write():
    """Writing WSet_RvrtTms = 0 turns the reversion off; the unit keeps its setpoint."""
    async with served_pcs() as (plant, _unit, poller):
        await poller.write_point("WSet_RvrtTms", 0)
        await start_unit(poller, 50_000.0)
        advance(plant, 3.0)
    assert plant.pcs.params.revert_s == float("inf")
    assert plant.pcs.state.p_kw[0] == pytest.approx(50.0, abs=0.1)


async def test_pcs_disconnect_command():
    """Conn = 0 (open) takes the unit to 0 kW at once, whatever WSet holds."""
    async with served_pcs() as (plant, unit, poller):
        await start_unit(poller, 100_000.0)
        advance(plant, 0.3)
        await poller.write_point("Conn", 0)
        advance(plant, 0.3)
        unit.publish()
        readings = await poller.poll_once()
    assert plant.pcs.state.p_kw[0] == pytest.approx(0.0, abs=0.1)
    assert readings["St"].value == 1  # off
    assert unit.writes[-1].following is False


async def test_pcs_heartbeat_timeout_opens():
    """A heartbeat that stops changing for HbTmoTms opens the unit (Conn = 0)."""
    async with served_pcs() as (plant, unit, poller):
        await poller.write_point("HbTmoTms", 1)
        await start_unit(poller, 60_000.0)
        await poller.write_point("HbCnt", 1)
        advance(plant, 0.9)
        opened_early = unit.check_heartbeat(plant.t_s)
        await poller.write_point("HbCnt", 2)
        advance(plant, 0.9)
        opened_fed = unit.check_heartbeat(plant.t_s)
        advance(plant, 0.2)
        opened_late = unit.check_heartbeat(plant.t_s)
        advance(plant, 0.3)
    assert opened_early is False
    assert opened_fed is False
    assert opened_late is True
    assert unit.server.get_point("Conn") == 0
    assert plant.pcs.state.p_kw[0] == pytest.approx(0.0, abs=0.1)


async def test_pcs_trip_and_clear():
    """pcs_trip drops the output at once and reports St = 7 with Evt1 bit 0 until cleared."""
    async with served_pcs() as (plant, unit, poller):
        await start_unit(poller, 100_000.0)
        advance(plant, 0.3)
        await unit.inject("pcs_trip")
        advance(plant, 0.001)
        unit.publish()
        tripped = await poller.poll_once()
        tripped_kw = float(plant.pcs.state.p_kw[0])
        await unit.clear("pcs_trip")
        unit.publish()
        cleared = await poller.poll_once()
    assert tripped_kw == 0.0
    assert tripped["St"].value == 7
    assert tripped["Evt1"].value == 1
    assert cleared["St"].value == 8
    assert cleared["Evt1"].value == 0


async def test_pcs_sentinel_fault():
    """A sentinel fault makes W read as "no value" until it clears."""
    async with served_pcs() as (plant, unit, poller):
        await start_unit(poller, 40_000.0)
        advance(plant, 0.3)
        await unit.inject("sentinel")
        unit.publish()
        faulted = await poller.poll_once()
        await unit.clear("sentinel")
        unit.publish()
        cleared = await poller.poll_once()
    assert faulted["W"].quality is Quality.NOT_IMPLEMENTED
    assert cleared["W"].quality is Quality.GOOD


async def test_pcs_rejects_write_elsewhere():
    """A raw write to a read-only register gets exception 02 and reaches no unit."""
    from pymodbus.client import AsyncModbusTcpClient  # noqa: PLC0415

    async with served_pcs() as (plant, unit, _poller):
        client = AsyncModbusTcpClient("127.0.0.1", port=unit.port, timeout=1, retries=0)
        await client.connect()
        try:
            response = await client.write_register(40084, 10, device_id=1)
        finally:
            client.close()
    assert response.exception_code == 2
    assert unit.writes == []
    assert plant.pcs.state.command_kw[0] == 0.0


def test_pcs_needs_setpoint_point():
    """A profile without a [pcs] setpoint point cannot back a PCS simulator."""
    with pytest.raises(ValueError, match="setpoint_point"):
        PcsUnit("pcs-1", make_plant(), 0, load_profile("meter-3ph"))


# --------------------------------------------------------------------------- mbpoll


def _mbpoll(port: int, *args: str) -> str:
    result = subprocess.run(
        ["mbpoll", "-m", "tcp", "-a", "1", "-0", "-1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return result.stdout


def _registers(output: str) -> dict[int, int]:
    values = {}
    for line in output.splitlines():
        if line.startswith("["):
            address, value = line.split(":")
            values[int(address.strip("[]"))] = int(value)
    return values


@pytest.mark.skipif(shutil.which("mbpoll") is None, reason="mbpoll is not installed (.ci/run)")
def test_serve_pcs_answers_mbpoll():
    """`bessgw hil serve pcs` serves mbpoll: SunS marker, commands, read-back, clean Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "hil", "serve", "pcs", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "Ctrl-C" in line:
                port = int(line.split("127.0.0.1:")[1].split(";")[0])
        assert port is not None, "the simulator did not print its port"

        marker = _registers(_mbpoll(port, "-r", "40000", "-c", "2", "127.0.0.1"))
        assert marker == {40000: 0x5375, 40001: 0x6E53}  # "SunS"
        _mbpoll(port, "-r", "40154", "127.0.0.1", "1")  # Conn = 1
        _mbpoll(port, "-r", "40205", "127.0.0.1", "1")  # WSet_Ena = 1
        _mbpoll(port, "-r", "40204", "127.0.0.1", "500")  # WSet = 500 x 100 W
        readback: dict[int, int] = {}
        deadline = time.monotonic() + 5
        while readback.get(40084) != 500 and time.monotonic() < deadline:
            time.sleep(0.1)
            readback = _registers(_mbpoll(port, "-r", "40084", "-c", "2", "127.0.0.1"))
        status = _registers(_mbpoll(port, "-r", "40108", "127.0.0.1"))
        assert readback == {40084: 500, 40085: 2}  # 50 kW at W_SF = 2
        assert status == {40108: 4}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    assert rc == 0


def _serve(*args: str) -> tuple[subprocess.Popen, str]:
    """Start `bessgw hil serve ARGS`; return the process and its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "hil", "serve", *args, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "Ctrl-C" in line:
            return proc, line
    proc.kill()
    proc.wait()
    raise AssertionError("the simulator printed no ready line within 30 s")


def _interrupt(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.mark.skipif(shutil.which("mbpoll") is None, reason="mbpoll is not installed (.ci/run)")
def test_serve_meter_answers_mbpoll():
    """`bessgw hil serve meter` replays the site: mbpoll reads a plausible float p_kw in W."""
    proc, line = _serve("meter")
    try:
        port = int(line.split("127.0.0.1:")[1].split(";")[0])
        output = _mbpoll(port, "-t", "3:float", "-r", "52", "127.0.0.1")
    finally:
        rc = _interrupt(proc)
    values = [float(v.split(":")[1]) for v in output.splitlines() if v.startswith("[52]")]
    # The default site: 8 racks of 100 kW at 35-100 % plus 50 kW facility, minus up to 600 kW wind.
    assert len(values) == 1
    assert -600_000.0 < values[0] < 900_000.0
    assert values[0] != 0.0
    assert rc == 0


async def test_serve_bms_sends_frames(tmp_path):
    """`bessgw hil serve bms` sends Pylontech frame lines once a client opens the channel."""
    profile_out = str(tmp_path / "bms-profile.toml")
    proc, line = await asyncio.to_thread(_serve, "bms", "--profile-out", profile_out)
    try:
        port = int(line.split("socket://127.0.0.1:")[1].split(";")[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"S6\rO\r")
        acks = await asyncio.wait_for(reader.readexactly(2), 5)
        frames = [await asyncio.wait_for(reader.readuntil(b"\r"), 5) for _ in range(6)]
        writer.close()
    finally:
        rc = await asyncio.to_thread(_interrupt, proc)
    assert acks == b"\r\r"
    assert [f[:4] for f in frames] == [b"t351", b"t355", b"t356", b"t359", b"t35C", b"t35E"]
    assert rc == 0


@pytest.mark.parametrize("kind", ["pcs", "meter", "bms"])
def test_serve_busy_port(kind):
    """`hil serve` on a port in use exits 1 with one line naming the port and the fix."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "hil", "serve", kind, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"bessgw hil: cannot serve {kind}" in result.stderr
    assert f"127.0.0.1', {port}" in result.stderr or f"127.0.0.1:{port}" in result.stderr
    assert "choose another" in result.stderr


def test_serve_rejects_bms_profile():
    """`hil serve bms --profile X` is a usage error: the BMS has no Modbus profile."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "hil", "serve", "bms", "--profile", "meter-3ph"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--profile does not apply" in result.stderr


# --------------------------------------------------------------------------- meters


@pytest.mark.parametrize(("profile", "resolution_kw"), [("meter-3ph", 1e-3), ("pdu-rack", 1e-3)])
async def test_meter_publish_read(profile, resolution_kw):
    """A published power reaches the driver in kW, with the role's sign and phase split."""
    meter = MeterDevice("m", load_profile(profile))
    await meter.start()
    link, poller = await driver_for(meter)
    try:
        meter.publish(123.4567, 1.0)
        readings = await poller.poll_once()
    finally:
        await link.close()
        await meter.stop()
    assert readings["p_kw"].quality is Quality.GOOD
    assert readings["p_kw"].value == pytest.approx(123.4567, abs=resolution_kw)
    assert readings["p_l1_kw"].value == pytest.approx(123.4567 / 3, abs=resolution_kw)


async def test_meter_derived_points_read():
    """Currents, power factor and apparent power follow the published power, over Modbus."""
    meter = MeterDevice("m", load_profile("meter-3ph"))
    await meter.start()
    link, poller = await driver_for(meter)
    try:
        meter.publish(-849.0, 1.0)  # export: the magnitudes are the same
        readings = await poller.poll_once()
    finally:
        await link.close()
        await meter.stop()
    pf = MeterDevice.POWER_FACTOR
    phase_a = 849_000.0 / 3 / (230.0 * pf)
    assert readings["i_l1_a"].value == pytest.approx(phase_a, rel=1e-6)
    assert readings["i_sum_a"].value == pytest.approx(3 * phase_a, rel=1e-6)
    assert readings["pf"].value == pytest.approx(pf, rel=1e-6)
    assert readings["s_kva"].value == pytest.approx(849.0 / pf, abs=1e-3)
    assert readings["q_kvar"].value == pytest.approx(849.0 / pf * (1 - pf**2) ** 0.5, abs=1e-3)
    assert readings["v_l1_l2_v"].value == pytest.approx(230.0 * 3**0.5, rel=1e-6)
    assert readings["f_hz"].value == pytest.approx(50.0)


async def test_meter_energy_integrates():
    """Import energy is the integral of the published power: 360 kW for 10 s is 1 kWh."""
    meter = MeterDevice("m", load_profile("meter-3ph"))
    for k in range(11):
        meter.publish(360.0, float(k))
    assert meter.import_kwh == pytest.approx(1.0)
    assert meter.server.get_point("e_import_kwh") == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(
    ("kind", "value", "quality"),
    [
        ("sentinel", 0.0, Quality.NOT_IMPLEMENTED),
        ("exception", 4.0, Quality.COMM_ERROR),
        ("disconnect", 0.0, Quality.COMM_ERROR),
    ],
)
async def test_meter_fault_and_recovery(kind, value, quality):
    """Each meter fault makes the driver's p_kw bad; clearing it makes p_kw good again."""
    meter = MeterDevice("grid", load_profile("meter-3ph"))
    port = await meter.start()
    link, poller = await driver_for(meter)
    try:
        meter.publish(200.0, 0.0)
        await meter.inject(kind, value)
        meter.publish(210.0, 0.1)
        faulted = await poller.poll_once()
        await meter.clear(kind)
        meter.publish(220.0, 0.2)
        recovered = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            recovered = await poller.poll_once()
            if recovered["p_kw"].good:
                break
            await asyncio.sleep(0.1)
    finally:
        await link.close()
        await meter.stop()
    assert faulted["p_kw"].quality is quality
    assert meter.port == port
    assert recovered is not None
    assert recovered["p_kw"].value == pytest.approx(220.0, abs=1e-3)


async def test_meter_freeze_holds_values():
    """A frozen meter keeps returning the registers of the moment it froze."""
    meter = MeterDevice("grid", load_profile("meter-3ph"))
    await meter.start()
    link, poller = await driver_for(meter)
    try:
        meter.publish(100.0, 0.0)
        await poller.poll_once()
        await meter.inject("freeze")
        meter.publish(300.0, 0.1)
        frozen = await poller.poll_once()
        await meter.clear("freeze")
        thawed = await poller.poll_once()
    finally:
        await link.close()
        await meter.stop()
    assert frozen["p_kw"].value == pytest.approx(100.0)
    assert thawed["p_kw"].value == pytest.approx(300.0)


# --------------------------------------------------------------------------- BMS


def make_bms(strings: int = 2) -> tuple[plant_model.Plant, BmsDevice]:
    plant = make_plant(units=strings)
    return plant, BmsDevice("bms-1", plant.battery, strings=strings)


def decoded(frames) -> dict[str, object]:
    values: dict[str, object] = {}
    for frame_id, extended, data in frames:
        values.update(decode_frame(frame_id, data, extended).signals)
    return values


def test_bms_frames_from_battery():
    """A frame set carries the pack voltage, SoC, and current and limits per string."""
    plant, bms = make_bms(strings=2)
    for unit in range(2):
        plant.pcs.command(0.0, 100.0, unit)
    advance(plant, 0.3)
    state = plant.battery.state
    limits = plant.battery.bms_limits()
    values = decoded(bms.frames())
    assert values["pack_voltage_v"] == pytest.approx(state.voltage_v, abs=0.01)
    assert values["soc_pct"] == round(state.soc_pct)
    # Discharge is negative on the wire; each of 2 strings carries half the pack current.
    assert values["pack_current_a"] == pytest.approx(-state.current_a / 2, abs=0.1)
    assert values["charge_current_limit_a"] == pytest.approx(limits.charge_current_a / 2, abs=0.1)
    assert values["discharge_current_limit_a"] == pytest.approx(
        limits.discharge_current_a / 2, abs=0.1
    )
    assert values["charge_voltage_limit_v"] == pytest.approx(90 * 3.55, abs=0.1)
    assert values["module_count"] == 6
    assert values["charge_enable"] is True
    assert values["manufacturer_name"] == "PYLON"


def test_bms_fault_frames():
    """bms_alarm sets the system-error protection bit; bms_limits_zero zeroes limits and enables."""
    _, bms = make_bms()
    asyncio.run(bms.inject("bms_alarm"))
    asyncio.run(bms.inject("bms_limits_zero"))
    values = decoded(bms.frames())
    assert values["protection_system_error"] is True
    assert values["charge_current_limit_a"] == 0.0
    assert values["discharge_current_limit_a"] == 0.0
    assert values["discharge_enable"] is False
    asyncio.run(bms.clear("bms_alarm"))
    asyncio.run(bms.clear("bms_limits_zero"))
    values = decoded(bms.frames())
    assert values["protection_system_error"] is False
    assert values["discharge_current_limit_a"] > 0


def test_bms_silent_sends_nothing():
    """While bms_silent is on, due frame sets are skipped; the schedule keeps its rate."""
    _, bms = make_bms()
    assert bms.send(0.0) is True
    asyncio.run(bms.inject("bms_silent"))
    assert bms.send(1.0) is False
    asyncio.run(bms.clear("bms_silent"))
    assert bms.send(2.0) is True
    assert bms.frame_sets_sent == 2
    assert bms.next_send_t_s == pytest.approx(3.0)


def test_bms_rejects_high_voltage_pack():
    """A pack above the 327.67 V that 0x356 carries is rejected with the largest cell count."""
    battery = plant_model.Battery(plant_model.BatteryParams(energy_kwh=100.0, cells_in_series=100))
    with pytest.raises(ValueError, match="at most 90 cells"):
        BmsDevice("bms-1", battery)


async def test_bms_slcan_to_gateway_driver(tmp_path):
    """The gateway's CAN reader opens the socket:// URL; its BmsString goes online."""
    scenario = load_scenario("faults-bms-silent")
    plant, bms = make_bms(strings=2)
    url = await bms.start_slcan()

    profile = load_bms_profile(write_bms_profile(scenario, tmp_path / "bms.toml"))
    string = BmsString(
        BmsStringConfig(
            name="bms-1", profile=profile, max_current_a=600.0, stale_s=3.0, recovery_frame_sets=3
        )
    )
    reader = CanReader(CanLink("slcan", url, slcan_open_delay_s=0.0), string.on_message)
    reader.start()

    try:
        assert await asyncio.to_thread(wait_until, lambda: bms.slcan.open_clients == 1, 10.0)
        for k in range(4):
            bms.send(float(k))
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(
            wait_until, lambda: string.snapshot().state is BmsState.ONLINE, 10.0
        )
        snapshot = string.snapshot()
    finally:
        await asyncio.to_thread(reader.stop)
        await bms.stop()

    # python-can 4.6 sends close, bit rate, no data bit rate, open (twice); close on stop.
    assert bms.slcan.commands[:4] == [b"C", b"S6", b"", b"O"]
    assert bms.slcan.commands[-1] == b"C"
    assert snapshot.power_allowed
    assert snapshot["pack_voltage_v"].value == pytest.approx(
        plant.battery.state.voltage_v, abs=0.01
    )
    limits = plant.battery.bms_limits()
    assert snapshot["discharge_current_limit_a"].value == pytest.approx(
        limits.discharge_current_a / 2, abs=0.1
    )


async def test_bms_virtual_bus():
    """The same frame set goes out on python-can's virtual bus."""
    import can  # noqa: PLC0415

    channel = f"hil-{uuid.uuid4().hex}"
    _, bms = make_bms()
    receiver = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    bms.attach_virtual(channel)
    try:
        bms.send(0.0)
        received = [receiver.recv(1.0) for _ in range(6)]
    finally:
        receiver.shutdown()
        await bms.stop()
    assert [m.arbitration_id for m in received] == [0x351, 0x355, 0x356, 0x359, 0x35C, 0x35E]


async def test_slcan_server_commands():
    """The slcan server answers python-can's open sequence and sends frames only when open."""
    bms_plant, bms = make_bms()
    del bms_plant
    await bms.start_slcan()
    reader, writer = await asyncio.open_connection("127.0.0.1", bms.slcan.port)
    try:
        bms.send(0.0)  # no client has opened the channel yet
        writer.write(b"C\rS6\r\rV\rX\r")
        replies = await asyncio.wait_for(reader.readexactly(10), 5)
        writer.write(b"O\r")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"\r"
        bms.send(1.0)
        first_line = await asyncio.wait_for(reader.readuntil(b"\r"), 5)
    finally:
        writer.close()
        await bms.stop()
    assert replies == b"\r\r\rV1013\r\a"
    assert first_line.startswith(b"t3518")


# --------------------------------------------------------------------------- site and faults


def test_fault_timeline_rejects_bad_entries():
    """A fault on an unknown device or of a kind the device lacks is rejected, all listed."""
    kinds = {"grid": "meter", "pcs-1": "pcs", "bms-1": "bms", "gateway": "gateway"}
    faults = [
        Fault(at_s=1.0, device="rack-99", kind="drop"),
        Fault(at_s=1.0, device="grid", kind="bms_silent"),
        Fault(at_s=1.0, device="gateway", kind="pcs_trip"),
        Fault(at_s=1.0, device="grid", kind="delay"),
        Fault(at_s=1.0, device="pcs-1", kind="pcs_trip"),
    ]
    with pytest.raises(ValueError, match="invalid fault timeline") as info:
        check_faults(faults, kinds)
    message = str(info.value)
    assert "faults[0]: no device 'rack-99'" in message
    assert "faults[1]: 'bms_silent' does not apply to 'grid'" in message
    assert "faults[2]: 'pcs_trip' does not apply to 'gateway'" in message
    assert "faults[3]: a delay needs value" in message
    assert "faults[4]" not in message


@pytest.mark.parametrize(
    ("signal_kw", "expected_s"),
    [
        ([50.0, 40.0, 1.0, 0.5, 0.0], 0.002),  # inside from sample 2 on
        ([1.0, 1.0, 1.0], 0.0),  # inside from the start
        ([1.0, 9.0, 1.0, 1.0], 0.002),  # a later excursion restarts the count
        ([50.0, 1.0, 9.0], None),  # still outside at the end
        ([], None),  # nothing captured
    ],
)
def test_settle_time_cases(signal_kw, expected_s):
    """Settling is the first sample after which |p| stays within tolerance to the end."""
    import numpy as np  # noqa: PLC0415

    result = settle_time_s(np.array(signal_kw), 0.001, 0, len(signal_kw), 2.0)
    assert result == (None if expected_s is None else pytest.approx(expected_s))


async def test_gateway_config_for_site(tmp_path):
    """The generated configuration validates and points every device at its simulator."""
    scenario = load_scenario("ai-training-wind")
    plant = plant_model.Plant(pcs_params(scenario), battery_params(scenario), 2, DT_S)
    devices = SiteDevices(scenario, plant)
    await devices.start()

    try:
        files = write_gateway_config(
            scenario,
            tmp_path,
            tmp_path,
            meters=devices.meters(),
            pcs=devices.pcs,
            bms=devices.bms,
        )
    finally:
        await devices.stop()

    config = load_config(files.config_path)
    by_name = {d.name: d for d in config.devices}
    assert sorted(by_name) == sorted(
        ["grid", "wind", "facility", "pcs-1", "pcs-2", "bms-1", "bms-2"]
        + [f"rack-{i:02d}" for i in range(1, 9)]
    )
    assert by_name["grid"].transport.port == devices.grid.port
    assert by_name["bms-2"].transport.channel == devices.bms[1].slcan.url
    assert by_name["pcs-1"].bms == "bms-1"
    assert by_name["rack-03"].role == "rack_meter"
    assert by_name["bms-1"].max_current_a == pytest.approx(scenario.battery.max_current_a / 2)
    assert config.control.grid_cap_kw == scenario.control.grid_cap_kw
    assert config.control.rt_priority == 50
    # The scenario lead plus half a meter poll (50 ms) and half a PCS write interval (50 ms).
    assert config.control.feedforward_lead_ms == pytest.approx(
        scenario.control.feedforward_lead_ms + 50.0
    )
    assert config.safety.pcs_revert_s == scenario.pcs.revert_s
    profile = load_bms_profile(files.bms_profile_path)
    assert profile.ranges["pack_voltage_v"] == (225.0, 328.5)
    assert str(files.api_socket).startswith(str(tmp_path))


def test_serve_bms_profile_fits_gateway(tmp_path):
    """`hil serve bms` writes the profile that fits its pack; with it the gateway goes online."""
    profile_path = tmp_path / "bms-profile.toml"
    proc, line = _serve("bms", "--port", "0", "--profile-out", str(profile_path))
    try:
        assert f'profile = "{profile_path}"' in line
        url = line.split(" on ")[1].split(";")[0]
        string = BmsString(
            BmsStringConfig(
                name="bms-1",
                profile=load_bms_profile(profile_path),
                max_current_a=2000.0,
                stale_s=3.0,
                recovery_frame_sets=3,
            )
        )
        reader = CanReader(CanLink("slcan", url, slcan_open_delay_s=0.0), string.on_message)
        reader.start()
        try:
            online = wait_until(lambda: string.snapshot().state is BmsState.ONLINE, 15.0)
            snapshot = string.snapshot()
        finally:
            reader.stop()
    finally:
        rc = _interrupt(proc)
    assert online, snapshot.reason
    assert snapshot.power_allowed
    assert rc == 0
