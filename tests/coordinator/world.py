"""Builders for coordinator tests: a coordinator on a given chain and database, signed updates."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.contracts import CrowdContracts
from coordinator.db import make_sessions
from coordinator.ledger import LedgerPolicy
from coordinator.service import Coordinator
from coordinator.store import LocalContentStore
from crowdfl.backmodel import initial_back_weights
from crowdfl.envelope import seal
from crowdfl.identity import Identity
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, TaskSpec, sha256_hex
from tests.helpers import make_spec, update_receipt

FRONT = b"front-model-bytes"


def task_parts(**overrides: Any) -> tuple[TaskSpec, ModelWeights]:
    """A small task whose artifact hashes are real (initial head, front bytes)."""
    spec0 = make_spec(**overrides)
    initial = ModelWeights(spec0.task_id, 0, tuple(initial_back_weights(spec0, 1)))
    spec = replace(spec0, initial_model_hash=sha256_hex(CODEC.encode(initial)), front_model_hash=sha256_hex(FRONT))
    return spec, initial


# node id -> Identity of every identity a coordinator test generated (filled by the autouse fixture in
# conftest.py), so a test that names a device by its node id can still have the device sign its receipt
KEYS: dict[str, Identity] = {}


def update_env(
    edge: Identity, spec: TaskSpec, round_: int, customer: str | Identity, base: str, scale: float, seq: int, n: int = 10,
    receipt: bytes | None = None,
) -> bytes:
    """A signed update as an edge makes it, with the device's signed receipt for ``n`` samples."""
    rng = np.random.default_rng(seq)
    weights = tuple((w + scale * rng.standard_normal(w.shape)).astype(np.float32) for w in initial_back_weights(spec, 1))
    device = customer if isinstance(customer, Identity) else KEYS.get(customer)
    node = customer.node_id if isinstance(customer, Identity) else customer
    if receipt is None:
        receipt = update_receipt(device, spec.task_id, round_, edge.node_id, n, epsilon=spec.epsilon) if device else b""
    mu = ModelUpdate(spec.task_id, round_, node, base, weights, n, "ab" * 32, 0.1, receipt)
    return seal(CODEC.encode(mu), edge, seq)


@dataclass
class World:
    coord: Coordinator
    contracts: CrowdContracts
    store: LocalContentStore
    edge: Identity
    devices: list[Identity]
    payouts: dict[str, str] = field(default_factory=dict)
    published: list[tuple[str, bytes, bool]] = field(default_factory=list)


def make_coordinator(
    contracts: CrowdContracts, db_url: str, store_dir: Path, identity: Identity | None = None,
    policy: LedgerPolicy | None = None, published: list[tuple[str, bytes, bool]] | None = None,
) -> Coordinator:
    out = published if published is not None else []
    return Coordinator(
        identity or Identity.generate(), make_sessions(db_url), LocalContentStore(store_dir), contracts,
        lambda t, p, r: out.append((t, p, r)), evaluate=lambda w: 0.5, policy=policy,
    )


def make_world(contracts: CrowdContracts, db_url: str, tmp: Path, devices: int = 4, payouts: bool = True,
               policy: LedgerPolicy | None = None) -> World:
    published: list[tuple[str, bytes, bool]] = []
    coord = make_coordinator(contracts, db_url, tmp / "store", policy=policy, published=published)
    edge = Identity.generate()
    devs = [Identity.generate() for _ in range(devices)]
    pay = {d.node_id: contracts.client.new_account().address for d in devs} if payouts else {}
    coord.register([(edge.public, "edge", None, None)] + [(d.public, "device", edge.node_id, pay.get(d.node_id)) for d in devs])
    assert isinstance(coord.store, LocalContentStore)
    return World(coord, contracts, coord.store, edge, devs, pay, published)
