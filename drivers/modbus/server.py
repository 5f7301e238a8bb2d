"""Simulated Modbus device: a pymodbus 3.16 server whose registers come from a profile.

The HIL rig and the tests run the real drivers against this server on
127.0.0.1 (TCP) or on a pseudo-terminal (RTU)::

    server = RegisterServer(load_profile("meter-3ph"), unit_id=1)
    server.set_point("p_kw", 12.5)            # engineering units, scaled per the profile
    port = await server.start_tcp()           # binds 127.0.0.1 on a free port
    ...
    server.faults.delay_s = 0.5               # every response 0.5 s late
    server.faults.exception_for(40000, 10)    # exception 02 for 40000..40009
    await server.stop()

Address map: a request for wire address *a* returns the register the profile assigns to
*a* (0-based, no +1 shift). Holding and input registers are separate spaces.
Per function, every address from the first to the last point of the profile
responds, and registers between points read as 0. Addresses outside that span
get exception 02 (illegal data address), as on real devices. FC 01/02
return 16 zero bits at 0..15 because pymodbus needs a bit block.

Writes (FC 06/16) are accepted only when every register written belongs to a
``writable`` point; other writes get exception 02. The server responds only
its own unit id and stays silent for other ids, as an RTU device on a shared
bus does.

Fault hooks (:class:`Faults`) are consulted on every request: an exception
code for an address range, a delay before the response, dropped responses, and
frozen registers that keep returning the values they had when frozen.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import inspect
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus import codec
from drivers.modbus.profile import FUNCTIONS, Point, Profile

log = structlog.get_logger(__name__)

_FUNCTION_OF_CODE = {
    3: "holding",
    6: "holding",
    16: "holding",
    22: "holding",
    23: "holding",
    4: "input",
}
_WRITE_CODES = {6, 16, 22, 23}


class ServerStartError(OSError):
    """The simulator cannot listen on its TCP address or open its serial port.

    ``errno`` is the operating system's error when it could be found, else None.
    """

    def __init__(self, message: str, errno_value: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value


#: The fix to print for the usual errors of binding a TCP listener.
_BIND_FIXES = {
    errno.EADDRINUSE: "stop the program that listens there (see `ss -ltnp`) or choose another "
    "port; port 0 picks a free one",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE; choose a port from 1024",
    errno.EADDRNOTAVAIL: "the host is not an address of this machine; use 127.0.0.1",
}


@dataclass
class ExceptionRule:
    """Exception ``code`` for requests touching ``first..last`` (wire addresses, inclusive)."""

    first: int
    last: int
    code: ExcCodes = ExcCodes.ILLEGAL_ADDRESS
    #: "holding", "input", or None for both.
    function: str | None = None


@dataclass
class Faults:
    """Faults the server injects; change the fields at any time, they apply to the next request.

    Delays and exception rules apply to register requests of the server's
    own unit. Dropping works on the encoded response, so it covers every response.
    """

    #: Seconds to wait before responding to each register request.
    delay_s: float = 0.0
    #: Drop every response while True (the client times out).
    drop_all: bool = False
    #: Drop this many of the next responses, then respond normally again.
    drop_next: int = 0
    #: Return the registers as they were when this was set True.
    frozen: bool = False
    exceptions: list[ExceptionRule] = field(default_factory=list)

    def exception_for(
        self,
        address: int,
        count: int = 1,
        code: ExcCodes = ExcCodes.ILLEGAL_ADDRESS,
        function: str | None = None,
    ) -> ExceptionRule:
        """Add a rule: requests touching ``count`` registers from ``address`` get ``code``."""
        rule = ExceptionRule(address, address + count - 1, code, function)
        self.exceptions.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every fault."""
        self.delay_s = 0.0
        self.drop_all = False
        self.drop_next = 0
        self.frozen = False
        self.exceptions.clear()

    def exception_code(self, function: str, address: int, count: int) -> ExcCodes | None:
        last = address + count - 1
        for rule in self.exceptions:
            if rule.function in (None, function) and rule.first <= last and address <= rule.last:
                return rule.code
        return None


@dataclass(frozen=True)
class RegisterWrite:
    """A write a client made to holding registers, passed to ``on_write``."""

    address: int
    words: tuple[int, ...]
    #: Names of the points whose registers the write touched.
    point_names: tuple[str, ...]


#: ``on_write`` callback: sync or async; returning an ExcCodes rejects the
#: write (the registers are restored and the client gets that exception).
WriteCallback = Callable[[RegisterWrite], "ExcCodes | Awaitable[ExcCodes | None] | None"]


class _Image:
    """The registers of one function (holding or input) from ``start`` on."""

    def __init__(self, points: tuple[Point, ...]) -> None:
        self.start = min(p.address for p in points) if points else 0
        end = max(p.end for p in points) if points else 0
        self.words = [0] * (end - self.start)
        # Register offset -> the point it belongs to, for write checks.
        self.owner: list[Point | None] = [None] * len(self.words)
        for point in points:
            for address in range(point.address, point.end):
                self.owner[address - self.start] = point

    def contains(self, address: int, count: int) -> bool:
        return self.start <= address and address + count <= self.start + len(self.words)


class RegisterServer:
    """A Modbus device simulated from a :class:`Profile`, served over TCP and/or RTU.

    The register image is shared by every transport started, so one server
    can respond on TCP and RTU at once. Methods that change registers may be
    called before or after starting; they are not thread-safe and belong on
    the event loop's thread.
    """

    def __init__(
        self,
        profile: Profile,
        unit_id: int = 1,
        on_write: WriteCallback | None = None,
    ) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"unit_id {unit_id} is invalid: a Modbus unit id is 1..247")
        self.profile = profile
        self.unit_id = unit_id
        self.on_write = on_write
        self.faults = Faults()
        #: The last 1000 register requests served or rejected: (function code, address, count).
        self.requests: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=1000)
        self._images = {fn: _Image(profile.points_for(fn)) for fn in FUNCTIONS}
        self._points = {p.name: p for p in profile.points}
        self._servers: list[ModbusTcpServer | ModbusSerialServer] = []
        self._apply_defaults()

    # -- register access -------------------------------------------------

    def set_registers(self, function: str, address: int, words: list[int]) -> None:
        """Set raw registers (wire order) of ``function`` ("holding"/"input") from ``address``."""
        image = self._image(function)
        if not image.contains(address, len(words)):
            raise ValueError(
                f"{function} registers {address}..{address + len(words) - 1} are outside the "
                f"simulated span {image.start}..{image.start + len(image.words) - 1} of profile "
                f"{self.profile.name!r}: add points there to the profile"
            )
        for word in words:
            if isinstance(word, bool) or not isinstance(word, int) or not 0 <= word <= 0xFFFF:
                raise ValueError(f"register value {word!r} is not a 16-bit word (0..65535)")
        offset = address - image.start
        image.words[offset : offset + len(words)] = words

    def get_registers(self, function: str, address: int, count: int) -> list[int]:
        """Return raw registers of ``function`` from the model image (ignores ``frozen``)."""
        image = self._image(function)
        if not image.contains(address, count):
            raise ValueError(
                f"{function} registers {address}..{address + count - 1} are not simulated"
            )
        offset = address - image.start
        return image.words[offset : offset + count]

    def set_point(self, name: str, value: codec.Value | None) -> None:
        """Set a point from its engineering value (the inverse of the profile's scaling).

        ``None`` stores the type's "no value" sentinel (NaN for floats). A
        point scaled by a scale factor uses the factor's current value.
        """
        point = self._point(name)
        if value is None:
            raw: codec.Value = self._sentinel(point)
        elif point.type == "str":
            raw = value
        else:
            raw = (float(value) - point.offset) / self._multiplier(point)
            if point.type not in ("f32", "f64"):
                raw = round(raw)
        self.set_registers(
            point.function, point.address, codec.encode(raw, point.type, point.order, point.length)
        )

    def get_point(self, name: str) -> codec.Value | None:
        """Return a point's engineering value, or None when it contains its sentinel."""
        point = self._point(name)
        raw = codec.decode(
            self.get_registers(point.function, point.address, point.count), point.type, point.order
        )
        if codec.is_sentinel_value(raw, point.type, point.accumulator):
            return None
        if point.type == "str":
            return raw
        multiplier = self._multiplier(point)
        if multiplier == 1 and not point.offset:
            return raw
        return raw * multiplier + point.offset

    def _apply_defaults(self) -> None:
        # Scale factors first, because the values they scale are encoded with them.
        factors = {p.scale_factor for p in self.profile.points if p.scale_factor}
        ordered = sorted(self.profile.points, key=lambda p: p.name not in factors)
        for point in ordered:
            if point.default is None:
                continue
            try:
                self.set_point(point.name, point.default)
            except ValueError as err:
                raise ValueError(
                    f"profile {self.profile.name!r}: default {point.default!r} of point "
                    f"{point.name!r} cannot be encoded: {err}"
                ) from err

    def _point(self, name: str) -> Point:
        try:
            return self._points[name]
        except KeyError:
            raise KeyError(f"profile {self.profile.name!r} has no point {name!r}") from None

    def _image(self, function: str) -> _Image:
        if function not in self._images:
            raise ValueError(f"function {function!r} is invalid: use 'holding' or 'input'")
        return self._images[function]

    def _multiplier(self, point: Point) -> float:
        if point.scale_factor is not None:
            sf = self.get_point(point.scale_factor)
            if sf is None:
                raise ValueError(
                    f"scale factor {point.scale_factor!r} of {point.name!r} is missing (sentinel); "
                    "set it before the points it scales"
                )
            return 10.0**sf
        return point.scale if point.scale is not None else 1

    @staticmethod
    def _sentinel(point: Point) -> codec.Value:
        if point.type in ("f32", "f64"):
            return float("nan")
        if point.type == "str":
            return ""
        if point.accumulator:
            return 0
        return codec.SENTINELS[point.type]

    # -- serving -----------------------------------------------------------

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen for Modbus TCP on ``host``:``port`` (0 picks a free port); return the port.

        Raise :class:`ServerStartError` when the address cannot be bound, for
        example a port already in use.
        """
        server = ModbusTcpServer(self._sim_device(), address=(host, port), **self._hooks())
        try:
            await server.serve_forever(background=True)
        except RuntimeError as err:
            # pymodbus 3.16 logs the OSError of the bind and raises a bare RuntimeError,
            # so bind once more here to find the reason for the message.
            cause = _tcp_bind_error(host, port)
            if cause is None:
                reason, code, fix = "pymodbus could not listen", None, "check the host and port"
            else:
                reason, code = cause.strerror, cause.errno
                fix = _BIND_FIXES.get(code, "check the host and port")
            raise ServerStartError(
                f"cannot listen for Modbus TCP on {host}:{port} ({reason}); {fix}", code
            ) from err
        self._servers.append(server)
        sockets = server.transport.sockets  # type: ignore[union-attr]
        bound_port = sockets[0].getsockname()[1]
        log.info(
            "simulator listening",
            profile=self.profile.name,
            unit=self.unit_id,
            host=host,
            port=bound_port,
        )
        return bound_port

    async def start_rtu(self, serial_port: str, baudrate: int = 19200) -> None:
        """Serve Modbus RTU on ``serial_port`` (a tty, or one end of a pty pair).

        Raise :class:`ServerStartError` when the port cannot be opened.
        """
        server = ModbusSerialServer(
            self._sim_device(), port=serial_port, baudrate=baudrate, **self._hooks()
        )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as err:
            cause = _serial_open_error(serial_port)
            reason = cause.strerror if cause is not None else "pymodbus could not open it"
            raise ServerStartError(
                f"cannot open serial port {serial_port!r} for the RTU simulator ({reason}); "
                "check the device path, that no other program has it open, and that this "
                "user may use it (group dialout on Debian)",
                cause.errno if cause is not None else None,
            ) from err
        self._servers.append(server)
        log.info(
            "simulator listening",
            profile=self.profile.name,
            unit=self.unit_id,
            serial_port=serial_port,
        )

    async def stop(self) -> None:
        """Stop every transport started; the register image stays usable."""
        servers, self._servers = self._servers, []
        for server in servers:
            await server.shutdown()
        if servers:
            log.info("simulator stopped", profile=self.profile.name, unit=self.unit_id)

    async def __aenter__(self) -> RegisterServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _hooks(self) -> dict[str, object]:
        return {"trace_packet": self._trace_packet, "trace_pdu": self._trace_pdu}

    def _sim_device(self) -> SimDevice:
        blocks = []
        for function in ("holding", "input"):
            image = self._images[function]
            if image.words:
                blocks.append(
                    [SimData(image.start, values=list(image.words), datatype=DataType.REGISTERS)]
                )
            else:
                blocks.append([SimData(0, datatype=DataType.INVALID)])
        # pymodbus needs a coil and a discrete-input block when the spaces are separate.
        bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
        return SimDevice(
            id=self.unit_id,
            simdata=(bits, list(bits), blocks[0], blocks[1]),
            action=self._action,
        )

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        # A request for another unit becomes "no request": pymodbus 3.16's
        # server handler skips a PDU that this hook returns as None.
        if not sending and pdu.dev_id != self.unit_id:
            return None
        return pdu

    def _trace_packet(self, sending: bool, packet: bytes) -> bytes:
        if not sending:
            return packet
        if self.faults.drop_all:
            return b""
        if self.faults.drop_next > 0:
            self.faults.drop_next -= 1
            return b""
        return packet

    async def _action(  # noqa: PLR0917 - pymodbus calls it with six positional arguments
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Copy the model image into ``registers``, which pymodbus then sends in the response."""
        if function_code in _WRITE_CODES and set_values is None:
            # pymodbus 3.16 reads the register back to build the FC 06 echo. The
            # Modbus echo repeats the request, so it must not see later changes.
            return None
        self.requests.append((function_code, address, count))
        function = _FUNCTION_OF_CODE.get(function_code)
        if self.faults.delay_s > 0:
            await asyncio.sleep(self.faults.delay_s)
        if function is None:
            return None
        if (code := self.faults.exception_code(function, address, count)) is not None:
            return code
        image = self._images[function]
        offset = address - image.start
        runtime_offset = address - start_address
        if function_code in _WRITE_CODES and set_values is not None:
            return await self._write(image, address, [int(v) for v in set_values])
        if not self.faults.frozen:
            registers[runtime_offset : runtime_offset + count] = image.words[
                offset : offset + count
            ]
        return None

    async def _write(self, image: _Image, address: int, words: list[int]) -> ExcCodes | None:
        # pymodbus copies the written words into its own registers after this
        # returns, so a read-back matches even while frozen.
        offset = address - image.start
        owners = image.owner[offset : offset + len(words)]
        if any(owner is None or not owner.writable for owner in owners):
            return ExcCodes.ILLEGAL_ADDRESS
        previous = image.words[offset : offset + len(words)]
        image.words[offset : offset + len(words)] = words
        if self.on_write is not None:
            names = tuple(dict.fromkeys(owner.name for owner in owners if owner is not None))
            result = self.on_write(RegisterWrite(address, tuple(words), names))
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, ExcCodes):
                image.words[offset : offset + len(words)] = previous
                return result
        return None


__all__ = ["ExceptionRule", "Faults", "RegisterServer", "RegisterWrite"]


def _tcp_bind_error(host: str, port: int) -> OSError | None:
    """Bind ``host``:``port`` as asyncio's listener does; return the OSError, or None."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:  # socket.gaierror is an OSError too
        return err
    return None


def _serial_open_error(serial_port: str) -> OSError | None:
    """Open a serial device path once; return the OSError, or None when it opens or is a URL."""
    if "://" in serial_port:
        return None
    try:
        fd = os.open(serial_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as err:
        return err
    os.close(fd)
    return None
