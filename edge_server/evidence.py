"""Evidence of what a device sent: its stored batches, each with a Merkle proof under the device's
signed receipt (crowdfl/receipts.py).

A third party needs only this document and the device's public key (its node id, registered on
chain) to see that the device released exactly these noisy samples: each batch's encoding hashes
to a leaf, the proof leads to the receipt's root, and the receipt is signed by the device. The
receipt's hash is also a leaf of the round's anchored Merkle tree, so the coordinator's published
round ties the same contribution to the chain. No envelope signature is needed for this, which is
what lets per-message signatures go later.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any

from crowdfl.errors import WireError
from crowdfl.messages import CODEC, FeatureBatch
from crowdfl.receipts import batch_proof, open_receipt, verify_batch_proof

from .store import StoredBatch

EVIDENCE_KIND = "crowdfl-contribution-evidence"


def rebuild_batch(b: StoredBatch, epsilon: float, clip_l1: float) -> bytes:
    """The batch's exact encoding without its receipt (what the receipt's root commits to)."""
    return CODEC.encode(FeatureBatch(b.task_id, b.round, b.sample_ids, b.features, b.labels.astype("i1"), epsilon, clip_l1))


def export_evidence(batches: Sequence[StoredBatch], round_: int, clip_l1: float) -> dict[str, Any]:
    """Evidence for one device, task and round from that device's stored batches of the task (up to the round)."""
    mine = [b for b in batches if b.round == round_ and b.receipt]
    if not mine:
        raise WireError("no_evidence", f"no batch with a receipt from this device in round {round_}")
    signed = max((open_receipt(b.receipt) for b in mine), key=lambda s: s.receipt.num_batches)
    receipt = signed.receipt
    covered = [b for b in batches if b.round <= round_]
    digests = [bytes.fromhex(b.batch_digest) for b in covered]
    items = []
    for b, digest in zip(covered, digests, strict=True):
        encoding = rebuild_batch(b, receipt.epsilon, clip_l1)
        if hashlib.sha256(encoding).digest() != digest:
            raise WireError("evidence_mismatch", f"stored batch seq {b.seq} no longer matches its digest")
        items.append({
            "round": b.round, "seq": b.seq, "samples": len(b.sample_ids), "digest": digest.hex(),
            "proof": batch_proof(digests, digest), "batch": base64.b64encode(encoding).decode(),
        })
    return {
        "kind": EVIDENCE_KIND, "device": receipt.device, "edge": receipt.edge, "task_id": receipt.task_id, "round": round_,
        "receipt": signed.raw.hex(), "receipt_hash": signed.hash, "num_samples": receipt.num_samples,
        "batches_root": receipt.batches_root, "epsilon": receipt.epsilon, "batches": items,
    }


def verify_evidence(doc: dict[str, Any]) -> list[str]:
    """Problems with an evidence document (empty: the device signed for exactly these batches)."""
    problems: list[str] = []
    try:
        signed = open_receipt(bytes.fromhex(str(doc["receipt"])))
    except (WireError, ValueError, KeyError) as exc:
        return [f"receipt: {exc}"]
    r = signed.receipt
    if r.device != doc.get("device"):
        problems.append("the receipt is signed by another device than the document names")
    seen = 0
    for i, item in enumerate(doc.get("batches", [])):
        try:
            encoding = base64.b64decode(item["batch"], validate=True)
            batch = CODEC.decode(encoding, FeatureBatch)
            digest = hashlib.sha256(encoding).digest()
        except (WireError, ValueError, KeyError) as exc:
            problems.append(f"batch {i}: {exc}")
            continue
        if not verify_batch_proof(digest, item.get("proof", []), r.batches_root):
            problems.append(f"batch {i} (round {batch.round}) is not under the device's signed root")
        seen += len(batch.sample_ids)
    if seen != r.num_samples or len(doc.get("batches", [])) != r.num_batches:
        problems.append(f"the batches hold {seen} samples, the device signed for {r.num_samples}")
    return problems
