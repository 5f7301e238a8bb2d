"""Time of one supervisory planner period in the daemon, with a week of history.

Run: ``.venv/bin/python bench/bench_planner.py [--periods 240] [--json]``

The site is ``systemd/bessgw.example.toml`` with the planner enabled (a
2000 kWh battery, a 500 kW PCS, a wind meter), at the service period of one
minute. Eight days of synthetic minute means warm it up: a load of 1200 kW
with a daily swing of 300 kW and noise, and wind that varies over hours.
The load and wind forecasters record them (fitting after a day, refitting
daily), and the planner's history is seeded with the first seven days'
15-minute means. Then the script times ``--periods`` planner periods as the
daemon's planner thread runs them (forecasts, then ``plan_step``), and one
refit of each forecaster on eight days. These are the times the planner
thread takes once a minute, not time on the event loop.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from pathlib import Path

import numpy as np
import structlog

from gateway.config import load_config, validate_config
from gateway.plan.planner import seed_history
from gateway.planning import PeriodMeans, SupervisoryPlanner

COMMAND = ".venv/bin/python bench/bench_planner.py"
EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "bessgw.example.toml"
PERIOD_S = 60.0
WARM_DAYS = 8


def _site_minutes(count: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Return synthetic load and wind minute means in kW."""
    rng = np.random.default_rng(seed)
    t_s = np.arange(count) * PERIOD_S
    load = 1200.0 + 300.0 * np.sin(2 * np.pi * t_s / 86400.0) + rng.normal(0.0, 40.0, count)
    wind = 1500.0 * (0.5 + 0.5 * np.sin(2 * np.pi * t_s / (5 * 3600.0)))
    wind = np.clip(wind + rng.normal(0.0, 100.0, count), 0.0, 3000.0)
    return load, wind


def _planner(pool: concurrent.futures.Executor) -> SupervisoryPlanner:
    data = load_config(EXAMPLE).model_dump()
    data["planner"]["enabled"] = True
    return SupervisoryPlanner(validate_config(data), pool, 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", type=int, default=240, help="planner periods to time")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    warm = WARM_DAYS * 1440
    load, wind = _site_minutes(warm + args.periods)
    start_utc = 1_796_000_000.0 // 86400.0 * 86400.0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        planner = _planner(pool)
        for i in range(warm):
            t = start_utc + (i + 1) * PERIOD_S
            planner.load_forecaster.record(t, float(load[i]))
            planner.renewable_forecaster.record(t, float(wind[i]))
        per_interval = round(planner.config.interval_s / PERIOD_S)
        days = (WARM_DAYS - 1) * 1440
        net_means = (load[:days] - wind[:days]).reshape(-1, per_interval).mean(axis=1)
        wind_means = wind[:days].reshape(-1, per_interval).mean(axis=1)
        end_utc = start_utc + warm * PERIOD_S
        planner.state = seed_history(
            planner.config,
            planner.state,
            net_means,
            wind_means,
            last_index=int(end_utc // planner.config.interval_s) - 1,
        )

        step_s = []
        for i in range(warm, warm + args.periods):
            now = start_utc + (i + 1) * PERIOD_S
            means = PeriodMeans(
                grid_kw=float(load[i] - wind[i]),
                net_load_kw=float(load[i] - wind[i]),
                battery_kw=0.0,
                renewable_kw=float(wind[i]),
                soc_pct=60.0,
                period_s=PERIOD_S,
            )
            started = time.perf_counter()
            _plan, planner.state = planner._step(now, means, (), {})
            step_s.append(time.perf_counter() - started)

        started = time.perf_counter()
        planner.load_forecaster.fit()
        load_fit_s = time.perf_counter() - started
        started = time.perf_counter()
        planner.renewable_forecaster.fit()
        wind_fit_s = time.perf_counter() - started

    steps_ms = np.asarray(step_s) * 1000.0
    result = {
        "command": COMMAND,
        "periods": args.periods,
        "history_intervals": len(planner.state.history_net_kw),
        "step_ms_median": float(np.median(steps_ms)),
        "step_ms_p99": float(np.percentile(steps_ms, 99)),
        "step_ms_max": float(steps_ms.max()),
        "load_refit_ms": load_fit_s * 1000.0,
        "wind_refit_ms": wind_fit_s * 1000.0,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"command: {COMMAND} --periods {args.periods}")
    print(f"history: {result['history_intervals']} intervals of 15 min")
    print(
        f"planner period: median {result['step_ms_median']:.1f} ms, "
        f"p99 {result['step_ms_p99']:.1f} ms, max {result['step_ms_max']:.1f} ms"
    )
    print(
        f"refit on {WARM_DAYS} days: load {result['load_refit_ms']:.0f} ms, "
        f"wind {result['wind_refit_ms']:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
