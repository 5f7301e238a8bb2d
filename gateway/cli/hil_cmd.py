"""``bessgw hil``: run a HIL scenario against the real daemon, or serve one simulated device.

``bessgw hil run SCENARIO`` starts the simulators on 127.0.0.1 and the
daemon with a generated configuration, runs the scenario in real time and
writes report.json, junit.xml and report.png. It exits 0 only when every
criterion passes, 1 when one fails or the run breaks, 2 for a bad scenario.
``bessgw hil serve pcs|meter|bms`` serves one device until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.cli import EXIT_IO, EXIT_OK, EXIT_USAGE, CliError
from gateway.logs import configure_logging

BAR_WIDTH = 30


def register(subparsers: argparse._SubParsersAction) -> None:
    hil = subparsers.add_parser(
        "hil", help="hardware-in-the-loop rig: run scenarios, serve devices"
    )
    actions = hil.add_subparsers(dest="action", metavar="ACTION", required=True)

    run = actions.add_parser(
        "run",
        help="run a scenario against the real daemon in real time and write the reports",
    )
    run.add_argument("scenario", metavar="SCENARIO", help="built-in scenario name or TOML path")
    run.add_argument("--out", metavar="DIR", help="output folder (default out/hil/SCENARIO)")
    run.add_argument("--json", action="store_true", help="print report.json instead of the table")
    run.add_argument(
        "--duration", type=float, metavar="S", help="run only the first S seconds of the scenario"
    )
    run.add_argument(
        "--sil",
        action="store_true",
        help="replay through the control law and plant model only: no sockets, no daemon",
    )
    run.add_argument(
        "--no-compare",
        action="store_true",
        help="skip the SIL replay that a fault-free HIL run is compared with",
    )
    run.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="warning"
    )
    run.set_defaults(func=run_scenario)

    serve = actions.add_parser(
        "serve", help="serve one simulated device on 127.0.0.1 until Ctrl-C (for mbpoll)"
    )
    serve.add_argument("kind", choices=("pcs", "meter", "bms"), help="device to simulate")
    serve.add_argument(
        "--profile",
        metavar="P",
        help="Modbus profile name or path (default pcs-sunspec for pcs, meter-3ph for meter)",
    )
    serve.add_argument("--port", type=int, default=0, metavar="N", help="TCP port (0 = any free)")
    serve.add_argument("--unit-id", type=int, default=1, metavar="N", help="Modbus unit id")
    serve.add_argument(
        "--scenario",
        default="ai-training-wind",
        metavar="S",
        help="scenario whose sizes and traces the device takes (default ai-training-wind)",
    )
    serve.add_argument(
        "--profile-out",
        metavar="FILE",
        help="bms only: write the BMS profile that fits the simulated pack here "
        "(default: a new folder under /tmp); the banner names it",
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    serve.set_defaults(func=run_serve)

    listing = actions.add_parser("list", help="list the built-in scenarios")
    listing.set_defaults(func=run_list)


def _load(name: str) -> Any:
    from hil.scenario import ScenarioError, load_scenario  # noqa: PLC0415 - heavy imports

    try:
        return load_scenario(name)
    except ScenarioError as err:
        raise CliError(str(err), EXIT_USAGE) from err


# -- run -------------------------------------------------------------------------


class _ProgressBar:
    """A one-line bar on stderr in a terminal, else one line per phase and per 10 % of the run."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last: tuple[int, str] | None = None

    def __call__(self, progress: Any) -> None:
        fraction = min(max(progress.run_s / progress.duration_s, 0.0), 1.0)
        state = progress.gateway_state or "-"
        text = (
            f"{progress.phase:<10} {progress.run_s:7.1f}/{progress.duration_s:g} s  gateway "
            f"{state:<10} grid {progress.grid_kw:7.1f} kW  battery {progress.battery_kw:7.1f} kW"
        )
        if self.tty:
            filled = round(fraction * BAR_WIDTH)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            print(f"\r[{bar}] {text}", end="", file=sys.stderr, flush=True)
            return
        tenth = int(fraction * 10)
        if (tenth, progress.phase) != self._last:
            self._last = (tenth, progress.phase)
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def format_summary(report: dict[str, Any], out_dir: Path) -> str:
    """Render the criteria of a report as a table, then the verdict and the report's paths."""
    rows = [("criterion", "value", "limit", "result")]
    for criterion in report["criteria"]:
        value = criterion["value"]
        limit = criterion["limit"]
        unit = f" {criterion['unit']}" if criterion["unit"] else ""
        rows.append(
            (
                criterion["name"],
                "not measured" if value is None else f"{value:.4g}{unit}",
                "" if limit is None else f"{criterion['comparison']} {limit:g}",
                "pass" if criterion["passed"] else "FAIL",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    faults = report.get("faults") or []
    for fault in faults:
        if fault["reaction"] is None:
            reaction = "none expected"
        elif fault["reaction_ms"] is None:
            reaction = "NONE within the fault"
        else:
            reaction = f"{fault['reaction_ms']:.0f} ms"
        where = f"{fault['kind']} on {fault['device']} at {fault['at_s']:g} s"
        lines.append(f"fault {where}: reaction {reaction}")
    lines.append(f"verdict: {report['verdict'].upper()} ({report.get('mode', '')})")
    lines.append(f"report: {out_dir / 'report.png'} (report.json and junit.xml beside it)")
    return "\n".join(lines)


def run_scenario(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, "console")
    scenario = _load(args.scenario)
    if args.duration is not None and not 0 < args.duration <= scenario.run.duration_s:
        raise CliError(
            f"--duration {args.duration:g} is invalid: give seconds in (0, "
            f"{scenario.run.duration_s:g}], the scenario's length",
            EXIT_USAGE,
        )
    out_dir = Path(args.out) if args.out else Path("out") / "hil" / scenario.run.name
    from hil.rig import HilError, run_hil, run_sil_report  # noqa: PLC0415 - heavy imports

    bar = _ProgressBar()
    try:
        if args.sil:
            result = run_sil_report(scenario, out_dir, duration_s=args.duration)
        else:
            result = run_hil(
                scenario,
                out_dir,
                duration_s=args.duration,
                compare_sil=not args.no_compare,
                progress=None if args.json else bar,
            )
    except ValueError as err:
        raise CliError(f"scenario {scenario.run.name}: {err}", EXIT_USAGE) from err
    except HilError as err:
        raise CliError(str(err), EXIT_IO) from err
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        print(format_summary(result.report, out_dir))
    return EXIT_OK if result.verdict == "pass" else EXIT_IO


# -- serve -----------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, "console")
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port} is invalid: use 0..65535 (0 = any free)", EXIT_USAGE)
    if not 1 <= args.unit_id <= 247:
        raise CliError(
            f"--unit-id {args.unit_id} is invalid: a Modbus unit id is 1..247", EXIT_USAGE
        )
    scenario = _load(args.scenario)
    from drivers.modbus.server import ServerStartError  # noqa: PLC0415 - heavy imports
    from hil.serve import ServeOptions, serve_device  # noqa: PLC0415

    if args.profile_out is not None and args.kind != "bms":
        raise CliError("--profile-out applies to `hil serve bms` only", EXIT_USAGE)
    profile_out = Path(args.profile_out) if args.profile_out is not None else None
    options = ServeOptions(
        args.kind, scenario, args.profile, args.port, args.unit_id, profile_out=profile_out
    )

    def ready(line: str) -> None:
        print(f"{line}; Ctrl-C stops", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve_device(options, ready, stop)

    try:
        asyncio.run(main())
    except (KeyError, ValueError) as err:
        raise CliError(f"cannot serve {args.kind}: {err}", EXIT_USAGE) from err
    except ServerStartError as err:
        raise CliError(f"cannot serve {args.kind}: {err}", EXIT_IO) from err
    except OSError as err:
        fix = ""
        if err.errno == errno.EADDRINUSE:
            fix = "; stop the program that listens there or choose another --port (0 = any free)"
        message = f"cannot serve {args.kind} on port {args.port}: {err}{fix}"
        raise CliError(message, EXIT_IO) from err
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    from hil.scenario import builtin_scenarios, load_scenario  # noqa: PLC0415 - heavy imports

    for name in builtin_scenarios():
        scenario = load_scenario(name)
        print(f"{name:<24} {scenario.run.duration_s:>7g} s  {scenario.run.description}")
    return EXIT_OK
