"""Timing benchmark of the fast loop: the C thread, the Python fallback and cyclictest.

Each run feeds the loop fresh inputs every 10 ms (a 100 Hz meter) with a
GPU-training-like load, drains the ring as the daemon would, and reduces the
tick records to wake-lateness percentiles, missed deadlines and compute time.
``bessgw bench loop`` prints the result; see :mod:`gateway.cli.bench_cmd`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gateway.control import law
from gateway.control.layout import empty_inputs
from gateway.control.loop import FastLoop, PythonLoop

#: Inputs are rewritten and the ring drained this often, like a 100 Hz meter poll.
FEED_PERIOD_S = 0.01


@dataclass
class LoopStats:
    """Wake lateness and compute time of one run, in microseconds."""

    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float
    missed: int
    ticks: int
    compute_mean_us: float | None = None
    compute_p99_us: float | None = None
    overflows: int = 0
    granted: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_params(n_units: int, rate_hz: float) -> law.LawParams:
    """Parameters for ``n_units`` 500 kW units with the cap at 60 % of their total rating."""
    return law.LawParams(
        rated_kw=np.full(n_units, 500.0),
        cap_kw=300.0 * n_units,
        rate_hz=rate_hz,
        smoothing_tau_s=5.0,
        deadband_kw=1.0,
        meter_stale_ms=500.0,
        pcs_stale_ms=500.0,
    )


def lateness_stats(late_ns: np.ndarray, missed: int) -> dict[str, float]:
    """Percentiles of wake lateness given in ns, returned in us."""
    if late_ns.size == 0:
        raise ValueError("no ticks were recorded; the loop did not run")
    p50, p99, p999 = np.percentile(late_ns, [50, 99, 99.9]) / 1000.0
    return {
        "p50_us": round(float(p50), 2),
        "p99_us": round(float(p99), 2),
        "p999_us": round(float(p999), 2),
        "max_us": round(float(late_ns.max()) / 1000.0, 2),
        "missed": int(missed),
        "ticks": int(late_ns.size),
    }


def _fill_inputs(site: np.ndarray, units: np.ndarray, now_ns: int, load_kw: float) -> None:
    """Write fresh, healthy readings: 60 % SoC, 800 V x 1000 A BMS limits."""
    for name in ("grid", "load"):
        site[f"{name}_kw"] = load_kw
        site[f"{name}_quality"] = 0
        site[f"{name}_t_ns"] = now_ns
    for name in ("pcs", "bms"):
        units[f"{name}_quality"] = 0
        units[f"{name}_t_ns"] = now_ns
    units["pcs_p_kw"] = 0.0
    units["soc_pct"] = 60.0
    units["bms_voltage_v"] = 800.0
    units["bms_charge_limit_a"] = 1000.0
    units["bms_discharge_limit_a"] = 1000.0
    units["pcs_fault"] = 0
    units["bms_protection"] = 0


def run_loop(loop: FastLoop | PythonLoop, seconds: float) -> LoopStats:
    """Run ``loop`` for ``seconds`` while feeding and draining it; return its timing."""
    n_units = loop.n_units
    site, units = empty_inputs(n_units)
    peak_kw = 450.0 * n_units
    chunks = []

    _fill_inputs(site, units, loop.monotonic_ns(), 0.35 * peak_kw)
    loop.write_inputs(site, units)
    loop.reset_faults()
    granted = loop.start()

    try:
        t_start = time.monotonic()
        while (elapsed := time.monotonic() - t_start) < seconds:
            # 1.5 s training iterations between 35 % and 100 % of peak.
            load_kw = peak_kw if (elapsed % 1.5) < 0.9 else 0.35 * peak_kw
            _fill_inputs(site, units, loop.monotonic_ns(), load_kw)
            loop.write_inputs(site, units)
            chunks.append(loop.drain())
            time.sleep(FEED_PERIOD_S)
    finally:
        loop.stop()
    chunks.append(loop.drain())

    records = np.concatenate(chunks)
    health = loop.health()
    compute_us = records["compute_ns"] / 1000.0
    return LoopStats(
        **lateness_stats(records["wake_late_ns"], health.missed),
        compute_mean_us=round(float(compute_us.mean()), 2),
        compute_p99_us=round(float(np.percentile(compute_us, 99)), 2),
        overflows=health.overflows,
        granted=dict(granted),
    )


_MAX_LATENCY = re.compile(r"^# Max Latencies:\s+(\d+)", re.MULTILINE)
_OVERFLOWS = re.compile(r"^# Histogram Overflows:\s+(\d+)", re.MULTILINE)


def parse_cyclictest_histogram(text: str, interval_us: int) -> dict[str, float]:
    """Reduce ``cyclictest -h`` output (rows of ``latency_us count``) to the loop statistics.

    Samples beyond the histogram range ("Histogram Overflows") count at the
    reported maximum. ``missed`` counts wake-ups at least one interval late,
    the closest cyclictest offers to a missed deadline.
    """
    bins, counts = [], []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            bins.append(int(parts[0]))
            counts.append(int(parts[1]))
    max_match = _MAX_LATENCY.search(text)
    overflow_match = _OVERFLOWS.search(text)
    if not bins or max_match is None:
        raise ValueError("cyclictest printed no histogram; was it run with -h?")
    max_us = float(max_match.group(1))
    overflows = int(overflow_match.group(1)) if overflow_match else 0
    total = sum(counts) + overflows
    if total == 0:
        raise ValueError("cyclictest recorded no samples")
    cumulative = np.cumsum(counts)

    def percentile(q: float) -> float:
        index = int(np.searchsorted(cumulative, q * total))
        return float(bins[index]) if index < len(bins) else max_us

    missed = overflows + sum(c for b, c in zip(bins, counts, strict=True) if b >= interval_us)
    return {
        "p50_us": percentile(0.50),
        "p99_us": percentile(0.99),
        "p999_us": percentile(0.999),
        "max_us": max_us,
        "missed": int(missed),
        "ticks": int(total),
    }


def run_cyclictest(
    seconds: float, rate_hz: float, priority: int, cpu: int | None
) -> LoopStats | None:
    """Run cyclictest (Debian package rt-tests) with the loop's period; None when not installed."""
    binary = shutil.which("cyclictest")
    if binary is None:
        return None
    interval_us = round(1e6 / rate_hz)
    loops = max(1, round(seconds * rate_hz))
    command = [binary, "-q", "-m", "-t1", f"-i{interval_us}", f"-l{loops}", "-h2000"]
    if priority > 0:
        command.append(f"-p{priority}")
    if cpu is not None:
        command.append(f"-a{cpu}")
    # The command is the cyclictest found on PATH with numeric options only.
    result = subprocess.run(  # noqa: S603
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"cyclictest failed with exit code {result.returncode}: {result.stderr.strip()[:300]}"
        )
    stats = parse_cyclictest_histogram(result.stdout, interval_us)
    return LoopStats(**stats, granted={"command": " ".join(command[1:])})
