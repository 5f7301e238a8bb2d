"""CanReader over real links: python-can's virtual bus, slcan on a pseudo-terminal and socket://.

The field cases run over both the virtual bus and slcan (the ``can_link``
fixture). The silence case is compressed in time: frames every 20 ms instead
of 1 s and a stale time of 100 ms instead of 5 s. The assertions use the receive times
the reader records, never the wall-clock speed of the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
import uuid

import can
import pytest
from can_support import (  # noqa: F401  (pytest fixtures)
    PtySlcan,
    can_link,
    frame_bytes,
    no_reader_threads,
    set_frames,
    slcan_line,
    wait_until,
)
from structlog.testing import capture_logs

from drivers.can.bms import BmsState, BmsString, BmsStringConfig
from drivers.can.profile import load_bms_profile
from drivers.can.reader import (
    CAN_ERR_BUSOFF,
    CAN_ERR_CRTL,
    CAN_ERR_CRTL_ACTIVE,
    CAN_ERR_CRTL_RX_PASSIVE,
    CanLink,
    CanOpenError,
    CanReader,
    LinkState,
    asyncio_sink,
    open_bus,
)
from drivers.quality import Quality
from gateway.config import CanTransport

FAST_BACKOFF = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "receive_timeout_s": 0.02}


def make_bms(stale_s: float = 5.0, frame_sets: int = 3) -> BmsString:
    config = BmsStringConfig(
        name="bms-1",
        profile=load_bms_profile("bms-pylontech"),
        max_current_a=1000.0,
        stale_s=stale_s,
        recovery_frame_sets=frame_sets,
    )
    return BmsString(config)


def send_all(link, frames) -> None:
    for frame_id, is_extended, data in frames:
        link.send(frame_id, is_extended, data)


def snapshot_after(link, frames, bms: BmsString | None = None):
    """Send ``frames`` over ``link`` into a BmsString and return its snapshot once all arrived."""
    bms = bms or make_bms()
    expected = bms.frames_received + len(frames)
    reader = CanReader(link.link, bms.on_message, **FAST_BACKOFF)
    reader.open()
    with reader:
        send_all(link, frames)
        assert wait_until(lambda: bms.frames_received == expected)
    return bms.snapshot()


# -- field cases over both links ----------------------------------------------------------


def test_frame_set_over_link(can_link):  # noqa: F811  (pytest fixture)
    name = (0x35E, False, frame_bytes("5059544553"))
    snap = snapshot_after(can_link, [*set_frames(), name])
    assert snap["charge_voltage_limit_v"].value == 53.2
    assert snap["charge_current_limit_a"].value == 370.0
    assert snap["discharge_current_limit_a"].value == 370.0
    assert snap["discharge_voltage_limit_v"].value == 46.0
    assert snap["soc_pct"].value == 26
    assert snap["soh_pct"].value == 100
    assert snap["pack_voltage_v"].value == 48.66
    assert snap["battery_current_a"].value == 0.0
    assert snap["pack_temperature_c"].value == 33.0
    assert snap["module_count"].value == 10
    assert snap["charge_enable"].value is True
    assert snap["discharge_enable"].value is True
    assert snap["force_charge_request_1"].value is False
    assert snap["manufacturer_name"].value == "PYTES"
    assert snap.alarms == ()


def test_status_alarms_over_link(can_link):  # noqa: F811  (pytest fixture)
    snap = snapshot_after(can_link, [(0x359, False, frame_bytes("82000001 01504E"))])
    assert [a.name for a in snap.alarms] == [
        "protection_cell_over_voltage",
        "protection_discharge_over_current",
        "warning_charge_high_current",
    ]
    assert snap["module_count"].value == 1


def test_signed_values_over_link(can_link):  # noqa: F811  (pytest fixture)
    snap = snapshot_after(can_link, [(0x356, False, frame_bytes("021311FF38FF"))])
    # -23.9 A from the BMS is 23.9 A of discharge in the gateway's sign.
    assert snap["battery_current_a"].value == 23.9
    assert snap["pack_temperature_c"].value == -20.0


def test_limit_variants_over_link(can_link):  # noqa: F811  (pytest fixture)
    bms = make_bms()
    snap = snapshot_after(can_link, [(0x4220, True, frame_bytes("A410200D2A763674"))], bms)
    assert snap["charge_current_limit_a"].value == 25.0
    assert snap["discharge_current_limit_a"].value == 25.0
    snap = snapshot_after(can_link, [(0x351, False, frame_bytes("4502AC0354FCC001"))], bms)
    assert snap["charge_current_limit_a"].value == 94.0
    assert snap["discharge_current_limit_a"].value == 94.0
    assert snap["charge_voltage_limit_v"].value == 58.1
    assert snap["discharge_voltage_limit_v"].value == 44.8


def test_silence_recovery_over_link(can_link):  # noqa: F811  (pytest fixture)
    """Silence and recovery, compressed: 20 ms frame sets, 100 ms stale time, 3 sets to recover."""
    stale_s = 0.1
    bms = make_bms(stale_s=stale_s)

    def send_sets(count: int, limits_hex: str) -> None:
        for _ in range(count):
            before = bms.frames_received
            send_all(can_link, set_frames(limits_hex))
            assert wait_until(lambda: bms.frames_received == before + 5)  # noqa: B023
            time.sleep(0.02)

    reader = CanReader(can_link.link, bms.on_message, **FAST_BACKOFF)
    reader.open()
    with reader:
        send_sets(3, "1402740E740ECC01")
        snap = bms.snapshot()
        assert snap.power_allowed
        last_frame_t = reader.health().last_frame_t_mono_s

        # Silence: by the last frame plus the stale time, everything is unavailable.
        snap = bms.snapshot(last_frame_t + stale_s + 0.001)
        assert snap.state is BmsState.SILENT
        assert snap.alarm("bms_silent") is not None
        assert all(r.value is None and r.quality is Quality.STALE for r in snap.readings.values())
        assert snap.power_window_kw() == (0.0, 0.0)
        time.sleep(stale_s + 0.05)
        assert bms.snapshot().state is BmsState.SILENT

        # Frames resume with new limits: power stays off until three consistent sets.
        send_sets(1, "4502AC0354FCC001")
        snap = bms.snapshot()
        assert snap.state is BmsState.RECOVERING
        assert not snap.power_allowed
        assert snap["charge_current_limit_a"].value == 94.0
        send_sets(2, "4502AC0354FCC001")
        snap = bms.snapshot()
    assert snap.state is BmsState.ONLINE
    # 94 A * 48.66 V / 1000 = 4.57404 kW.
    assert snap.power_window_kw() == pytest.approx((4.57404, 4.57404), abs=1e-12)


# -- slcan ----------------------------------------------------------------------------------


def test_slcan_garbled_lines():
    pty = PtySlcan()
    received = []
    link = CanLink("slcan", pty.path, slcan_open_delay_s=0.0)
    try:
        reader = CanReader(link, lambda m, t: received.append(m), **FAST_BACKOFF)
        reader.open()
        with reader:
            pty.write(
                b"t35\xff\xfe\r"  # non-ASCII bytes
                + b"t3554ZZ006400\r"  # non-hex data
                + b"t3558140274\r"  # DLC 8 with 3 data bytes
                + b"t3552AABBCC\r"  # DLC 2 with 3 data bytes
                + b"t9000\r"  # 11-bit id above 0x7FF
                + b"x\r"  # unknown command letter
                + b"\a"  # adapter error reply
                + b"z\r\r"  # transmit acknowledgement and OK reply
                + slcan_line(0x355, frame_bytes("1A006400"))
                + b"t35C2C0001234\r"  # with a timestamp
            )
            assert wait_until(lambda: len(received) == 2)
            health = reader.health()
    finally:
        pty.close()
    assert [(m.arbitration_id, bytes(m.data)) for m in received] == [
        (0x355, frame_bytes("1A006400")),
        (0x35C, frame_bytes("C000")),
    ]
    assert health.garbled_lines == 6
    assert health.adapter_errors == 1
    assert health.receive_failures == 0


def test_slcan_overlong_line():
    pty = PtySlcan()
    received = []
    link = CanLink("slcan", pty.path, slcan_open_delay_s=0.0)
    try:
        reader = CanReader(link, lambda m, t: received.append(m), **FAST_BACKOFF)
        reader.open()
        with reader:
            pty.write(b"A" * 100)
            pty.write(b"\r" + slcan_line(0x355, frame_bytes("1A006400")))
            assert wait_until(lambda: len(received) == 1)
            assert reader.health().garbled_lines >= 1
    finally:
        pty.close()


def test_slcan_garbled_logged_once():
    pty = PtySlcan()
    link = CanLink("slcan", pty.path, slcan_open_delay_s=0.0)
    try:
        reader = CanReader(link, lambda m, t: None, **FAST_BACKOFF)
        reader.open()
        with capture_logs() as logs, reader:
            for _ in range(20):
                pty.write(b"t35\xff\r")
            assert wait_until(lambda: reader.health().garbled_lines == 20)
    finally:
        pty.close()
    assert len([e for e in logs if e["event"] == "slcan_garbled_lines"]) == 1


def test_slcan_extended_frame():
    pty = PtySlcan()
    received = []
    link = CanLink("slcan", pty.path, slcan_open_delay_s=0.0)
    try:
        reader = CanReader(link, lambda m, t: received.append(m), **FAST_BACKOFF)
        reader.open()
        with reader:
            pty.write(b"T000042208A410200D2A763674\r")
            assert wait_until(lambda: len(received) == 1)
    finally:
        pty.close()
    assert received[0].arbitration_id == 0x4220
    assert received[0].is_extended_id
    assert bytes(received[0].data) == frame_bytes("A410200D2A763674")


def test_slcan_sends_open_commands():
    pty = PtySlcan()
    try:
        bus = open_bus(CanLink("slcan", pty.path, bitrate=250_000, slcan_open_delay_s=0.0))
        bus.shutdown()
        written = os.read(pty.master, 200)
    finally:
        pty.close()
    # Close, set 250 kbit/s (S5), open.
    assert written.startswith(b"C\rS5\r")
    assert b"O\r" in written


def test_slcan_pty_closed_keeps_trying():
    pty = PtySlcan()
    link = CanLink("slcan", pty.path, slcan_open_delay_s=0.0)
    reader = CanReader(link, lambda m, t: None, **FAST_BACKOFF)
    reader.open()
    reader.start()
    try:
        pty.close()
        assert wait_until(lambda: reader.health().state is LinkState.DOWN)
        failures = reader.health().receive_failures
        assert failures >= 1
        time.sleep(0.2)
        assert reader.running
    finally:
        reader.stop()
    assert reader.health().state is LinkState.CLOSED


class _SlcanServer:
    """A TCP server on 127.0.0.1 that plays an slcan adapter for ``socket://`` URLs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(5.0)
        self.url = f"socket://127.0.0.1:{self.sock.getsockname()[1]}"

    def accept(self) -> socket.socket:
        """Accept the reader's connection and wait for its open command, as an adapter does.

        pyserial flushes its input while connecting, so frames sent before
        the open command could be lost.
        """
        conn, _ = self.sock.accept()
        conn.settimeout(5.0)
        commands = b""
        while b"O\r" not in commands:
            chunk = conn.recv(64)
            assert chunk, f"reader closed the connection after {commands!r}"
            commands += chunk
        return conn

    def close(self) -> None:
        self.sock.close()


def test_slcan_socket_url_reconnects():
    server = _SlcanServer()
    bms = make_bms()
    link = CanLink("slcan", server.url, slcan_open_delay_s=0.0)
    reader = CanReader(link, bms.on_message, **FAST_BACKOFF)
    try:
        reader.start()
        first = server.accept()
        first.sendall(slcan_line(0x355, frame_bytes("1A006400")))
        assert wait_until(lambda: bms.frames_received == 1)
        first.close()  # the adapter drops the connection

        second = server.accept()  # the reader reconnects by itself
        second.sendall(slcan_line(0x355, frame_bytes("1B006400")))
        assert wait_until(lambda: bms.frames_received == 2)
        health = reader.health()
        second.close()
    finally:
        reader.stop()
        server.close()
    assert bms.snapshot()["soc_pct"].value == 27
    assert health.reopens >= 1
    assert health.receive_failures >= 1


# -- error frames and recovery ----------------------------------------------------------------


@pytest.fixture
def virtual_channel():
    channel = f"test-{uuid.uuid4().hex}"
    sender = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    yield channel, sender
    sender.shutdown()


def error_frame(error_class: int, data: bytes = b"\x00" * 8) -> can.Message:
    return can.Message(arbitration_id=error_class, is_error_frame=True, data=data)


def test_error_passive_counted(virtual_channel):
    channel, sender = virtual_channel
    reader = CanReader(CanLink("virtual", channel), lambda m, t: None, **FAST_BACKOFF)
    reader.open()
    with reader:
        sender.send(
            error_frame(CAN_ERR_CRTL, bytes([0, CAN_ERR_CRTL_RX_PASSIVE, 0, 0, 0, 0, 0, 0]))
        )
        assert wait_until(lambda: reader.health().state is LinkState.ERROR_PASSIVE)
        sender.send(
            error_frame(CAN_ERR_CRTL, bytes([0, CAN_ERR_CRTL_RX_PASSIVE, 0, 0, 0, 0, 0, 0]))
        )
        sender.send(error_frame(CAN_ERR_CRTL, bytes([0, CAN_ERR_CRTL_ACTIVE, 0, 0, 0, 0, 0, 0])))
        assert wait_until(lambda: reader.health().state is LinkState.ERROR_ACTIVE)
        health = reader.health()
    assert health.error_frames == 3
    assert health.error_passive_events == 1
    assert health.frames_received == 0


def test_bus_off_reopens(virtual_channel):
    channel, sender = virtual_channel
    received = []
    reader = CanReader(CanLink("virtual", channel), lambda m, t: received.append(m), **FAST_BACKOFF)
    reader.open()
    with capture_logs() as logs, reader:
        sender.send(error_frame(CAN_ERR_BUSOFF))
        assert wait_until(lambda: reader.health().reopens == 1)
        assert reader.health().state is LinkState.ERROR_ACTIVE

        def frame_arrives() -> bool:
            sender.send(can.Message(arbitration_id=0x355, is_extended_id=False, data=b"\x1a\x00"))
            return wait_until(lambda: bool(received), timeout_s=0.05)

        assert wait_until(frame_arrives, timeout_s=5.0)
        health = reader.health()
    assert health.bus_off_events == 1
    states = [e["state"] for e in logs if e["event"] == "can_link_state"]
    assert states[:2] == ["bus_off", "error_active"]


def test_open_failures_back_off(virtual_channel):
    channel, sender = virtual_channel
    attempts = []

    def flaky_open(link: CanLink) -> can.BusABC:
        attempts.append(time.monotonic())
        if len(attempts) <= 3:
            raise CanOpenError(f"cannot open CAN {link.describe()}: test failure {len(attempts)}")
        return open_bus(link)

    received = []
    reader = CanReader(
        CanLink("virtual", channel),
        lambda m, t: received.append(m),
        bus_factory=flaky_open,
        **FAST_BACKOFF,
    )
    with capture_logs() as logs, reader:
        assert wait_until(lambda: reader.health().state is LinkState.ERROR_ACTIVE)
        sender.send(can.Message(arbitration_id=0x355, is_extended_id=False, data=b"\x1a\x00"))
        assert wait_until(lambda: len(received) == 1)
    gaps = [b - a for a, b in itertools.pairwise(attempts[:4])]
    # Backoff doubles: 0.01 s, 0.02 s, 0.04 s (each gap at least its backoff).
    assert gaps[0] >= 0.01
    assert gaps[1] >= 0.02
    assert gaps[2] >= 0.04
    down_logs = [e for e in logs if e["event"] == "can_link_state" and e["state"] == "down"]
    assert len(down_logs) == 1


class _FailingBus(can.BusABC):
    """A bus whose receive fails a given number of times, then delivers one frame."""

    def __init__(self, failures: list[BaseException]) -> None:
        self._failures = failures
        self._delivered = False
        super().__init__(channel="failing")

    def _recv_internal(self, timeout):
        if self._failures:
            raise self._failures.pop(0)
        if not self._delivered:
            self._delivered = True
            return can.Message(arbitration_id=0x355, is_extended_id=False, data=b"\x1a\x00"), False
        time.sleep(timeout or 0)
        return None, False

    def send(self, msg, timeout=None):
        raise NotImplementedError


def test_receive_failures_survive():
    failures = [
        can.CanOperationError("interface went down"),
        OSError(5, "Input/output error"),
        ValueError("parse error in driver"),
    ]
    buses = []

    def factory(link):
        bus = _FailingBus(failures)
        buses.append(bus)
        return bus

    received = []
    with CanReader(
        CanLink("virtual", "unused"),
        lambda m, t: received.append(m),
        bus_factory=factory,
        **FAST_BACKOFF,
    ) as reader:
        assert wait_until(lambda: len(received) == 1)
        health = reader.health()
    assert health.receive_failures == 3
    assert health.reopens == 3
    assert len(buses) == 4


def test_sink_failure_counted(virtual_channel):
    channel, sender = virtual_channel
    calls = []

    def sink(message, t):
        calls.append(message.arbitration_id)
        if message.arbitration_id == 0x351:
            raise KeyError("sink bug")

    reader = CanReader(CanLink("virtual", channel), sink, **FAST_BACKOFF)
    reader.open()
    with capture_logs() as logs, reader:
        for frame_id in (0x351, 0x351, 0x351, 0x355):
            sender.send(can.Message(arbitration_id=frame_id, is_extended_id=False, data=b"\x00"))
        assert wait_until(lambda: len(calls) == 4)
        health = reader.health()
    assert health.sink_failures == 3
    assert health.frames_received == 4
    events = [e["event"] for e in logs if e["event"].startswith("can_sink")]
    assert events == ["can_sink_failed", "can_sink_recovered"]


# -- lifecycle ---------------------------------------------------------------------------------


def test_open_error_names_link(tmp_path):
    missing = tmp_path / "ttyUSB9"
    with pytest.raises(CanOpenError) as info:
        open_bus(CanLink("slcan", str(missing), slcan_open_delay_s=0.0))
    message = str(info.value)
    assert f"slcan {missing}" in message
    assert "check the serial device" in message
    assert isinstance(info.value, ConnectionError)


def test_open_rejects_bitrate():
    pty = PtySlcan()
    try:
        with pytest.raises(CanOpenError, match="slcan supports"):
            open_bus(CanLink("slcan", pty.path, bitrate=123_456, slcan_open_delay_s=0.0))
    finally:
        pty.close()


def test_start_twice_and_restart(virtual_channel):
    channel, _ = virtual_channel
    reader = CanReader(CanLink("virtual", channel), lambda m, t: None, **FAST_BACKOFF)
    reader.start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            reader.start()
    finally:
        reader.stop()
    assert not reader.running
    reader.start()
    reader.stop()
    assert threading.active_count() >= 1


async def test_asyncio_sink(virtual_channel):
    channel, sender = virtual_channel
    frames: asyncio.Queue = asyncio.Queue()
    reader = CanReader(
        CanLink("virtual", channel),
        asyncio_sink(asyncio.get_running_loop(), frames),
        **FAST_BACKOFF,
    )
    reader.open()
    with reader:
        sender.send(
            can.Message(arbitration_id=0x355, is_extended_id=False, data=b"\x1a\x00\x64\x00")
        )
        message, t_mono_s = await asyncio.wait_for(frames.get(), timeout=5.0)
    assert message.arbitration_id == 0x355
    assert t_mono_s <= time.monotonic()


@pytest.mark.parametrize(
    ("channel", "configured", "expected"),
    [
        ("socket://127.0.0.1:4001", None, 0.0),
        ("/dev/ttyACM0", None, 2.0),
        ("/dev/pts/7", None, 0.0),
        ("/dev/ttyACM0", 0.5, 0.5),
        ("socket://127.0.0.1:4001", 1.5, 1.5),
    ],
)
def test_slcan_open_delay_from_config(channel, configured, expected):
    # Adapters that reset on open need python-can's 2 s wait; nothing resets over TCP.
    fields = {"kind": "can", "interface": "slcan", "channel": channel}
    if configured is not None:
        fields["slcan_open_delay_s"] = configured
    link = CanLink.from_transport(CanTransport(**fields))
    assert link.slcan_open_delay_s == expected


def test_slcan_open_delay_rejects_negative():
    with pytest.raises(ValueError, match="slcan_open_delay_s"):
        CanTransport(kind="can", interface="slcan", channel="/dev/ttyACM0", slcan_open_delay_s=-1)
