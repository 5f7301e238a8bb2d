"""``bessgw bench loop``: wake lateness and compute time of the C loop, Python loop and cyclictest.

The three run one after the other in this process, each for ``--seconds``
at ``--rate``. The Python loop runs the numpy law with the same
SCHED_FIFO priority and CPU as the C thread, so the ratio compares the
implementations and not their priorities.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from gateway.cli import EXIT_OK, EXIT_USAGE, CliError
from gateway.control import bench
from gateway.control.layout import MAX_UNITS
from gateway.control.loop import FastLoop, LoopUnavailableError, PythonLoop

_COLUMNS = ("p50_us", "p99_us", "p999_us", "max_us", "missed")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure the timing of the fast control loop")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    loop = actions.add_parser(
        "loop",
        help="run the C loop, the Python loop and cyclictest in turn and print their wake lateness",
    )
    loop.add_argument(
        "--seconds", type=float, default=10.0, help="run time of each loop in s (default 10)"
    )
    loop.add_argument(
        "--rate", type=int, default=1000, help="tick rate in Hz, 100 to 2000 (default 1000)"
    )
    loop.add_argument(
        "--units", type=int, default=16, help=f"PCS units, 1 to {MAX_UNITS} (default 16)"
    )
    loop.add_argument(
        "--priority",
        type=int,
        default=80,
        help="SCHED_FIFO priority for every loop, 0 for the normal scheduler (default 80)",
    )
    loop.add_argument(
        "--cpu", type=int, default=None, help="pin every loop to this CPU (default: no pinning)"
    )
    loop.add_argument(
        "--spin-us",
        type=int,
        default=100,
        help="the loops sleep until this long before each deadline, then spin (default 100)",
    )
    loop.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    loop.set_defaults(func=run_loop_bench)


class _BenchSettings:
    """The ``control`` section the loops read their real-time settings from."""

    def __init__(self, priority: int, cpu: int | None, spin_us: int) -> None:
        self.rt_priority = priority
        self.cpu = cpu
        self.lock_memory = True
        self.spin_us = spin_us
        self.allow_python_fallback = True


class _BenchConfig:
    def __init__(self, priority: int, cpu: int | None, spin_us: int) -> None:
        self.control = _BenchSettings(priority, cpu, spin_us)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.seconds <= 3600:
        raise CliError(
            f"--seconds is {args.seconds:g}; give a duration from above 0 to 3600 s", EXIT_USAGE
        )
    if not 100 <= args.rate <= 2000:
        raise CliError(f"--rate is {args.rate}; give a rate from 100 to 2000 Hz", EXIT_USAGE)
    if not 1 <= args.units <= MAX_UNITS:
        raise CliError(f"--units is {args.units}; give 1 to {MAX_UNITS} units", EXIT_USAGE)
    if not 0 <= args.priority <= 99:
        raise CliError(f"--priority is {args.priority}; give 0 to 99", EXIT_USAGE)
    period_us = 1e6 / args.rate
    if not 0 <= args.spin_us < period_us:
        raise CliError(
            f"--spin-us is {args.spin_us}; give 0 to below the period ({period_us:g} us)",
            EXIT_USAGE,
        )
    if args.cpu is not None and args.cpu < 0:
        raise CliError(f"--cpu is {args.cpu}; give a CPU number from 0", EXIT_USAGE)


def _ratio(slow: float, fast: float) -> float | None:
    return round(slow / fast, 1) if fast > 0 else None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three benchmarks and return the JSON-ready result."""
    params = bench.bench_params(args.units, float(args.rate))
    config = _BenchConfig(args.priority, args.cpu, args.spin_us)
    try:
        c_loop = FastLoop(config, params=params, ring_capacity=1 << 14)
    except LoopUnavailableError as err:
        raise CliError(str(err)) from err
    c_stats = bench.run_loop(c_loop, args.seconds)
    python_stats = bench.run_loop(PythonLoop(config, params=params), args.seconds)
    try:
        cyclic = bench.run_cyclictest(args.seconds, float(args.rate), args.priority, args.cpu)
    except (RuntimeError, ValueError) as err:
        raise CliError(f"cyclictest: {err}") from err
    return {
        "c": c_stats.to_dict(),
        "python": python_stats.to_dict(),
        "cyclictest": cyclic.to_dict() if cyclic is not None else None,
        "compute_us_per_tick": c_stats.compute_mean_us,
        "units": args.units,
        "rate_hz": args.rate,
        "seconds": args.seconds,
        "spin_us": args.spin_us,
        "ratios_python_to_c": {
            "p99": _ratio(python_stats.p99_us, c_stats.p99_us),
            "p999": _ratio(python_stats.p999_us, c_stats.p999_us),
            "compute_mean": _ratio(
                python_stats.compute_mean_us or 0.0, c_stats.compute_mean_us or 0.0
            ),
        },
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"fast loop at {result['rate_hz']} Hz, {result['units']} units, "
        f"{result['seconds']:g} s per loop, spin {result['spin_us']} us",
        f"{'loop':<11}" + "".join(f"{name:>12}" for name in (*_COLUMNS, "ticks", "compute_us")),
    ]
    for name in ("c", "python", "cyclictest"):
        stats = result[name]
        if stats is None:
            lines.append(f"{name:<11}not installed (Debian package rt-tests)")
            continue
        compute = stats["compute_mean_us"]
        row = "".join(f"{stats[key]:>12g}" for key in (*_COLUMNS, "ticks"))
        lines.append(f"{name:<11}{row}{(f'{compute:g}' if compute is not None else '-'):>12}")
    ratios = result["ratios_python_to_c"]
    lines.append(
        f"python / c: p99 {ratios['p99']}x, p99.9 {ratios['p999']}x, "
        f"compute {ratios['compute_mean']}x"
    )
    granted = result["c"]["granted"]
    lines.append(
        f"c loop granted: sched_fifo={granted['sched_fifo']} priority={granted['priority']} "
        f"cpu={granted['cpu']} mlockall={granted['mlockall']}; "
        f"ring overflows {result['c']['overflows']}"
    )
    return "\n".join(lines)


def run_loop_bench(args: argparse.Namespace) -> int:
    _check_args(args)
    # Log events of the loops go to stderr so that stdout holds only the result.
    with contextlib.redirect_stdout(sys.stderr):
        result = measure(args)
    print(json.dumps(result) if args.json else format_table(result))
    return EXIT_OK
