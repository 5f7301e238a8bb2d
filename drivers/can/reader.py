"""CAN reader: one thread per link that receives frames, tracks link health and never dies.

:class:`CanReader` opens a python-can bus: SocketCAN, slcan through pyserial,
or python-can's virtual bus. It hands every data frame to a sink together
with its ``time.monotonic()`` receive time. :class:`LinkHealth` counts error
frames, error-warning, error-passive and bus-off events, garbled slcan lines,
failed receives and reopens.

Failure handling, in one place (:meth:`CanReader._run`):

* a receive that raises closes the bus, and the loop reopens it after a
  backoff that doubles from ``backoff_initial_s`` up to ``backoff_max_s``;
* a bus-off error frame does the same, because on slcan adapters closing and
  reopening the channel restarts the CAN controller;
* an exception in the sink is counted and logged, and the frame is dropped;
* one log line per state change, never one per frame or per attempt, and at
  most one a minute about garbled slcan lines.

NOTE: on SocketCAN, reopening the socket does not restart a controller in
bus-off; only the kernel does, when the interface has ``restart-ms`` set
(``ip link set can0 type can restart-ms 100``). python-can's slcan interface
reports no error frames, so on slcan the error states stay unknown and only
garbled lines and failed receives show up in :class:`LinkHealth`.

The sink runs in the reader's thread and must not block. For asyncio code,
:func:`asyncio_sink` forwards frames to a queue on an event loop.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import can
import structlog

from drivers.can.slcan import StrictSlcanBus

log = structlog.get_logger(__name__)

Sink = Callable[[can.Message, float], None]
Interface = Literal["socketcan", "slcan", "virtual"]

# SocketCAN error frame layout (linux/can/error.h): the class is in the CAN id,
# details in the data bytes.
CAN_ERR_CRTL = 0x004
CAN_ERR_BUSOFF = 0x040
CAN_ERR_RESTARTED = 0x100
# data[1] of a CAN_ERR_CRTL frame: controller problems.
CAN_ERR_CRTL_RX_WARNING = 0x04
CAN_ERR_CRTL_TX_WARNING = 0x08
CAN_ERR_CRTL_RX_PASSIVE = 0x10
CAN_ERR_CRTL_TX_PASSIVE = 0x20
CAN_ERR_CRTL_ACTIVE = 0x40

#: Shortest time between two log lines about garbled slcan lines.
GARBLED_LOG_INTERVAL_S = 60.0


class CanOpenError(ConnectionError):
    """Opening a CAN bus failed; the message names the interface, the channel and a fix."""


class LinkState(enum.Enum):
    """State of a CAN link as the reader sees it."""

    CLOSED = "closed"
    ERROR_ACTIVE = "error_active"
    ERROR_WARNING = "error_warning"
    ERROR_PASSIVE = "error_passive"
    BUS_OFF = "bus_off"
    #: The bus could not be opened, or a receive failed; the reader is reopening it.
    DOWN = "down"


@dataclass(frozen=True)
class CanLink:
    """Interface, channel and settings of one CAN bus."""

    interface: Interface
    #: ``can0`` for socketcan; a serial device, pseudo-terminal or ``socket://host:port``
    #: URL for slcan; any name for virtual.
    channel: str
    #: Bit rate in bit/s. Set by slcan's S command; SocketCAN takes it from
    #: ``ip link set can0 type can bitrate B`` and the virtual bus ignores it.
    bitrate: int = 500_000
    #: slcan only: wait after opening the port; python-can 4.6 defaults to 2 s for
    #: adapters that reset when the port opens.
    slcan_open_delay_s: float = 2.0
    #: slcan only: serial baud rate between host and adapter; USB adapters ignore it.
    slcan_tty_baudrate: int = 115_200

    @classmethod
    def from_transport(cls, transport) -> CanLink:
        """Build from a ``gateway.config.CanTransport``."""
        delay_s = getattr(transport, "slcan_open_delay_s", None)
        if delay_s is None:
            delay_s = default_open_delay_s(transport.channel)
        return cls(transport.interface, transport.channel, transport.bitrate, delay_s)

    def describe(self) -> str:
        return f"{self.interface} {self.channel}"


def default_open_delay_s(channel: str) -> float:
    """Return the slcan open delay for ``channel``: 0 over ``socket://`` or a pty, else 2 s.

    python-can waits 2 s by default because some USB adapters (Arduino-style
    boards) reset when the port opens. A TCP socket or a pseudo-terminal
    (``/dev/pts/N``) has no board behind it to reset.
    """
    return 0.0 if channel.startswith(("socket://", "/dev/pts/")) else 2.0


def _open_hint(link: CanLink, err: BaseException) -> str:
    code = getattr(err, "errno", None) or getattr(err.__cause__, "errno", None)
    if link.interface == "socketcan":
        if code == errno.ENODEV:
            return f"no such interface; check `ip link show {link.channel}`"
        if code == errno.ENETDOWN:
            return (
                f"interface is down; run `ip link set {link.channel} up type can "
                f"bitrate {link.bitrate}`"
            )
    if link.interface == "slcan":
        if code == errno.EACCES:
            return "permission denied; add the service user to the serial device's group (dialout)"
        if isinstance(err, ValueError) or isinstance(err.__cause__, ValueError):
            return "slcan supports 10k, 20k, 50k, 83.3k, 100k, 125k, 250k, 500k, 750k and 1M bit/s"
        return "check the serial device or socket:// URL and that the adapter is plugged in"
    return "check the interface name and channel"


def open_bus(link: CanLink) -> can.BusABC:
    """Open the bus of ``link``; raise :class:`CanOpenError` with the cause and a fix."""
    try:
        if link.interface == "slcan":
            return StrictSlcanBus(
                link.channel,
                bitrate=link.bitrate,
                tty_baudrate=link.slcan_tty_baudrate,
                sleep_after_open=link.slcan_open_delay_s,
            )
        if link.interface == "virtual":
            return can.Bus(interface="virtual", channel=link.channel, receive_own_messages=False)
        return can.Bus(interface=link.interface, channel=link.channel)
    except (can.CanError, OSError, ValueError) as err:
        raise CanOpenError(
            f"cannot open CAN {link.describe()} at {link.bitrate} bit/s: {err}; "
            f"{_open_hint(link, err)}"
        ) from err


@dataclass(frozen=True)
class LinkHealth:
    """Counters and state of one link; counters never decrease while the reader exists."""

    state: LinkState
    frames_received: int
    error_frames: int
    error_warning_events: int
    error_passive_events: int
    bus_off_events: int
    #: slcan lines dropped because they do not fit the slcan grammar.
    garbled_lines: int
    #: slcan ``\\a`` replies: the adapter rejected a command.
    adapter_errors: int
    receive_failures: int
    sink_failures: int
    reopens: int
    last_error: str
    #: ``time.monotonic()`` of the last data frame, or ``None`` before the first.
    last_frame_t_mono_s: float | None


class CanReader:
    """Receive frames from one CAN link in a thread and pass them to ``sink(message, t_mono_s)``.

    ``open()`` may be called first to fail fast with :class:`CanOpenError`;
    otherwise ``start()`` opens the bus in the thread and retries with backoff.
    ``stop()`` joins the thread and closes the bus; a reader can be started
    again after it.
    """

    def __init__(
        self,
        link: CanLink,
        sink: Sink,
        *,
        name: str | None = None,
        receive_timeout_s: float = 0.1,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 10.0,
        bus_factory: Callable[[CanLink], can.BusABC] = open_bus,
    ) -> None:
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError(
                f"backoff must satisfy 0 < backoff_initial_s <= backoff_max_s, got "
                f"{backoff_initial_s} and {backoff_max_s}"
            )
        self.link = link
        self.name = name or link.describe()
        self._sink = sink
        self._receive_timeout_s = receive_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._bus_factory = bus_factory
        self._bus: can.BusABC | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

        self._state = LinkState.CLOSED
        self._opened_before = False
        self._sink_failing = False
        self._loop_failing = False
        self._garbled_logged = 0
        self._garbled_log_t: float | None = None
        self._closed_garbled = 0
        self._closed_adapter_errors = 0
        self._counts = dict.fromkeys(
            (
                "frames_received",
                "error_frames",
                "error_warning_events",
                "error_passive_events",
                "bus_off_events",
                "receive_failures",
                "sink_failures",
                "reopens",
            ),
            0,
        )
        self._last_error = ""
        self._last_frame_t: float | None = None

    # -- lifecycle -----------------------------------------------------------

    def open(self) -> None:
        """Open the bus now, in the calling thread; raise :class:`CanOpenError` on failure.

        Call it before :meth:`start`, never while the thread runs, because the
        thread opens and reopens the bus itself.
        """
        if self.running:
            raise RuntimeError(f"CAN reader {self.name}: open() must be called before start()")
        if self._bus is None:
            self._bus = self._bus_factory(self.link)
            self._on_opened()

    def start(self) -> None:
        """Start the receive thread; raise RuntimeError if it is already running."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"CAN reader {self.name} is already running")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"can-reader {self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and close the bus; raise TimeoutError if the thread does not end."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                raise TimeoutError(
                    f"CAN reader {self.name}: receive thread still running {timeout_s} s after "
                    "stop(); the bus driver is blocked in recv"
                )
            self._thread = None
        self._close_bus()
        self._set_state(LinkState.CLOSED, "stopped")

    def __enter__(self) -> CanReader:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> LinkHealth:
        """Return the link's state and counters; safe to call from any thread."""
        garbled, adapter_errors = self._slcan_counts()
        return LinkHealth(
            state=self._state,
            garbled_lines=garbled,
            adapter_errors=adapter_errors,
            last_error=self._last_error,
            last_frame_t_mono_s=self._last_frame_t,
            **self._counts,
        )

    # -- receive loop --------------------------------------------------------

    def _run(self) -> None:
        backoff_s = self._backoff_initial_s
        while not self._stop.is_set():
            try:
                healthy = self._receive_once()
            except Exception as err:  # the loop must outlive any bug below it
                self._counts["receive_failures"] += 1
                if not self._loop_failing:
                    log.exception("can_reader_loop_failed", link=self.name, error=str(err))
                self._loop_failing = True
                self._close_bus()
                healthy = False
            if healthy:
                backoff_s = self._backoff_initial_s
            elif healthy is False:
                self._stop.wait(backoff_s)
                backoff_s = min(2 * backoff_s, self._backoff_max_s)

    def _receive_once(self) -> bool | None:
        """Receive at most one message; return True after a data frame, False to back off."""
        if self._bus is None:
            try:
                self._bus = self._bus_factory(self.link)
            except CanOpenError as err:
                self._fail(LinkState.DOWN, str(err))
                return False
            self._on_opened()

        try:
            message = self._bus.recv(self._receive_timeout_s)
        except (can.CanError, OSError, ValueError) as err:
            self._counts["receive_failures"] += 1
            self._close_bus()
            self._fail(LinkState.DOWN, f"receive failed on {self.link.describe()}: {err}")
            return False
        self._log_garbled()
        if message is None:
            return None

        t_mono_s = time.monotonic()
        if message.is_error_frame:
            return self._on_error_frame(message)

        self._counts["frames_received"] += 1
        self._last_frame_t = t_mono_s
        self._loop_failing = False
        try:
            self._sink(message, t_mono_s)
        except Exception as err:  # a faulty sink must not stop reception
            self._counts["sink_failures"] += 1
            if not self._sink_failing:
                log.exception(
                    "can_sink_failed",
                    link=self.name,
                    frame_id=hex(message.arbitration_id),
                    error=str(err),
                )
                self._sink_failing = True
        else:
            if self._sink_failing:
                log.info(
                    "can_sink_recovered", link=self.name, failures=self._counts["sink_failures"]
                )
                self._sink_failing = False
        return True

    def _on_error_frame(self, message: can.Message) -> bool | None:
        self._counts["error_frames"] += 1
        error_class = message.arbitration_id
        if error_class & CAN_ERR_BUSOFF:
            self._counts["bus_off_events"] += 1
            self._close_bus()
            self._fail(LinkState.BUS_OFF, f"bus-off on {self.link.describe()}; reopening the bus")
            return False
        if error_class & CAN_ERR_RESTARTED:
            self._set_state(LinkState.ERROR_ACTIVE, "controller restarted")
        elif error_class & CAN_ERR_CRTL and len(message.data) > 1:
            status = message.data[1]
            if status & (CAN_ERR_CRTL_RX_PASSIVE | CAN_ERR_CRTL_TX_PASSIVE):
                if self._state is not LinkState.ERROR_PASSIVE:
                    self._counts["error_passive_events"] += 1
                self._set_state(LinkState.ERROR_PASSIVE, "error counter reached 128")
            elif status & (CAN_ERR_CRTL_RX_WARNING | CAN_ERR_CRTL_TX_WARNING):
                if self._state is not LinkState.ERROR_WARNING:
                    self._counts["error_warning_events"] += 1
                self._set_state(LinkState.ERROR_WARNING, "error counter reached 96")
            elif status & CAN_ERR_CRTL_ACTIVE:
                self._set_state(LinkState.ERROR_ACTIVE, "controller back to error active")
        return None

    # -- helpers -------------------------------------------------------------

    def _on_opened(self) -> None:
        if self._opened_before:
            self._counts["reopens"] += 1
        self._opened_before = True
        self._set_state(LinkState.ERROR_ACTIVE, "opened")

    def _close_bus(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        if isinstance(bus, StrictSlcanBus):
            self._closed_garbled += bus.garbled_lines
            self._closed_adapter_errors += bus.adapter_errors
        try:
            bus.shutdown()
        except Exception as err:  # a dead port may fail to close; the bus is dropped anyway
            log.debug("can_bus_shutdown_failed", link=self.name, error=str(err))

    def _slcan_counts(self) -> tuple[int, int]:
        bus = self._bus
        if isinstance(bus, StrictSlcanBus):
            return (
                self._closed_garbled + bus.garbled_lines,
                self._closed_adapter_errors + bus.adapter_errors,
            )
        return self._closed_garbled, self._closed_adapter_errors

    def _log_garbled(self) -> None:
        """Log the first garbled slcan line, then at most one summary a minute while more arrive."""
        garbled, _ = self._slcan_counts()
        if garbled == self._garbled_logged:
            return
        now = time.monotonic()
        if self._garbled_log_t is None or now - self._garbled_log_t >= GARBLED_LOG_INTERVAL_S:
            bus = self._bus
            example = bus.last_garbled.decode("latin-1") if isinstance(bus, StrictSlcanBus) else ""
            log.warning(
                "slcan_garbled_lines", link=self.name, garbled_lines=garbled, example=example
            )
            self._garbled_log_t = now
            self._garbled_logged = garbled

    def _fail(self, state: LinkState, error: str) -> None:
        self._last_error = error
        self._set_state(state, error)

    def _set_state(self, state: LinkState, reason: str) -> None:
        if state is self._state:
            return
        previous, self._state = self._state, state
        fields = {
            "link": self.name,
            "state": state.value,
            "previous": previous.value,
            "reason": reason,
        }
        if state in (LinkState.DOWN, LinkState.BUS_OFF):
            log.error("can_link_state", **fields)
        elif state in (LinkState.ERROR_PASSIVE, LinkState.ERROR_WARNING):
            log.warning("can_link_state", **fields)
        else:
            log.info("can_link_state", **fields)


def asyncio_sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Sink:
    """Return a sink that puts ``(message, t_mono_s)`` on ``queue``, owned by ``loop``.

    A full queue or a closed loop raises in the reader's thread, where it is
    counted as a sink failure.
    """

    def sink(message: can.Message, t_mono_s: float) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (message, t_mono_s))

    return sink
