"""``bessgw plan optimum|replay SCENARIO``: score the planner against the perfect-foresight optimum.

Both commands take a built-in scenario name (``nordic-week``) or a path to
a scenario TOML file, and run on this machine only: no daemon, no sockets.
"""

from __future__ import annotations

import argparse
import json
import sys

import structlog

from gateway.cli import EXIT_IO, EXIT_OK, EXIT_USAGE, CliError

#: Keys of ``plan replay --json`` that other tools may rely on.
REPLAY_KEYS = (
    "capture_ratio",
    "peak_kw_without_battery",
    "peak_kw_with_bessgw",
    "peak_kw_optimum",
    "renewable_self_consumption_before",
    "renewable_self_consumption_after",
    "equivalent_full_cycles",
    "cap_breaks",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser(
        "plan", help="score the peak-cap planner on a scenario against the optimum"
    )
    actions = plan.add_subparsers(dest="action", metavar="ACTION", required=True)

    optimum = actions.add_parser(
        "optimum",
        help="print the lowest 15-minute peak the scenario's battery could reach "
        "with perfect foresight",
    )
    _common(optimum)
    optimum.set_defaults(func=run_optimum)

    replay = actions.add_parser(
        "replay",
        help="replay the scenario through the forecasts, the planner and a 1-s fast loop; "
        "exit 0 when its criteria pass, 1 when one fails",
    )
    _common(replay)
    replay.set_defaults(func=run_replay)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", metavar="SCENARIO", help="built-in scenario name or TOML path")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--duration-s",
        type=float,
        default=None,
        metavar="S",
        help="replay only the first S seconds of the run (default: the scenario's duration)",
    )


def _load(args: argparse.Namespace):
    from hil.scenario import ScenarioError, load_scenario  # noqa: PLC0415 - hil is optional

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as err:
        raise CliError("\n  ".join([str(err.source), *err.problems]), EXIT_USAGE) from err
    duration = scenario.run.duration_s if args.duration_s is None else args.duration_s
    if not 0 < duration <= scenario.run.duration_s:
        raise CliError(
            f"--duration-s {args.duration_s} must be > 0 and at most the scenario's "
            f"duration_s ({scenario.run.duration_s:g})",
            EXIT_USAGE,
        )
    return scenario, duration


def _quiet_logs() -> None:
    """Keep the planner's per-change info lines out of a report meant for reading."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))


def run_optimum(args: argparse.Namespace) -> int:
    from hil.plan_replay import ReplayError, optimum_for  # noqa: PLC0415

    scenario, duration = _load(args)
    if not args.json:
        _quiet_logs()
    try:
        result = optimum_for(scenario, duration)
    except ReplayError as err:
        raise CliError(str(err), EXIT_USAGE) from err
    except OSError as err:
        raise CliError(f"cannot read the scenario's data: {err}", EXIT_IO) from err
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    battery = result["battery"]
    print(
        f"scenario {scenario.run.name}: {result['duration_s'] / 86400:.2f} days, "
        f"{result['interval_s'] / 60:g}-min demand intervals"
    )
    print(
        f"battery {battery['energy_kwh']:g} kWh, {battery['discharge_kw']:g} kW, "
        f"SoC band {battery['soc_min_pct']:g}-{battery['soc_max_pct']:g} %, "
        f"start {result['soc_initial_pct']:g} %"
    )
    print(f"peak without battery  {result['peak_kw_without_battery']:10.1f} kW")
    print(f"optimum               {result['peak_kw_optimum']:10.1f} kW")
    print(f"reduction             {result['reduction_kw']:10.1f} kW")
    return EXIT_OK


def run_replay(args: argparse.Namespace) -> int:
    from hil.plan_replay import ReplayError, judge, run_plan_replay  # noqa: PLC0415

    scenario, duration = _load(args)
    _quiet_logs()
    try:
        result = run_plan_replay(scenario, duration)
    except ReplayError as err:
        raise CliError(str(err), EXIT_USAGE) from err
    except OSError as err:
        raise CliError(f"cannot read the scenario's data: {err}", EXIT_IO) from err
    result.pop("series")
    verdicts = judge(scenario, result)
    result["criteria"] = verdicts
    result["verdict"] = "pass" if all(v["passed"] for v in verdicts) else "fail"
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_replay(result)
    return EXIT_OK if result["verdict"] == "pass" else EXIT_IO


def _print_replay(result: dict) -> None:
    print(
        f"scenario {result['scenario']}: {result['duration_s'] / 86400:.2f} days at "
        f"{result['step_s']:g} s steps, replayed in {result['wall_s']:.0f} s"
    )
    print(f"{'':34}{'no battery':>12}{'bessgw':>12}{'optimum':>12}")
    print(
        f"{'15-min peak, kW':34}{result['peak_kw_without_battery']:12.1f}"
        f"{result['peak_kw_with_bessgw']:12.1f}{result['peak_kw_optimum']:12.1f}"
    )
    print(
        f"{'renewable self-consumption':34}{result['renewable_self_consumption_before']:12.1%}"
        f"{result['renewable_self_consumption_after']:12.1%}"
    )
    print(
        f"{'intervals without ride-through':34}{result['intervals']:12d}"
        f"{result['ride_through_short_intervals']:12d}"
    )
    print(
        f"capture ratio {result['capture_ratio']:.3f}, "
        f"equivalent full cycles {result['equivalent_full_cycles']:.2f}, "
        f"cap breaks {result['cap_breaks']} of {result['intervals']} intervals"
    )
    for verdict in result["criteria"]:
        mark = "pass" if verdict["passed"] else "FAIL"
        print(f"  {mark}  {verdict['name']}: {verdict['value']:.3f} (limit {verdict['limit']:g})")
    print(f"verdict: {result['verdict']}")
    sys.stdout.flush()
