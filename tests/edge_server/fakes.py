"""In-process stand-ins for the edge's two network neighbours (MQTT link, coordinator), recording what they see."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from crowdfl.backmodel import initial_back_weights
from crowdfl.envelope import parse, seal
from crowdfl.identity import Identity, short_id
from crowdfl.messages import CODEC, FeatureBatch, ModelUpdate, ModelWeights, RoundStart, TaskSpec, sha256_hex
from crowdfl.mqtt import Incoming, feature_topic, round_topic, task_topic
from edge_server.submit import SubmitResult
from tests.helpers import make_spec, with_receipt


class FakeLink:
    """The part of MqttLink the edge uses: an inbox, a connected flag, publish."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self.connected = threading.Event()
        self.dropped = 0
        self.published: list[tuple[str, bytes]] = []

    def start(self) -> None:
        self.connected.set()

    def stop(self) -> None:
        self.connected.clear()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))


@dataclass
class RecordingCoordinator:
    """Answers like coordinator/service.py's intake: received once per update hash, duplicate after."""

    available: bool = True
    posts: list[bytes] = field(default_factory=list)
    by_key: dict[tuple[str, int, str], set[str]] = field(default_factory=dict)

    def submit(self, envelope: bytes) -> SubmitResult:
        if not self.available:
            return SubmitResult("retry", "HTTP 503", reached=False)
        self.posts.append(envelope)
        sealed = parse(envelope)
        upd = CODEC.decode(sealed.body, ModelUpdate)
        seen = self.by_key.setdefault((upd.task_id, upd.round, upd.customer), set())
        if sealed.digest in seen:
            return SubmitResult("duplicate")
        seen.add(sealed.digest)
        return SubmitResult("received") if len(seen) == 1 else SubmitResult("rejected", "conflict")


@dataclass(frozen=True)
class World:
    """A task, its initial model and the identities around one edge."""

    coordinator: Identity
    edge: Identity
    devices: tuple[Identity, ...]
    spec: TaskSpec
    model_bytes: bytes
    history: dict[tuple[str, str], list[tuple[bytes, int]]] = field(default_factory=dict)  # earlier batches, for receipts

    def fetch(self, address: str) -> bytes:
        if address != sha256_hex(self.model_bytes):
            raise KeyError(address)
        return self.model_bytes

    def control(self, selected: tuple[Identity, ...], round_: int = 1) -> list[Incoming]:
        rs = RoundStart(self.spec.task_id, round_, self.spec.initial_model_hash, tuple(d.node_id for d in selected), self.spec.deadline)
        return [
            Incoming(task_topic(self.spec.task_id), seal(CODEC.encode(self.spec), self.coordinator, 1), True),
            Incoming(round_topic(self.spec.task_id), seal(CODEC.encode(rs), self.coordinator, 1 + round_), True),
        ]

    def batch(self, device: Identity, seq: int, ids: list[int], round_: int = 1, seed: int = 0) -> Incoming:
        rng = np.random.default_rng(seed + seq)
        n = len(ids)
        b = FeatureBatch(
            self.spec.task_id, round_, np.array(ids, np.uint64), rng.random((n, self.spec.feature_dim), dtype=np.float32),
            rng.integers(0, self.spec.num_classes, n).astype(np.int8), self.spec.epsilon, self.spec.clip_l1,
        )
        b = with_receipt(b, device, self.edge.node_id, self.history)
        topic = feature_topic(short_id(self.edge.node_id), short_id(device.node_id))
        env = seal(CODEC.encode(b), device, seq, self.edge.public, context=topic.encode())
        return Incoming(topic, env, False)


def make_world(devices: int = 3, edge: Identity | None = None, coordinator: Identity | None = None) -> World:
    base = make_spec(local_epochs=1)
    weights = initial_back_weights(base, 1)
    model = CODEC.encode(ModelWeights(base.task_id, 0, tuple(weights)))
    spec = make_spec(local_epochs=1, initial_model_hash=sha256_hex(model))
    return World(
        coordinator or Identity.generate(), edge or Identity.generate(),
        tuple(Identity.generate() for _ in range(devices)), spec, model,
    )
