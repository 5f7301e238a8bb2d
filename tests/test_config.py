"""Site configuration: schema, error messages and the ``config check`` command."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "bessgw.example.toml"


def test_example_config_is_valid():
    config = load_config(EXAMPLE)
    assert config.site.name == "block-a"
    assert config.device("pcs-1").rated_kw == 500.0
    assert config.device("grid").effective_stale_ms == 300


def test_config_check_prints_summary(capsys):
    assert main(["config", "check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "site block-a" in out
    assert "pcs-1" in out


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_errors_are_all_listed(tmp_path, capsys):
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("grid_cap_kw = 1500.0", "grid_cap_kw = nan\ncap_kw = 3")
    text = text.replace(
        "port = 502 }\nunit_id = 1\npoll_period_ms = 100\nrated_kw",
        "port = 70000 }\nunit_id = 1\npoll_period_ms = 100\nrated_kw",
    )
    path = _write(tmp_path, text)

    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "control.cap_kw: unknown key" in err
    assert "control.grid_cap_kw: invalid value nan" in err
    assert "devices[3].transport.port: invalid value 70000" in err
    assert "3 error(s)" in err


def test_config_bms_must_use_can(tmp_path):
    text = EXAMPLE.read_text(encoding="utf-8").replace(
        'transport = { kind = "can", interface = "socketcan", channel = "can0", bitrate = 500000 }',
        'transport = { kind = "tcp", host = "192.0.2.30" }',
    )
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert any("role 'bms'" in p and "transport.kind = 'can'" in p for p in info.value.problems)


def test_config_soc_band_order(tmp_path):
    text = EXAMPLE.read_text(encoding="utf-8").replace(
        "soc_soft_min_pct = 15.0", "soc_soft_min_pct = 95.0"
    )
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert any("SoC band" in p and "95.0" in p for p in info.value.problems)


def test_config_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[site\nname="))


def test_config_device_error_omits_input(tmp_path, capsys):
    text = EXAMPLE.read_text(encoding="utf-8").replace(
        'transport = { kind = "can", interface = "socketcan", channel = "can0", bitrate = 500000 }',
        'transport = { kind = "tcp", host = "192.0.2.30" }',
    )
    assert main(["config", "check", str(_write(tmp_path, text))]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[1].startswith("  devices[4]: device 'bms-1' has role 'bms' but transport kind")
    assert "{" not in lines[1]


def test_config_site_problems_all_listed(tmp_path, capsys):
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace('role = "grid_meter"', 'role = "facility_meter"')
    text = text.replace('name = "wind"', 'name = "rack-01"')
    text = text.replace("max_current_a = 1000.0", 'bms = "bms-1"')
    assert main(["config", "check", str(_write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    expected = [
        "(top level): device names must be unique; repeated: rack-01",
        "(top level): no device has role 'grid_meter'; the control law needs the grid power",
        "devices[4].max_current_a: device 'bms-1' is a BMS without max_current_a; set it to",
        "devices[4].bms: device 'bms-1' has bms = 'bms-1' but role 'bms'; only a PCS names",
    ]
    for line in expected:
        assert f"\n  {line}" in err
    assert "4 error(s)" in err
    assert "{" not in err


def test_config_unknown_bms_name(tmp_path):
    text = EXAMPLE.read_text(encoding="utf-8").replace('bms = "bms-1"', 'bms = "bms-9"')
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert info.value.problems == [
        "devices[3].bms: device 'pcs-1' names bms = 'bms-9', which is not a device with role "
        "'bms' (BMS devices: bms-1)"
    ]


def test_config_missing_file_hints(tmp_path, capsys):
    absent = str(tmp_path / "absent.toml")
    assert main(["config", "check", absent]) == 2
    err = capsys.readouterr().err
    assert f"{absent}: file not found; check the FILE argument" in err
    assert "--config" not in err

    assert main(["run", "--config", absent]) == 2
    err = capsys.readouterr().err
    assert f"{absent}: file not found; pass the site file with --config FILE" in err

    with pytest.raises(ConfigError) as info:
        load_config(absent)
    assert info.value.problems == [f"{absent}: file not found; check the path"]
