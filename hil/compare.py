"""HIL-vs-SIL agreement: the main metrics of the two runs of one scenario, each with a tolerance.

The SIL replay models the devices' timing (meter windows and update periods,
BMS frame rate, PCS dead time) but not the sockets, the daemon's polling
phase or the event loop's jitter, so the runs agree only within a margin.
The default tolerances below are judgement calls for that margin:

==============================  ============  =============================================
metric                          tolerance     why
==============================  ============  =============================================
max_15min_demand_kw             2 % relative  control timing hardly moves a 15-minute mean
band_attenuation_db             3 dB          polling adds up to one poll period of delay,
                                              which costs a few dB of the 0.1-2 Hz band
grid_ramp_p99_kw_per_s          30 % relative the 99th percentile of 1-s ramps is noisy
ramp_exceed_fraction            0.01          one share of the seconds, like its criterion
soc_min_pct, soc_max_pct        1 point       the same energy moves in both runs
equivalent_full_cycles          20 % relative throughput, small on short runs
==============================  ============  =============================================

A scenario's ``criteria.hil_sil_tolerance`` replaces the relative
tolerances; the absolute ones stay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from hil.report import CriterionResult

#: metric -> (tolerance, "relative" or "absolute").
TOLERANCES: dict[str, tuple[float, str]] = {
    "max_15min_demand_kw": (0.02, "relative"),
    "band_attenuation_db": (3.0, "absolute"),
    "grid_ramp_p99_kw_per_s": (0.30, "relative"),
    "ramp_exceed_fraction": (0.01, "absolute"),
    "soc_min_pct": (1.0, "absolute"),
    "soc_max_pct": (1.0, "absolute"),
    "equivalent_full_cycles": (0.20, "relative"),
}


@dataclass(frozen=True)
class Agreement:
    """One metric of both runs and whether they agree."""

    metric: str
    hil: float | None
    sil: float | None
    #: HIL minus SIL, in the metric's unit.
    difference: float | None
    tolerance: float
    kind: str
    within: bool


def compare_runs(
    hil: dict[str, Any], sil: dict[str, Any], relative_tolerance: float | None = None
) -> list[Agreement]:
    """Compare the metrics of :data:`TOLERANCES` between two ``compute_metrics`` results.

    A metric missing or non-finite in either run does not agree.
    """
    rows = []
    for metric, (default, kind) in TOLERANCES.items():
        use_given = kind == "relative" and relative_tolerance is not None
        tolerance = relative_tolerance if use_given else default
        a, b = hil.get(metric), sil.get(metric)
        if not (_finite(a) and _finite(b)):
            rows.append(Agreement(metric, _num(a), _num(b), None, tolerance, kind, False))
            continue
        difference = float(a) - float(b)
        allowed = tolerance * max(abs(float(b)), 1e-9) if kind == "relative" else tolerance
        within = abs(difference) <= allowed
        rows.append(Agreement(metric, float(a), float(b), difference, tolerance, kind, within))
    return rows


def agreement_result(rows: list[Agreement]) -> CriterionResult:
    """Judge the comparison as one criterion: every compared metric within its tolerance."""
    outside = [r.metric for r in rows if not r.within]
    message = (
        "HIL and SIL agree on every compared metric"
        if not outside
        else "HIL and SIL differ beyond tolerance on " + ", ".join(outside)
    )
    return CriterionResult(
        "hil_sil_agreement",
        not outside,
        float(len(outside)),
        0.0,
        "<=",
        "metrics outside tolerance",
        message,
    )


def rows_as_dicts(rows: list[Agreement]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _num(value: Any) -> float | None:
    return float(value) if _finite(value) else None
