"""crowdfl-agent's one-shot commands and config validation (no broker needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import AgentConfig
from crowdfl.config import load_config
from crowdfl.errors import ConfigError


def _cfg(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(f'state_dir = "{tmp_path / "state"}"\n[mqtt]\nport = 8883\ntls = true\nca_file = "/etc/ca.pem"\n{extra}')
    return p


def test_provision_creates_keys_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path)
    assert main(["--config", str(cfg), "provision"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first["sign_key"]) == 64 and first["mqtt_username"] == first["node_id"][:16]
    key = tmp_path / "state" / "identity.json"
    assert key.stat().st_mode & 0o777 == 0o600
    assert main(["--config", str(cfg), "provision"]) == 0
    assert json.loads(capsys.readouterr().out)["node_id"] == first["node_id"]


def test_import_validates_lines_and_status_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path)
    lines = [
        {"device_id": "p1", "kind": "fridge", "ts": 1_790_000_000 + 900 * i, "power_w": 80, "energy_total_kwh": 0.02 * i}
        for i in range(1, 5)
    ]
    src = tmp_path / "log.jsonl"
    src.write_text(
        "\n".join(json.dumps(x) for x in lines)
        + '\n{"device_id": "p1", "kind": "toaster", "ts": 1790000000, "power_w": 1, "energy_total_kwh": 0}\nnot json\n[1,2]\n'
    )
    assert main(["--config", str(cfg), "import", str(src)]) == 0
    assert "imported 4 new reports" in capsys.readouterr().out
    assert main(["--config", str(cfg), "status"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["usage_reports"] == 4 and st["samples_released"] == 0 and st["spool_pending"] == 0


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key.*prot"):
        load_config(AgentConfig, _cfg(tmp_path, "prot = 1\n"), None)
    with pytest.raises(ConfigError, match="mqtt.port: expected an integer"):
        load_config(AgentConfig, _cfg(tmp_path), "X", {"X__MQTT__PORT": "eighty"})
    cfg = load_config(AgentConfig, _cfg(tmp_path), "X", {"X__MQTT__PORT": "1884", "X__PRIVACY__MAX_EPSILON": "2.5"})
    assert cfg.mqtt.port == 1884 and cfg.mqtt.tls is True and cfg.privacy.max_epsilon == 2.5
    bad = tmp_path / "bad.toml"
    bad.write_text("state_dir = \n")
    assert main(["--config", str(bad), "status"]) == 2


def test_config_option_after_the_subcommand_and_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)
    assert main(["provision", "--config", str(cfg)]) == 0
    node = json.loads(capsys.readouterr().out)["node_id"]
    monkeypatch.setenv("CROWDFL_CONFIG", str(cfg))  # what the systemd unit sets
    assert main(["provision"]) == 0
    assert json.loads(capsys.readouterr().out)["node_id"] == node


def test_csv_import_validates_rows_and_the_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path)
    good = tmp_path / "plugs.csv"
    good.write_text(
        "device_id,kind,ts,power_w,energy_total_kwh,on\n"
        "p1,kettle,1790000900,0,0.10,0\n"
        "p1,kettle,1790001800,2000,0.60,1\n"
        "p1,kettle,not-a-time,1,1,1\n"
        "p1,spaceship,1790002700,1,1,1\n"
        "p1,kettle,1790003600,-5,0.70,1\n"
    )
    assert main(["--config", str(cfg), "import", str(good)]) == 0
    assert "imported 2 new reports" in capsys.readouterr().out
    bad = tmp_path / "other.csv"
    bad.write_text("device,when,watts\nx,1,2\n")
    assert main(["--config", str(cfg), "import", str(bad)]) == 2
    assert "lacks column(s) device_id" in capsys.readouterr().err


def test_status_shows_the_budget_per_hour_and_day_beside_the_default_caps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.privacy import release_spend
    from agent.state import AgentState
    from tests.helpers import make_spec

    cfg = _cfg(tmp_path)
    (tmp_path / "state").mkdir()
    spec = make_spec(epsilon=4.0, window_hours=24, window_stride_hours=24)
    h0 = 490_000 * 24  # midnight UTC
    state = AgentState(tmp_path / "state" / "state.sqlite")
    try:  # two daily windows, as the default task releases them
        state.release("t", 1, [h0 + 24, h0 + 48], 4.0, "x", lambda s: b"e", spend=release_spend([h0 + 24, h0 + 48], spec))
    finally:
        state.close()
    assert main(["--config", str(cfg), "status"]) == 0
    st = json.loads(capsys.readouterr().out)
    p = st["privacy_per_hour"]
    assert (p["max_epsilon_per_hour"], p["max_epsilon_per_day"], p["hours_accounted"]) == (4.0, 4.0, 48)
    assert (p["cap_per_hour"], p["cap_per_day"]) == (8.0, 8.0)  # on when the owner sets nothing
    off = _cfg(tmp_path, "[privacy]\nmax_epsilon_per_hour = 0\nmax_epsilon_per_day = 0\n")
    assert main(["--config", str(off), "status"]) == 0
    p = json.loads(capsys.readouterr().out)["privacy_per_hour"]
    assert (p["cap_per_hour"], p["cap_per_day"]) == (None, None)
