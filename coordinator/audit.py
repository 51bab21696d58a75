"""Rebuild and check a global model's provenance from the chain and the content store alone.

Nothing from the coordinator's database is used: an auditor with read access to the chain and a
copy of the store can run this. For every round up to the model's, it checks that the anchored
manifest is in the store, that the Merkle root of its updates is the anchored root, that every
update is signed by an edge server registered on chain for a registered customer, and that
re-running the round's aggregation rule on the valid updates reproduces, byte for byte, the
anchored global model and manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from crowdfl.envelope import parse, verify
from crowdfl.errors import CrowdflError
from crowdfl.identity import PublicIdentity
from crowdfl.merkle import merkle_root
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, RoundManifest, TaskSpec, sha256_hex

from .chain import ChainError
from .contracts import CrowdContracts, Role
from .rounds import build_round
from .store import ContentStore


@dataclass
class UpdateFinding:
    update_hash: str
    edge: str
    customer: str
    num_samples: int
    status: str  # accepted | rejected
    reason: str = ""


@dataclass
class RoundFinding:
    round: int
    tx_hash: str
    block_number: int
    model_hash: str
    manifest_hash: str
    accuracy: float
    rule: str
    updates: list[UpdateFinding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class AuditReport:
    model_hash: str
    task_id: str = ""
    round: int = 0
    rounds: list[RoundFinding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(not r.problems for r in self.rounds)

    def lines(self) -> list[str]:
        out = [f"audit of model {self.model_hash[:16]}… (task {self.task_id[:16]}…, round {self.round}): {'OK' if self.ok else 'FAILED'}"]
        for r in self.rounds:
            acc = sum(1 for u in r.updates if u.status == "accepted")
            out.append(
                f"  round {r.round}: block {r.block_number} tx {r.tx_hash[:18]}… rule {r.rule}, "
                f"{acc} accepted / {len(r.updates) - acc} rejected, held-out accuracy {r.accuracy:.3f}"
            )
            for u in r.updates:
                if u.status != "accepted":
                    out.append(f"    rejected {u.update_hash[:12]} (customer {u.customer[:12]}, edge {u.edge[:12]}): {u.reason}")
            out.extend(f"    PROBLEM: {p}" for p in r.problems)
        out.extend(f"  PROBLEM: {p}" for p in self.problems)
        out.extend(f"  note: {n}" for n in self.notes)
        return out


def audit_model(contracts: CrowdContracts, store: ContentStore, model_hash: str) -> AuditReport:
    report = AuditReport(model_hash)
    try:
        model = CODEC.decode(store.get(model_hash), ModelWeights)
        report.task_id, report.round = model.task_id, model.round
        tid = bytes.fromhex(model.task_id)
        record = contracts.task(tid)
        spec = CODEC.decode(store.get(record.model_hash.hex()), TaskSpec)
        if spec.task_id != model.task_id:
            report.problems.append("the task's anchored spec names another task id")
            return report
        anchors = {a.round: a for a in contracts.anchors(tid)}
    except (CrowdflError, ChainError, ValueError) as exc:
        report.problems.append(f"cannot start: {exc}")
        return report
    if model.round < 1 or model.round not in anchors:
        report.problems.append(f"round {model.round} of the task is not anchored on chain")
        return report
    base = spec.initial_model_hash
    try:
        store.get(base)
    except CrowdflError as exc:
        report.problems.append(f"initial model: {exc}")
    active_cache: dict[tuple[str, Role], bool] = {}

    def active(node: str, role: Role) -> bool:
        key = (node, role)
        if key not in active_cache:
            active_cache[key] = contracts.is_active(bytes.fromhex(node), role)
        return active_cache[key]

    for r in range(1, model.round + 1):
        anchor = anchors.get(r)
        if anchor is None:
            report.problems.append(f"round {r} is not anchored")
            break
        finding = RoundFinding(r, anchor.tx_hash.hex(), anchor.block_number, anchor.model_hash.hex(), anchor.manifest_hash.hex(), float("nan"), "")
        report.rounds.append(finding)
        try:
            manifest = CODEC.decode(store.get(anchor.manifest_hash.hex()), RoundManifest)
        except CrowdflError as exc:
            finding.problems.append(f"manifest: {exc}")
            break
        finding.accuracy, finding.rule = manifest.held_out_accuracy, manifest.rule
        if manifest.base_model_hash != base:
            finding.problems.append("manifest's base model is not the previous round's model")
        if manifest.model_hash != anchor.model_hash.hex():
            finding.problems.append("manifest's model hash differs from the anchored one")
        if (len(manifest.accepted), len(manifest.rejected)) != (anchor.accepted, anchor.rejected):
            finding.problems.append("accepted/rejected counts differ from the anchor")
        if manifest.updates and merkle_root([bytes.fromhex(h) for h in manifest.updates]).hex() != anchor.merkle_root.hex():
            finding.problems.append("Merkle root of the manifest's updates differs from the anchored root")
        reasons = dict(x.split(":", 1) for x in manifest.rejected)
        candidates: list[tuple[str, ModelUpdate]] = []
        invalid: list[tuple[str, str]] = []
        for h in manifest.updates:
            try:
                sealed = parse(store.get(h))
                upd = CODEC.decode(sealed.body, ModelUpdate)
                verify(sealed, PublicIdentity(sealed.sender_key, bytes(32)))
            except CrowdflError as exc:
                finding.problems.append(f"update {h[:12]}: {exc}")
                continue
            status = "accepted" if h in manifest.accepted else "rejected"
            finding.updates.append(UpdateFinding(h, sealed.sender_id, upd.customer, upd.num_samples, status, reasons.get(h, "")))
            if not active(sealed.sender_id, Role.EDGE):
                finding.problems.append(f"update {h[:12]} is signed by {sealed.sender_id[:12]}, not an active edge on chain")
            if status == "accepted" and not active(upd.customer, Role.DEVICE):
                report.notes.append(f"customer {upd.customer[:12]} of round {r} is not active on chain now")
            if h in manifest.candidates:
                candidates.append((h, upd))
            else:
                invalid.append((h, reasons.get(h, "invalid").removeprefix("invalid:")))
        if finding.problems:
            break
        try:
            rebuilt = build_round(
                spec, r, base, candidates, invalid, manifest.rule, json.loads(manifest.rule_params),
                accuracy=manifest.held_out_accuracy,
            )
        except (ValueError, CrowdflError) as exc:
            finding.problems.append(f"cannot re-run the aggregation: {exc}")
            break
        if sha256_hex(rebuilt.model_bytes) != anchor.model_hash.hex():
            finding.problems.append("re-running the aggregation does not reproduce the anchored model")
        if sha256_hex(rebuilt.manifest_bytes) != anchor.manifest_hash.hex():
            finding.problems.append("re-running the round does not reproduce the anchored manifest")
        base = anchor.model_hash.hex()
    if anchors[model.round].model_hash.hex() != model_hash:
        report.problems.append(f"round {model.round}'s anchored model is {anchors[model.round].model_hash.hex()[:16]}…, not this one")
    report.notes.append("registry checks use the chain's current registry state")
    return report
