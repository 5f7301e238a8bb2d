"""Score a run against its criteria; write ``report.json``, ``junit.xml`` and ``report.png``.

The HIL rig and the SIL replay both capture a :class:`Capture` and hand it
here, so the two runs are judged by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hil import metrics, report
from hil.scenario import Scenario

#: Current beyond a BMS limit by less than this is measurement noise, not a breach.
BMS_BREACH_TOLERANCE_A = 1.0
#: A breach must last this long to count; shorter ones are the PCS's own response time.
BMS_BREACH_MIN_S = 0.2


@dataclass
class Capture:
    """Plant signals of one run, sampled every ``dt_s`` from run time 0. Powers in kW."""

    dt_s: float
    load_kw: np.ndarray
    renewable_kw: np.ndarray
    grid_kw: np.ndarray
    battery_kw: np.ndarray
    soc_pct: np.ndarray
    #: Battery DC current (positive = discharge) and the BMS limits in force, in A.
    current_a: np.ndarray
    charge_limit_a: np.ndarray
    discharge_limit_a: np.ndarray
    #: (run time in s, label) of each injected fault and gateway event.
    events: list[tuple[float, str]] = field(default_factory=list)
    #: Fault reaction times measured by the runner, name -> ms (None = never reacted).
    reactions_ms: dict[str, float | None] = field(default_factory=dict)


def compute_metrics(scenario: Scenario, capture: Capture) -> dict[str, Any]:
    c = capture
    dt = c.dt_s
    fs_hz = 1.0 / dt
    rated_kw = scenario.pcs.rated_kw * scenario.pcs.units
    soc_lo = scenario.criteria.soc_min_pct if scenario.criteria.soc_min_pct is not None else 0.0
    soc_hi = scenario.criteria.soc_max_pct if scenario.criteria.soc_max_pct is not None else 100.0
    net_load = c.load_kw - c.renewable_kw
    headroom = metrics.battery_headroom(
        c.battery_kw, c.soc_pct, dt, rated_kw=rated_kw, soc_min_pct=soc_lo, soc_max_pct=soc_hi
    )
    ramp_limit = scenario.control.ramp_limit_kw_per_s
    grid_ramps = metrics.ramp_stats(c.grid_kw, dt, ramp_limit, headroom)
    load_ramps = metrics.ramp_stats(net_load, dt, ramp_limit)
    segment_s = min(60.0, c.grid_kw.size * dt / 2)
    soc = metrics.soc_bounds(c.soc_pct, soc_lo, soc_hi)
    breaches = metrics.bms_limit_breaches(
        c.current_a,
        c.charge_limit_a,
        c.discharge_limit_a,
        dt,
        tolerance_a=BMS_BREACH_TOLERANCE_A,
        min_duration_s=BMS_BREACH_MIN_S,
    )
    return {
        "duration_s": c.grid_kw.size * dt,
        "max_15min_demand_kw": metrics.max_demand_kw(c.grid_kw, dt, 900.0, rolling=True),
        "max_15min_demand_without_battery_kw": metrics.max_demand_kw(
            net_load, dt, 900.0, rolling=True
        ),
        "grid_ramp_max_kw_per_s": grid_ramps.max_kw_per_s,
        "grid_ramp_p99_kw_per_s": grid_ramps.p99_kw_per_s,
        "load_ramp_p99_kw_per_s": load_ramps.p99_kw_per_s,
        "ramp_exceed_fraction": grid_ramps.fraction_above_limit,
        "ramp_exceed_seconds": list(grid_ramps.seconds_above),
        "seconds_with_headroom": int(np.sum(headroom)),
        "band_attenuation_db": metrics.attenuation_db(
            net_load, c.grid_kw, fs_hz, segment_s=segment_s
        ),
        "soc_min_pct": soc.min_pct,
        "soc_max_pct": soc.max_pct,
        "bms_limit_breaches": len(breaches),
        "renewable_self_consumption": metrics.renewable_self_consumption(c.renewable_kw, c.grid_kw),
        "equivalent_full_cycles": metrics.equivalent_full_cycles(
            c.battery_kw, dt, scenario.battery.energy_kwh
        ),
        "fault_reaction_ms": dict(c.reactions_ms),
    }


def judge_criteria(scenario: Scenario, values: dict[str, Any]) -> list[report.CriterionResult]:
    """Compare the measured values with every criterion the scenario sets."""
    crit = scenario.criteria
    results = []
    checks = [
        ("max_15min_demand_kw", crit.max_15min_demand_kw, "<=", "kW"),
        ("grid_ramp_max_kw_per_s", crit.max_grid_ramp_kw_per_s, "<=", "kW/s"),
        ("ramp_exceed_fraction", crit.ramp_exceed_fraction_max, "<=", ""),
        ("band_attenuation_db", crit.min_band_attenuation_db, ">=", "dB"),
        ("soc_min_pct", crit.soc_min_pct, ">=", "%"),
        ("soc_max_pct", crit.soc_max_pct, "<=", "%"),
        ("bms_limit_breaches", crit.max_bms_limit_breaches, "<=", ""),
    ]
    for name, limit, comparison, unit in checks:
        if limit is not None:
            results.append(report.judge(name, values.get(name), limit, comparison, unit))
    if crit.max_fault_reaction_ms is not None:
        for fault, reaction_ms in values["fault_reaction_ms"].items():
            results.append(
                report.judge(
                    f"reaction {fault}", reaction_ms, crit.max_fault_reaction_ms, "<=", "ms"
                )
            )
    return results


def _seconds_text(seconds: list[int], max_listed: int = 6) -> str:
    """Format the run seconds over the ramp limit, at most ``max_listed`` of them."""
    if not seconds:
        return ""
    listed = ", ".join(str(k) for k in seconds[:max_listed])
    more = f" and {len(seconds) - max_listed} more" if len(seconds) > max_listed else ""
    return f" (s {listed}{more})"


def summary_lines(values: dict[str, Any]) -> list[str]:
    return [
        f"15-min demand: {values['max_15min_demand_kw']:.0f} kW "
        f"(no battery {values['max_15min_demand_without_battery_kw']:.0f} kW)",
        f"0.1-2 Hz swing attenuation: {values['band_attenuation_db']:.1f} dB",
        f"grid ramp p99: {values['grid_ramp_p99_kw_per_s']:.1f} kW/s "
        f"(net load {values['load_ramp_p99_kw_per_s']:.1f} kW/s)",
        f"seconds over ramp limit: {100 * values['ramp_exceed_fraction']:.2f} %"
        + _seconds_text(values.get("ramp_exceed_seconds", [])),
        f"SoC {values['soc_min_pct']:.1f}-{values['soc_max_pct']:.1f} %, "
        f"BMS limit breaches {values['bms_limit_breaches']}",
    ]


def write_outputs(
    out_dir: Path,
    scenario: Scenario,
    capture: Capture,
    mode: str,
    *,
    extra: dict[str, Any] | None = None,
    wall_s: float = 0.0,
    extra_results: list[report.CriterionResult] | None = None,
) -> dict[str, Any]:
    """Score the capture and write the three report files; return the ``report.json`` object.

    ``extra_results`` are criteria the runner judged itself (the HIL rig's
    daemon exit code, for one); they count toward the verdict like the rest.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    values = compute_metrics(scenario, capture)
    results = judge_criteria(scenario, values) + list(extra_results or [])
    body = report.write_report_json(
        out_dir / "report.json",
        scenario.run.name,
        results,
        values,
        extra={"mode": mode, **(extra or {})},
    )
    report.write_junit_xml(out_dir / "junit.xml", f"{scenario.run.name}.{mode}", results, wall_s)
    signals = report.ReportSignals(
        dt_s=capture.dt_s,
        load_kw=capture.load_kw,
        grid_kw=capture.grid_kw,
        battery_kw=capture.battery_kw,
        soc_pct=capture.soc_pct,
        renewable_kw=capture.renewable_kw,
        cap_kw=scenario.control.grid_cap_kw,
        events=capture.events,
        soc_min_pct=scenario.criteria.soc_min_pct,
        soc_max_pct=scenario.criteria.soc_max_pct,
    )
    verdict = body["verdict"].upper()
    report.plot_report(
        out_dir / "report.png",
        f"{scenario.run.name} ({mode}): {verdict}",
        signals,
        summary=summary_lines(values),
    )
    return body
