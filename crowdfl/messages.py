"""Wire messages exchanged between the roles, as frozen dataclasses.

Identifiers of participants are the hex of their 32-byte Ed25519 public key ("node ids"); hashes
are hex sha256 of the exact bytes they name. Arrays keep their dtype on the wire.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .wire import Codec


@dataclass(frozen=True, eq=False)
class TaskSpec:
    """A crowdsourcing task as the manufacturer publishes it (retained on MQTT, stored, anchored)."""

    KIND: ClassVar[int] = 10
    task_id: str
    title: str
    rounds: int
    epsilon: float  # per-sample Laplace budget for the released features
    label_epsilon: float  # randomised response on the label; 0 means the label is sent as is
    clip_l1: float  # L1 bound of a feature vector after per-coordinate normalisation to [0, 1]
    window_hours: int
    horizon_hours: int
    device_kinds: tuple[str, ...]
    class_edges_wh: np.ndarray  # float64, ascending; len + 1 classes
    input_scale: np.ndarray  # float32 per device kind: log1p(Wh) / scale
    feature_scale: np.ndarray  # float32 per feature: features / scale, then clipped to [0, 1]
    front_model_hash: str
    initial_model_hash: str  # sha256 of the round-0 ModelWeights (the published head)
    feature_dim: int
    hidden_units: int
    samples_per_round: int
    local_epochs: int
    learning_rate: float
    aggregation: str
    deadline: int  # unix seconds
    # devices release only windows ending on multiples of this many hours (aligned to the clock):
    # with stride >= window_hours no two released windows share an hour, so each hour of a
    # household's usage carries at most epsilon (agent.privacy.sample_spend)
    window_stride_hours: int = 1

    @property
    def num_classes(self) -> int:
        return int(len(self.class_edges_wh)) + 1

    @property
    def num_channels(self) -> int:
        return len(self.device_kinds) + 4


@dataclass(frozen=True, eq=False)
class RoundStart:
    """The coordinator opens a round: which global model, which customers."""

    KIND: ClassVar[int] = 11
    task_id: str
    round: int
    global_model_hash: str
    selected: tuple[str, ...]  # node ids of the customers selected for this round
    deadline: int


@dataclass(frozen=True, eq=False)
class FeatureBatch:
    """Noisy features one device releases for a task (encrypted to its edge server)."""

    KIND: ClassVar[int] = 20
    task_id: str
    round: int
    sample_ids: np.ndarray  # uint64, unique per device, never released twice
    features: np.ndarray  # float32 (n, feature_dim), already clipped and noised on the device
    labels: np.ndarray  # int8 (n,)
    epsilon: float
    clip_l1: float
    receipt: bytes = b""  # the device's signed ContributionReceipt for this round (crowdfl/receipts.py)


@dataclass(frozen=True, eq=False)
class Ack:
    """An edge server confirms that it persisted a device's envelopes (by sender sequence number)."""

    KIND: ClassVar[int] = 21
    device: str
    seqs: np.ndarray  # uint64


@dataclass(frozen=True, eq=False)
class Nack:
    """An edge server refuses a device's authentic envelopes for good (by sequence number, one
    reason each): resending cannot change the outcome, so the device drops them from its spool."""

    KIND: ClassVar[int] = 22
    device: str
    seqs: np.ndarray  # uint64
    reasons: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class ModelUpdate:
    """A customer's trained dense layers, produced and signed by the edge that trained them."""

    KIND: ClassVar[int] = 30
    task_id: str
    round: int
    customer: str  # node id of the device whose features were used
    base_model_hash: str
    weights: tuple[np.ndarray, ...]
    num_samples: int
    inputs_digest: str  # the device receipt's batches_root: the batches the update was trained on
    train_loss: float
    receipt: bytes = b""  # the customer's signed ContributionReceipt (its num_samples and root are the update's)


@dataclass(frozen=True, eq=False)
class ModelWeights:
    """A model's trainable weights as stored in the content-addressed store."""

    KIND: ClassVar[int] = 40
    task_id: str
    round: int
    weights: tuple[np.ndarray, ...]


@dataclass(frozen=True, eq=False)
class RoundManifest:
    """Everything needed to re-check one round; its hash is anchored on chain."""

    KIND: ClassVar[int] = 41
    task_id: str
    round: int
    base_model_hash: str
    model_hash: str
    rule: str
    rule_params: str  # canonical JSON
    updates: tuple[str, ...]  # hashes of every update envelope of the round, sorted: the Merkle leaves
    candidates: tuple[str, ...]  # the valid ones, sorted: the input of the aggregation rule
    accepted: tuple[str, ...]  # those the rule kept
    rejected: tuple[str, ...]  # "hash:reason" for every update not accepted
    merkle_root: str
    held_out_accuracy: float
    ledger_hash: str = ""  # the round's scores, reputations, selection and rewards (coordinator/ledger.py)
    receipts: tuple[str, ...] = ()  # sha256 of each update's device receipt, sorted: Merkle leaves too


CODEC = Codec([TaskSpec, RoundStart, FeatureBatch, Ack, Nack, ModelUpdate, ModelWeights, RoundManifest])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_HEX_DIGITS = frozenset("0123456789abcdef")


def is_hex64(value: object) -> bool:
    """A content address (sha256 digest) or a node id (Ed25519 key): 64 lowercase hex characters."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX_DIGITS
