"""``bessgw config check FILE``: validate a site configuration and summarise it.

The check loads every device profile as ``bessgw run`` does, so a file that
passes here does not fail when the daemon starts.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from gateway.cli import EXIT_OK, EXIT_USAGE
from gateway.config import ConfigError, SiteConfig
from gateway.site_check import load_site_config


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="check a site configuration file")
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="print every error in FILE and exit 2, or a summary of the site and exit 0",
    )
    check.add_argument("file", metavar="FILE", help="site configuration (TOML)")
    check.set_defaults(func=run_check)


def summarise(config: SiteConfig) -> str:
    roles = Counter(device.role for device in config.devices)
    lines = [
        f"site {config.site.name}: grid connection {config.site.grid_connection_kw:g} kW",
        "devices: " + ", ".join(f"{count} {role}" for role, count in sorted(roles.items())),
    ]
    for device in config.devices:
        transport = device.transport
        if transport.kind == "tcp":
            where = f"tcp {transport.host}:{transport.port} unit {device.unit_id}"
        elif transport.kind == "rtu":
            where = (
                f"rtu {transport.device} {transport.baud} {transport.parity}"
                f"{transport.stop_bits} unit {device.unit_id}"
            )
        else:
            where = f"can {transport.interface} {transport.channel} {transport.bitrate} bit/s"
        lines.append(
            f"  {device.name:<16} {device.role:<16} {device.profile:<18} {where}, "
            f"poll {device.poll_period_ms} ms"
        )
    control = config.control
    lines.append(
        f"control: {control.rate_hz} Hz, cap {control.grid_cap_kw:g} kW, floor "
        f"{control.grid_floor_kw:g} kW, ramp {control.ramp_limit_kw_per_s:g} kW/s, SoC soft band "
        f"{control.soc_soft_min_pct:g}-{control.soc_soft_max_pct:g} %"
    )
    return "\n".join(lines)


def run_check(args: argparse.Namespace) -> int:
    try:
        config = load_site_config(args.file, missing_hint="check the FILE argument")
    except ConfigError as err:
        print(f"{err.path}: {len(err.problems)} error(s)", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(summarise(config))
    return EXIT_OK
