"""The Modbus transaction engine: one :class:`ModbusLink` per physical link.

A link is one TCP connection, or one RS-485 bus that several unit ids share.
It sends requests, pairs each response with its request, enforces the
per-request timeout and keeps the link up by reconnecting forever.

Contract for callers:

* ``read``/``write_*`` either return the checked data or raise a
  :class:`~drivers.modbus.errors.ModbusError` subclass: a timeout, an
  exception response (raised as soon as it arrives, never counted as a
  timeout), a mismatched frame, or a connect error.
* While the link is down every request fails at once with
  :class:`~drivers.modbus.errors.ModbusConnectError`, without waiting for
  the reconnect. Losing the connection fails the requests in flight at once.
* One request is in flight per link, unless a TCP link is built with
  ``max_in_flight > 1`` for a device that accepts pipelined requests.
* Matching is strict. On TCP the transaction id picks the request, and
  then the unit, function and byte count (or write echo) must match. A
  response with an unknown transaction id is stale and is dropped.
* RTU has no transaction id, so a frame that does not match the request in
  flight by unit, function and byte count is taken as a late response to an
  earlier request and dropped. Before each request the link waits until the
  line has been silent for 3.5 characters and flushes the input.
* Reconnects use capped exponential backoff with jitter. The link logs one
  line per state change (connected, down, reconnected, closed), never one
  per attempt; :attr:`ModbusLink.counters` counts the rest.

The link does no I/O until :meth:`ModbusLink.start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from dataclasses import dataclass
from typing import Any

import structlog
from pymodbus.transport.serialtransport import create_serial_connection

from drivers.modbus import framing
from drivers.modbus.errors import (
    ModbusConnectError,
    ModbusError,
    ModbusExceptionResponse,
    ModbusFrameError,
    ModbusTimeout,
    RequestInfo,
)

log = structlog.get_logger(__name__)

#: How long :meth:`ModbusLink.close` waits for the supervisor before cancelling it again.
_CLOSE_RETRY_S = 0.5


class LinkState(str, enum.Enum):
    #: Started; the first connect attempt has not finished yet.
    CONNECTING = "connecting"
    CONNECTED = "connected"
    #: The last connect attempt failed or the connection was lost; attempts continue.
    DOWN = "down"
    CLOSED = "closed"


@dataclass
class LinkCounters:
    """Totals since the link was built; they only grow."""

    requests: int = 0
    #: Responses that matched their request and were not exception responses.
    responses: int = 0
    timeouts: int = 0
    #: Exception responses (a response, so never also counted as a timeout).
    exceptions: int = 0
    #: Malformed or mismatched responses that failed their request.
    frame_errors: int = 0
    #: Well-formed responses that matched no request in flight (late responses).
    stale_frames: int = 0
    #: RTU bytes that belonged to no frame (line noise, flushed input).
    discarded_bytes: int = 0
    connect_attempts: int = 0
    #: Successful connects after a connection was lost or an attempt failed.
    reconnects: int = 0
    #: Connections lost after they were established.
    disconnects: int = 0


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter between connect attempts.

    Attempt ``n`` (from 0) waits ``min(max_s, initial_s * 2**n)`` reduced by a
    random fraction of up to ``jitter``, so the wait never exceeds ``max_s``
    and gateways that lost power together do not reconnect in lockstep.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(
                f"backoff needs 0 < initial_s <= max_s, got initial_s={self.initial_s} "
                f"max_s={self.max_s}"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        base_s = min(self.max_s, self.initial_s * 2.0 ** min(attempt, 64))
        return base_s * (1.0 - self.jitter * rng.random())


class _Pending:
    """One request waiting for its response."""

    __slots__ = ("address", "count", "expected", "future", "key", "timer", "unit")

    def __init__(
        self,
        future: asyncio.Future[bytes],
        unit: int,
        expected: framing.ExpectedResponse,
        address: int,
        count: int,
    ) -> None:
        self.future = future
        self.unit = unit
        self.expected = expected
        self.address = address
        self.count = count
        #: Transaction id on TCP; 0 on RTU, where only one request is in flight.
        self.key = 0
        self.timer: asyncio.TimerHandle | None = None


class _LinkProtocol(asyncio.Protocol):
    """Forwards one connection's events to its link; ignored once it is no longer current."""

    def __init__(self, link: ModbusLink) -> None:
        self._link = link

    def data_received(self, data: bytes) -> None:
        self._link._on_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._on_connection_lost(self, exc)


class ModbusLink:
    """Shared machinery of the TCP and RTU links: requests, timeouts, reconnects.

    Build one with :meth:`tcp`, :meth:`rtu` or :meth:`from_transport`, then
    ``await link.start()``, or use ``async with``. A subclass supplies the
    transport, the framing and the matching rule through the hooks at the
    end of this class.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout_s: float = 1.0,
        connect_timeout_s: float = 3.0,
        backoff: Backoff | None = None,
        max_in_flight: int = 1,
        rng: random.Random | None = None,
        one_shot: bool = False,
    ) -> None:
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError(
                f"timeouts must be positive, got timeout_s={timeout_s} "
                f"connect_timeout_s={connect_timeout_s}"
            )
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")

        #: ``tcp 10.0.0.5:502`` or ``rtu /dev/ttyUSB0``, used in every message.
        self.name = name
        #: Default request timeout.
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff = backoff or Backoff()
        self.max_in_flight = max_in_flight
        #: Set by a command that makes a few requests and exits: its connect errors then
        #: leave out the background reconnect, which ends with the command.
        self.one_shot = one_shot

        self.state = LinkState.CLOSED
        self.counters = LinkCounters()
        #: Why the link last went down.
        self.last_error: BaseException | None = None
        #: ``time.monotonic()`` of the next connect attempt while the link is down.
        self.next_attempt_mono_s: float | None = None

        self._rng = rng or random.Random()
        self._log = log.bind(link=name)
        self._pending: dict[int, _Pending] = {}
        self._transport: asyncio.BaseTransport | None = None
        self._protocol: _LinkProtocol | None = None
        self._lost = asyncio.Event()
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._slots: asyncio.Semaphore | None = None
        self._ever_connected = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def tcp(cls, host: str, port: int = 502, **options: Any) -> ModbusTcpLink:
        """Build a Modbus TCP link; ``options`` go to :class:`ModbusTcpLink`."""
        return ModbusTcpLink(host, port, **options)

    @classmethod
    def rtu(
        cls, device: str, baud: int = 9600, parity: str = "N", stop_bits: int = 1, **options: Any
    ) -> ModbusRtuLink:
        """Build a Modbus RTU link on a serial device, a pty path or a pyserial URL."""
        return ModbusRtuLink(device, baud, parity, stop_bits, **options)

    @classmethod
    def from_transport(cls, transport: Any, **options: Any) -> ModbusLink:
        """Build the link that a configuration ``TcpTransport`` or ``RtuTransport`` describes."""
        kind = getattr(transport, "kind", None)
        if kind == "tcp":
            return cls.tcp(transport.host, transport.port, **options)
        if kind == "rtu":
            return cls.rtu(
                transport.device, transport.baud, transport.parity, transport.stop_bits, **options
            )
        raise ValueError(
            f"a Modbus link needs a transport of kind 'tcp' or 'rtu', got {kind!r}; "
            "CAN devices are read by the CAN drivers"
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start connecting in the background; the link reconnects until :meth:`close`."""
        if self._supervisor is not None:
            return
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._closing = False
        self._set_state(LinkState.CONNECTING)
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"modbus link {self.name}"
        )

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until the link is connected; raise :class:`ModbusConnectError` after timeout_s."""
        if self._supervisor is None:
            raise ModbusConnectError(f"{self.name}: link not started; call start() first")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except asyncio.TimeoutError as err:
            raise self._down_error(None) from self.last_error or err

    async def close(self) -> None:
        """Stop reconnecting, close the connection and fail every request in flight."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        # On Python 3.11 asyncio.wait_for can swallow a cancellation that
        # arrives just as the connect attempt ends, and the supervisor would
        # then loop on. It checks this flag each round, and the cancel is
        # repeated until the task ends.
        self._closing = True
        while not supervisor.done():
            supervisor.cancel()
            await asyncio.wait({supervisor}, timeout=_CLOSE_RETRY_S)
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        self._set_state(LinkState.CLOSED)
        self._drop_connection(ModbusConnectError(f"{self.name}: link closed"))

    async def __aenter__(self) -> ModbusLink:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ requests

    async def read(
        self, unit: int, function: int, address: int, count: int, timeout_s: float | None = None
    ) -> list[int]:
        """Read ``count`` registers or bits; bits come back as 0/1 ints.

        ``function`` is 1 (coils), 2 (discrete inputs), 3 (holding
        registers) or 4 (input registers). ``address`` is the 0-based wire
        address. ``timeout_s`` defaults to the link's ``timeout_s``.
        """
        request = framing.read_request_pdu(function, address, count)
        response = await self._transact(unit, request, address, count, timeout_s)
        if function >= 3:
            return framing.decode_registers(response, count)
        return framing.decode_bits(response, count)

    async def read_register_bytes(
        self, unit: int, function: int, address: int, count: int, timeout_s: float | None = None
    ) -> bytes:
        """Read ``count`` registers with function 3 or 4 and return their data bytes as received.

        The result contains ``2 * count`` bytes, each register big-endian as on
        the wire: what a precompiled decoder unpacks without building a list.
        """
        if function not in (3, 4):
            raise ValueError(f"read_register_bytes reads function 3 or 4, got {function}")
        request = framing.read_request_pdu(function, address, count)
        response = await self._transact(unit, request, address, count, timeout_s)
        return response[2:]

    async def write_register(
        self, unit: int, address: int, value: int, timeout_s: float | None = None
    ) -> None:
        """Write one register with function 6 and check the device's echo."""
        request = framing.write_register_pdu(address, value)
        await self._transact(unit, request, address, 1, timeout_s)

    async def write_registers(
        self, unit: int, address: int, values: list[int], timeout_s: float | None = None
    ) -> None:
        """Write consecutive registers with function 16 and check the echoed address and count."""
        request = framing.write_registers_pdu(address, values)
        await self._transact(unit, request, address, len(values), timeout_s)

    async def _transact(
        self, unit: int, request: bytes, address: int, count: int, timeout_s: float | None
    ) -> bytes:
        """Send ``request`` and return the checked response PDU."""
        self.check_unit(unit)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if self.state is not LinkState.CONNECTED or self._slots is None:
            raise self._down_error(self._info(unit, request[0], address, count))
        async with self._slots:
            if self.state is not LinkState.CONNECTED:
                raise self._down_error(self._info(unit, request[0], address, count))
            await self._before_send(self._info(unit, request[0], address, count), timeout_s)
            loop = asyncio.get_running_loop()
            pending = _Pending(
                loop.create_future(), unit, framing.expected_response(request), address, count
            )
            pending.key = self._next_key()
            self._pending[pending.key] = pending
            self.counters.requests += 1
            try:
                self._write(self._encode(pending, request))
                pending.timer = loop.call_later(timeout_s, self._expire, pending, timeout_s)
                return await pending.future
            finally:
                if pending.timer is not None:
                    pending.timer.cancel()
                if self._pending.get(pending.key) is pending:
                    del self._pending[pending.key]

    def _resolve(self, pending: _Pending, pdu: bytes) -> bool:
        """Settle ``pending`` with ``pdu`` if ``pdu`` responds to it; return whether it did.

        A PDU that is neither the expected response nor an exception response
        settles nothing: the subclass decides whether that is a frame error
        (TCP, where the transaction id already matched) or a stale frame (RTU).
        """
        if framing.mismatch(pending.expected, pdu) is None:
            self.counters.responses += 1
            pending.future.set_result(pdu)
            return True
        code = framing.exception_code(pending.expected, pdu)
        if code is not None:
            self.counters.exceptions += 1
            pending.future.set_exception(ModbusExceptionResponse(self._pending_info(pending), code))
            return True
        return False

    def _fail_frame(self, pending: _Pending, reason: str) -> None:
        self.counters.frame_errors += 1
        info = self._pending_info(pending)
        pending.future.set_exception(
            ModbusFrameError(
                f"{info.describe()}: invalid response: {reason}; check that the unit id is "
                "right and that no other client shares this connection",
                info,
            )
        )

    def _expire(self, pending: _Pending, timeout_s: float) -> None:
        pending.timer = None
        if pending.future.done():
            return
        self.counters.timeouts += 1
        # Forget the request now, so that a response arriving later counts as stale.
        if self._pending.get(pending.key) is pending:
            del self._pending[pending.key]
        pending.future.set_exception(ModbusTimeout(self._pending_info(pending), timeout_s))
        self._after_timeout()

    # ------------------------------------------------------------------ connection management

    async def _supervise(self) -> None:
        """Connect, wait for the connection to drop, back off, repeat until cancelled."""
        attempt = 0
        down_since_mono_s: float | None = None
        while not self._closing:
            self.counters.connect_attempts += 1
            try:
                await self._connect()
            except Exception as err:
                # OSError and timeouts are the usual failures. Anything else
                # (a pyserial URL it cannot parse, say) is retried as well, so
                # the link never stops trying and the error shows in the log.
                self.last_error = err
                if down_since_mono_s is None:
                    down_since_mono_s = time.monotonic()
                delay_s = self.backoff.delay_s(attempt, self._rng)
                attempt += 1
                self.next_attempt_mono_s = time.monotonic() + delay_s
                self._set_state(LinkState.DOWN, error=_describe(err), retry_in_s=round(delay_s, 3))
                await asyncio.sleep(delay_s)
                continue

            self.next_attempt_mono_s = None
            if down_since_mono_s is None:
                self._set_state(LinkState.CONNECTED)
            else:
                if self._ever_connected:
                    self.counters.reconnects += 1
                self._set_state(
                    LinkState.CONNECTED,
                    down_s=round(time.monotonic() - down_since_mono_s, 3),
                    attempts=attempt,
                )
            self._ever_connected = True
            attempt = 0
            await self._lost.wait()

            # _drop_connection already failed the requests in flight and logged the change.
            down_since_mono_s = time.monotonic()
            delay_s = self.backoff.delay_s(attempt, self._rng)
            attempt += 1
            self.next_attempt_mono_s = time.monotonic() + delay_s
            await asyncio.sleep(delay_s)

    async def _connect(self) -> None:
        protocol = _LinkProtocol(self)
        transport = await asyncio.wait_for(self._open(protocol), self.connect_timeout_s)
        self._reset_framing()
        self._lost.clear()
        self._transport = transport
        self._protocol = protocol

    def _on_connection_lost(self, protocol: _LinkProtocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return
        self.counters.disconnects += 1
        self.last_error = exc or ConnectionResetError("peer closed the connection")
        self._drop_connection(
            ModbusConnectError(
                f"{self.name}: connection lost ({_describe(self.last_error)}); reconnecting"
            )
        )

    def _drop_connection(self, error: ModbusError) -> None:
        """Close the transport, fail every request in flight with ``error``, wake the supervisor."""
        transport, self._transport = self._transport, None
        self._protocol = None
        if self.state is LinkState.CONNECTED:
            self._set_state(LinkState.DOWN, error=_describe(self.last_error))
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()
        if transport is not None:
            transport.close()
        self._lost.set()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            raise ModbusConnectError(f"{self.name}: connection lost before the request was sent")
        transport.write(data)  # type: ignore[attr-defined]

    def _on_data(self, protocol: _LinkProtocol, data: bytes) -> None:
        if protocol is self._protocol:
            self._receive(data)

    # ------------------------------------------------------------------ helpers

    def _set_state(self, state: LinkState, **fields: Any) -> None:
        """Change the state and log it; repeating the current state logs nothing."""
        if state is self.state:
            return
        previous, self.state = self.state, state
        if state is LinkState.CONNECTED:
            self._connected.set()
            event = "modbus link reconnected" if self._ever_connected else "modbus link connected"
            self._log.info(event, **fields)
            return
        self._connected.clear()
        if state is LinkState.DOWN:
            self._log.warning("modbus link down", previous=previous.value, **fields)
        elif state is LinkState.CLOSED:
            self._log.info("modbus link closed")

    @property
    def down_reason(self) -> str:
        """The last connect or I/O error of the link, as text for a message."""
        return _describe(self.last_error)

    def _down_error(self, info: RequestInfo | None) -> ModbusConnectError:
        where = info.describe() if info else self.name
        if self.state is LinkState.CLOSED:
            return ModbusConnectError(f"{where}: link is closed; call start() first", info)
        if self.one_shot:
            failure = "link is down" if self._ever_connected else "cannot connect"
            reason = self.down_reason
            if self.last_error is None:
                reason = "the first connect attempt has not finished"
            return ModbusConnectError(
                f"{where}: {failure} ({reason}); {self._connect_hint()}", info
            )
        if self.state is LinkState.CONNECTING:
            return ModbusConnectError(f"{where}: link is still connecting; retry shortly", info)
        retry = ""
        if self.next_attempt_mono_s is not None:
            wait_s = max(0.0, self.next_attempt_mono_s - time.monotonic())
            retry = f", next attempt in {wait_s:.1f} s"
        return ModbusConnectError(
            f"{where}: link is down ({_describe(self.last_error)}); reconnecting in the "
            f"background{retry}; {self._connect_hint()}",
            info,
        )

    def _info(self, unit: int, function: int, address: int, count: int) -> RequestInfo:
        return RequestInfo(self.name, unit, function, address, count)

    def _pending_info(self, pending: _Pending) -> RequestInfo:
        return self._info(pending.unit, pending.expected.function, pending.address, pending.count)

    # ------------------------------------------------------------------ hooks

    async def _open(self, protocol: asyncio.Protocol) -> asyncio.BaseTransport:
        """Open the transport with ``protocol`` attached; raise ``OSError`` on failure."""
        raise NotImplementedError

    def _reset_framing(self) -> None:
        """Forget partial input from an earlier connection."""
        raise NotImplementedError

    def check_unit(self, unit: int) -> None:
        """Raise ``ValueError`` for a unit id this transport cannot address."""
        raise NotImplementedError

    def _connect_hint(self) -> str:
        """Say what to check when the link stays down."""
        raise NotImplementedError

    def _next_key(self) -> int:
        """Return the key under which the next request waits in ``_pending``."""
        raise NotImplementedError

    def _encode(self, pending: _Pending, request: bytes) -> bytes:
        """Wrap a request PDU in this transport's frame."""
        raise NotImplementedError

    def _receive(self, data: bytes) -> None:
        """Frame received bytes and settle the requests they respond to."""
        raise NotImplementedError

    async def _before_send(self, info: RequestInfo, timeout_s: float) -> None:
        """Wait, if the transport needs it, before a request is written."""

    def _after_timeout(self) -> None:
        """React to a request that timed out."""


def _describe(err: BaseException | None) -> str:
    if err is None:
        return "no error recorded"
    if isinstance(err, asyncio.TimeoutError) and not str(err):
        return "connect timed out"
    return str(err) or type(err).__name__


# ============================================================================= TCP


class ModbusTcpLink(ModbusLink):
    """Modbus TCP to one host and port.

    ``max_in_flight`` above 1 pipelines requests for devices that accept
    it; transaction ids keep the responses apart. After ``drop_after_timeouts``
    timeouts in a row with no frame received in between, the link closes the
    connection and reconnects. A peer that rebooted without closing leaves a
    half-open socket that only a new connection detects. 0 turns this off.
    """

    def __init__(
        self, host: str, port: int = 502, *, drop_after_timeouts: int = 3, **options: Any
    ) -> None:
        if not host:
            raise ValueError("Modbus TCP host must not be empty")
        if not 1 <= port <= 65535:
            raise ValueError(f"Modbus TCP port must be 1..65535, got {port}")
        if drop_after_timeouts < 0:
            raise ValueError(f"drop_after_timeouts must be 0 or more, got {drop_after_timeouts}")
        super().__init__(f"tcp {host}:{port}", **options)
        self.host = host
        self.port = port
        self.drop_after_timeouts = drop_after_timeouts
        #: Transaction id of the next request: 1..65535, wrapping back to 1.
        self.next_transaction_id = 1
        self._splitter = framing.MbapSplitter()
        self._timeouts_in_a_row = 0

    async def _open(self, protocol: asyncio.Protocol) -> asyncio.BaseTransport:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(lambda: protocol, self.host, self.port)
        return transport

    def _reset_framing(self) -> None:
        self._splitter.reset()
        self._timeouts_in_a_row = 0

    def check_unit(self, unit: int) -> None:
        # Modbus TCP uses 0 or 255 for a device addressed by its IP alone.
        if not 0 <= unit <= 255:
            raise ValueError(f"unit id must be 0..255 on Modbus TCP, got {unit}")

    def _connect_hint(self) -> str:
        return f"check that the device at {self.host}:{self.port} is powered and reachable"

    def _next_key(self) -> int:
        transaction_id = self.next_transaction_id
        while transaction_id in self._pending:
            transaction_id = transaction_id % 0xFFFF + 1
        self.next_transaction_id = transaction_id % 0xFFFF + 1
        return transaction_id

    def _encode(self, pending: _Pending, request: bytes) -> bytes:
        return framing.tcp_adu(pending.key, pending.unit, request)

    def _receive(self, data: bytes) -> None:
        try:
            adus = self._splitter.feed(data)
        except ModbusFrameError as err:
            self.counters.frame_errors += 1
            self.last_error = err
            self._drop_connection(
                ModbusConnectError(f"{self.name}: {err}; connection dropped to resynchronise")
            )
            return
        for transaction_id, unit, pdu in adus:
            self._timeouts_in_a_row = 0
            pending = self._pending.get(transaction_id)
            if pending is None or pending.future.done():
                self.counters.stale_frames += 1
                continue
            if unit != pending.unit:
                self._fail_frame(pending, f"unit {unit} where {pending.unit} was expected")
            elif not self._resolve(pending, pdu):
                self._fail_frame(pending, framing.mismatch(pending.expected, pdu) or "")

    def _after_timeout(self) -> None:
        self._timeouts_in_a_row += 1
        if self.drop_after_timeouts and self._timeouts_in_a_row >= self.drop_after_timeouts:
            self._timeouts_in_a_row = 0
            self.last_error = TimeoutError(
                f"{self.drop_after_timeouts} requests in a row timed out"
            )
            self._drop_connection(
                ModbusConnectError(f"{self.name}: connection dropped after repeated timeouts")
            )


# ============================================================================= RTU

#: Baud rates above this use the fixed 1.75 ms inter-frame gap the RTU spec
#: sets, because 3.5 character times get shorter than a UART's timing allows.
_FIXED_GAP_ABOVE_BAUD = 19200
_FIXED_GAP_S = 0.00175


class ModbusRtuLink(ModbusLink):
    """Modbus RTU on one serial bus, shared by every unit id on it.

    ``device`` is a serial device (``/dev/ttyUSB0``), a pty path, or any
    pyserial URL (``socket://127.0.0.1:4001`` for a serial-to-TCP
    converter in raw mode). Only one request is in flight. Before each
    request the link waits until the line has been silent for the
    inter-frame gap (3.5 characters, or 1.75 ms above 19200 baud) and drops
    whatever arrived since the last response.
    """

    def __init__(
        self,
        device: str,
        baud: int = 9600,
        parity: str = "N",
        stop_bits: int = 1,
        *,
        silence_s: float | None = None,
        **options: Any,
    ) -> None:
        if not device:
            raise ValueError("serial device must not be empty")
        if baud <= 0:
            raise ValueError(f"baud rate must be positive, got {baud}")
        if parity not in ("N", "E", "O"):
            raise ValueError(f"parity must be 'N', 'E' or 'O', got {parity!r}")
        if stop_bits not in (1, 2):
            raise ValueError(f"stop bits must be 1 or 2, got {stop_bits}")
        if options.get("max_in_flight", 1) != 1:
            raise ValueError("an RTU bus carries one request at a time; max_in_flight must be 1")
        super().__init__(f"rtu {device}", **options)
        self.device = device
        self.baud = baud
        self.parity = parity
        self.stop_bits = stop_bits
        bits_per_char = 1 + 8 + (parity != "N") + stop_bits
        if silence_s is None:
            silence_s = _FIXED_GAP_S if baud > _FIXED_GAP_ABOVE_BAUD else 3.5 * bits_per_char / baud
        #: Inter-frame gap the link waits for before each request.
        self.silence_s = silence_s
        self._extractor = framing.RtuFrameExtractor()
        self._last_rx_mono_s = 0.0

    async def _open(self, protocol: asyncio.Protocol) -> asyncio.BaseTransport:
        # pymodbus's SerialTransport wraps a non-blocking pyserial port in an
        # asyncio transport and accepts pyserial URLs; pymodbus's own serial
        # client runs on it.
        transport, _ = await create_serial_connection(
            asyncio.get_running_loop(),
            lambda: protocol,
            self.device,
            baudrate=self.baud,
            bytesize=8,
            parity=self.parity,
            stopbits=self.stop_bits,
        )
        return transport

    def _reset_framing(self) -> None:
        self._extractor.reset()
        self.counters.discarded_bytes = self._extractor.discarded_bytes

    def check_unit(self, unit: int) -> None:
        if not 1 <= unit <= 247:
            raise ValueError(
                f"unit id must be 1..247 on Modbus RTU, got {unit}; broadcast (0) gets no "
                "response and is not supported"
            )

    def _connect_hint(self) -> str:
        return f"check that {self.device} exists, is not in use, and that the adapter is plugged in"

    def _next_key(self) -> int:
        return 0

    def _encode(self, pending: _Pending, request: bytes) -> bytes:
        return framing.rtu_adu(pending.unit, request)

    async def _before_send(self, info: RequestInfo, timeout_s: float) -> None:
        deadline_mono_s = time.monotonic() + timeout_s
        while (quiet_s := time.monotonic() - self._last_rx_mono_s) < self.silence_s:
            if time.monotonic() >= deadline_mono_s:
                raise ModbusTimeout(
                    info,
                    timeout_s,
                    f"{info.describe()}: the line never went silent for {self.silence_s * 1e3:.2f} "
                    f"ms within {timeout_s:g} s, so the request was not sent; check for a second "
                    "master or a device that transmits without being asked",
                )
            await asyncio.sleep(self.silence_s - quiet_s)
        self._extractor.reset()
        self.counters.discarded_bytes = self._extractor.discarded_bytes

    def _receive(self, data: bytes) -> None:
        self._last_rx_mono_s = time.monotonic()
        frames = self._extractor.feed(data)
        self.counters.discarded_bytes = self._extractor.discarded_bytes
        for unit, pdu in frames:
            pending = self._pending.get(0)
            if (
                pending is None
                or pending.future.done()
                or unit != pending.unit
                or not self._resolve(pending, pdu)
            ):
                # A late response to a request that timed out, or another unit's response.
                self.counters.stale_frames += 1
