"""Run reports: ``report.png`` (signals and spectra), ``junit.xml`` and ``report.json``.

The writers take plain numbers and arrays, so the HIL runner and the SIL
replay produce the same files. The picture is drawn with matplotlib's Agg
backend and needs no display.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hil import metrics


@dataclass(frozen=True)
class CriterionResult:
    """One pass/fail criterion of a scenario and what the run measured for it."""

    name: str
    passed: bool
    #: Measured value; None when it could not be measured (which is a failure).
    value: float | None
    #: The limit it was judged against, and how: ``<=`` or ``>=``.
    limit: float | None = None
    comparison: str = "<="
    unit: str = ""
    #: One sentence for a human, in_view in the summary and as the JUnit failure message.
    message: str = ""


def judge(
    name: str, value: float | None, limit: float, comparison: str, unit: str = ""
) -> CriterionResult:
    """Build a criterion result by comparing ``value`` with ``limit`` (``<=`` or ``>=``)."""
    if comparison not in ("<=", ">="):
        raise ValueError(f"comparison {comparison!r} is invalid; expected '<=' or '>='")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return CriterionResult(name, False, None, limit, comparison, unit, f"{name}: not measured")
    passed = value <= limit if comparison == "<=" else value >= limit
    verdict = "ok" if passed else "FAILED"
    suffix = f" {unit}" if unit else ""
    message = f"{name}: {value:.4g}{suffix} (limit {comparison} {limit:g}{suffix}) {verdict}"
    return CriterionResult(name, bool(passed), float(value), limit, comparison, unit, message)


def verdict(results: list[CriterionResult]) -> str:
    """Return ``pass`` when every criterion passed, else ``fail`` (also for no criteria)."""
    return "pass" if results and all(r.passed for r in results) else "fail"


def _json_safe(value: Any) -> Any:
    """Turn numpy scalars and arrays into JSON values, and non-finite floats into None."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report_json(
    path: Path | str,
    scenario: str,
    results: list[CriterionResult],
    metrics_values: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``report.json`` and return what was written.

    The object has ``scenario``, ``verdict`` (``pass`` or ``fail``),
    ``criteria`` (one object per :class:`CriterionResult`), ``metrics`` and
    any ``extra`` keys. Infinities and NaN become null, so strict JSON
    parsers read the file.
    """
    report: dict[str, Any] = {
        "scenario": scenario,
        "verdict": verdict(results),
        "criteria": [asdict(r) for r in results],
        "metrics": metrics_values,
    }
    if extra:
        clash = set(extra) & set(report)
        if clash:
            raise ValueError(f"extra keys {sorted(clash)} would overwrite the report's own keys")
        report.update(extra)
    report = _json_safe(report)
    Path(path).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return report


def write_junit_xml(
    path: Path | str, suite: str, results: list[CriterionResult], duration_s: float = 0.0
) -> None:
    """Write ``junit.xml``: one test suite named ``suite``, one test case per criterion."""
    failures = sum(not r.passed for r in results)
    root = ET.Element(
        "testsuites", name="bessgw-hil", tests=str(len(results)), failures=str(failures)
    )
    node = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(results)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=f"{duration_s:.3f}",
    )
    for result in results:
        case = ET.SubElement(node, "testcase", classname=f"hil.{suite}", name=result.name, time="0")
        if not result.passed:
            failure = ET.SubElement(
                case, "failure", message=result.message or result.name, type="criterion"
            )
            failure.text = json.dumps(_json_safe(asdict(result)))
        else:
            ET.SubElement(case, "system-out").text = result.message
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


# --------------------------------------------------------------------------- picture


@dataclass
class ReportSignals:
    """Signals of one run for the picture, all sampled at ``dt_s`` from run time 0."""

    dt_s: float
    load_kw: np.ndarray
    grid_kw: np.ndarray
    battery_kw: np.ndarray
    soc_pct: np.ndarray
    renewable_kw: np.ndarray | None = None
    #: Grid import cap, scalar or per sample.
    cap_kw: float | np.ndarray | None = None
    #: (run time in s, label) of each fault or event to mark.
    events: list[tuple[float, str]] = field(default_factory=list)
    soc_min_pct: float | None = None
    soc_max_pct: float | None = None


def _envelope(x: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reduce ``x`` to at most ``bins`` (index, mean, min, max) rows for plotting."""
    size = max(x.size // bins, 1)
    whole = x.size // size
    blocks = x[: whole * size].reshape(whole, size)
    centre = (np.arange(whole) + 0.5) * size
    return centre, blocks.mean(axis=1), blocks.min(axis=1), blocks.max(axis=1)


def plot_report(
    path: Path | str,
    title: str,
    signals: ReportSignals,
    band_hz: tuple[float, float] = (0.1, 2.0),
    summary: list[str] | None = None,
) -> None:
    """Draw ``report.png``: power and SoC over time with cap and events, and the two spectra.

    Lines are means over 300 blocks of the run (2 s each for 10 minutes), so
    swings faster than a block do not alias into noise. The load and grid
    also get a shaded min-max band over the same blocks, which shows how deep
    those swings are.
    ``summary`` lines are printed in a box beside the spectra.
    """
    # Imported here because pyplot takes about half a second to load and picks a backend.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib import transforms  # noqa: PLC0415

    s = signals
    fs_hz = 1.0 / s.dt_s
    duration_s = s.load_kw.size * s.dt_s
    minutes = duration_s >= 600
    scale = 60.0 if minutes else 1.0
    unit = "min" if minutes else "s"

    fig = plt.figure(figsize=(13, 9), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[2.2, 1.0, 1.6], width_ratios=[2.2, 1.0])
    ax_power = fig.add_subplot(grid[0, :])
    ax_soc = fig.add_subplot(grid[1, :], sharex=ax_power)
    ax_psd = fig.add_subplot(grid[2, 0])
    ax_text = fig.add_subplot(grid[2, 1])
    fig.suptitle(title, fontsize=14, fontweight="bold")

    bins = 300
    for values, label, color in (
        (s.load_kw, "load", "tab:red"),
        (s.grid_kw, "grid (+import)", "tab:blue"),
    ):
        index, mean, low, high = _envelope(np.asarray(values, dtype=float), bins)
        t = index * s.dt_s / scale
        ax_power.fill_between(t, low, high, color=color, alpha=0.2, linewidth=0)
        ax_power.plot(t, mean, color=color, linewidth=1.0, label=label)
    index, mean, _, _ = _envelope(np.asarray(s.battery_kw, dtype=float), bins)
    ax_power.plot(
        index * s.dt_s / scale, mean, color="tab:green", linewidth=1.0, label="battery (+discharge)"
    )
    if s.renewable_kw is not None:
        index, mean, _, _ = _envelope(np.asarray(s.renewable_kw, dtype=float), bins)
        ax_power.plot(index * s.dt_s / scale, mean, color="tab:olive", linewidth=1.0, label="wind")
    if s.cap_kw is not None:
        cap = np.broadcast_to(np.asarray(s.cap_kw, dtype=float), s.load_kw.shape)
        index, mean, _, _ = _envelope(cap, bins)
        ax_power.plot(
            index * s.dt_s / scale,
            mean,
            color="black",
            linestyle="--",
            linewidth=1.2,
            label="grid cap",
        )
    marker_position = transforms.blended_transform_factory(ax_power.transData, ax_power.transAxes)
    for at_s, label in s.events:
        for axis in (ax_power, ax_soc):
            axis.axvline(at_s / scale, color="tab:purple", linestyle=":", linewidth=1.2)
        ax_power.text(
            at_s / scale,
            0.97,
            f" {label}",
            transform=marker_position,
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            color="tab:purple",
        )
    block_s = max(s.load_kw.size // bins, 1) * s.dt_s
    ax_power.set_title(
        f"lines: {block_s:g} s means; shaded: min to max within each {block_s:g} s",
        fontsize=9,
        loc="right",
    )
    ax_power.set_ylabel("power (kW)")
    ax_power.axhline(0.0, color="grey", linewidth=0.6)
    ax_power.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=5, fontsize=9, frameon=False)
    ax_power.grid(alpha=0.3)
    ax_power.tick_params(labelbottom=False)

    index, mean, _, _ = _envelope(np.asarray(s.soc_pct, dtype=float), bins)
    ax_soc.plot(index * s.dt_s / scale, mean, color="tab:brown", linewidth=1.2, label="SoC")
    for bound, name in ((s.soc_min_pct, "SoC min"), (s.soc_max_pct, "SoC max")):
        if bound is not None:
            ax_soc.axhline(bound, color="tab:brown", linestyle="--", linewidth=0.8, label=name)
    ax_soc.set_ylabel("SoC (%)")
    ax_soc.set_xlabel(f"run time ({unit})")
    ax_soc.legend(loc="lower left", ncol=3, fontsize=9)
    ax_soc.grid(alpha=0.3)

    segment_s = min(60.0, duration_s)
    freqs, psd_load = metrics.welch_psd(s.load_kw, fs_hz, segment_s)
    _, psd_grid = metrics.welch_psd(s.grid_kw, fs_hz, segment_s)
    in_view = (freqs > 0) & (freqs <= 10.0)
    ax_psd.semilogy(freqs[in_view], psd_load[in_view], color="tab:red", linewidth=1.0, label="load")
    ax_psd.semilogy(
        freqs[in_view], psd_grid[in_view], color="tab:blue", linewidth=1.0, label="grid"
    )
    ax_psd.axvspan(
        band_hz[0],
        band_hz[1],
        color="grey",
        alpha=0.15,
        label=f"{band_hz[0]:g}-{band_hz[1]:g} Hz band",
    )
    ax_psd.set_xscale("log")
    ax_psd.set_xlabel("frequency (Hz)")
    ax_psd.set_ylabel("PSD (kW²/Hz)")
    ax_psd.set_title("power spectra (Welch)", fontsize=10)
    ax_psd.legend(loc="lower left", fontsize=9)
    ax_psd.grid(alpha=0.3, which="both")

    ax_text.axis("off")
    if summary:
        ax_text.text(
            0.0, 1.0, "\n".join(summary), va="top", ha="left", family="monospace", fontsize=9
        )

    fig.savefig(path, dpi=100)
    plt.close(fig)
