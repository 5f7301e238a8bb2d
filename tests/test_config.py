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
    text = text.replace('port = 502 }\nunit_id = 1\npoll_period_ms = 100\nrated_kw', 'port = 70000 }\nunit_id = 1\npoll_period_ms = 100\nrated_kw')
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
    text = EXAMPLE.read_text(encoding="utf-8").replace("soc_soft_min_pct = 15.0", "soc_soft_min_pct = 95.0")
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert any("SoC band" in p and "95.0" in p for p in info.value.problems)


def test_config_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[site\nname="))
