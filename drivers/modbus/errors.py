"""Errors of the Modbus transaction engine, split by the phase that failed.

::

    ModbusError
     +-- ModbusConnectError      (also ConnectionError)  link down, connect failed, link lost
     +-- ModbusTimeout           (also TimeoutError)     no response within the request timeout
     +-- ModbusExceptionResponse                         the device sent an exception response
     +-- ModbusFrameError                                a malformed or mismatched response
     +-- ModbusWriteVerifyError                          the read-back after a write differs

A timeout and an exception response are different things. In the second
case the device responded, so the link is fine, and repeating the same
request is pointless for most codes. Every message names the link, the unit, the
function, the address and the count, and tells what to check.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Standard names of the Modbus exception codes (Modbus Application Protocol
#: Specification V1.1b3, section 7).
EXCEPTION_NAMES: dict[int, str] = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x05: "acknowledge",
    0x06: "server device busy",
    0x08: "memory parity error",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond",
}

#: Hint per exception code: what the operator should check.
_EXCEPTION_HINTS: dict[int, str] = {
    0x01: "the device does not support this function code; check the profile's register table",
    0x02: "the device has no register in this range; check the profile's addresses and counts",
    0x03: "the device rejected the value or the count; check the point's range and type",
    0x04: "the device reported an internal failure; check its own fault log",
    0x05: "the device accepted a long-running command; read the result later",
    0x06: "the device is busy; the request can be repeated later",
    0x08: "the device reported a memory parity error; check its own fault log",
    0x0A: "the gateway has no path to this unit; check the unit id and the gateway's routing",
    0x0B: "the device behind the gateway did not respond; check its power and serial wiring",
}

FUNCTION_NAMES: dict[int, str] = {
    1: "read coils",
    2: "read discrete inputs",
    3: "read holding registers",
    4: "read input registers",
    5: "write single coil",
    6: "write single register",
    15: "write multiple coils",
    16: "write multiple registers",
}


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """Target and content of one request, for error messages."""

    #: ``tcp 10.0.0.5:502`` or ``rtu /dev/ttyUSB0``.
    link: str
    unit: int
    function: int
    address: int
    count: int

    def describe(self) -> str:
        name = FUNCTION_NAMES.get(self.function, "function")
        return (
            f"{self.link} unit {self.unit}: {name} (function {self.function}) "
            f"at address {self.address} count {self.count}"
        )


class ModbusError(Exception):
    """Base of every error the Modbus engine raises.

    ``request`` is ``None`` for errors that happen outside a request, such as
    a failed connect.
    """

    def __init__(self, message: str, request: RequestInfo | None = None) -> None:
        super().__init__(message)
        self.request = request


class ModbusConnectError(ModbusError, ConnectionError):
    """The link is down: connecting failed, or the connection was lost."""


class ModbusTimeout(ModbusError, TimeoutError):  # noqa: N818 - named like the builtin it extends
    """No response arrived within the request timeout."""

    def __init__(self, request: RequestInfo, timeout_s: float, message: str | None = None) -> None:
        super().__init__(
            message
            or f"{request.describe()}: no answer within {timeout_s:g} s; check that the device "
            "is powered, the unit id, and the wiring or IP route",
            request,
        )
        self.timeout_s = timeout_s


class ModbusExceptionResponse(ModbusError):  # noqa: N818 - the Modbus term for this response
    """The device responded with a Modbus exception code.

    ``function`` is the request's function code (without the 0x80 bit).
    """

    def __init__(self, request: RequestInfo, code: int) -> None:
        name = EXCEPTION_NAMES.get(code, "unknown exception code")
        hint = _EXCEPTION_HINTS.get(code, "see the device manual for this code")
        super().__init__(
            f"{request.describe()}: exception response {code:#04x} ({name}); {hint}", request
        )
        self.function = request.function
        self.code = code

    @property
    def illegal_address(self) -> bool:
        return self.code == 0x02

    @property
    def busy(self) -> bool:
        return self.code == 0x06

    @property
    def device_unreachable(self) -> bool:
        """Whether a gateway reported the unit behind it unreachable (codes 0x0A and 0x0B)."""
        return self.code in (0x0A, 0x0B)


class ModbusFrameError(ModbusError):
    """A response that arrived but is malformed or does not match its request."""


class ModbusWriteVerifyError(ModbusError):
    """A write was acknowledged but reading the registers back gave other values."""
