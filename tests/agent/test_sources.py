"""agent.sources and the [[plugs]] config: plug telemetry is decoded exactly, anything else is refused with a reason."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, PlugSettings
from agent.sources import PlugDecoder, PlugInputError, PlugMqttSource, SimulatedSource, UsageSource
from crowdfl.config import load_config
from crowdfl.errors import ConfigError
from crowdfl.mqtt import MqttSettings

NOW = 1_795_000_000.0
PLUGS = (
    PlugSettings(topic="fridge_plug", kind="fridge"),
    PlugSettings(topic="shellyplug-s-7A1B2C", kind="washing_machine", firmware="shelly_gen1"),
    PlugSettings(topic="shellies-plus/kettle", kind="kettle", firmware="shelly_gen2", device_id="kitchen-kettle"),
)


def decoder() -> PlugDecoder:
    return PlugDecoder(PLUGS)


def code(d: PlugDecoder, topic: str, payload: bytes) -> str:
    with pytest.raises(PlugInputError) as exc:
        d.decode(topic, payload, NOW)
    return exc.value.code


def test_topics_follow_each_firmware() -> None:
    assert decoder().topics() == sorted([
        "tele/fridge_plug/SENSOR", "stat/fridge_plug/POWER",
        "shellies/shellyplug-s-7A1B2C/relay/0/power", "shellies/shellyplug-s-7A1B2C/relay/0/energy",
        "shellies/shellyplug-s-7A1B2C/relay/0", "shellies-plus/kettle/status/switch:0",
    ])


def test_tasmota_sensor_and_power_state() -> None:
    d = decoder()
    assert d.decode("stat/fridge_plug/POWER", b"OFF", NOW) is None  # no meter reading yet: nothing to anchor to
    r = d.decode("tele/fridge_plug/SENSOR", json.dumps({
        "Time": "2026-11-26T05:00:00",
        "ENERGY": {"TotalStartTime": "2026-01-01T00:00:00", "Total": 3.25, "Yesterday": 0.8, "Today": 0.2, "Power": 95, "Voltage": 230},
    }).encode(), NOW)
    assert r is not None and (r.device_id, r.kind, r.ts, r.power_w, r.energy_total_kwh, r.on) == (
        "tasmota:fridge_plug", "fridge", NOW, 95.0, 3.25, True)
    assert d.decode("stat/fridge_plug/POWER", b"ON", NOW + 1) is None
    off = d.decode("stat/fridge_plug/POWER", b"OFF", NOW + 2)
    assert off is not None and (off.power_w, off.energy_total_kwh, off.on) == (0.0, 3.25, False)
    multi = d.decode("tele/fridge_plug/SENSOR", b'{"ENERGY":{"Total":3.3,"Power":[1,2.5]}}', NOW + 3)
    assert multi is not None and multi.power_w == 3.5 and not multi.on


def test_shelly_gen1_pairs_power_with_the_watt_minute_meter() -> None:
    d = decoder()
    base = "shellies/shellyplug-s-7A1B2C/relay/0"
    assert d.decode(f"{base}/power", b"1200.5", NOW) is None
    r = d.decode(f"{base}/energy", b"120000", NOW + 1)
    assert r is not None and r.energy_total_kwh == 2.0 and r.power_w == 1200.5 and r.on
    stale = d.decode(f"{base}/energy", b"120060", NOW + 3600)  # the power reading is an hour old
    assert stale is not None and stale.power_w == 0.0 and stale.energy_total_kwh == pytest.approx(2.001)
    assert d.decode(base, b"on", NOW + 3601) is None
    off = d.decode(base, b"overpower", NOW + 3602)
    assert off is not None and off.power_w == 0.0 and off.energy_total_kwh == pytest.approx(2.001)


def test_shelly_gen2_switch_status() -> None:
    d = decoder()
    t = "shellies-plus/kettle/status/switch:0"
    r = d.decode(t, json.dumps({
        "id": 0, "source": "WS_in", "output": True, "apower": 2150.0, "voltage": 230.1, "current": 9.3,
        "aenergy": {"total": 1234.5, "by_minute": [35833.0, 0.0, 0.0], "minute_ts": 1795000000},
        "temperature": {"tC": 41.2, "tF": 106.2},
    }).encode(), NOW)
    assert r is not None and (r.device_id, r.kind, r.power_w, r.energy_total_kwh) == ("kitchen-kettle", "kettle", 2150.0, 1.2345)
    off = d.decode(t, b'{"id":0,"output":false}', NOW + 1)  # a status without the meter: the relay went off
    assert off is not None and off.power_w == 0.0 and off.energy_total_kwh == 1.2345


def test_every_kind_of_bad_input_has_its_reason() -> None:
    d = decoder()
    sensor, g1, g2 = "tele/fridge_plug/SENSOR", "shellies/shellyplug-s-7A1B2C/relay/0", "shellies-plus/kettle/status/switch:0"
    assert code(d, "tele/other_plug/SENSOR", b"{}") == "unexpected_topic"
    assert code(d, sensor, b"x" * 20_000) == "oversized"
    assert code(d, sensor, b"\xff\xfe") == "not_utf8"
    assert code(d, sensor, b'{"ENERGY":') == "bad_json"
    assert code(d, sensor, b'{"ENERGY":{"Total":NaN}}') == "bad_json"
    assert code(d, sensor, b'{"ENERGY":{"Total":Infinity}}') == "bad_json"
    assert code(d, sensor, b"[1, 2]") == "bad_json"
    assert code(d, sensor, b"[" * 3000 + b"]" * 3000) == "bad_json"
    assert code(d, sensor, b'{"AM2301":{"Temperature":20}}') == "no_energy"
    assert code(d, sensor, b'{"ENERGY":{"Power":5}}') == "no_energy"
    assert code(d, sensor, b'{"ENERGY":{"Total":-0.1,"Power":5}}') == "bad_value"
    assert code(d, sensor, b'{"ENERGY":{"Total":"1.0","Power":5}}') == "bad_value"
    assert code(d, sensor, b'{"ENERGY":{"Total":true,"Power":5}}') == "bad_value"
    assert code(d, sensor, b'{"ENERGY":{"Total":1,"Power":[1,null]}}') == "bad_value"
    assert code(d, sensor, b'{"ENERGY":{"Total":1e300,"Power":5}}') == "invalid_report"  # finite, but no plug meters that
    assert code(d, sensor, b'{"ENERGY":{"Total":1,"Power":2e6}}') == "invalid_report"
    assert code(d, sensor, b'{"ENERGY":{"Total":1' + b"0" * 400 + b',"Power":5}}') == "bad_value"  # int too big for a float
    assert code(d, sensor, b'{"ENERGY":{"Total":1' + b"0" * 5000 + b',"Power":5}}') == "bad_json"  # beyond int parsing
    assert code(d, "stat/fridge_plug/POWER", b"TOGGLE") == "bad_state"
    assert code(d, f"{g1}/energy", b"12kWh") == "bad_value"
    assert code(d, f"{g1}/energy", b"inf") == "bad_value"
    assert code(d, f"{g1}/power", b"-3") == "bad_value"
    assert code(d, g1, b"maybe") == "bad_state"
    assert code(d, g2, b'{"id":1,"aenergy":{"total":1}}') == "bad_value"
    assert code(d, g2, b'{"id":0,"output":"yes","aenergy":{"total":1}}') == "bad_value"
    assert code(d, g2, b'{"id":0,"output":true}') == "no_energy"
    assert code(d, g2, b'{"id":0,"aenergy":{"by_minute":[]}}') == "no_energy"
    assert code(d, g2, b'{"id":0,"apower":-5,"aenergy":{"total":1}}') == "bad_value"


@settings(max_examples=300, deadline=None)
@given(topic=st.sampled_from(decoder().topics() + ["tele/x/SENSOR"]), payload=st.binary(max_size=300) | st.from_regex(rb"\{.*\}", fullmatch=True))
def test_arbitrary_input_is_a_valid_report_or_a_reasoned_refusal(topic: str, payload: bytes) -> None:
    d = decoder()
    try:
        r = d.decode(topic, payload, NOW)
    except PlugInputError as exc:
        assert exc.code and exc.detail
        return
    if r is not None:
        assert r.power_w >= 0 and r.energy_total_kwh >= 0 and r.ts == NOW


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**400) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(total=_json_values, power=_json_values, ident=_json_values, output=_json_values)
def test_well_formed_json_with_any_values_never_crashes(total: object, power: object, ident: object, output: object) -> None:
    d = decoder()
    tasmota = json.dumps({"ENERGY": {"Total": total, "Power": power}}).encode()
    gen2 = json.dumps({"id": ident, "output": output, "apower": power, "aenergy": {"total": total}}).encode()
    for topic, payload in (("tele/fridge_plug/SENSOR", tasmota), ("shellies-plus/kettle/status/switch:0", gen2)):
        try:
            r = d.decode(topic, payload, NOW)
        except PlugInputError:
            continue
        assert r is not None and 0 <= r.power_w <= 100_000 and 0 <= r.energy_total_kwh <= 1e9


def test_source_counts_and_logs_skips(caplog: pytest.LogCaptureFixture) -> None:
    src = PlugMqttSource(MqttSettings(), PLUGS, "test")  # never started: handle() is the pump's per-message step
    caplog.set_level(logging.WARNING, logger="agent.sources")
    src.handle("tele/fridge_plug/SENSOR", b'{"ENERGY":{"Total":1,"Power":2}}', NOW)
    for i in range(25):
        src.handle("tele/fridge_plug/SENSOR", b"garbage", NOW + i)
    src.handle("tele/fridge_plug/SENSOR", b'{"ENERGY":{"Total":1.1,"Power":2}}', NOW + 30)
    assert [r.energy_total_kwh for r in src.poll(NOW + 31)] == [1.0, 1.1] and src.poll(NOW + 32) == []
    assert src.stats.received == 27 and src.stats.reports == 2 and src.stats.skipped == {"bad_json": 25}
    assert len(caplog.records) == PlugMqttSource.LOG_FIRST  # a broken plug cannot flood the journal
    assert "bad_json" in caplog.records[0].getMessage()


def test_simulated_and_plug_sources_are_usage_sources() -> None:
    def takes(src: UsageSource) -> UsageSource:
        return src

    takes(PlugMqttSource(MqttSettings(), PLUGS, "x"))
    takes(SimulatedSource.__new__(SimulatedSource))


def _toml(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(body)
    return p


def test_plugs_config_is_strict(tmp_path: Path) -> None:
    good = _toml(tmp_path, '[plug_mqtt]\nhost = "192.168.1.2"\n[[plugs]]\ntopic = "fridge_plug"\nkind = "fridge"\n'
                           '[[plugs]]\ntopic = "shellyplug-s-1"\nkind = "kettle"\nfirmware = "shelly_gen1"\nchannel = 0\n')
    cfg = load_config(AgentConfig, good, None)
    assert [p.log_id for p in cfg.plugs] == ["tasmota:fridge_plug", "shelly_gen1:shellyplug-s-1"]
    assert cfg.plug_mqtt.host == "192.168.1.2"
    for body, match in [
        ('[[plugs]]\ntopic = "a"\nkind = "toaster"\n', r"plugs\[0\].*kind must be one of"),
        ('[[plugs]]\ntopic = "a"\nkind = "fridge"\nfirmware = "zigbee"\n', "firmware must be one of"),
        ('[[plugs]]\ntopic = "a/#"\nkind = "fridge"\n', "wildcards"),
        ('[[plugs]]\ntopic = "a/b"\nkind = "fridge"\n', "one level"),
        ('[[plugs]]\ntopic = "a"\nkind = "fridge"\ncolour = "red"\n', r"plugs\[0\]: unknown key.*colour"),
        ('[[plugs]]\ntopic = "a"\n', "kind"),
        ('[[plugs]]\ntopic = "a"\nkind = "fridge"\n[[plugs]]\ntopic = "a"\nkind = "kettle"\n', "configured twice"),
        ('plugs = "a"\n', "expected a table"),
        ('[source]\nkind = "zigbee"\n', "source.kind"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(AgentConfig, _toml(tmp_path, body), None)
