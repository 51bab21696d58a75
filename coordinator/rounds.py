"""One round's logic, free of I/O: check an update, aggregate the round, build its manifest.

The audit calls ``build_round`` again on what the store holds and compares the hashes, so this is
the single definition of what a round's published model is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crowdfl.backmodel import check_back_weights
from crowdfl.errors import WireError
from crowdfl.merkle import merkle_proof, merkle_root
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, RoundManifest, TaskSpec, sha256_hex

from .aggregation import AggregationResult, AggregationRule, aggregate
from .defence import DefenceConfig, defend, guard

# Reads an artifact from the content store by its sha256 address (the audit passes store.get).
Resolver = Callable[[str], bytes]

# Given the aggregation's input (in its order) and result, stores the round's ledger; returns its hash.
LedgerMaker = Callable[[Sequence[tuple[str, ModelUpdate]], AggregationResult], str]


def check_update(update: ModelUpdate, spec: TaskSpec, round_: int, base_model_hash: str) -> None:
    """Content checks of an authenticated update; raises WireError with the reason."""
    if update.task_id != spec.task_id or update.round != round_:
        raise WireError("wrong_round", f"update for round {update.round}, round {round_} is open")
    if update.base_model_hash != base_model_hash:
        raise WireError("wrong_base", "update was not trained from this round's global model")
    try:
        check_back_weights(update.weights, spec)
    except ValueError as exc:
        raise WireError("bad_weights", str(exc)) from None
    if not 0 < update.num_samples <= spec.samples_per_round * spec.rounds:
        raise WireError("bad_samples", f"num_samples {update.num_samples} is implausible")
    if len(update.inputs_digest) != 64:
        raise WireError("malformed", "inputs_digest must be a sha256 hex digest")


def effective_rule(rule: str, n: int) -> str:
    """The task's rule, or the coordinate median where Krum cannot run (fewer than 3 updates).

    The manifest records the rule actually used, so the audit replays exactly this choice.
    """
    r = AggregationRule(rule)
    if r in (AggregationRule.KRUM, AggregationRule.MULTI_KRUM) and n < 3:
        return AggregationRule.COORDINATE_MEDIAN.value
    return r.value


def rule_params(rule: str, n: int, byzantine_fraction: float, trim_beta: float) -> dict[str, Any]:
    """Parameters for ``rule`` with ``n`` candidate updates (recorded in the manifest)."""
    r = AggregationRule(rule)
    if r in (AggregationRule.KRUM, AggregationRule.MULTI_KRUM):
        f = min(int(np.floor(byzantine_fraction * n)), max(0, (n - 3) // 2))
        return {"f": f}
    if r is AggregationRule.TRIMMED_MEAN:
        return {"beta": trim_beta}
    return {}


def round_leaves(updates: Sequence[str], receipts: Sequence[str]) -> list[str]:
    """The anchored tree's leaves: every update envelope's hash and every device receipt's hash."""
    return sorted(list(updates) + list(receipts))


def leaf_proof(manifest: RoundManifest, leaf: str) -> list[str]:
    """Merkle siblings of one leaf (an update or a receipt hash) of a round, from its manifest."""
    tree = round_leaves(manifest.updates, manifest.receipts)
    return [p.hex() for p in merkle_proof([bytes.fromhex(h) for h in tree], tree.index(leaf))]


def receipt_hash(update: ModelUpdate) -> str:
    return hashlib.sha256(update.receipt).hexdigest() if update.receipt else ""


@dataclass(frozen=True)
class BuiltRound:
    model: ModelWeights
    model_bytes: bytes
    manifest: RoundManifest
    manifest_bytes: bytes
    proofs: dict[str, list[str]]  # update hash -> Merkle siblings (hex)
    kept: tuple[str, ...]


def build_round(
    spec: TaskSpec,
    round_: int,
    base_model_hash: str,
    candidates: Sequence[tuple[str, ModelUpdate]],
    invalid: Sequence[tuple[str, str]],
    rule: str,
    params: dict[str, Any],
    evaluate: Callable[[list[np.ndarray]], float] | None = None,
    accuracy: float | None = None,
    ledger: LedgerMaker | None = None,
    ledger_hash: str = "",
    receipts: Sequence[str] = (),
    resolve: Resolver | None = None,
) -> BuiltRound:
    """Aggregate the valid updates (in hash order) and describe the round in a manifest.

    When ``params`` holds a "defence" entry the round is defended (``defended_round``); its
    inputs (the reference update's address, each update's standing, the guard's validation
    accuracies once measured) are part of ``params`` and so of the manifest, and ``resolve``
    reads the base model and the reference from the content store.
    """
    if not candidates:
        raise ValueError("a round needs at least one valid update")
    ordered = sorted(candidates, key=lambda c: c[0])
    hashes = [h for h, _ in ordered]
    refused = ""
    if "defence" in params:
        if resolve is None:
            raise ValueError("a defended round needs the content store to read its base model and reference")
        result, refused = defended_round(spec, base_model_hash, ordered, params, resolve, evaluate)
    else:
        result = aggregate(rule, [list(u.weights) for _, u in ordered], [u.num_samples for _, u in ordered], **params)
    kept = tuple(hashes[i] for i in result.kept)
    if ledger is not None:
        ledger_hash = ledger(ordered, result)
    weights = [np.asarray(w, dtype=np.float32) for w in result.weights]
    model = ModelWeights(spec.task_id, round_, tuple(weights))
    model_bytes = CODEC.encode(model)
    if accuracy is None:
        accuracy = evaluate(weights) if evaluate is not None else float("nan")
    rejected = sorted(
        [f"{h}:invalid:{reason}" for h, reason in invalid]
        + [f"{h}:{refused or 'excluded_by_' + result.rule}" for h in hashes if h not in kept]
    )
    leaves = sorted(hashes + [h for h, _ in invalid])
    receipt_leaves = sorted(set(receipts))
    tree = round_leaves(leaves, receipt_leaves)
    leaf_bytes = [bytes.fromhex(h) for h in tree]
    root = merkle_root(leaf_bytes)
    manifest = RoundManifest(
        task_id=spec.task_id,
        round=round_,
        base_model_hash=base_model_hash,
        model_hash=sha256_hex(model_bytes),
        rule=str(result.rule),
        rule_params=json.dumps(result.params, sort_keys=True, separators=(",", ":")),
        updates=tuple(leaves),
        candidates=tuple(hashes),
        accepted=kept,
        rejected=tuple(rejected),
        merkle_root=root.hex(),
        held_out_accuracy=float(accuracy),
        ledger_hash=ledger_hash,
        receipts=tuple(receipt_leaves),
    )
    proofs = {h: [p.hex() for p in merkle_proof(leaf_bytes, i)] for i, h in enumerate(tree)}
    return BuiltRound(model, model_bytes, manifest, CODEC.encode(manifest), proofs, kept)


def defended_round(
    spec: TaskSpec,
    base_model_hash: str,
    ordered: Sequence[tuple[str, ModelUpdate]],
    params: dict[str, Any],
    resolve: Resolver,
    evaluate: Callable[[list[np.ndarray]], float] | None,
) -> tuple[AggregationResult, str]:
    """Run ``coordinator.defence.defend`` and the publication guard for one round.

    Inputs read from ``params``: "defence" (the DefenceConfig), "reference" (address of the
    server's reference model for this round), "standing" (per update, in hash order), "inner"
    (the inner rule's parameters) and, when replayed, "guard" (the recorded validation
    accuracies of the candidate and of the previous model). Everything else in ``params`` is
    recomputed. Returns the result (its params are what the manifest records) and, when the guard
    refused the candidate, the reason code written for every update ("guard_refused").
    """
    config = DefenceConfig.from_json(params["defence"])
    standing = [float(x) for x in params["standing"]]
    inner = dict(params.get("inner", {}))
    base = _load_weights(resolve, base_model_hash, spec)
    reference = _load_weights(resolve, str(params["reference"]), spec)
    d = defend(base, [list(u.weights) for _, u in ordered], [u.num_samples for _, u in ordered], reference, standing, config, inner)
    candidate = [np.asarray(w, dtype=np.float32) for w in d.aggregate.weights]
    candidate_hash = sha256_hex(CODEC.encode(ModelWeights(spec.task_id, 0, tuple(candidate))))
    out: dict[str, Any] = {
        "defence": config.to_json(), "reference": str(params["reference"]), "standing": standing, "inner": inner,
        "candidate_hash": candidate_hash,
        "cosine": d.summary()["cosine"],
        "penalty": [float(f"{float(x):.12g}") for x in d.similarity_penalty * d.clip_scale],
        "value": d.summary()["value"], "weight": d.summary()["weight"],
    }
    recorded = params.get("guard")
    decision = None
    if isinstance(recorded, dict):
        decision = guard(float(recorded["candidate_accuracy"]), float(recorded["previous_accuracy"]), config.guard_tolerance)
    elif evaluate is not None:
        decision = guard(float(evaluate(candidate)), float(evaluate(base)), config.guard_tolerance)
    refused = ""
    weights, kept = d.aggregate.weights, d.aggregate.kept
    if decision is not None:
        out["guard"] = decision.to_json()
        if not decision.publish:
            weights, kept, refused = [np.asarray(w) for w in base], (), "guard_refused"
    result = AggregationResult(list(weights), kept, None, d.aggregate.rule, {**d.aggregate.params, **out})
    return result, refused


def _load_weights(resolve: Resolver, address: str, spec: TaskSpec) -> list[np.ndarray]:
    data = resolve(address)
    if sha256_hex(data) != address:
        raise ValueError(f"artifact {address[:16]} does not match its address")
    weights = [np.asarray(w, dtype=np.float32) for w in CODEC.decode(data, ModelWeights).weights]
    check_back_weights(weights, spec)
    return weights
