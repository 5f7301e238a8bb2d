"""PcsDriver against the pcs-sunspec profile served by RegisterServer on 127.0.0.1.

The PCS model of :mod:`tests.pcs_sim` runs behind the server. Tests that
count writes drive the driver with a :class:`FakeClock`, so the rate limit
and the heartbeat period do not depend on how fast this machine runs.

``WSet`` is an i16 in W with scale factor ``WSet_SF`` = 2, so it stores whole
multiples of 100 W: 42.04 kW is written as raw 420 and reads back as 42.0 kW.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import structlog
from pymodbus.constants import ExcCodes

from drivers.modbus.link import Backoff, ModbusLink
from drivers.modbus.profile import parse_profile
from drivers.pcs import (
    PcsConfigError,
    PcsDriver,
    PcsFaultError,
    PcsGroup,
    PcsMap,
    PcsStartError,
)
from drivers.quality import Quality
from tests.pcs_sim import PROFILE, pcs_server

pytestmark = pytest.mark.timeout(30)

WSET_ADDRESS = PROFILE.point("WSet").address


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
async def sim():
    async with pcs_server() as running:
        yield running


@pytest.fixture
async def links():
    opened: list[ModbusLink] = []

    async def connect(port: int, timeout_s: float = 0.5) -> ModbusLink:
        link = ModbusLink.tcp(
            "127.0.0.1", port, timeout_s=timeout_s, backoff=Backoff(initial_s=0.02, max_s=0.1)
        )
        opened.append(link)
        await link.start()
        await link.wait_connected(5.0)
        return link

    yield connect
    for link in opened:
        await link.close()


def make_driver(
    link: ModbusLink, profile=PROFILE, name: str = "pcs-1", unit_id: int = 1, **options
) -> PcsDriver:
    settings = {
        "rated_kw": 100.0,
        "revert_s": 1.0,
        "write_budget": 3,
        "deadband_kw": 1.0,
        "timeout_s": 0.5,
        "min_write_interval_s": 0.05,
    } | options
    return PcsDriver(name, profile, link, unit_id, **settings)


async def started_driver(links, port: int) -> tuple[PcsDriver, FakeClock]:
    """Return a started driver on a fake clock, with the clock."""
    clock = FakeClock()
    driver = make_driver(await links(port), clock=clock)
    await driver.start()
    return driver, clock


# ----------------------------------------------------------------------------- start


async def test_start_programs_revert_timer(sim, links):
    server, _, port = sim
    server.set_point("HbTmoTms", 3)
    driver = make_driver(await links(port))
    with structlog.testing.capture_logs() as logs:
        await driver.start()
    assert server.get_point("WSet_RvrtTms") == 1
    assert driver.revert_timer_programmed
    assert driver.programmed_revert_s == 1.0
    # Refresh three times per reversion time; heartbeat three times per timeout.
    assert driver.policy.settings.refresh_interval_s == pytest.approx(1 / 3)
    assert driver.policy.settings.heartbeat_period_s == pytest.approx(1.0)
    assert driver.nameplate_kw == 500.0
    events = [entry["event"] for entry in logs]
    assert events.count("pcs revert timer programmed") == 1


async def test_revert_time_rounds_up(sim, links):
    _, _, port = sim
    link = await links(port)
    # WSet_RvrtTms counts whole seconds and 0 means "never revert", so 0.3 s becomes 1 s.
    assert make_driver(link, revert_s=0.3).programmed_revert_s == 1.0
    assert make_driver(link, revert_s=2.2).programmed_revert_s == 3.0
    assert make_driver(link, revert_s=2.0).programmed_revert_s == 2.0


async def test_start_rejects_rated_above_nameplate(sim, links):
    _, _, port = sim
    driver = make_driver(await links(port), rated_kw=600.0)
    with pytest.raises(PcsConfigError, match=r"rated_kw 600 .* above the PCS nameplate WRtg = 500"):
        await driver.start()


async def test_start_fails_when_silent(sim, links):
    server, _, port = sim
    link = await links(port, timeout_s=0.2)
    server.faults.drop_all = True
    driver = make_driver(link, timeout_s=0.2)
    with pytest.raises(PcsStartError) as info:
        await driver.start()
    message = str(info.value)
    assert f"tcp 127.0.0.1:{port} unit 1" in message
    assert "no response at start" in message
    assert not driver.started


async def test_start_revert_timer_rejected(sim, links):
    _, model, port = sim
    model.reject["WSet_RvrtTms"] = ExcCodes.ILLEGAL_VALUE
    driver = make_driver(await links(port))
    with pytest.raises(PcsStartError, match="revert_timer"):
        await driver.start()
    assert driver.fault is not None
    assert driver.fault.target == "revert_timer"
    assert "0x03" in driver.fault.detail
    with pytest.raises(PcsFaultError, match="fault latched"):
        await driver.start()  # a latched fault needs the operator reset
    assert not driver.started

    del model.reject["WSet_RvrtTms"]
    await driver.reset()
    assert driver.started
    assert driver.revert_timer_programmed


# ----------------------------------------------------------------------------- setpoints


async def test_enable_and_setpoint(sim, links):
    server, _, port = sim
    driver, clock = await started_driver(links, port)
    with structlog.testing.capture_logs() as logs:
        await driver.enable()
        await driver.enable()  # already enabled: no second log line
    assert server.get_point("Conn") == 1
    assert server.get_point("WSet_Ena") == 1
    assert server.get_point("WSet") == 0
    assert [entry["event"] for entry in logs].count("pcs enabled") == 1

    assert (await driver.step(42.04)).p_kw is None  # enable wrote 0 kW just now: rate limit
    clock.now_s += 0.05
    decision = await driver.step(42.04)
    assert decision.p_kw == 42.04
    assert server.get_registers("holding", WSET_ADDRESS, 1) == [420]
    assert driver.policy.verified("p") == 42.0

    status = await _status_when(driver, lambda s: s.p_kw.value == 42.0)
    assert status.setpoint_kw.value == 42.0
    assert status.enabled is True
    assert status.write_failures == 0


async def test_negative_setpoint_charges(sim, links):
    server, _, port = sim
    driver, clock = await started_driver(links, port)
    await driver.step(-25.0)
    # + discharge in bessgw and in SunSpec: -25 kW is -25000 W, raw -250 = 0xFF06.
    assert server.get_point("WSet") == -25000
    assert server.get_registers("holding", WSET_ADDRESS, 1) == [0xFF06]
    clock.now_s += 0.05
    await driver.step(-500.0)
    assert server.get_point("WSet") == -100000  # clamped to -rated_kw


async def test_deadband_and_rate_limit(sim, links):
    server, model, port = sim
    driver, clock = await started_driver(links, port)
    # (seconds after start, request kW, expected WSet in W after the cycle)
    rows = [
        (0.00, 10.0, 10000),  # first write
        (0.01, 20.0, 10000),  # 0.01 s after the last attempt < 0.05 s: held back
        (0.05, 20.0, 20000),  # |20 - 10| > 1 kW deadband and 0.05 s passed
        (0.10, 20.5, 20000),  # |20.5 - 20| = 0.5 <= 1: inside the deadband
        (0.15, 21.2, 21200),  # |21.2 - 20| = 1.2 > 1
        (0.20, 0.6, 600),  # large change
        (0.25, 0.0, 0),  # inside the deadband, but 0 kW is always written
    ]
    start_s = clock.now_s
    for offset_s, request_kw, expected_w in rows:
        clock.now_s = start_s + offset_s
        await driver.step(request_kw)
        assert server.get_point("WSet") == expected_w, f"t+{offset_s} request {request_kw}"
    assert len(model.words_written("WSet")) == 5


async def test_unchanged_setpoint_is_refreshed(sim, links):
    _, model, port = sim
    driver, clock = await started_driver(links, port)
    start_s = clock.now_s
    for cycle in range(21):  # 1.0 s in 0.05 s cycles at a constant 30 kW
        clock.now_s = start_s + cycle * 0.05
        await driver.step(30.0)
    # Writes at 0 s, then each time 1/3 s has passed since the last verified
    # write: at 0.35, 0.70 and 1.05 s would be next, so 3 writes by 1.0 s.
    assert len(model.words_written("WSet")) == 3


async def test_readback_mismatch_latches_fault(sim, links):
    server, model, port = sim
    driver, clock = await started_driver(links, port)
    await driver.enable()
    model.clamp_w = 30000.0  # the PCS accepts the write but limits WSet to 30 kW
    start_s = clock.now_s
    with structlog.testing.capture_logs() as logs:
        for cycle in range(1, 6):
            clock.now_s = start_s + cycle * 0.05
            await driver.step(50.0)
    fault = driver.fault
    assert fault is not None
    assert fault.target == "p"
    assert "commanded 50, read back 30" in fault.detail
    assert driver.policy.total_failures == 3
    # The zero from enable, three attempts at 50 kW, then the safe stop's 0 kW;
    # nothing after the latch.
    assert model.words_written("WSet") == [(0,), (500,), (500,), (500,), (0,)]
    assert server.get_point("WSet") == 0
    assert server.get_point("Conn") == 0
    assert server.get_point("WSet_Ena") == 0
    events = [entry["event"] for entry in logs]
    assert events.count("pcs fault latched") == 1
    assert events.count("pcs disabled") == 1
    status = await driver.read_status()
    assert status.fault == fault
    assert status.enabled is False

    # Operator reset after the cause is gone: programmed again, then usable.
    model.clamp_w = None
    with structlog.testing.capture_logs() as logs:
        await driver.reset()
    assert driver.fault is None
    assert driver.revert_timer_programmed
    assert [entry["event"] for entry in logs].count("pcs fault cleared") == 1
    await driver.enable()
    clock.now_s += 0.05
    await driver.step(50.0)
    assert server.get_point("WSet") == 50000


async def test_exception_on_write_latches_fault(sim, links):
    server, _, port = sim
    driver, clock = await started_driver(links, port)
    await driver.enable()
    server.faults.exception_for(WSET_ADDRESS, 1, ExcCodes.DEVICE_FAILURE)
    for _ in range(3):
        clock.now_s += 0.05
        await driver.step(20.0)
    assert driver.fault is not None
    assert "exception response 0x04" in driver.fault.detail
    assert f"127.0.0.1:{port} unit 1" in driver.fault.detail
    # The zero setpoint cannot be written, but the run command still opens.
    assert server.get_point("Conn") == 0


async def test_scale_factor_change_retries(sim, links):
    server, _, port = sim
    driver, clock = await started_driver(links, port)
    await driver.step(42.0)
    assert server.get_registers("holding", WSET_ADDRESS, 1) == [420]
    server.set_point("WSet_SF", 1)  # the PCS now counts WSet in 10 W steps
    clock.now_s += 0.05
    await driver.step(60.0)
    # Written as raw 600 with the old factor: read back 6000 W, not 60 kW.
    assert driver.policy.failures_in_row("p") == 1
    clock.now_s += 0.05
    await driver.step(60.0)
    assert server.get_registers("holding", WSET_ADDRESS, 1) == [6000]
    assert server.get_point("WSet") == 60000
    assert driver.policy.failures_in_row("p") == 0
    assert driver.policy.total_failures == 1
    assert driver.fault is None


async def test_heartbeat_increments(sim, links):
    server, model, port = sim
    server.set_point("HbTmoTms", 1)  # heartbeat period 1/3 s
    driver, clock = await started_driver(links, port)
    start_s = clock.now_s
    for cycle in range(15):  # 0.7 s in 0.05 s cycles
        clock.now_s = start_s + cycle * 0.05
        await driver.step(0.0)
    # Counter writes at 0, 0.35 and 0.70 s (the first cycle at or after each 1/3 s).
    assert model.words_written("HbCnt") == [(1,), (2,), (3,)]
    assert server.get_point("HbCnt") == 3
    assert driver.policy.heartbeat_value == 3


async def test_pcs_reverts_when_writes_stop(sim, links):
    server, model, port = sim
    driver = make_driver(await links(port))  # real clock: the model's timer runs on it
    await driver.start()
    await driver.enable()
    # Hold 40 kW for 1.5 s, longer than the 1 s reversion timer: the
    # refresh writes keep the PCS from reverting.
    deadline_s = time.monotonic() + 1.5
    while time.monotonic() < deadline_s:
        await driver.step(40.0)
        await asyncio.sleep(0.05)
    model.update()
    assert not model.reverted
    assert server.get_point("W") == 40000
    assert len(model.words_written("WSet")) >= 3  # the zero from enable, then refreshes

    # The gateway goes silent: the PCS reverts to 0 W by itself.
    last_write_s = model.last_setpoint_write_s
    status = await _status_when(driver, lambda s: s.p_kw.value == 0.0, timeout_s=5.0)
    assert model.reverted
    assert status.setpoint_kw.value == 40.0  # the register keeps the last command
    assert last_write_s is not None
    assert time.monotonic() - last_write_s > 1.0


# ----------------------------------------------------------------------------- status


async def test_status_decodes_state_and_events(sim, links):
    server, _, port = sim
    server.set_point("St", 7)
    server.set_point("Evt1", 0b1000_0001)
    driver = make_driver(await links(port))
    status = await driver.read_status()
    assert status.state_code == 7
    assert status.state_name == "fault"
    assert status.state_fault
    assert status.events == ("ground_fault", "over_temp")
    assert status.enabled is False
    assert status.revert_timer_s == 0.0
    assert not status.revert_timer_programmed
    assert status.p_kw.quality is Quality.GOOD
    assert status.device_state == "online"


async def test_status_when_offline(sim, links):
    server, _, port = sim
    link = await links(port, timeout_s=0.2)
    driver = make_driver(link, timeout_s=0.2)
    server.faults.drop_all = True
    status = await driver.read_status()
    assert status.device_state == "not_responding"
    assert status.p_kw.quality is Quality.COMM_ERROR
    assert status.enabled is None
    assert status.state_name == "unknown"


# ----------------------------------------------------------------------------- other profiles


PERCENT_PROFILE = parse_profile(
    {
        "profile": {"name": "pcs-percent", "max_gap_regs": 4},
        "points": [
            {
                "name": "p_set_pct",
                "address": 10,
                "type": "i16",
                "scale": 0.1,
                "unit": "%",
                "writable": True,
                "min": -100.0,
                "max": 100.0,
            },
            {"name": "run", "address": 11, "type": "u16", "writable": True},
            {"name": "q_set_var", "address": 12, "type": "i32", "unit": "var", "writable": True},
            {"name": "p_w", "address": 20, "type": "i32", "unit": "W"},
        ],
        "pcs": {
            "setpoint_point": "p_set_pct",
            "reactive_setpoint_point": "q_set_var",
            # This PCS counts charging as positive.
            "setpoint_sign": -1,
            "enable_point": "run",
            "enable_on": 2,
            "active_power_point": "p_w",
            "active_power_sign": -1,
        },
    }
)


async def test_percent_setpoint_sign_and_scale(links):
    async with pcs_server(profile=PERCENT_PROFILE) as (server, _, port):
        clock = FakeClock()
        driver = make_driver(await links(port), PERCENT_PROFILE, rated_kw=200.0, clock=clock)
        await driver.start()
        await driver.enable()
        assert server.get_point("run") == 2
        clock.now_s += 0.05
        await driver.step(50.0)
        # 50 kW discharge of 200 kW = 25 %, charge-positive: -25.0 %, raw -250 at 0.1 %.
        assert server.get_registers("holding", 10, 1) == [(-250) & 0xFFFF]
        assert driver.policy.verified("p") == 50.0
        clock.now_s += 0.05
        decision = await driver.step(50.0, q_kvar=-20.5)
        assert decision.p_kw is None  # unchanged
        assert server.get_point("q_set_var") == -20_500  # reactive sign is +1 by default
        assert driver.policy.verified("q") == -20.5
        server.set_point("p_w", -49_000)
        status = await driver.read_status()
        assert status.p_kw.value == 49.0
        assert status.setpoint_kw.value == 50.0
        assert driver.programmed_revert_s is None
        assert driver.policy.settings.heartbeat_period_s is None


def test_pcs_map_lists_problems():
    profile = parse_profile(
        {
            "profile": {"name": "pcs-broken"},
            "points": [
                {"name": "p_set", "address": 0, "type": "i16", "unit": "A", "writable": False},
                {"name": "hb", "address": 1, "type": "f32", "writable": True},
            ],
            "pcs": {"setpoint_point": "p_set", "heartbeat_point": "hb", "setpoint_sign": 2},
        }
    )
    with pytest.raises(PcsConfigError) as info:
        PcsMap.from_profile(profile)
    problems = info.value.problems
    assert any("setpoint_point = 'p_set' is not a writable holding point" in p for p in problems)
    assert any("has unit 'A'" in p for p in problems)
    assert any("heartbeat_point 'hb' is 'f32'" in p for p in problems)
    assert any("setpoint_sign = 2 is invalid" in p for p in problems)
    assert len(problems) == 4


def test_pcs_map_needs_setpoint():
    profile = parse_profile(
        {"profile": {"name": "meter"}, "points": [{"name": "p_w", "address": 0, "type": "i16"}]}
    )
    with pytest.raises(PcsConfigError, match="has no \\[pcs\\] table"):
        PcsMap.from_profile(profile)


# ----------------------------------------------------------------------------- several units


async def test_group_steps_each_unit(links):
    async with pcs_server(unit_id=1) as (server_a, _, port_a), pcs_server(unit_id=2) as (
        server_b,
        _,
        port_b,
    ):
        unit_a = make_driver(await links(port_a), name="pcs-a")
        unit_b = make_driver(await links(port_b), name="pcs-b", unit_id=2)
        group = PcsGroup([unit_a, unit_b])
        await group.start()
        decisions = await group.step({"pcs-a": 10.0, "pcs-b": -5.0})
        assert decisions["pcs-a"].p_kw == 10.0
        assert server_a.get_point("WSet") == 10000
        assert server_b.get_point("WSet") == -5000
        assert await group.disable() == {"pcs-a": True, "pcs-b": True}
        assert group.faults == {}


async def _status_when(driver: PcsDriver, condition, timeout_s: float = 3.0):
    """Read the status every 50 ms until ``condition(status)`` holds; fail after timeout_s."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        status = await driver.read_status()
        if condition(status):
            return status
        if time.monotonic() > deadline_s:
            pytest.fail(f"condition not met within {timeout_s} s; last status {status}")
        await asyncio.sleep(0.05)
