"""``bessgw device read NAME``: read every point of a configured Modbus device once or repeatedly.

The command reads the device the way the gateway does: the profile named in
the site configuration, polled by :class:`~drivers.modbus.device.ModbusDevice`
over a :class:`~drivers.modbus.link.ModbusLink` on the device's transport. A
block the device rejects marks its points COMM_ERROR (and logs a warning on
stderr) while the other blocks are still read, so one bad address in a
profile shows up as one bad block.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from drivers.modbus.device import DeviceState, ModbusDevice
from drivers.modbus.errors import ModbusError
from drivers.modbus.link import ModbusLink
from drivers.modbus.profile import Profile, ProfileError, load_profile
from drivers.quality import Quality, Reading
from gateway.cli import EXIT_IO, EXIT_OK, EXIT_USAGE, CliError
from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, Device, load_config
from gateway.logs import configure_logging


def register(subparsers: argparse._SubParsersAction) -> None:
    device = subparsers.add_parser("device", help="read the points of a configured device")
    actions = device.add_subparsers(dest="action", metavar="ACTION", required=True)
    read = actions.add_parser(
        "read",
        help="print every point of device NAME, decoded, with unit and quality",
    )
    read.add_argument("name", metavar="NAME", help="device name from the site configuration")
    read.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG_PATH),
        metavar="FILE",
        help=f"site configuration (default {DEFAULT_CONFIG_PATH})",
    )
    read.add_argument(
        "--json", action="store_true", help="print one JSON object per read instead of a table"
    )
    read.add_argument(
        "--watch", type=float, metavar="SECONDS", help="read again every SECONDS until interrupted"
    )
    read.add_argument(
        "--reads",
        type=int,
        metavar="N",
        help="stop after N reads (default 1, or no limit with --watch)",
    )
    read.set_defaults(func=run_read)


def find_device(config_path: str, name: str) -> tuple[Device, Profile]:
    """Return the configured Modbus device ``name`` and its loaded profile."""
    try:
        config = load_config(config_path, missing_hint="pass the site file with --config FILE")
    except ConfigError as err:
        raise CliError(
            f"{err}\nfix the configuration, then check it with: bessgw config check {config_path}",
            EXIT_USAGE,
        ) from err
    devices = {device.name: device for device in config.devices}
    if name not in devices:
        known = ", ".join(sorted(devices)) or "none"
        raise CliError(
            f"no device {name!r} in {config_path}: configured devices are {known}", EXIT_USAGE
        )
    device = devices[name]
    if device.transport.kind not in ("tcp", "rtu"):
        raise CliError(
            f"device {name!r} is on {device.transport.kind}, not Modbus; "
            "read CAN devices with the CAN commands",
            EXIT_USAGE,
        )
    try:
        profile = load_profile(device.profile)
    except ProfileError as err:
        raise CliError(f"device {name!r}: {err}", EXIT_USAGE) from err
    return device, profile


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def format_table(profile: Profile, readings: dict[str, Reading]) -> str:
    rows = [("point", "value", "unit", "quality", "address")]
    for point in sorted(profile.points, key=lambda p: (p.function, p.address)):
        reading = readings[point.name]
        rows.append(
            (
                point.name,
                format_value(reading.value),
                point.unit,
                reading.quality.name.lower(),
                f"{point.function} {point.address}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = []
    for row in rows:
        cells = [
            row[0].ljust(widths[0]),
            row[1].rjust(widths[1]),
            row[2].ljust(widths[2]),
            row[3].ljust(widths[3]),
            row[4],
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_json(name: str, readings: dict[str, Reading], errors: list[str]) -> str:
    points = {
        point_name: {"value": r.value, "unit": r.unit, "quality": r.quality.name.lower()}
        for point_name, r in readings.items()
    }
    return json.dumps({"device": name, "points": points, "errors": errors})


def run_read(args: argparse.Namespace) -> int:
    configure_logging("warning", "console", stream=sys.stderr)
    if args.watch is not None and args.watch <= 0:
        raise CliError(f"invalid --watch {args.watch}: expected seconds > 0", EXIT_USAGE)
    if args.reads is not None and args.reads < 1:
        raise CliError(f"invalid --reads {args.reads}: expected 1 or more", EXIT_USAGE)
    # Without --reads: one read, or no limit with --watch.
    reads = args.reads
    if reads is None and not args.watch:
        reads = 1
    device_config, profile = find_device(args.config, args.name)
    timeout_s = device_config.timeout_ms / 1000

    async def session() -> bool:
        # With --watch the link reconnects between reads, as in the daemon.
        link = ModbusLink.from_transport(
            device_config.transport, timeout_s=timeout_s, one_shot=args.watch is None
        )
        # A rejected block is tried again on the next read, not after the daemon's minute.
        device = ModbusDevice(
            device_config.name,
            profile,
            link,
            device_config.unit_id,
            poll_period_s=args.watch or 1.0,
            timeout_s=timeout_s,
            rejected_block_retry_s=0.0,
        )
        await link.start()
        all_good = True
        try:
            try:
                await link.wait_connected(max(3.0, timeout_s))
            except ModbusError as err:
                raise CliError(f"device {device.name!r}: {err}", EXIT_IO) from err
            done = 0
            while reads is None or done < reads:
                started = time.monotonic()
                readings = await device.poll_once()
                errors = [str(device.last_error)] if device.state is not DeviceState.ONLINE else []
                failed = any(r.quality is Quality.COMM_ERROR for r in readings.values())
                all_good = all_good and not failed
                if args.json:
                    print(format_json(device.name, readings, errors), flush=True)
                else:
                    print(f"{device.name} ({profile.name}, unit {device.unit_id}, {link.name})")
                    print(format_table(profile, readings))
                    for error in errors:
                        print(f"error: {error}")
                    print(flush=True)
                done += 1
                if args.watch and (reads is None or done < reads):
                    await asyncio.sleep(max(0.0, args.watch - (time.monotonic() - started)))
        finally:
            await link.close()
        return all_good

    return EXIT_OK if asyncio.run(session()) else EXIT_IO
