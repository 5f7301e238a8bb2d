"""Forecast skill at 1 hour against persistence on the bundled data.

Run: ``.venv/bin/python bench/bench_forecast.py [--json]``

It forecasts the site load with and without the scheduler's job hints, and
the wind farm's output. For each it prints the mean absolute error of the
model's median and of persistence (the last value) on the same targets,
their ratio, the skill (1 - ratio), and the share of actuals inside the
0.1-0.9 quantile band. Then it scores other wind models on the same plant
(fitted on 2014, scored on 2015; see ``hil.forecast_skill.wind_alternatives``).
Load: 28 simulated days of a 128-node cluster plus facility baseline, at 1-min
steps, the first 7 days left out as warm-up. Wind: the La Haute Borne plant's
10-minute output, 2014 as warm-up and 2015 scored. Takes about half a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import structlog

from hil.forecast_skill import load_skill, wind_alternatives, wind_skill

COMMAND = ".venv/bin/python bench/bench_forecast.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    results = {}
    started = time.perf_counter()
    results["load_with_hints"] = load_skill(days=28.0, warmup_days=7.0, use_hints=True)
    results["load_without_hints"] = load_skill(days=28.0, warmup_days=7.0, use_hints=False)
    results["wind"] = wind_skill()
    alternatives = wind_alternatives()
    elapsed_s = time.perf_counter() - started

    if args.json:
        print(
            json.dumps(
                {
                    "command": COMMAND,
                    "elapsed_s": elapsed_s,
                    **results,
                    "wind_alternatives": alternatives,
                },
                indent=2,
            )
        )
        return 0
    print(f"command: {COMMAND}")
    print(f"{'signal':<20} {'MAE model kW':>13} {'MAE persist kW':>15} {'ratio':>6} "
          f"{'skill':>6} {'in 10-90 band':>14}")
    for name, result in results.items():
        print(
            f"{name:<20} {result['mae_model_kw']:>13.1f} {result['mae_persistence_kw']:>15.1f} "
            f"{result['ratio']:>6.3f} {result['skill']:>6.1%} {result['inside_band']:>14.1%}"
        )
    print("other wind models, fitted on 2014, scored on 2015:")
    for name, result in alternatives.items():
        print(
            f"  {name:<20} {result['mae_model_kw']:>11.1f} {result['mae_persistence_kw']:>15.1f} "
            f"{result['ratio']:>6.3f} {result['skill']:>6.1%}"
        )
    print(f"elapsed {elapsed_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
