"""Rebuild and check a global model's provenance from the chain and the content store alone.

Nothing from the coordinator's database is used: an auditor with read access to the chain and a
copy of the store can run this. For every round up to the model's, it checks that the anchored
manifest is in the store, that the Merkle root of its updates is the anchored root, that every
update is signed by an edge server registered on chain for a registered customer, and that
re-running the round's aggregation rule on the valid updates reproduces, byte for byte, the
anchored global model and manifest. The manifest names the round's ledger; the audit redoes the
customer selection (public seed, previous round's reputations), the scores, the reputations and
the reward split, and checks them against the ledger and against what the chain recorded
(setScores and credit events).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from crowdfl.envelope import parse, verify
from crowdfl.errors import CrowdflError
from crowdfl.identity import PublicIdentity
from crowdfl.merkle import merkle_root
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, RoundManifest, TaskSpec, sha256_hex

from .aggregation import AggregationResult
from .chain import ChainError
from .contracts import CrowdContracts, Role, RoundEntries
from .ledger import (
    LedgerPolicy,
    chain_credits,
    chain_scores,
    ledger_bytes,
    parse_ledger,
    round_ledger,
    select_customers,
)
from .rounds import build_round, check_update
from .store import ContentStore


@dataclass
class UpdateFinding:
    update_hash: str
    edge: str
    customer: str
    num_samples: int
    status: str  # accepted | rejected
    reason: str = ""
    score: float | None = None
    reputation: float | None = None
    reward_wei: int = 0


@dataclass
class RoundFinding:
    round: int
    tx_hash: str
    block_number: int
    model_hash: str
    manifest_hash: str
    accuracy: float
    rule: str
    selected: int = 0
    ledger_hash: str = ""
    scores_tx: str = ""
    credit_tx: str = ""
    updates: list[UpdateFinding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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
            if r.ledger_hash:
                paid = sum(u.reward_wei for u in r.updates)
                out.append(
                    f"    ledger {r.ledger_hash[:12]}: {r.selected} selected, scores on chain "
                    f"{'tx ' + r.scores_tx[:18] + '…' if r.scores_tx else 'not yet'}, {paid} wei rewarded"
                    + (f" (tx {r.credit_tx[:18]}…)" if r.credit_tx else "")
                )
            for u in r.updates:
                if u.status != "accepted":
                    out.append(f"    rejected {u.update_hash[:12]} (customer {u.customer[:12]}, edge {u.edge[:12]}): {u.reason}")
            out.extend(f"    PROBLEM: {p}" for p in r.problems)
            out.extend(f"    note: {n}" for n in r.notes)
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
        scored = contracts.scores_set(tid)
        credited = contracts.credits(tid)
    except (CrowdflError, ChainError, ValueError) as exc:
        report.problems.append(f"cannot start: {exc}")
        return report
    if model.round < 1 or model.round not in anchors:
        report.problems.append(f"round {model.round} of the task is not anchored on chain")
        return report
    base = spec.initial_model_hash
    # the published artifacts the rounds build on: the head they start from and the devices' front
    for what, address in (("initial model", base), ("front model", spec.front_model_hash)):
        try:
            store.get(address)
        except CrowdflError as exc:
            report.problems.append(f"{what}: {exc}")
    active_cache: dict[tuple[str, Role], bool] = {}

    def active(node: str, role: Role) -> bool:
        key = (node, role)
        if key not in active_cache:
            active_cache[key] = contracts.is_active(bytes.fromhex(node), role)
        return active_cache[key]

    reputation: dict[str, float] = {}  # after the previous round, as rebuilt by this audit
    leaves_seen: set[str] = set()
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
        invalid_customers: list[tuple[str, str]] = []
        customers_seen: set[str] = set()
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
            # a signed update belongs to exactly one task, round and customer slot: a coordinator
            # must not re-use an old one, or count a customer twice
            if h in leaves_seen:
                finding.problems.append(f"update {h[:12]} was already anchored in an earlier round")
            leaves_seen.add(h)
            if upd.task_id != spec.task_id or upd.round != r:
                finding.problems.append(f"update {h[:12]} was signed for task {upd.task_id[:12]} round {upd.round}, not this round")
            if upd.customer in customers_seen:
                finding.problems.append(f"customer {upd.customer[:12]} has more than one update in round {r}")
            customers_seen.add(upd.customer)
            if h in manifest.candidates:
                try:
                    check_update(upd, spec, r, base)
                except CrowdflError as exc:
                    finding.problems.append(f"update {h[:12]} was aggregated but is invalid: {exc}")
                candidates.append((h, upd))
            else:
                invalid.append((h, reasons.get(h, "invalid").removeprefix("invalid:")))
                invalid_customers.append((upd.customer, reasons.get(h, "invalid").removeprefix("invalid:")))
        if finding.problems:
            break
        stored: dict[str, Any] | None = None
        rebuilt_ledger: list[dict[str, Any]] = []
        if manifest.ledger_hash:
            finding.ledger_hash = manifest.ledger_hash
            try:
                stored = parse_ledger(store.get(manifest.ledger_hash))
                policy = LedgerPolicy.from_json(stored["policy"])
            except (CrowdflError, ValueError, TypeError) as exc:
                finding.problems.append(f"ledger: {exc}")
                break
            selected = select_customers(policy, reputation, stored["eligible"], spec.task_id, r)
            finding.selected = len(selected)
            if list(selected) != stored["selected"]:
                finding.problems.append("the round's customers are not the ones the reputation draw selects")
            chosen = set(selected)
            for u in finding.updates:
                if u.status == "accepted" and u.customer not in chosen:
                    finding.problems.append(f"accepted update {u.update_hash[:12]} is from a customer not selected for the round")

            def remake(ordered: Sequence[tuple[str, ModelUpdate]], result: AggregationResult) -> str:
                assert stored is not None
                again = round_ledger(
                    policy, spec.task_id, r, stored["eligible"], selected, reputation, ordered, result,
                    invalid_customers, int(stored["pool_wei"]), set(stored["rewards"]),
                )
                rebuilt_ledger.append(again)
                return sha256_hex(ledger_bytes(again))
        try:
            rebuilt = build_round(
                spec, r, base, candidates, invalid, manifest.rule, json.loads(manifest.rule_params),
                accuracy=manifest.held_out_accuracy, ledger=remake if stored is not None else None, resolve=store.get,
            )
        except (ValueError, CrowdflError) as exc:
            finding.problems.append(f"cannot re-run the aggregation: {exc}")
            break
        if sha256_hex(rebuilt.model_bytes) != anchor.model_hash.hex():
            finding.problems.append("re-running the aggregation does not reproduce the anchored model")
        if stored is not None and rebuilt_ledger:
            again = rebuilt_ledger[0]
            if ledger_bytes(again) != ledger_bytes(stored):
                differs = sorted(k for k in again if again[k] != stored.get(k))
                finding.problems.append(f"the ledger does not follow from the round's updates and history ({', '.join(differs)} differ)")
            _check_chain_record(finding, scored.get(r), chain_scores(again), lambda v: round(v * 1000), "scores")
            _check_chain_record(finding, credited.get(r), chain_credits(again), lambda v: v, "rewards")
            if scored.get(r):
                finding.scores_tx = "0x" + scored[r].tx_hash.hex()
            if credited.get(r):
                finding.credit_tx = "0x" + credited[r].tx_hash.hex()
            for u in finding.updates:
                u.score = again["scores"].get(u.customer)
                u.reputation = again["reputation_after"].get(u.customer)
                u.reward_wei = int(again["rewards"].get(u.customer, "0")) if u.status == "accepted" else 0
            reputation = {c: float(v) for c, v in again["reputation_after"].items()}
        if sha256_hex(rebuilt.manifest_bytes) != anchor.manifest_hash.hex():
            finding.problems.append("re-running the round does not reproduce the anchored manifest")
        base = anchor.model_hash.hex()
    if anchors[model.round].model_hash.hex() != model_hash:
        report.problems.append(f"round {model.round}'s anchored model is {anchors[model.round].model_hash.hex()[:16]}…, not this one")
    report.notes.append("registry checks use the chain's current registry state")
    return report


def _check_chain_record(
    finding: RoundFinding, record: RoundEntries | None, expected: dict[str, Any], to_chain: Any, what: str
) -> None:
    """The chain's setScores / credit of a round must match the ledger; it may leave out customers
    removed before it was sent, and may still be pending (a note, not a problem)."""
    if record is None:
        if expected:
            finding.notes.append(f"{what} of round {finding.round} not (yet) recorded on chain")
        return
    want = {bytes.fromhex(c): int(to_chain(v)) for c, v in expected.items()}
    for key, value in record.values.items():
        if key not in want:
            finding.problems.append(f"chain {what} name 0x{key.hex()[:12]}, which the ledger does not")
        elif want[key] != value:
            finding.problems.append(f"chain {what} for 0x{key.hex()[:12]} is {value}, the ledger says {want[key]}")

