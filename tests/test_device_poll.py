"""Device poller against the profile-driven simulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import pytest
from pymodbus.constants import ExcCodes

from drivers.modbus.device import DeviceState, ModbusDevice
from drivers.modbus.errors import ModbusWriteVerifyError
from drivers.modbus.link import Backoff, LinkState, ModbusLink
from drivers.modbus.profile import parse_profile
from drivers.modbus.server import RegisterServer
from drivers.quality import Quality
from tests.modbus_fakes import ScriptedTcpServer, captured_events, register_response

pytestmark = pytest.mark.timeout(30)

UNIT = 5
# Four blocks, because max_gap_regs = 0 keeps the address ranges apart:
#   [0..6) p_w, e_total_wh   [100] v_v   [200..202) setpoint_w   [300..302) dc_w, dc_w_sf
PROFILE = parse_profile(
    {
        "profile": {"name": "test-inverter", "max_gap_regs": 0},
        "points": [
            {"name": "p_w", "address": 0, "function": "holding", "type": "i32", "unit": "W"},
            {"name": "e_total_wh", "address": 2, "function": "holding", "type": "u64"},
            {"name": "v_v", "address": 100, "function": "holding", "type": "u16", "scale": 0.1},
            {
                "name": "setpoint_w",
                "address": 200,
                "function": "holding",
                "type": "i32",
                "writable": True,
                "min": -5000,
                "max": 5000,
            },
            {
                "name": "dc_w",
                "address": 300,
                "function": "holding",
                "type": "u16",
                "scale_factor": "dc_w_sf",
                "writable": True,
            },
            {"name": "dc_w_sf", "address": 301, "function": "holding", "type": "i16"},
        ],
    }
)
FAST_BACKOFF = Backoff(initial_s=0.02, max_s=0.1)


def set_valid(server: RegisterServer, energy_wh: int) -> None:
    server.set_point("p_w", 1500)
    server.set_point("e_total_wh", energy_wh)
    server.set_point("v_v", 230.1)
    server.set_point("setpoint_w", 0)
    server.set_point("dc_w_sf", -1)
    server.set_point("dc_w", 612.3)


@pytest.fixture
async def server():
    simulator = RegisterServer(PROFILE, unit_id=UNIT)
    set_valid(simulator, 123_456)
    await simulator.start_tcp("127.0.0.1", 0)
    yield simulator
    await simulator.stop()


async def connected_link(port: int, **options) -> ModbusLink:
    link = ModbusLink.tcp("127.0.0.1", port, backoff=FAST_BACKOFF, **options)
    await link.start()
    await link.wait_connected(5.0)
    return link


def port_of(server: RegisterServer) -> int:
    return server._servers[0].transport.sockets[0].getsockname()[1]


@pytest.fixture
async def link(server):
    modbus_link = await connected_link(port_of(server), timeout_s=0.5)
    yield modbus_link
    await modbus_link.close()


def make_device(link: ModbusLink, unit_id: int = UNIT, **options) -> ModbusDevice:
    settings = {"poll_period_s": 0.05, "timeout_s": 0.5} | options
    return ModbusDevice("inv1", PROFILE, link, unit_id, **settings)


def reads_of(server: RegisterServer, address: int) -> int:
    return sum(1 for _, start, _ in server.requests if start == address)


def good_values(readings) -> dict:
    return {name: reading.value for name, reading in readings.items() if reading.good}


# ----------------------------------------------------------------------------- polling


async def test_poll_decodes_every_point(server, link):
    device = make_device(link)
    assert [(b.address, b.count) for b in device.blocks] == [(0, 6), (100, 1), (200, 2), (300, 2)]
    readings = await device.poll_once()
    assert good_values(readings) == {
        "p_w": 1500,
        "e_total_wh": 123_456,
        "v_v": 230.1,
        "setpoint_w": 0,
        "dc_w": 612.3,
        "dc_w_sf": -1,
    }
    assert readings["p_w"].unit == "W"
    assert device.state is DeviceState.ONLINE


async def test_readings_age_to_stale(server, link):
    device = make_device(link, stale_s=0.2)
    before = device.readings()
    assert all(reading.quality is Quality.STALE for reading in before.values())
    polled = await device.poll_once()
    t_mono_s = polled["p_w"].t_mono_s
    assert device.readings(t_mono_s + 0.19)["p_w"].value == 1500
    assert device.readings(t_mono_s + 0.21)["p_w"].quality is Quality.STALE


# ------------------------------------------------ FC-08: exception responses per code


async def test_illegal_address_skips_block(server, link):
    server.faults.exception_for(100, 1, ExcCodes.ILLEGAL_ADDRESS)
    with captured_events() as logs:
        device = make_device(link, rejected_block_retry_s=60.0)
        first = await device.poll_once()
        second = await device.poll_once()
    for readings in (first, second):
        assert readings["v_v"].quality is Quality.COMM_ERROR
        assert readings["v_v"].value is None
        assert readings["p_w"].value == 1500
        assert readings["dc_w"].value == 612.3
    assert reads_of(server, 100) == 1
    assert reads_of(server, 0) == 2
    assert device.state is DeviceState.ONLINE
    assert link.counters.timeouts == 0
    rejected = [entry for entry in logs if entry["event"] == "modbus block rejected"]
    assert len(rejected) == 1
    assert rejected[0]["address"] == 100


async def test_rejected_block_retried_later(server, link):
    server.faults.exception_for(100, 1, ExcCodes.ILLEGAL_ADDRESS)
    with captured_events() as logs:
        device = make_device(link, rejected_block_retry_s=0.05)
        await device.poll_once()
        server.faults.clear()
        await asyncio.sleep(0.06)
        readings = await device.poll_once()
    assert readings["v_v"].value == 230.1
    block_events = [entry["event"] for entry in logs if "block" in entry["event"]]
    assert block_events == ["modbus block rejected", "modbus block readable again"]


@pytest.mark.parametrize("code", [ExcCodes.GATEWAY_PATH_UNAVIABLE, ExcCodes.GATEWAY_NO_RESPONSE])
async def test_gateway_unreachable_backs_off(server, link, code):
    server.faults.exception_for(0, 6, code)
    with captured_events() as logs:
        device = make_device(link, backoff=Backoff(initial_s=10.0, max_s=10.0))
        readings = await device.poll_once()
        assert all(reading.quality is Quality.COMM_ERROR for reading in readings.values())
        assert device.state is DeviceState.UNREACHABLE
        assert link.state is LinkState.CONNECTED
        assert device.retry_at_mono_s > time.monotonic() + 5.0

        # run() keeps publishing at its period but sends nothing during the backoff.
        published = []
        task = asyncio.ensure_future(device.run(lambda name, r: published.append(r)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert reads_of(server, 0) == 1
    assert len(published) >= 2
    assert all(r["p_w"].quality is Quality.COMM_ERROR for r in published)
    offline = [entry for entry in logs if entry["event"] == "modbus device offline"]
    assert len(offline) == 1
    assert offline[0]["reason"] == "unreachable"

    server.faults.clear()
    readings = await device.poll_once()
    assert readings["p_w"].value == 1500
    assert device.state is DeviceState.ONLINE
    assert device.retry_at_mono_s == 0.0


async def test_busy_retried_in_same_poll(server, link):
    rule = server.faults.exception_for(100, 1, ExcCodes.DEVICE_BUSY)
    device = make_device(link, busy_retries=2, busy_retry_s=0.2)
    polling = asyncio.ensure_future(device.poll_once())
    while reads_of(server, 100) == 0:  # noqa: ASYNC110 - the simulator's request log is a deque
        await asyncio.sleep(0.005)
    assert device.readings()["v_v"].quality is Quality.COMM_ERROR
    server.faults.exceptions.remove(rule)
    readings = await polling
    assert readings["v_v"].value == 230.1
    assert reads_of(server, 100) == 2
    assert link.counters.exceptions == 1


async def test_busy_gives_up_after_retries(server, link):
    server.faults.exception_for(100, 1, ExcCodes.DEVICE_BUSY)
    device = make_device(link, busy_retries=2, busy_retry_s=0.01)
    readings = await device.poll_once()
    assert readings["v_v"].quality is Quality.COMM_ERROR
    assert readings["dc_w"].value == 612.3
    assert reads_of(server, 100) == 3
    assert link.counters.timeouts == 0


async def test_timeout_marks_rest_and_backs_off(server, link):
    server.faults.drop_all = True
    device = make_device(link, timeout_s=0.1)
    readings = await device.poll_once()
    assert all(reading.quality is Quality.COMM_ERROR for reading in readings.values())
    assert device.state is DeviceState.NOT_RESPONDING
    assert len(server.requests) == 1
    assert device.retry_at_mono_s > time.monotonic()


# ------------------------------------------------ FC-04: sentinels and a reboot


async def test_reboot_energy_never_jumps(server):
    """Valid data, then sentinels, then the connection closes, then valid data again."""
    port = port_of(server)
    link = await connected_link(port, timeout_s=0.5)
    device = make_device(link)
    energies = []
    try:
        readings = await device.poll_once()
        energies.append(readings["e_total_wh"])

        server.set_registers("holding", 0, [0x8000, 0x0000])
        server.set_registers("holding", 2, [0xFFFF] * 4)
        readings = await device.poll_once()
        assert readings["p_w"].quality is Quality.NOT_IMPLEMENTED
        energies.append(readings["e_total_wh"])

        await server.stop()
        readings = await device.poll_once()
        assert readings["p_w"].quality is Quality.COMM_ERROR
        energies.append(readings["e_total_wh"])

        set_valid(server, 123_457)
        await server.start_tcp("127.0.0.1", port)
        await link.wait_connected(5.0)
        readings = await device.poll_once()
        energies.append(readings["e_total_wh"])
    finally:
        await link.close()

    assert [reading.quality for reading in energies] == [
        Quality.GOOD,
        Quality.NOT_IMPLEMENTED,
        Quality.COMM_ERROR,
        Quality.GOOD,
    ]
    assert [reading.value for reading in energies] == [123_456, None, None, 123_457]


# ------------------------------------------------ FC-10: reconnect forever


async def test_reconnect_forever_compressed(server):
    """FC-10 at 1/300 scale: poll every 50 ms, peer gone 1 s, backoff 20 ms doubling to 100 ms.

    The field case polls at 1 s with the peer gone for 300 s. The backoff's
    cap of 100 ms plays the role of a 30 s cap in the field.
    """
    port = port_of(server)
    records = []
    with captured_events() as logs:
        link = await connected_link(port, timeout_s=0.5)
        device = make_device(link, poll_period_s=0.05)
        task = asyncio.ensure_future(
            device.run(lambda name, r: records.append((time.monotonic(), link.state, r)))
        )
        try:
            await asyncio.sleep(0.3)
            await server.stop()  # the peer closes the connection; connects are refused
            closed_mono_s = time.monotonic()
            await asyncio.sleep(1.0)
            await server.start_tcp("127.0.0.1", port)
            back_mono_s = time.monotonic()
            attempts_while_down = link.counters.connect_attempts
            while not any(t > back_mono_s and r["p_w"].good for t, _, r in records):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            resumed_mono_s = time.monotonic()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await link.close()

    # Points are unusable from the poll at which the link went down to the reconnect.
    assert any(t < closed_mono_s and r["p_w"].good for t, _, r in records)
    down = [r for _, state, r in records if state is not LinkState.CONNECTED]
    assert len(down) >= 5
    assert all(reading.quality is Quality.COMM_ERROR for r in down for reading in r.values())

    # Attempts went on through the outage, and the first one after the
    # peer was back (or one already under way) reconnected.
    assert attempts_while_down >= 5
    assert link.counters.connect_attempts - attempts_while_down <= 1
    assert resumed_mono_s - back_mono_s < 1.0

    link_events = [e["event"] for e in logs if e["event"].startswith("modbus link")]
    assert link_events == [
        "modbus link connected",
        "modbus link down",
        "modbus link reconnected",
        "modbus link closed",
    ]
    device_events = [(e["event"], e.get("reason")) for e in logs if "modbus device" in e["event"]]
    assert device_events == [
        ("modbus device online", None),
        ("modbus device offline", "link_down"),
        ("modbus device online", None),
    ]


# ----------------------------------------------------------------------------- run()


async def test_run_counts_overruns(server, link):
    server.faults.delay_s = 0.06
    device = make_device(link, poll_period_s=0.02, timeout_s=1.0)
    published = []
    task = asyncio.ensure_future(device.run(lambda name, r: published.append(name)))
    await asyncio.sleep(0.4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert published
    assert set(published) == {"inv1"}
    assert device.overruns >= len(published)
    assert device.cycle_time_s >= 0.06


# ----------------------------------------------------------------------------- writes


async def test_write_point_encodes_and_reads_back(server, link):
    device = make_device(link)
    await device.write_point("setpoint_w", -2500)
    assert server.get_point("setpoint_w") == -2500
    assert server.get_registers("holding", 200, 2) == [0xFFFF, 0xF63C]

    await device.write_point("dc_w", 590.0)
    assert server.get_registers("holding", 300, 1) == [5900]  # scale factor -1 read fresh
    server.set_point("dc_w_sf", -2)
    await device.write_point("dc_w", 590.0)
    assert server.get_registers("holding", 300, 1) == [0xE678]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("p_w", 1, "not writable"),
        ("setpoint_w", 6000, "outside its range"),
        ("setpoint_w", float("nan"), "finite"),
        ("setpoint_w", "high", "takes a number"),
    ],
)
async def test_write_point_rejects(server, link, name, value, message):
    device = make_device(link)
    with pytest.raises(ValueError, match=message):
        await device.write_point(name, value)
    assert server.get_point("setpoint_w") == 0


async def test_write_point_read_back_mismatch():
    async def clamping(request: bytes, writer: asyncio.StreamWriter) -> None:
        if request[7] == 16:
            writer.write(request[:4] + bytes.fromhex("0006") + request[6:12])
        else:
            writer.write(register_response(request, [0x0000, 0x1388]))  # clamped to 5000

    async with ScriptedTcpServer(clamping) as peer:
        link = await connected_link(peer.port)
        try:
            device = make_device(link)
            with pytest.raises(ModbusWriteVerifyError, match="read back 0000 1388"):
                await device.write_point("setpoint_w", -2500)
        finally:
            await link.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"poll_period_s": 0}, "must be positive"),
        ({"timeout_s": -1}, "must be positive"),
        ({"stale_s": 0}, "stale_s"),
        ({"busy_retries": -1}, "busy_retries"),
        ({"unit_id": 256}, "unit id must be 0..255"),
    ],
)
def test_device_rejects_settings(options, message):
    link = ModbusLink.tcp("127.0.0.1", 502)
    with pytest.raises(ValueError, match=message):
        make_device(link, **options)
