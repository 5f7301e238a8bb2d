"""``bessgw can dump`` and ``bessgw can decode``: look at BMS frames on a CAN link.

``decode`` takes frames in candump's ``ID#HEX`` form, as printed by
``candump -L`` and accepted by ``cansend``: 3 hex digits for an 11-bit id,
8 for a 29-bit id, then up to 8 data bytes as hex, optionally separated by
dots. ``dump`` prints live frames, raw and decoded, and can record them in
any python-can log format.

Both show current limits as the non-negative magnitudes they mean, with the
BMS driver's own :func:`drivers.can.bms.limit_magnitude_a`; ``--raw`` shows
the sign the BMS sent. Every other point is shown as decoded.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import sys
import time
from dataclasses import dataclass

import can

from drivers.can.bms import LIMIT_POINTS, limit_magnitude_a
from drivers.can.dbc import DbcDecoder, DbcError
from drivers.can.points import POINTS, FrameDecoder, PointValue
from drivers.can.pylontech import PylontechDecoder
from drivers.can.reader import (
    CanLink,
    CanOpenError,
    CanReader,
    LinkHealth,
    default_open_delay_s,
)
from gateway.cli import EXIT_IO, EXIT_OK, EXIT_USAGE, CliError
from gateway.logs import configure_logging

FRAME_FORM = (
    "expected candump form ID#HEX such as 351#1402740E740ECC01: 3 hex digits for an "
    "11-bit id or 8 for a 29-bit id, then 0 to 8 data bytes as hex pairs (dots allowed)"
)
_FRAME_ARGUMENT = re.compile(r"(?P<id>[0-9A-Fa-f]+)#(?P<data>[0-9A-Fa-f.]*)")


@dataclass(frozen=True)
class Frame:
    """One CAN data frame given on the command line."""

    frame_id: int
    is_extended: bool
    data: bytes


def parse_frame(text: str) -> Frame:
    """Parse ``ID#HEX``; raise ValueError naming the argument and the expected form."""
    match = _FRAME_ARGUMENT.fullmatch(text.strip())
    if match is None:
        if "##" in text:
            raise ValueError(
                f"invalid frame {text!r}: CAN FD frames are not supported; {FRAME_FORM}"
            )
        if "#R" in text.upper():
            raise ValueError(f"invalid frame {text!r}: remote frames carry no data; {FRAME_FORM}")
        raise ValueError(f"invalid frame {text!r}; {FRAME_FORM}")
    id_digits = match["id"]
    if len(id_digits) not in (3, 8):
        raise ValueError(
            f"invalid frame {text!r}: id {id_digits!r} has {len(id_digits)} digits; {FRAME_FORM}"
        )
    frame_id = int(id_digits, 16)
    extended = len(id_digits) == 8
    if frame_id > (0x1FFFFFFF if extended else 0x7FF):
        raise ValueError(f"invalid frame {text!r}: id 0x{frame_id:X} is out of range; {FRAME_FORM}")
    hex_data = match["data"].replace(".", "")
    if len(hex_data) % 2 or len(hex_data) > 16:
        raise ValueError(
            f"invalid frame {text!r}: data {match['data']!r} is not 0 to 8 whole bytes; "
            + FRAME_FORM
        )
    return Frame(frame_id, extended, bytes.fromhex(hex_data))


def _make_decoder(args: argparse.Namespace) -> FrameDecoder:
    if args.dbc is not None:
        try:
            return DbcDecoder(args.dbc)
        except DbcError as err:
            raise CliError(str(err), EXIT_USAGE) from err
    return PylontechDecoder()


def _format_id(frame_id: int, is_extended: bool) -> str:
    return f"{frame_id:08X}" if is_extended else f"{frame_id:03X}"


def _decode(
    decoder: FrameDecoder, frame_id: int, data: bytes, is_extended: bool, raw: bool
) -> tuple[str | None, dict[str, PointValue | None]]:
    """Return ``(frame name, {point: value or None})``; missing points map to ``None``.

    Current limits are magnitudes unless ``raw`` is set.
    """
    decoded = decoder.decode(frame_id, data, is_extended)
    if decoded is None:
        return None, {}
    values: dict[str, PointValue | None] = dict(decoded.signals)
    if not raw:
        for point in LIMIT_POINTS:
            value = values.get(point)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[point] = limit_magnitude_a(value)
    values.update(dict.fromkeys(decoded.missing))
    return decoded.name, values


def _format_values(values: dict[str, PointValue | None]) -> str:
    parts = []
    for name, value in values.items():
        if value is None:
            parts.append(f"{name}=missing")
            continue
        unit = POINTS[name].unit if name in POINTS else ""
        shown = json.dumps(value, ensure_ascii=False)
        parts.append(f"{name}={shown}{' ' + unit if unit else ''}")
    return ", ".join(parts)


def run_decode(args: argparse.Namespace) -> int:
    frames = []
    for text in args.frames:
        try:
            frames.append(parse_frame(text))
        except ValueError as err:
            raise CliError(str(err), EXIT_USAGE) from err
    decoder = _make_decoder(args)
    for frame in frames:
        name, values = _decode(decoder, frame.frame_id, frame.data, frame.is_extended, args.raw)
        if args.json:
            print(json.dumps(values, ensure_ascii=False))
            continue
        frame_id = _format_id(frame.frame_id, frame.is_extended)
        head = f"{frame_id} [{len(frame.data)}] {frame.data.hex(' ').upper()}"
        if name is None:
            print(f"{head}  (no decoder for this id)")
        else:
            print(f"{head}  {name}: {_format_values(values)}")
    return EXIT_OK


class _StderrStream:
    """Write to whatever ``sys.stderr`` is at the time of the write."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _open_logger(path: str | None) -> can.Listener | None:
    if path is None:
        return None
    try:
        return can.Logger(path)
    except ValueError as err:
        raise CliError(
            f"--log {path}: {err}; use a python-can log suffix such as .asc, .blf, .log, "
            ".csv or .trc",
            EXIT_USAGE,
        ) from err
    except OSError as err:
        raise CliError(f"--log {path}: cannot open for writing: {err.strerror}", EXIT_IO) from err


def _summary(health: LinkHealth, printed: int) -> str:
    return (
        f"{printed} frame(s) printed; link {health.state.value}: "
        f"{health.frames_received} received, "
        f"{health.error_frames} error frames, {health.bus_off_events} bus-off, "
        f"{health.error_passive_events} error-passive, {health.garbled_lines} garbled slcan lines, "
        f"{health.receive_failures} receive failures, {health.reopens} reopens"
    )


def run_dump(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise CliError(f"--count must be at least 1, got {args.count}", EXIT_USAGE)
    if args.seconds is not None and not args.seconds > 0:
        raise CliError(f"--seconds must be above 0, got {args.seconds}", EXIT_USAGE)
    configure_logging("warning", "console", stream=_StderrStream())
    decoder = _make_decoder(args)
    open_delay_s = args.open_delay
    if open_delay_s is None:
        open_delay_s = default_open_delay_s(args.channel)
    link = CanLink(args.interface, args.channel, args.bitrate, slcan_open_delay_s=open_delay_s)
    frames: queue.SimpleQueue[tuple[can.Message, float]] = queue.SimpleQueue()
    reader = CanReader(link, lambda message, t: frames.put((message, t)))
    logger = _open_logger(args.log)
    try:
        reader.open()
    except CanOpenError as err:
        if logger is not None:
            logger.stop()
        raise CliError(str(err), EXIT_IO) from err

    printed = 0
    start = time.monotonic()
    deadline = None if args.seconds is None else start + args.seconds
    reader.start()
    try:
        while args.count is None or printed < args.count:
            wait_s = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait_s <= 0:
                break
            try:
                message, t_mono_s = frames.get(timeout=wait_s)
            except queue.Empty:
                continue
            if logger is not None:
                logger.on_message_received(message)
            _print_message(decoder, message, t_mono_s - start, args.json, args.raw)
            printed += 1
    except KeyboardInterrupt:
        pass
    finally:
        reader.stop()
        if logger is not None:
            logger.stop()
    print(_summary(reader.health(), printed), file=sys.stderr)
    return EXIT_OK


def _print_message(
    decoder: FrameDecoder, message: can.Message, t_s: float, as_json: bool, raw: bool
) -> None:
    data = bytes(message.data)
    name, values = (None, {})
    if not message.is_remote_frame:
        name, values = _decode(decoder, message.arbitration_id, data, message.is_extended_id, raw)
    frame_id = _format_id(message.arbitration_id, message.is_extended_id)
    if as_json:
        record = {
            "t_s": round(t_s, 6),
            "id": frame_id,
            "extended": message.is_extended_id,
            "remote": message.is_remote_frame,
            "dlc": message.dlc,
            "data": data.hex().upper(),
            "frame": name,
            "signals": values,
        }
        print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    decoded = f"  {name}: {_format_values(values)}" if name is not None else ""
    print(
        f"{t_s:10.3f}  {frame_id:>8}  [{message.dlc}]  {data.hex(' ').upper():<23}{decoded}",
        flush=True,
    )


def _add_decoder_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--protocol",
        choices=["pylontech"],
        help="built-in decoder; points are named as in the BMS profile (the default)",
    )
    group.add_argument(
        "--dbc",
        metavar="FILE",
        help="decode with this DBC file instead; signals keep their DBC names, units and "
        "signs, because the command cannot tell which DBC signal is a current limit",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="show charge and discharge current limits with the sign the BMS sent; by default "
        "they are the non-negative limits in A that the gateway uses",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per frame instead of text"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    can_parser = subparsers.add_parser("can", help="dump and decode BMS frames on a CAN link")
    actions = can_parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    decode = actions.add_parser(
        "decode",
        help="decode frames given as ID#HEX",
        description="Decode CAN frames given in candump's ID#HEX form. With --json, each frame "
        "becomes one JSON object of point names to values; a point whose bytes lie past the "
        "frame's DLC is null.",
    )
    _add_decoder_options(decode)
    decode.add_argument(
        "frames", nargs="+", metavar="FRAME", help="frame such as 351#1402740E740ECC01"
    )
    decode.set_defaults(func=run_decode)

    dump = actions.add_parser(
        "dump",
        help="print live frames, raw and decoded",
        description="Print frames from a CAN link until --count or --seconds is reached or "
        "Ctrl-C, then a link-health summary on stderr. Exit 1 if the link cannot be opened.",
    )
    dump.add_argument(
        "--interface",
        required=True,
        choices=["socketcan", "slcan", "virtual"],
        help="python-can interface",
    )
    dump.add_argument(
        "--channel",
        required=True,
        help="can0 for socketcan; serial device or socket://HOST:PORT for slcan; "
        "any name for virtual",
    )
    dump.add_argument(
        "--bitrate",
        type=int,
        default=500_000,
        help="bit rate in bit/s, set on slcan adapters (SocketCAN takes it from `ip link`); "
        "default 500000",
    )
    dump.add_argument(
        "--open-delay",
        type=float,
        default=None,
        metavar="S",
        help="slcan only: seconds to wait after opening the port, for adapters that reset on "
        "open; default 2 on a serial device, 0 on a socket:// URL or /dev/pts/N",
    )
    _add_decoder_options(dump)
    dump.add_argument(
        "--log",
        metavar="FILE",
        help="also record frames to FILE; its suffix picks the python-can log format "
        "(.asc, .blf, .log, ...)",
    )
    dump.add_argument("--count", type=int, metavar="N", help="stop after N frames")
    dump.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    dump.set_defaults(func=run_dump)
