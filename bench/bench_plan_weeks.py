"""Capture ratio of the peak-cap planner on nordic-week and on other weeks of the same site.

Run: ``.venv/bin/python bench/bench_plan_weeks.py [--step-s 60] [--set NAME=VALUE] [--json]``

One week scores a planner poorly: its peak falls in one spell, and a rule
tuned to that spell may fail the next. This script replays
``hil/scenarios/nordic-week.toml`` and six variants of it that differ only
in the job stream's seed and the wind week (the ``WEEKS`` table below), and
prints each week's capture ratio and their mean. ``--set`` overrides a
:class:`gateway.plan.planner.PlannerConfig` field for every week (for
example ``--set need_quantile=0.6``), so a planner change can be measured
on all seven weeks.

``--oracle`` is a diagnostic that breaks the planner's rule of knowing only
the past: its outlook becomes the true net load of the next day, as one
scenario. What the planner then still misses is lost in the planning
machinery (the fast loop, interval means, recharge rules), not to a lack of
information.

At ``--step-s 60`` the plant and the coarse fast loop step once a minute,
like the planner, and a week takes about 25 s on the shared 2-core machine.
The figures then differ from those at the scenario's 1-s step by a few
hundredths of capture ratio. Two weeks run at a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import sys
import time

import structlog

COMMAND = ".venv/bin/python bench/bench_plan_weeks.py"

#: (job stream seed, first day of the week, UTC). The first row is nordic-week itself; the
#: others are Mondays from the two years of the wind record, each with its own job stream.
WEEKS = (
    (11, "2015-02-02"),
    (3, "2015-01-12"),
    (5, "2015-03-02"),
    (7, "2015-11-09"),
    (13, "2015-12-07"),
    (17, "2014-12-08"),
    (19, "2015-10-05"),
)


def _parse_override(text: str) -> tuple[str, object]:
    name, separator, raw = text.partition("=")
    fields = {field.name for field in dataclasses.fields(_planner_config_type())}
    if not separator or name not in fields:
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: give NAME=VALUE with NAME a PlannerConfig field "
            f"({', '.join(sorted(fields))})"
        )
    if raw.lower() in ("true", "false"):
        return name, raw.lower() == "true"
    try:
        return name, float(raw)
    except ValueError:
        message = f"--set {text!r}: {raw!r} is not a number, true or false"
        raise argparse.ArgumentTypeError(message) from None


def _planner_config_type() -> type:
    from gateway.plan.planner import PlannerConfig  # noqa: PLC0415 - keeps --help fast

    return PlannerConfig


def replay_week(seed: int, monday: str, step_s: float, overrides: dict, oracle: bool) -> dict:
    """Replay nordic-week with the job stream ``seed`` and the wind week from ``monday``."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    import hil.plan_replay as replay  # noqa: PLC0415 - imported in the worker process
    from hil.scenario import load_scenario  # noqa: PLC0415

    scenario = load_scenario("nordic-week")
    run = scenario.run.model_copy(update={"seed": seed, "start_utc": f"{monday}T00:00:00Z"})
    planner = scenario.planner.model_copy(update={"step_s": step_s})
    scenario = scenario.model_copy(update={"run": run, "planner": planner})
    config = dataclasses.replace(replay.planner_config(scenario), **overrides)
    if oracle:
        _give_outlook_the_future(scenario, config)
    result = replay.run_plan_replay(scenario, config=config)
    result.pop("series")
    return {"seed": seed, "week": monday, **result}


def _give_outlook_the_future(scenario, config) -> None:
    """Replace the planner's outlook, in this process, by the true net load of the next day."""
    import numpy as np  # noqa: PLC0415

    import gateway.plan.planner as planner_module  # noqa: PLC0415
    from gateway.plan.outlook import build_outlook  # noqa: PLC0415
    from hil.plan_replay import build_site  # noqa: PLC0415

    site = build_site(scenario, scenario.run.duration_s)
    net_kw = site.load_kw - site.wind_kw
    per_interval = round(config.interval_s / site.step_s)
    intervals = round(config.outlook_s / config.interval_s)

    def future(config, state, inputs):
        outlook = build_outlook(config, state, inputs)
        first = round((inputs.now_utc - site.first_utc) / site.step_s)
        ahead = net_kw[first : first + intervals * per_interval]
        ahead = np.pad(ahead, (0, intervals * per_interval - ahead.size), mode="edge")
        means = ahead.reshape(intervals, per_interval).mean(axis=1)
        return dataclasses.replace(outlook, scenarios_kw=means[None, :])

    planner_module.build_outlook = future


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--step-s", type=float, default=60.0, help="plant and fast-loop step in s (default 60)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=_parse_override,
        metavar="NAME=VALUE",
        help="override a PlannerConfig field for every week; repeat for more",
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="diagnostic: give the planner the true net load of the next day as its outlook",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    overrides = dict(args.overrides)

    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        futures = [
            pool.submit(replay_week, seed, monday, args.step_s, overrides, args.oracle)
            for seed, monday in WEEKS
        ]
        weeks = [future.result() for future in futures]
    elapsed_s = time.perf_counter() - started
    mean = sum(week["capture_ratio"] for week in weeks) / len(weeks)

    if args.json:
        summary = {
            "command": COMMAND,
            "step_s": args.step_s,
            "overrides": overrides,
            "oracle": args.oracle,
        }
        print(json.dumps({**summary, "mean_capture_ratio": mean, "weeks": weeks}, indent=2))
        return 0
    oracle = ", oracle outlook (knows the next day)" if args.oracle else ""
    print(f"command: {COMMAND}, step {args.step_s:g} s, overrides {overrides or 'none'}{oracle}")
    print(f"{'seed':>4} {'week':<11} {'no battery':>10} {'bessgw':>8} {'optimum':>8} "
          f"{'capture':>8} {'cycles':>7}")
    for week in weeks:
        print(
            f"{week['seed']:>4} {week['week']:<11} {week['peak_kw_without_battery']:>10.1f} "
            f"{week['peak_kw_with_bessgw']:>8.1f} {week['peak_kw_optimum']:>8.1f} "
            f"{week['capture_ratio']:>8.3f} {week['equivalent_full_cycles']:>7.2f}"
        )
    print(f"mean capture ratio {mean:.3f}, elapsed {elapsed_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
