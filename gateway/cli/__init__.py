"""The ``bessgw`` command: one sub-command module per area, registered here.

Exit codes are the same for every sub-command: 0 success, 1 device or I/O
error, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway import __version__

EXIT_OK = 0
EXIT_IO = 1
EXIT_USAGE = 2

#: Sub-command modules under ``gateway.cli``; each defines ``register(subparsers)``.
#: ``register`` adds its parsers and sets ``func(args) -> int`` on each.
COMMAND_MODULES = (
    "config_cmd",
    "modbus_cmd",
    "device_cmd",
    "can_cmd",
    "pcs_cmd",
    "bench_cmd",
    "hil_cmd",
    "run_cmd",
    "plan_cmd",
)


class CliError(Exception):
    """A failure to report to the user with an exit code and no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_IO) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bessgw",
        description="Battery gateway for GPU datacenters: daemon, commissioning and test tools.",
    )
    parser.add_argument("--version", action="version", version=f"bessgw {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"gateway.cli.{name}")
        except ModuleNotFoundError as err:
            # NOTE: a command area that is not built yet is left out of the
            # parser; any other missing module is a real error and raises.
            if err.name == f"gateway.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as err:
        print(f"bessgw {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
