"""A strict slcan bus: python-can's slcan with its own line parser.

python-can 4.6.1's ``slcanBus`` opens the port with ``serial.serial_for_url``,
so serial devices, pseudo-terminals and ``socket://host:port`` URLs all work,
and this class keeps that, along with the bitrate and open/close commands.
Its receive path is replaced because the stock one has three faults on a
noisy line:

* a line with a non-hex character raises ``ValueError`` out of ``recv``;
* a line with too few or too many data digits becomes a message whose data
  does not match its DLC, or loses its extra digits without a word;
* a non-ASCII byte raises inside ``_read`` before the buffer is cleared, so
  every later read raises again and the bus never recovers.

Here every received line is checked against the slcan grammar. A line that
does not fit is dropped and counted in :attr:`StrictSlcanBus.garbled_lines`,
and reception carries on with the next line.

slcan lines (``\\r`` ends each; ``\\a`` is the adapter's error reply)::

    t iii L dd..dd [ssss]       11-bit data frame: 3 hex id, DLC 0-8, 2*L hex data
    T iiiiiiii L dd..dd [ssss]  29-bit data frame: 8 hex id
    r iii L [ssss] / R iiiiiiii L [ssss]   remote frames
    ssss                        optional timestamp in ms (adapter option Z1)
"""

from __future__ import annotations

import re
import time
from collections import deque
from typing import Any

import can
from can.interfaces.slcan import slcanBus

_STANDARD = re.compile(rb"[tr](?P<id>[0-9A-Fa-f]{3})(?P<dlc>[0-8])(?P<data>[0-9A-Fa-f]*)")
_EXTENDED = re.compile(rb"[TR](?P<id>[0-9A-Fa-f]{8})(?P<dlc>[0-8])(?P<data>[0-9A-Fa-f]*)")
_LINE_END = re.compile(rb"[\r\a]")
#: Maximum length of a valid line: T, 8 id, 1 DLC, 16 data and 4 timestamp digits.
_MAX_LINE_BYTES = 30
#: Lines the adapter sends in reply to commands (transmit acknowledgements,
#: version, serial number, status flags); they carry no frame.
_REPLY_PREFIXES = (b"z", b"Z", b"V", b"v", b"N", b"F")


class StrictSlcanBus(slcanBus):
    """slcan on any pyserial URL, counting garbled lines instead of raising.

    ``serial_timeout_s`` bounds each blocking read of the port, so ``recv``
    returns within about that long after its own timeout.
    """

    def __init__(self, channel: str, serial_timeout_s: float = 0.05, **kwargs: Any) -> None:
        self._rx = bytearray()
        self._lines: deque[tuple[bytes, bytes]] = deque()
        #: Lines dropped because they do not fit the slcan grammar.
        self.garbled_lines = 0
        #: ``\\a`` replies: the adapter rejected a command.
        self.adapter_errors = 0
        #: The last garbled line, cut to 40 bytes, for a log line.
        self.last_garbled = b""
        self._channel_name = channel
        super().__init__(channel, timeout=serial_timeout_s, **kwargs)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        deadline = None if timeout is None else time.monotonic() + timeout
        port = self.serialPortOrig
        while True:
            while self._lines:
                message = self._parse(*self._lines.popleft())
                if message is not None:
                    return message, False
            chunk = port.read(port.in_waiting or 1)
            if chunk:
                self._split(chunk)
            elif deadline is not None and time.monotonic() >= deadline:
                return None, False

    def _split(self, chunk: bytes) -> None:
        self._rx += chunk
        start = 0
        for end in _LINE_END.finditer(self._rx):
            self._lines.append((bytes(self._rx[start : end.start()]), end.group()))
            start = end.end()
        del self._rx[:start]
        if len(self._rx) > _MAX_LINE_BYTES:
            # No terminator where one must have come: drop the run as one garbled line.
            self._garbled(bytes(self._rx))
            self._rx.clear()

    def _garbled(self, line: bytes) -> None:
        self.garbled_lines += 1
        self.last_garbled = line[:40]

    def _parse(self, line: bytes, terminator: bytes) -> can.Message | None:
        if terminator == b"\a":
            self.adapter_errors += 1
            return None
        if not line or line.startswith(_REPLY_PREFIXES):
            return None
        kind = line[:1]
        extended = kind in (b"T", b"R")
        match = (_EXTENDED if extended else _STANDARD).fullmatch(line)
        if match is None:
            self._garbled(line)
            return None

        frame_id = int(match["id"], 16)
        dlc = int(match["dlc"])
        digits = match["data"]
        remote = kind in (b"r", b"R")
        data_digits = 0 if remote else 2 * dlc
        # The data is exactly 2 * DLC digits, optionally followed by a 4-digit timestamp.
        if len(digits) not in (data_digits, data_digits + 4) or frame_id > (
            0x1FFFFFFF if extended else 0x7FF
        ):
            self._garbled(line)
            return None
        return can.Message(
            arbitration_id=frame_id,
            is_extended_id=extended,
            is_remote_frame=remote,
            dlc=dlc,
            data=bytes.fromhex(digits[:data_digits].decode("ascii")),
            timestamp=time.time(),
            channel=self._channel_name,
        )
