"""The host half of the emulated-device tests: broker, chain, coordinator API and one edge server.

Built as in ``crowdfl_sim/demo.py`` (embedded amqtt broker, eth-tester chain, the coordinator's
Flask API, SQLite), all on 127.0.0.1. The devices are not built here: they run in QEMU, generate
their own keys, and are registered from the public keys they print (as the manufacturer would).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from crowdfl.artifacts import fetch_artifact
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.mqtt import MqttLink, MqttSettings

HISTORY_START = datetime(2026, 9, 1, tzinfo=UTC)
DEVICE_LINE = re.compile(r"crowdfl-firstboot: device (\{.*\})")


@dataclass(frozen=True)
class DeviceKeys:
    """What a device's ``crowdfl-agent provision`` prints, checked."""

    node_id: str
    enc_key: str

    @classmethod
    def parse(cls, text: str) -> DeviceKeys:
        data = json.loads(text)
        node_id, enc_key = str(data["node_id"]), str(data["enc_key"])
        for name, value in (("node_id", node_id), ("enc_key", enc_key)):
            if not re.fullmatch(r"[0-9a-f]{64}", value):
                raise ValueError(f"device printed a bad {name}: {value!r}")
        return cls(node_id, enc_key)

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(bytes.fromhex(self.node_id), bytes.fromhex(self.enc_key))


class HostSide:
    """Everything except the devices; ``close()`` stops all of it."""

    def __init__(self, workdir: Path, samples_per_round: int = 32, epsilon: float = 4.0) -> None:
        from coordinator.api import ApiServer, create_app
        from coordinator.chain import ChainConfig, connect
        from coordinator.contracts import CrowdContracts
        from coordinator.db import make_sessions
        from coordinator.service import Coordinator
        from coordinator.store import LocalContentStore
        from coordinator.task_model import TaskDesign, design_task
        from crowdfl_sim.broker import EmbeddedBroker
        from edge_server.service import EdgeServer
        from edge_server.store import EdgeStore
        from edge_server.submit import CoordinatorClient

        self._cleanups: list[Callable[[], None]] = []
        self._stop = threading.Event()
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.broker = EmbeddedBroker()
            self.broker.start()
            self._cleanups.append(self.broker.stop)
            self.mqtt = MqttSettings(host=self.broker.host, port=self.broker.port)
            self.chain = connect(ChainConfig(kind="embedded"))
            contracts = CrowdContracts.deploy(self.chain)
            designed = design_task(
                TaskDesign(rounds=1, epsilon=epsilon, samples_per_round=samples_per_round, seed=7), HISTORY_START
            )
            self.spec, self._front, self._initial = designed.spec, designed.front_tflite, designed.initial
            self.coord_id = Identity.generate()
            publisher = MqttLink(self.mqtt, f"coordinator-{short_id(self.coord_id.node_id)}", [])
            publisher.start()
            self._cleanups.append(publisher.stop)
            publisher.connected.wait(10)
            self.coordinator = Coordinator(
                self.coord_id, make_sessions(f"sqlite:///{workdir / 'coordinator.sqlite'}"),
                LocalContentStore(workdir / "store"), contracts,
                lambda topic, payload, retain: publisher.publish(topic, payload, qos=1, retain=retain),
            )
            self.api = ApiServer(create_app(self.coordinator))
            self.api.start()
            self._cleanups.append(self.api.stop)
            ident = Identity.generate()
            link = MqttLink(self.mqtt, f"edge-{short_id(ident.node_id)}", EdgeServer.subscriptions(short_id(ident.node_id)))
            self.edge = EdgeServer(
                ident, self.coord_id.public, EdgeStore(f"sqlite:///{workdir / 'edge.sqlite'}"), link,
                CoordinatorClient(self.api.url), lambda h: fetch_artifact(self.api.url, h), seed=0,
            )
            self.coordinator.register([(ident.public, "edge", None, None)])
            self.edge.start()
            self._cleanups.append(self.edge.stop)
            link.connected.wait(10)
        except BaseException:
            self.close()
            raise

    def agent_config(self, mqtt_host: str, mqtt_port: int, coordinator_url: str, seed: int = 0, **top: object) -> str:
        """The crowdfl.toml a manufacturer would drop on the device's boot partition."""
        lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
        lines += [
            "[mqtt]", f'host = "{mqtt_host}"', f"port = {mqtt_port}",
            "[edge]", f'sign_key = "{self.edge.identity.public.sign_key.hex()}"',
            f'enc_key = "{self.edge.identity.public.enc_key.hex()}"',
            "[coordinator]", f'sign_key = "{self.coord_id.public.sign_key.hex()}"', f'url = "{coordinator_url}"',
            "[source]", 'kind = "simulated"', f"seed = {seed}",
        ]
        return "\n".join(lines) + "\n"

    def register(self, devices: list[DeviceKeys]) -> None:
        """What the manufacturer does with the public keys a device printed."""
        self.edge.store.register_devices([(d.node_id, d.enc_key) for d in devices])
        payout = self.chain.w3.eth.account.create().address
        self.coordinator.register([(d.public, "device", self.edge.identity.node_id, payout) for d in devices])

    def publish_task(self) -> None:
        self.coordinator.publish_task(self.spec, self._front, self._initial)
        t = threading.Thread(target=self._rounds, name="rounds", daemon=True)
        t.start()
        self._cleanups.append(lambda: (self._stop.set(), t.join(timeout=30)))

    def _rounds(self) -> None:
        """The coordinator's round loop (opens round 1 with the registered devices selected)."""
        while not self._stop.is_set():
            if self.coordinator.step(self.spec.task_id, 600.0) is None:
                self._stop.wait(0.2)

    def devices_with_batches(self) -> set[str]:
        return self.edge.store.rounds_received(self.spec.task_id, 1)

    def wait_for_batches(self, devices: set[str], timeout: float, alive: Callable[[], bool] = lambda: True) -> float:
        """Seconds until every device's round-1 batch was stored at the edge (``alive``: devices still run)."""
        t0 = time.monotonic()
        while not devices <= self.devices_with_batches():
            if not alive():
                raise AssertionError("a device stopped before its batch arrived")
            if time.monotonic() - t0 > timeout:
                missing = devices - self.devices_with_batches()
                raise TimeoutError(
                    f"no batch from {sorted(d[:16] for d in missing)} after {timeout:.0f} s; "
                    f"edge ingest {self.edge.ingestor.stats}"
                )
            time.sleep(0.5)
        return time.monotonic() - t0

    def close(self) -> None:
        self._stop.set()
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                pass
        self._cleanups.clear()
