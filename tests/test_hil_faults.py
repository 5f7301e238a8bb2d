"""The fault suite: each fault scenario against the real daemon, shortened with a duration override.

Every scenario injects its fault at 6 s for 5 s while both PCS units are
working (``output_before_kw`` checks that, so a reaction cannot pass on an
idle battery). Each run takes its duration plus about 10 s to start the
daemon (its slcan port waits 2 s after opening), stop it and score.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hil.rig import HilResult, run_hil
from hil.scenario import Fault, load_scenario

pytestmark = pytest.mark.timeout(180)

FAULT_START_S = 6.0
FAULT_END_S = 11.0


def run_case(name: str, duration_s: float, out_dir: Path) -> HilResult:
    return run_hil(load_scenario(name), out_dir, duration_s=duration_s, compare_sil=False)


def checked_fault(result: HilResult) -> dict:
    """Return the run's one fault after the checks every fault scenario shares."""
    report = result.report
    failed = [c["message"] for c in report["criteria"] if not c["passed"]]
    assert failed == [], f"criteria failed; daemon log: {report['daemon_log']}"
    assert report["verdict"] == "pass"
    (fault,) = report["faults"]
    tolerance = report["reaction_tolerance_kw"]["unit" if fault["reaction"] == "unit" else "total"]
    assert fault["started"] is True
    assert fault["reaction_ms"] is not None
    assert fault["output_before_kw"] > 5 * tolerance, "the battery was idle when the fault hit"
    return fault


def event_times(result: HilResult, label: str) -> list[float]:
    """Times of the events called ``label``, with or without a list of fault codes after it."""
    assert result.capture is not None
    return [t for t, text in result.capture.events if text.split(" (")[0] == label]


def window(result: HilResult, start_s: float, end_s: float) -> slice:
    dt_s = result.capture.dt_s
    return slice(round(start_s / dt_s), round(end_s / dt_s))


def test_meter_loss(tmp_path):
    """Losing the grid meter takes the bank to 0 kW within 2 s; an operator reset resumes it."""
    # The daemon reconnects with backoff, so the meter may take a few seconds to come back.
    result = run_case("faults-meter-loss", 17.0, tmp_path)
    fault = checked_fault(result)
    assert fault["reaction_ms"] <= 2000.0
    assert any(FAULT_START_S <= t <= FAULT_END_S for t in event_times(result, "gateway fault"))
    faults = [text for _, text in result.capture.events if text.startswith("gateway fault")]
    assert "grid_stale" in faults[0]
    assert any(t > FAULT_END_S for t in event_times(result, "gateway running"))
    held = result.capture.battery_kw[window(result, FAULT_START_S + 2.5, FAULT_END_S)]
    assert np.max(np.abs(held)) <= 3.0


def test_bms_silent(tmp_path):
    """A silent BMS takes its PCS to 0 kW within 4.5 s; the other string keeps working."""
    result = run_case("faults-bms-silent", 17.0, tmp_path)
    fault = checked_fault(result)
    assert fault["reaction_ms"] <= 4500.0
    # Silence counts from the last frame set, up to 1 s before the fault, plus 3 s stale time.
    assert fault["reaction_ms"] >= 2000.0
    other = result.unit_kw[1, window(result, FAULT_START_S + 4.5, FAULT_END_S)]
    assert np.max(np.abs(other)) > 50.0
    assert any(t > FAULT_END_S for t in event_times(result, "gateway running"))


def test_pcs_trip(tmp_path):
    """A tripped PCS is disabled by the gateway within 500 ms; the other unit carries on."""
    result = run_case("faults-pcs-trip", 12.0, tmp_path)
    fault = checked_fault(result)
    assert fault["reaction_ms"] <= 500.0
    tripped = result.unit_kw[0, window(result, FAULT_START_S + 0.01, FAULT_END_S)]
    other = result.unit_kw[1, window(result, FAULT_START_S + 0.5, FAULT_END_S)]
    assert np.max(np.abs(tripped)) == 0.0
    assert np.max(np.abs(other)) > 50.0


def test_pcs_unreachable(tmp_path):
    """An unreachable PCS reverts to 0 kW by its own 2 s timer; the reachable one carries on."""
    result = run_case("faults-pcs-unreachable", 12.0, tmp_path)
    fault = checked_fault(result)
    assert 1000.0 <= fault["reaction_ms"] <= 2500.0
    reachable = result.unit_kw[0, window(result, FAULT_START_S + 2.5, FAULT_END_S)]
    assert np.max(np.abs(reachable)) > 50.0


def test_gateway_sigkill(tmp_path):
    """After SIGKILL the PCS units revert on their own within 2.5 s; a restart resumes control."""
    result = run_case("faults-gateway-sigkill", 20.0, tmp_path)
    fault = checked_fault(result)
    assert fault["reaction_ms"] <= 2500.0
    assert result.report["gateway_starts"] == 2
    restarted = event_times(result, "gateway restarted")
    assert restarted == [pytest.approx(FAULT_END_S, abs=0.1)]
    assert any(t > FAULT_END_S for t in event_times(result, "gateway running"))
    last_second = result.capture.battery_kw[window(result, 19.0, 20.0)]
    assert np.max(np.abs(last_second)) > 50.0


def test_gateway_sigterm_cli(tmp_path):
    """`bessgw hil run` on the SIGTERM case: ramp to 0 within 3 s, exit 0, then restart; exit 0."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, "-m", "gateway", "hil", "run", "faults-gateway-sigterm",
            "--duration", "20", "--no-compare", "--json", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["verdict"] == "pass"
    (fault,) = report["faults"]
    assert fault["reaction_ms"] is not None
    assert fault["reaction_ms"] <= 3000.0
    assert fault["output_before_kw"] > 15.0
    assert report["gateway_starts"] == 2
    assert report["final_stop"]["exit_code"] == 0
    assert {p.name for p in out.iterdir()} >= {"report.json", "junit.xml", "report.png"}
    # Stopping is not a fault: both stops end without a fault raised by stale inputs.
    events = [json.loads(line) for line in (out / "daemon.log").read_text().splitlines()]
    assert [e["code"] for e in events if e.get("event") == "fault_raised"] == []


def test_unknown_fault_device(tmp_path):
    """A fault on a device the site lacks fails before anything starts."""
    scenario = load_scenario("faults-pcs-trip")
    bad = scenario.model_copy(
        update={"faults": [Fault(at_s=1.0, device="pcs-9", kind="pcs_trip", duration_s=1.0)]}
    )
    with pytest.raises(ValueError, match="no device 'pcs-9'"):
        run_hil(bad, tmp_path)
    assert not (tmp_path / "bessgw.toml").exists()
