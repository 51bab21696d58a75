"""The sample Grafana dashboard only queries metrics the running roles actually export.

Each role is started with its real metrics endpoint on 127.0.0.1 (the agent's stdlib server, the
edge's and the coordinator's Flask apps) and scraped over HTTP; the names come from what they
serve, so the check holds whatever library renders the exposition.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_SUFFIX = re.compile(r"_(bucket|sum|count|created)$")


def exported_names(text: str) -> set[str]:
    """Metric families in a text exposition: declared by TYPE or seen as samples; histogram and
    summary sample suffixes folded into their family."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split(" ")[2])
        elif line and not line.startswith("#"):
            names.add(_SUFFIX.sub("", re.split(r"[{ ]", line, maxsplit=1)[0]))
    return names


def scrape(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return exported_names(r.read().decode())


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    from agent.metrics import MetricsServer
    from agent.privacy import HourCaps, PrivacyPolicy
    from agent.service import Agent
    from agent.state import AgentState
    from agent.usage_log import UsageLog
    from coordinator.api import ApiServer
    from coordinator.api import create_app as coordinator_app
    from coordinator.chain import ChainConfig, connect
    from coordinator.contracts import CrowdContracts
    from coordinator.db import make_sessions
    from coordinator.service import Coordinator
    from coordinator.store import LocalContentStore
    from crowdfl.identity import Identity, short_id
    from crowdfl.mqtt import MqttLink, MqttSettings
    from edge_server.api import HttpServer
    from edge_server.api import create_app as edge_app
    from edge_server.service import EdgeServer
    from edge_server.store import EdgeStore
    from tests.coordinator.world import update_env
    from tests.edge_server.fakes import FakeLink, RecordingCoordinator, make_world

    tmp = tmp_path_factory.mktemp("scrape")
    stops: list = []  # type: ignore[type-arg]
    try:
        # the agent, as crowdfl-agent runs it (its MQTT link is never started here)
        device, coord_id, edge_id = Identity.generate(), Identity.generate(), Identity.generate()
        short = short_id(device.node_id)

        def no_fetch(h: str) -> bytes:
            raise AssertionError("nothing to fetch in this test")

        agent = Agent(
            device, coord_id.public, edge_id.public, UsageLog(tmp / "usage.sqlite"), AgentState(tmp / "state.sqlite"),
            MqttLink(MqttSettings(), f"agent-{short}", Agent.subscriptions(short)), no_fetch, tmp / "models",
            PrivacyPolicy(8.0, caps=HourCaps()), np.random.default_rng(0),  # many overlapping windows from a short log
        )
        stops += [agent.state.close, agent.usage_log.close]
        agent_http = MetricsServer(agent)
        agent_http.start()
        stops.append(agent_http.stop)

        # an edge server
        world = make_world(devices=1)
        store = EdgeStore(f"sqlite:///{tmp / 'edge.sqlite'}")
        stops.append(store.close)
        edge = EdgeServer(world.edge, world.coordinator.public, store, FakeLink(), RecordingCoordinator(), world.fetch)  # type: ignore[arg-type]
        edge_http = HttpServer(edge_app(edge), "127.0.0.1", 0)
        edge_http.start()
        stops.append(edge_http.stop)

        # the coordinator on the embedded chain, with one closed round (the accuracy gauge needs one)
        contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
        coord = Coordinator(Identity.generate(), make_sessions(f"sqlite:///{tmp / 'c.sqlite'}"), LocalContentStore(tmp / "store"),
                            contracts, lambda *a: None, evaluate=lambda w: 0.5)
        spec, front, initial = published_task()
        sub_edge, customer = Identity.generate(), Identity.generate()
        coord.register([(sub_edge.public, "edge", None, None), (customer.public, "device", sub_edge.node_id, None)])
        coord.publish_task(spec, front, initial)
        rs = coord.open_round(spec.task_id, 1)
        assert coord.receive_update(update_env(sub_edge, spec, 1, customer, rs.global_model_hash, 0.05, 1)).status == "received"
        coord.close_round(spec.task_id, 1)
        coord_http = ApiServer(coordinator_app(coord), "127.0.0.1", 0)
        coord_http.start()
        stops.append(coord_http.stop)

        yield {
            "agent": scrape(f"http://127.0.0.1:{agent_http.port}/metrics"),
            "edge": scrape(f"{edge_http.url}/metrics"),
            "coordinator": scrape(f"{coord_http.url}/metrics"),
        }
    finally:
        for stop in reversed(stops):
            stop()


def published_task():  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from crowdfl.backmodel import initial_back_weights
    from crowdfl.messages import CODEC, ModelWeights, sha256_hex
    from tests.helpers import make_spec

    spec = make_spec(rounds=2)
    initial = ModelWeights(spec.task_id, 0, tuple(initial_back_weights(spec, 1)))
    front = b"front-model-bytes"
    return replace(spec, initial_model_hash=sha256_hex(CODEC.encode(initial)), front_model_hash=sha256_hex(front)), front, initial


def dashboard_metrics() -> set[str]:
    dash = json.loads((ROOT / "hardware/grafana/crowdfl-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return {_SUFFIX.sub("", m) for e in exprs for m in re.findall(r"crowdfl_[a-z_]+", e)}


def test_exported_names_reads_both_renderings() -> None:
    text = (
        "# HELP crowdfl_x_total x\n# TYPE crowdfl_x_total counter\ncrowdfl_x_total 1\n"
        '# TYPE crowdfl_h histogram\ncrowdfl_h_bucket{le="+Inf"} 0\ncrowdfl_h_sum 0\ncrowdfl_h_count 0\n'
        'crowdfl_g{task="a"} 2\n'
    )
    assert exported_names(text) == {"crowdfl_x_total", "crowdfl_h", "crowdfl_g"}


def test_every_queried_metric_is_exported_by_its_role(scraped: dict[str, set[str]]) -> None:
    for role, names in scraped.items():
        assert any(n.startswith(f"crowdfl_{role}_") for n in names), (role, sorted(names))
    queried = dashboard_metrics()
    assert {m.split("_")[1] for m in queried} == {"agent", "edge", "coordinator"}  # a panel for every role
    missing = sorted(m for m in queried if m not in scraped[m.split("_")[1]])
    assert not missing, f"the dashboard queries metrics no running role exports: {missing}"
