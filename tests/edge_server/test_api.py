"""edge_server.api: /healthz tells ok/degraded/failing; /metrics is valid Prometheus text and counts what happened."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from crowdfl.mqtt import Incoming
from edge_server.api import HttpServer, create_app
from crowdfl.metrics import Exposition, Histogram
from edge_server.service import EdgeServer
from edge_server.store import EdgeStore
from tests.edge_server.fakes import FakeLink, RecordingCoordinator, make_world

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse_exposition(text: str) -> dict[str, dict[str, float]]:
    """A strict reader of format 0.0.4: every sample belongs to a family declared by HELP and TYPE."""
    assert text.endswith("\n")
    families: dict[str, str] = {}
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped") and name not in families
            families[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not an exposition sample: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(4)
        # a counter family is declared without its _total suffix (OpenMetrics style, as prometheus-client writes it)
        base = re.sub(r"_(bucket|sum|count|total)$", "", name) if name not in families else name
        assert base in families, f"sample {name} has no TYPE line"
        if families[base] == "counter":
            assert name.endswith("_total")
        out.setdefault(name, {})[labels] = float(value)
    return out


def test_histogram_is_cumulative() -> None:
    h = Histogram((0.5, 1.0))
    for v in (0.1, 0.7, 0.9, 3.0):
        h.observe(v)
    x = Exposition()
    x.histogram("t_seconds", "help", h)
    m = parse_exposition(x.render())
    assert m["t_seconds_bucket"] == {'{le="0.5"}': 1, '{le="1.0"}': 3, '{le="+Inf"}': 4}
    assert m["t_seconds_count"][""] == 4 and m["t_seconds_sum"][""] == pytest.approx(4.7)
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


def test_label_values_are_escaped() -> None:
    x = Exposition()
    x.counter("c_total", 'a "quoted"\nhelp', {(("reason", 'we"ird\\\n'),): 2})
    assert parse_exposition(x.render())["c_total"] == {'{reason="we\\"ird\\\\\\n"}': 2}


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def _wait(cond, timeout: float = 300.0) -> None:  # type: ignore[no-untyped-def]  # TF training on a loaded 2-core machine
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_health_and_metrics_of_a_running_edge(tmp_path: Path) -> None:
    world = make_world(devices=2)
    store = EdgeStore(f"sqlite:///{tmp_path / 'edge.sqlite'}")
    store.register_devices([(d.node_id, d.public.enc_key.hex()) for d in world.devices])
    link = FakeLink()
    edge = EdgeServer(world.edge, world.coordinator.public, store, link, RecordingCoordinator(), world.fetch, resubmit_every_s=0.5)  # type: ignore[arg-type]
    http = HttpServer(create_app(edge), "127.0.0.1", 0)
    http.start()
    try:
        status, _, body = _get(f"{http.url}/healthz")
        assert status == 503 and json.loads(body)["status"] == "failing"  # not started: no threads
        edge.start()
        status, _, body = _get(f"{http.url}/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["database"] is True

        d1, d2 = world.devices
        msgs = [*world.control(selected=(d1,)), world.batch(d1, 1, [1, 2, 3]), world.batch(d2, 1, [4, 5])]
        bad = Incoming(msgs[2].topic, msgs[2].payload[:-1] + bytes([msgs[2].payload[-1] ^ 1]), False)
        for m in [*msgs, msgs[2], bad, Incoming("crowdfl/v1/feat/x/y", b"junk", False)]:
            link.inbox.put(m)
        _wait(lambda: edge.stats.submitted == 1)

        status, ctype, text = _get(f"{http.url}/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        m = parse_exposition(text)
        assert m["crowdfl_edge_messages_total"][""] == 5
        assert m["crowdfl_edge_batches_accepted_total"][""] == 2
        assert m["crowdfl_edge_batches_duplicate_total"][""] == 1
        assert m["crowdfl_edge_messages_rejected_total"] == {'{reason="bad_topic"}': 1, '{reason="decrypt_failed"}': 1}
        assert m["crowdfl_edge_samples_stored_total"][""] == 5
        assert m["crowdfl_edge_trained_total"][""] == 1  # d2 is not selected
        assert m["crowdfl_edge_train_seconds_count"][""] == 1 and m["crowdfl_edge_train_seconds_sum"][""] > 0
        assert m["crowdfl_edge_train_seconds_bucket"]['{le="+Inf"}'] == 1
        assert m["crowdfl_edge_updates_submitted_total"][""] == 1
        assert m["crowdfl_edge_updates_rejected_total"][""] == 0
        assert m["crowdfl_edge_updates_unsubmitted"][""] == 0
        assert m["crowdfl_edge_training_queue_depth"][""] == 0
        assert m["crowdfl_edge_inbox_depth"][""] == 0
        assert m["crowdfl_edge_mqtt_connected"][""] == 1

        link.connected.clear()
        status, _, body = _get(f"{http.url}/healthz")
        assert status == 200 and json.loads(body)["status"] == "degraded"
    finally:
        http.stop()
        edge.stop()


def test_http_and_ingest_settings_are_validated(tmp_path: Path) -> None:
    from crowdfl.errors import ConfigError
    from edge_server.config import load

    cfg = tmp_path / "edge.toml"
    cfg.write_text('[http]\nport = 9100\nhost = "127.0.0.1"\n')
    assert load(cfg).http.port == 9100 and load(cfg).http.enabled and load(cfg).ingest_workers == 0
    for bad in ("[http]\nport = 70000\n", "[http]\nprot = 1\n", "ingest_workers = -1\n"):
        cfg.write_text(bad)
        with pytest.raises(ConfigError):
            load(cfg)


def test_status_command_reports_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_server.cli import main

    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    assert main(["--config", str(cfg), "status"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batches"] == 0 and out["unsubmitted_updates"] == 0 and out["rejections"] == {}
