"""``bessgw modbus read|write|scan``: talk to one Modbus device from the command line.

Commissioning engineers use these commands to check a device before writing
a profile: read a few registers in every type and order, write a setting
and read it back, find which unit ids respond on a link. All requests go
through the gateway's own transaction engine (:mod:`drivers.modbus.link`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from drivers.modbus import codec
from drivers.modbus.errors import ModbusError, ModbusExceptionResponse, ModbusTimeout
from drivers.modbus.link import ModbusLink
from drivers.modbus.planner import apply_scale
from drivers.quality import Quality
from gateway.cli import EXIT_IO, EXIT_OK, EXIT_USAGE, CliError
from gateway.logs import configure_logging

log = structlog.get_logger(__name__)

FUNCTION_CODES = {"holding": 3, "input": 4}
#: Addresses where SunSpec devices start their map with the "SunS" marker.
SUNSPEC_BASES = (40000, 0, 50000)
SUNSPEC_MARKER = [0x5375, 0x6E53]
SUNSPEC_END_ID = 0xFFFF
#: A SunSpec map with more models than this is treated as corrupt.
MAX_SUNSPEC_MODELS = 64
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """Device address: a TCP host and port, or a serial device for RTU."""

    host: str | None = None
    port: int = 502
    serial_device: str | None = None
    baud: int = 9600
    parity: str = "N"
    stop_bits: int = 1

    def describe(self) -> str:
        if self.serial_device is not None:
            return f"rtu {self.serial_device} {self.baud} {self.parity}{self.stop_bits}"
        return f"tcp {self.host}:{self.port}"


def register(subparsers: argparse._SubParsersAction) -> None:
    modbus = subparsers.add_parser("modbus", help="read, write and scan Modbus devices")
    actions = modbus.add_subparsers(dest="action", metavar="ACTION", required=True)

    read = actions.add_parser(
        "read",
        help="read registers and print the raw words and the decoded value",
        usage="bessgw modbus read (HOST[:PORT] | --rtu DEVICE) ADDRESS [options]",
    )
    read.add_argument(
        "operands",
        nargs="+",
        metavar="HOST[:PORT] ADDRESS",
        help="device address and the 0-based register address (decimal or 0x hex)",
    )
    read.add_argument("--count", type=int, help="registers to read (default: one value of --type)")
    _add_value_options(read)
    read.add_argument(
        "--function",
        choices=sorted(FUNCTION_CODES),
        default="holding",
        help="register table: holding (FC 03, default) or input (FC 04)",
    )
    read.add_argument(
        "--scale",
        type=float,
        help="multiply each decoded number by this factor; a 'no value' sentinel stays unscaled",
    )
    read.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with 'registers', 'value' and 'quality' "
        "(value null where quality is not 'good')",
    )
    _add_link_options(read)
    read.set_defaults(func=run_read)

    write = actions.add_parser(
        "write",
        help="write holding registers, then read them back and compare",
        usage="bessgw modbus write (HOST[:PORT] | --rtu DEVICE) ADDRESS VALUE... --yes [options]",
    )
    write.add_argument(
        "operands",
        nargs="+",
        metavar="HOST[:PORT] ADDRESS VALUE",
        help="device address, 0-based register address and the values to write",
    )
    _add_value_options(write)
    write.add_argument(
        "--count", type=int, help="registers for a str value (default: as many as the text needs)"
    )
    write.add_argument(
        "--yes", action="store_true", help="confirm the write; without it nothing is sent"
    )
    _add_link_options(write)
    write.set_defaults(func=run_write)

    scan = actions.add_parser(
        "scan",
        help="list the unit ids that respond and the SunSpec models they carry",
        usage="bessgw modbus scan (HOST[:PORT] | --rtu DEVICE) [--units 1-247] [options]",
    )
    scan.add_argument("operands", nargs="*", metavar="HOST[:PORT]", help="device address")
    scan.add_argument(
        "--units",
        default="1-247",
        help="unit ids to try: a range and/or list, e.g. 1-10,100 (default 1-247)",
    )
    _add_link_options(scan, default_timeout_s=0.3)
    scan.set_defaults(func=run_scan)


def _add_value_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--type", choices=codec.POINT_TYPES, default="u16", help="value type (default u16)"
    )
    parser.add_argument(
        "--order",
        choices=codec.ORDERS,
        default="ABCD",
        help="word and byte order of multi-register values (default ABCD)",
    )


def _add_link_options(parser: argparse.ArgumentParser, default_timeout_s: float = 1.0) -> None:
    parser.add_argument("--unit", type=int, default=1, help="Modbus unit id (default 1)")
    parser.add_argument(
        "--rtu", metavar="DEVICE", help="use Modbus RTU on this serial device instead of TCP"
    )
    parser.add_argument("--baud", type=int, default=9600, help="RTU baud rate (default 9600)")
    parser.add_argument(
        "--parity", choices=("N", "E", "O"), default="N", help="RTU parity (default N)"
    )
    parser.add_argument(
        "--stop-bits", type=int, choices=(1, 2), default=1, help="RTU stop bits (default 1)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default_timeout_s,
        metavar="SECONDS",
        help=f"response timeout per request in seconds (default {default_timeout_s:g})",
    )


# -- argument parsing ---------------------------------------------------------


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST[:PORT]`` (``[v6]:PORT`` for IPv6); the port defaults to 502."""
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise CliError(f"invalid device address {text!r}: expected HOST or HOST:PORT", EXIT_USAGE)
    if not port_text:
        return host, 502
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise CliError(f"invalid port in {text!r}: expected 1..65535", EXIT_USAGE)
    return host, port


def parse_address(text: str) -> int:
    """Parse a 0-based register address in decimal or ``0x`` hex."""
    try:
        address = int(text, 0)
    except ValueError:
        address = -1
    if not 0 <= address <= 0xFFFF:
        raise CliError(
            f"invalid register address {text!r}: expected 0..65535 (0-based, decimal or 0x hex)",
            EXIT_USAGE,
        )
    return address


def parse_units(text: str) -> list[int]:
    """Parse ``1-247`` or ``1,2,10-20`` into a sorted list of unit ids."""
    units: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if last else low
        except ValueError:
            raise CliError(
                f"invalid --units {text!r}: expected ranges like 1-247 or lists like 1,5,10-20",
                EXIT_USAGE,
            ) from None
        if not (0 <= low <= 255 and 0 <= high <= 255):
            raise CliError(f"invalid unit range {part!r}: unit ids are 0..255", EXIT_USAGE)
        if low > high:
            raise CliError(
                f"invalid unit range {part!r}: the range is reversed; write {high}-{low}",
                EXIT_USAGE,
            )
        units.update(range(low, high + 1))
    return sorted(units)


def split_target(args: argparse.Namespace, needs: int) -> tuple[Target, list[str]]:
    """Take the device address from ``--rtu`` or the first operand; return it and the rest."""
    operands = list(args.operands)
    if args.rtu:
        target = Target(
            serial_device=args.rtu, baud=args.baud, parity=args.parity, stop_bits=args.stop_bits
        )
    else:
        if not operands:
            raise CliError("missing device address: give HOST[:PORT] or --rtu DEVICE", EXIT_USAGE)
        host, port = parse_host_port(operands.pop(0))
        target = Target(host=host, port=port)
    if len(operands) < needs:
        raise CliError(
            f"missing operands after the device address: expected {needs}, got {len(operands)}",
            EXIT_USAGE,
        )
    if not 0 <= args.unit <= 255:
        raise CliError(f"invalid --unit {args.unit}: expected 0..255 (1..247 on RTU)", EXIT_USAGE)
    if args.timeout <= 0:
        raise CliError(f"invalid --timeout {args.timeout}: expected seconds > 0", EXIT_USAGE)
    return target, operands


def build_link(target: Target, timeout_s: float, **options: Any) -> ModbusLink:
    if target.serial_device is not None:
        return ModbusLink.rtu(
            target.serial_device,
            target.baud,
            target.parity,
            target.stop_bits,
            timeout_s=timeout_s,
            **options,
        )
    return ModbusLink.tcp(target.host or "", target.port, timeout_s=timeout_s, **options)


def run_with_link(
    target: Target,
    timeout_s: float,
    work: Callable[[ModbusLink], Awaitable[T]],
    **options: Any,
) -> T:
    """Connect, run ``work(link)``, close; turn Modbus errors into exit code 1."""

    async def session() -> T:
        link = build_link(target, timeout_s, one_shot=True, **options)
        await link.start()
        try:
            await link.wait_connected(max(3.0, timeout_s))
            return await work(link)
        finally:
            await link.close()

    try:
        return asyncio.run(session())
    except ModbusError as err:
        raise CliError(str(err), EXIT_IO) from err
    except (OSError, ValueError) as err:
        raise CliError(f"{target.describe()}: {err}", EXIT_IO) from err


# -- read ---------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedValue:
    """One value of a read: its registers in wire order, and the value or ``None``.

    ``value`` is ``None`` unless ``quality`` is GOOD. A "no value" sentinel
    (int16 ``8000``, uint16 ``FFFF``, a float NaN, an all-NUL string and the
    others in :data:`drivers.modbus.codec.SENTINELS`) is NOT_IMPLEMENTED and is
    never scaled. An infinite float is OUT_OF_RANGE.
    """

    words: list[int]
    value: int | float | str | None
    quality: Quality


def decode_registers(
    registers: list[int], type_: str, order: str, scale: float | None
) -> list[DecodedValue]:
    """Decode what a read returned into one entry per value of ``type_``."""
    size = len(registers) if type_ == "str" else codec.register_count(type_)
    decoded = []
    for start in range(0, len(registers), size):
        words = registers[start : start + size]
        raw = codec.decode(words, type_, order)
        if codec.is_sentinel_value(raw, type_):
            decoded.append(DecodedValue(words, None, Quality.NOT_IMPLEMENTED))
        elif isinstance(raw, float) and not math.isfinite(raw):
            decoded.append(DecodedValue(words, None, Quality.OUT_OF_RANGE))
        elif scale is not None and not isinstance(raw, str):
            decoded.append(DecodedValue(words, apply_scale(raw, scale), Quality.GOOD))
        else:
            decoded.append(DecodedValue(words, raw, Quality.GOOD))
    return decoded


def run_read(args: argparse.Namespace) -> int:
    # Errors only: the link's own warnings (link down, retry) repeat the error this prints.
    configure_logging("error", "console", stream=sys.stderr)
    target, operands = split_target(args, needs=1)
    if len(operands) > 1:
        raise CliError(f"unexpected operands {operands[1:]}: read takes one ADDRESS", EXIT_USAGE)
    address = parse_address(operands[0])
    count = _value_count(args.type, args.count)
    if count < 1 or count > 125 or address + count > 0x10000:
        raise CliError(f"invalid --count {count}: expected 1..125 within 0..65535", EXIT_USAGE)
    if args.type != "str" and count % codec.register_count(args.type):
        size = codec.register_count(args.type)
        raise CliError(
            f"--count {count} is not a whole number of {args.type} values of {size} registers: "
            f"use a multiple of {size}",
            EXIT_USAGE,
        )
    function = FUNCTION_CODES[args.function]
    registers = run_with_link(
        target, args.timeout, lambda link: link.read(args.unit, function, address, count)
    )
    decoded = decode_registers(registers, args.type, args.order, args.scale)

    if args.json:
        print(json.dumps(_json_result(registers, decoded)))
        return EXIT_OK
    print(f"{target.describe()} unit {args.unit} {args.function} {address}..{address + count - 1}")
    print("registers: " + " ".join(f"{word:04X}" for word in registers))
    shown = ", ".join(_format_value(entry, args.type) for entry in decoded)
    print(f"value ({args.type} {args.order}): {shown}")
    return EXIT_OK


def _json_result(registers: list[int], decoded: list[DecodedValue]) -> dict[str, Any]:
    """Build the ``--json`` object: a scalar value and quality for one value, else lists."""
    values = [entry.value for entry in decoded]
    qualities = [entry.quality.name.lower() for entry in decoded]
    if len(decoded) == 1:
        return {"registers": registers, "value": values[0], "quality": qualities[0]}
    return {"registers": registers, "value": values, "quality": qualities}


def _value_count(type_: str, count: int | None) -> int:
    if count is not None:
        return count
    if type_ == "str":
        raise CliError("--type str needs --count: the string length in registers", EXIT_USAGE)
    return codec.register_count(type_)


def _format_value(entry: DecodedValue, type_: str) -> str:
    words = " ".join(f"{word:04X}" for word in entry.words)
    if entry.quality is Quality.NOT_IMPLEMENTED:
        return f"no value (sentinel {words})"
    if entry.quality is not Quality.GOOD:
        return f"no value ({entry.quality.name.lower()}: {words})"
    if type_ == "str":
        return repr(entry.value)
    return f"{entry.value:g}" if isinstance(entry.value, float) else f"{entry.value}"


# -- write --------------------------------------------------------------------


def encode_values(texts: list[str], type_: str, order: str, count: int | None) -> list[int]:
    """Encode command-line values of ``type_`` into registers in wire order."""
    if type_ == "str":
        text = " ".join(texts)
        length = count if count is not None else max(1, (len(text.encode("utf-8")) + 1) // 2)
        return codec.encode(text, "str", order, length)
    words: list[int] = []
    for text in texts:
        try:
            number: int | float = float(text) if type_ in ("f32", "f64") else int(text, 0)
        except ValueError:
            raise CliError(f"invalid value {text!r} for type {type_}", EXIT_USAGE) from None
        try:
            words.extend(codec.encode(number, type_, order))
        except ValueError as err:
            raise CliError(str(err), EXIT_USAGE) from err
    return words


def run_write(args: argparse.Namespace) -> int:
    configure_logging("info", "console", stream=sys.stderr)
    target, operands = split_target(args, needs=2)
    address = parse_address(operands[0])
    words = encode_values(operands[1:], args.type, args.order, args.count)
    if len(words) > 123 or address + len(words) > 0x10000:
        raise CliError(
            f"{len(words)} registers at {address} do not fit one write (max 123)", EXIT_USAGE
        )
    shown = " ".join(f"{word:04X}" for word in words)
    where = f"{target.describe()} unit {args.unit} holding {address}..{address + len(words) - 1}"
    if not args.yes:
        raise CliError(
            f"not written: add --yes to write {shown} to {where}. A write changes the device's "
            "behaviour; check the address in the device manual first",
            EXIT_USAGE,
        )

    async def write_and_verify(link: ModbusLink) -> list[int]:
        if len(words) == 1:
            await link.write_register(args.unit, address, words[0])
        else:
            await link.write_registers(args.unit, address, words)
        log.info(
            "modbus write", link=target.describe(), unit=args.unit, address=address, registers=shown
        )
        return await link.read(args.unit, 3, address, len(words))

    read_back = run_with_link(target, args.timeout, write_and_verify)
    read_text = " ".join(f"{word:04X}" for word in read_back)
    if read_back != words:
        raise CliError(
            f"{where}: wrote {shown} but read back {read_text}; the device may reject the value, "
            "scale it, or map this address to another register",
            EXIT_IO,
        )
    print(f"wrote {where}: {shown}; read back matches")
    return EXIT_OK


# -- scan ---------------------------------------------------------------------


async def probe_unit(link: ModbusLink, unit: int) -> bool:
    """Tell whether ``unit`` responds at all: any response, even an exception, counts."""
    try:
        await link.read(unit, 3, SUNSPEC_BASES[0], 2)
    except ModbusTimeout:
        return False
    except ModbusExceptionResponse as err:
        # A gateway that returns 0x0A/0x0B reports that no device has this id.
        return not err.device_unreachable
    return True


async def sunspec_models(
    link: ModbusLink, unit: int
) -> tuple[int, list[tuple[int, int, int]]] | None:
    """Walk the SunSpec model headers; return the base and (address, id, length) per model."""
    for base in SUNSPEC_BASES:
        try:
            if await link.read(unit, 3, base, 2) != SUNSPEC_MARKER:
                continue
        except (ModbusExceptionResponse, ModbusTimeout):
            continue
        models = []
        address = base + 2
        for _ in range(MAX_SUNSPEC_MODELS):
            if address + 2 > 0x10000:
                break
            model_id, length = await link.read(unit, 3, address, 2)
            if model_id == SUNSPEC_END_ID:
                break
            models.append((address, model_id, length))
            address += 2 + length
        return base, models
    return None


def run_scan(args: argparse.Namespace) -> int:
    # Errors only: the link's own warnings (link down, retry) repeat the error this prints.
    configure_logging("error", "console", stream=sys.stderr)
    target, operands = split_target(args, needs=0)
    if operands:
        raise CliError(
            f"unexpected operands {operands}: scan takes only the device address", EXIT_USAGE
        )
    units = parse_units(args.units)
    if target.serial_device is not None and (units[0] < 1 or units[-1] > 247):
        raise CliError("invalid --units for RTU: unit ids on a serial bus are 1..247", EXIT_USAGE)

    async def scan(link: ModbusLink) -> list[tuple[int, Any]]:
        found = []
        for unit in units:
            if await probe_unit(link, unit):
                found.append((unit, await sunspec_models(link, unit)))
        return found

    # Silent unit ids are expected here, so timeouts must not drop the TCP connection.
    options = {} if target.serial_device is not None else {"drop_after_timeouts": 0}
    found = run_with_link(target, args.timeout, scan, **options)
    print(f"{target.describe()}: {len(found)} of {len(units)} unit id(s) responded")
    for unit, sunspec in found:
        if sunspec is None:
            print(
                f"  unit {unit}: responds, no SunSpec map at {', '.join(map(str, SUNSPEC_BASES))}"
            )
            continue
        base, models = sunspec
        listed = ", ".join(
            f"{model_id} at {address} (L {length})" for address, model_id, length in models
        )
        print(f"  unit {unit}: SunSpec at {base}: models {listed or 'none'}")
    if not found:
        raise CliError(
            f"{target.describe()}: no unit id in {args.units} responded within {args.timeout:g} s; "
            "check the unit ids, the wiring or IP route, and on RTU the baud rate and parity",
            EXIT_IO,
        )
    return EXIT_OK
