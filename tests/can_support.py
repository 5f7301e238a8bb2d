"""CAN test helpers: field-case frames, a virtual bus and an slcan pseudo-terminal link.

Test modules import the fixtures they need from here (``from can_support
import can_link, no_reader_threads``) so that pytest picks them up.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import can
import pytest

from drivers.can.reader import CanLink

#: Frames reported from the field, with known right values, as (frame id, is_extended, data hex).
FRAME_SET_CASES = {
    "limits": (0x351, False, "1402740E740ECC01"),
    "soc_soh": (0x355, False, "1A006400"),
    "pack": (0x356, False, "021300004A01"),
    "status_clear": (0x359, False, "000000000A504E"),
    "status_alarms": (0x359, False, "82000001 01504E"),
    "requests": (0x35C, False, "C000"),
    "name_pylon": (0x35E, False, "50594C4F4E202020"),
    "name_pytes": (0x35E, False, "5059544553"),
}
SIGNED_CASES = {
    "current_word": (0x356, False, "021316FE4A01"),
    "pack_negative": (0x356, False, "0A0211FFBE000000"),
    "cold": (0x356, False, "0213000038FF"),
}
LIMIT_CASES = {
    "negative_discharge": (0x351, False, "4502AC0354FCC001"),
    "positive_discharge": (0x351, False, "4502AC03AC03C001"),
    "small_limits": (0x351, False, "440264009CFF3F02"),
    "hv_offset": (0x4220, True, "A410200D2A763674"),
}
FIELD_CASES = {**FRAME_SET_CASES, **SIGNED_CASES, **LIMIT_CASES}


def frame_bytes(data_hex: str) -> bytes:
    return bytes.fromhex(data_hex.replace(" ", ""))


def set_frames(limits_hex: str = "1402740E740ECC01") -> list[tuple[int, bool, bytes]]:
    """Return one Pylontech frame set (0x351, 0x355, 0x356, 0x359, 0x35C) with the given limits."""
    return [
        (0x351, False, frame_bytes(limits_hex)),
        (0x355, False, frame_bytes("1A006400")),
        (0x356, False, frame_bytes("021300004A01")),
        (0x359, False, frame_bytes("000000000A504E")),
        (0x35C, False, frame_bytes("C000")),
    ]


def slcan_line(frame_id: int, data: bytes, is_extended: bool = False) -> bytes:
    """Encode one data frame as an slcan line, such as ``t3518140274...\\r``."""
    head = f"T{frame_id:08X}" if is_extended else f"t{frame_id:03X}"
    return f"{head}{len(data)}{data.hex().upper()}\r".encode("ascii")


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 5.0, step_s: float = 0.005
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


@dataclass
class LinkUnderTest:
    """A CAN link under test: the reader opens ``link``; ``send`` puts a frame on the wire."""

    kind: str
    link: CanLink
    send: Callable[[int, bool, bytes], None]
    #: Write raw bytes on the wire (slcan only).
    write_raw: Callable[[bytes], None] | None = None


class PtySlcan:
    """A pseudo-terminal pair: the reader opens the slave; the test writes slcan on the master."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        self.path = os.ttyname(self._slave)

    def write(self, raw: bytes) -> None:
        os.write(self.master, raw)

    def send(self, frame_id: int, is_extended: bool, data: bytes) -> None:
        self.write(slcan_line(frame_id, data, is_extended))

    def close(self) -> None:
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):  # closed already by the test
                os.close(fd)


@pytest.fixture(params=["virtual", "slcan-pty"])
def can_link(request) -> Iterator[LinkUnderTest]:
    """The same test over python-can's virtual bus and over slcan on a pseudo-terminal."""
    if request.param == "virtual":
        channel = f"test-{uuid.uuid4().hex}"
        sender = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)

        def send(frame_id: int, is_extended: bool, data: bytes) -> None:
            sender.send(can.Message(arbitration_id=frame_id, is_extended_id=is_extended, data=data))

        try:
            yield LinkUnderTest("virtual", CanLink("virtual", channel), send)
        finally:
            sender.shutdown()
    else:
        pty = PtySlcan()
        try:
            yield LinkUnderTest(
                "slcan", CanLink("slcan", pty.path, slcan_open_delay_s=0.0), pty.send, pty.write
            )
        finally:
            pty.close()


@pytest.fixture(autouse=True)
def no_reader_threads():
    """Fail a test that leaves a CAN reader thread running."""
    yield
    leaked = lambda: [t.name for t in threading.enumerate() if t.name.startswith("can-reader")]  # noqa: E731
    wait_until(lambda: not leaked(), timeout_s=2.0)
    assert leaked() == []
