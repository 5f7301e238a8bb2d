"""systemd unit: `systemd-analyze verify` is clean and the security exposure is 3.0 or lower."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[1] / "systemd"
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@pytest.fixture
def unit_path(tmp_path):
    """Copy the unit with ExecStart on this venv's bessgw, since verify needs it to exist."""
    bessgw = Path(sys.executable).with_name("bessgw")
    text = (SYSTEMD_DIR / "bessgw.service").read_text()
    unit = tmp_path / "bessgw.service"
    unit.write_text(text.replace("/usr/bin/bessgw", str(bessgw)))
    return unit


def test_unit_verify_clean(unit_path):
    result = subprocess.run(
        [ANALYZE, "verify", str(unit_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_unit_security_rating(unit_path):
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(unit_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0


def test_unit_directives():
    """The unit keeps the contract the daemon relies on: notify, watchdog, only two capabilities."""
    text = (SYSTEMD_DIR / "bessgw.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "on-failure"
    assert settings["User"] == "bessgw"
    assert settings["StateDirectory"] == "bessgw"
    assert settings["RuntimeDirectory"] == "bessgw"
    assert settings["AmbientCapabilities"].split() == ["CAP_SYS_NICE", "CAP_IPC_LOCK"]
    assert settings["CapabilityBoundingSet"].split() == ["CAP_SYS_NICE", "CAP_IPC_LOCK"]
    assert int(settings["WatchdogSec"]) > 0
    assert int(settings["TimeoutStopSec"]) > 5


def test_sysusers_creates_user(tmp_path):
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSTEMD_DIR / "bessgw.sysusers")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    assert re.search(r"^bessgw:x:\d+:\d+:", passwd, re.MULTILINE)
    assert re.search(r"^bessgw:x:\d+:", group, re.MULTILINE)
