"""The parts around an agent, for the agent's integration tests: the real coordinator (embedded
chain, content store, Flask API), a real edge server, and the MQTT settings each role uses.

Only the broker differs between tests (real mosquitto with TLS and accounts, or embedded amqtt),
so the roles get their settings from ``mqtt_for(role, short_id)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdfl.artifacts import fetch_artifact
from crowdfl.household import PlugReport, sample_profile
from crowdfl.identity import Identity, short_id
from crowdfl.mqtt import MqttLink, MqttSettings

MqttFor = Callable[[str, str], MqttSettings]  # (role: coordinator | edge | device, short id)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it is truthy; fail the test naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def household_reports(name: str, start: Any, days: int, seed: int = 5) -> list[PlugReport]:
    import numpy as np

    from agent.sources import SimulatedSource

    profile = sample_profile(name, np.random.default_rng(seed))
    return SimulatedSource(profile, start, 900, seed).backfill(days)


@dataclass
class EdgeCounts:
    samples: int
    sample_ids: list[int]
    envelopes: list[tuple[int, str]]  # (seq, digest)


def edge_counts(db: Path, device: str, task_id: str, feature_dim: int) -> EdgeCounts:
    """What the edge's database holds from ``device``, through the edge store's own read API
    (the envelopes' seqs from its batches table: a device's seqs start at the clock, not at 1)."""
    from sqlalchemy import select

    from edge_server.store import BatchRow, EdgeStore

    if not db.exists():
        return EdgeCounts(0, [], [])
    store = EdgeStore(f"sqlite:///{db}")
    try:
        ids = sorted(int(x) for x in store.customer_data(device, task_id, feature_dim).sample_ids)
        with store.sessions() as s:
            seqs = [int(q) for q in s.scalars(select(BatchRow.seq).where(BatchRow.device == device))]
        known = store.known_envelopes([(device, q) for q in seqs])
    finally:
        store.close()
    return EdgeCounts(len(ids), ids, sorted((seq, digest) for (_, seq), digest in known.items()))


class World:
    """Coordinator + API + one edge server around the devices under test."""

    def __init__(self, workdir: Path, designed: Any, mqtt_for: MqttFor, devices: list[Identity]) -> None:
        from coordinator.api import ApiServer, create_app
        from coordinator.chain import ChainConfig, connect
        from coordinator.contracts import CrowdContracts
        from coordinator.db import make_sessions
        from coordinator.service import Coordinator
        from coordinator.store import LocalContentStore

        self.workdir = workdir
        self.designed = designed
        self.spec = designed.spec
        self.mqtt_for = mqtt_for
        self._cleanups: list[Callable[[], None]] = []
        self.coord_id = Identity.generate()
        self.edge_id = Identity.generate()
        self.edge_db = workdir / "edge.sqlite"
        self.edge: Any = None
        try:
            contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
            short = short_id(self.coord_id.node_id)
            self.publisher = MqttLink(mqtt_for("coordinator", short), f"coordinator-{short}", [])
            self.publisher.start()
            self._cleanups.append(self.publisher.stop)
            wait_for(self.publisher.connected.is_set, 15, "the coordinator's MQTT connection")

            def publish(topic: str, payload: bytes, retain: bool) -> None:
                self.publisher.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

            self.coordinator = Coordinator(
                self.coord_id, make_sessions(f"sqlite:///{workdir / 'coordinator.sqlite'}"),
                LocalContentStore(workdir / "store"), contracts, publish, evaluate=lambda w: 0.5,
            )
            self.api = ApiServer(create_app(self.coordinator))
            self.api.start()
            self._cleanups.append(self.api.stop)
            self.edge_mqtt = mqtt_for("edge", short_id(self.edge_id.node_id))
            self.coordinator.register(
                [(self.edge_id.public, "edge", None, None)] + [(d.public, "device", self.edge_id.node_id, None) for d in devices]
            )
            from edge_server.store import EdgeStore

            store = EdgeStore(f"sqlite:///{self.edge_db}")
            store.register_devices([(d.node_id, d.public.enc_key.hex()) for d in devices])
            store.close()
            self.coordinator.publish_task(self.spec, designed.front_tflite, designed.initial)
        except BaseException:
            self.close()
            raise

    def fetch(self, h: str) -> bytes:
        return fetch_artifact(self.api.url, h)

    def start_edge(self) -> Any:
        from edge_server.service import EdgeServer
        from edge_server.store import EdgeStore
        from edge_server.submit import CoordinatorClient

        short = short_id(self.edge_id.node_id)
        link = MqttLink(self.edge_mqtt, f"edge-{short}", EdgeServer.subscriptions(short))
        self.edge = EdgeServer(
            self.edge_id, self.coord_id.public, EdgeStore(f"sqlite:///{self.edge_db}"), link,
            CoordinatorClient(self.api.url), self.fetch, seed=0,
        )
        self.edge.start()
        wait_for(link.connected.is_set, 15, "the edge's MQTT connection")
        return self.edge

    def stop_edge(self) -> None:
        if self.edge is not None:
            self.edge.stop()
            self.edge = None

    def open_round(self, n: int) -> None:
        self.coordinator.open_round(self.spec.task_id, n)

    def step_until_round(self, n: int, timeout: float) -> None:
        """Drive the coordinator (closing rounds as updates arrive) until round ``n`` is open."""

        def opened() -> bool:
            self.coordinator.step(self.spec.task_id, round_timeout_s=3600)
            rnd = self.coordinator.current_round(self.spec.task_id)
            return rnd is not None and rnd.round >= n

        wait_for(opened, timeout, f"round {n} to open", interval=0.2)

    def agent_toml(self, state_dir: Path, device_mqtt: MqttSettings, extra: str = "") -> str:
        """An agent config file for ``crowdfl-agent`` (no simulated source: the test imports history)."""
        lines = [
            f'state_dir = "{state_dir}"',
            "resend_after_s = 2.0",
            "shutdown_grace_s = 5.0",
            "[source]",
            'kind = "none"',
            "poll_s = 0.2",
            "[mqtt]",
            f'host = "{device_mqtt.host}"',
            f"port = {device_mqtt.port}",
            "reconnect_min_s = 1",
            "reconnect_max_s = 2",
            "[edge]",
            f'sign_key = "{self.edge_id.public.sign_key.hex()}"',
            f'enc_key = "{self.edge_id.public.enc_key.hex()}"',
            "[coordinator]",
            f'sign_key = "{self.coord_id.public.sign_key.hex()}"',
            f'url = "{self.api.url}"',
            "[privacy]",
            "max_epsilon = 8.0",
            # caps off: these worlds release many overlapping windows from a 4-day log to exercise
            # the spool and the ledger (the default caps: tests/agent/test_service.py, test_accountant.py)
            "max_epsilon_per_hour = 0",
            "max_epsilon_per_day = 0",
        ]
        return "\n".join(lines) + "\n" + extra

    def close(self) -> None:
        self.stop_edge()
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception:  # cleanup: the first failure must not hide the others
                pass
        self._cleanups.clear()
