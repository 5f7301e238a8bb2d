"""Profile checks of a site file: ``bessgw config check`` rejects what ``bessgw run`` would."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, read_config_data
from gateway.site_check import load_site_config, profile_problems

EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "bessgw.example.toml"
PROFILES = Path(__file__).resolve().parents[1] / "drivers" / "profiles"
PCS_LINE = 'profile = "pcs-sunspec"'
BMS_LINE = 'profile = "bms-pylontech"'
RACK_LINE = 'profile = "pdu-rack"'


def _site(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    text = EXAMPLE.read_text(encoding="utf-8")
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _profile(tmp_path: Path, builtin: str, old: str, new: str) -> Path:
    text = (PROFILES / f"{builtin}.toml").read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / f"custom-{builtin}.toml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    return info.value.problems


def test_example_profiles_load():
    assert profile_problems(read_config_data(EXAMPLE)) == []
    assert load_site_config(EXAMPLE).device("pcs-1").profile == "pcs-sunspec"


def test_misspelt_pcs_profile(tmp_path, capsys):
    path = _site(tmp_path, (PCS_LINE, 'profile = "pcs-sunspek"'))
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "1 error(s)" in err
    assert "\n  devices[3].profile: no built-in profile 'pcs-sunspek': use one of" in err


def test_misspelt_bms_profile(tmp_path):
    path = _site(tmp_path, (BMS_LINE, 'profile = "bms-pylontek"'))
    assert _problems(path) == [
        "devices[4].profile: 'bms-pylontek': file not found; built-in BMS profiles: bms-pylontech"
    ]


def test_custom_profile_unknown_key(tmp_path):
    header = 'profile.order = "ABCD"'
    custom = _profile(tmp_path, "pcs-sunspec", header, f"{header}\nprofile.oder = 1")
    path = _site(tmp_path, (PCS_LINE, f'profile = "{custom}"'))
    [problem] = _problems(path)
    assert problem.startswith(f"devices[3].profile: '{custom}': [profile]: unknown key 'oder'")


def test_bms_profile_unknown_key(tmp_path):
    custom = _profile(
        tmp_path, "bms-pylontech", "[bms]\n", "[bms]\ncurrent_sing = 'discharge_negative'\n"
    )
    path = _site(tmp_path, (BMS_LINE, f'profile = "{custom}"'))
    [problem] = _problems(path)
    assert problem.startswith(f"devices[4].profile: '{custom}': bms.current_sing: Extra inputs")


def test_pcs_profile_without_pcs_table(tmp_path):
    path = _site(tmp_path, (PCS_LINE, 'profile = "meter-3ph"'))
    assert _problems(path) == [
        "devices[3].profile: 'meter-3ph': has no [pcs] table; "
        "add one that names at least setpoint_point"
    ]


def test_pcs_profile_without_setpoint(tmp_path):
    custom = _profile(tmp_path, "pcs-sunspec", 'setpoint_point = "WSet"\n', "")
    path = _site(tmp_path, (PCS_LINE, f'profile = "{custom}"'))
    assert _problems(path) == [
        f"devices[3].profile: '{custom}': [pcs] setpoint_point is missing; name the point to write"
    ]


def test_meter_profile_without_power(tmp_path):
    path = _site(tmp_path, (RACK_LINE, 'profile = "pcs-sunspec"'))
    assert _problems(path) == [
        "devices[1].profile: 'pcs-sunspec': no point 'p_kw' for the meter's active power; "
        "name the power point with [meter] power_point"
    ]


def test_meter_power_unit_and_sign(tmp_path):
    custom = _profile(tmp_path, "pdu-rack", "power_sign = 1", "power_sign = 2")
    text = custom.read_text(encoding="utf-8")
    text = text.replace('unit = "kW", min = -5.0', 'unit = "W", min = -5.0')
    custom.write_text(text, encoding="utf-8")
    path = _site(tmp_path, (RACK_LINE, f'profile = "{custom}"'))
    assert _problems(path) == [
        f"devices[1].profile: '{custom}': [meter] power point 'p_kw' has unit 'W'; the gateway "
        'reads meter power in kW: scale the point to kW and set unit = "kW"',
        f"devices[1].profile: '{custom}': [meter] power_sign = 2 is invalid; use 1, or -1 when "
        "the meter's sign is the opposite of the gateway's for its role",
    ]


def test_relative_profile_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _site(tmp_path, (PCS_LINE, 'profile = "profiles/pcs.toml"'))
    assert _problems(path) == [
        "devices[3].profile: profile file 'profiles/pcs.toml' not found; a relative path is "
        f"read from the working directory ({tmp_path}), so give an absolute path"
    ]


def test_shared_profile_each_device(tmp_path):
    path = _site(
        tmp_path,
        ('profile = "meter-3ph"          #', 'profile = "meter-3pf"          #'),
        ('profile = "meter-3ph"\ntransport = { kind = "tcp", host = "192.0.2.11" }',
         'profile = "meter-3pf"\ntransport = { kind = "tcp", host = "192.0.2.11" }'),
    )
    problems = _problems(path)
    assert [p.split(":")[0] for p in problems] == ["devices[0].profile", "devices[2].profile"]


def test_schema_and_profile_errors_together(tmp_path):
    path = _site(
        tmp_path,
        (PCS_LINE, 'profile = "pcs-sunspek"'),
        ("rated_kw = 500.0", "rated_kw = -1.0"),
        ('role = "bms"', 'role = "bms"\ncolour = "red"'),
    )
    problems = _problems(path)
    assert len(problems) == 3
    assert problems[0].startswith("devices[3].rated_kw: invalid value -1.0")
    assert problems[1] == "devices[4].colour: unknown key (value 'red'); remove it or check " \
        "its spelling against systemd/bessgw.example.toml"
    assert problems[2].startswith("devices[3].profile: no built-in profile 'pcs-sunspek'")


def test_run_rejects_bad_profile(tmp_path, capsys):
    # A schema error too, so that the daemon never starts even if the profile check is missing.
    path = _site(
        tmp_path,
        (PCS_LINE, 'profile = "pcs-sunspek"'),
        ("grid_connection_kw = 2000.0", "grid_connection_kw = 0"),
    )
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 error(s)" in err
    assert "\n  devices[3].profile: no built-in profile 'pcs-sunspek'" in err
