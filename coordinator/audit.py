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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from crowdfl.envelope import parse, verify
from crowdfl.errors import CrowdflError
from crowdfl.identity import PublicIdentity
from crowdfl.merkle import merkle_root
from crowdfl.receipts import ContributionReceipt, update_receipt_checked
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, RoundManifest, TaskSpec, sha256_hex

from .aggregation import AggregationResult
from .chain import ChainError
from .contracts import CrowdContracts, Role, RoundAnchor
from .ledger import (
    LedgerPolicy,
    ledger_bytes,
    parse_ledger,
    round_ledger,
    select_customers,
)
from .rounds import build_round, check_update, round_leaves
from .settlement import settle
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
    receipt: ContributionReceipt | None = None


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
    unchecked: list[str] = field(default_factory=list)  # said plainly: what this audit could not verify

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
                    f"    ledger {r.ledger_hash[:12]}: {r.selected} selected, {paid} wei rewarded, settled on chain"
                    + (f" (tx {r.credit_tx[:18]}…)" if r.credit_tx else "")
                )
            for u in r.updates:
                if u.receipt is not None:
                    out.append(
                        f"    device {u.customer[:12]} via edge {u.edge[:12]}: {u.receipt.num_samples} samples in "
                        f"{u.receipt.num_batches} signed batch(es) at epsilon {u.receipt.epsilon:g}, {u.status}"
                        + (f", reward {u.reward_wei} wei" if u.reward_wei else "")
                    )
            for u in r.updates:
                if u.status != "accepted":
                    out.append(f"    rejected {u.update_hash[:12]} (customer {u.customer[:12]}, edge {u.edge[:12]}): {u.reason}")
            out.extend(f"    PROBLEM: {p}" for p in r.problems)
            out.extend(f"    note: {n}" for n in r.notes)
        out.extend(f"  PROBLEM: {p}" for p in self.problems)
        out.extend(f"  note: {n}" for n in self.notes)
        out.extend(f"  not checked: {u}" for u in self.unchecked)
        return out


def audit_model(contracts: CrowdContracts, store: ContentStore, model_hash: str) -> AuditReport:
    """Audit every round up to the model's, in order; a round whose inputs cannot be trusted stops
    the audit there (later rounds build on it)."""
    report = AuditReport(model_hash)
    task = _open_task(contracts, store, model_hash, report)
    if task is None:
        return report
    trail = _Trail(base=task.spec.initial_model_hash)
    for r in range(1, task.model.round + 1):
        if not _audit_round(task, r, trail, report):
            break
    if task.anchors[task.model.round].model_hash.hex() != model_hash:
        report.problems.append(f"round {task.model.round}'s anchored model is {task.anchors[task.model.round].model_hash.hex()[:16]}…, not this one")
    report.notes.append("edge servers are checked against the chain's current registry; device bindings as of each round's anchor block")
    report.unchecked.extend([
        "held-out accuracy: the manifest's figure is the coordinator's; its held-out set is not published, so it is not recomputed",
        "selection seed: sha256(task id, round), public from the task's publication; the coordinator chose the task id",
    ])
    return report


@dataclass
class _TaskOnChain:
    """What the audit reads once: the model, the task's spec and anchors, the registry's history."""

    contracts: CrowdContracts
    store: ContentStore
    model: ModelWeights
    spec: TaskSpec
    tid: bytes
    anchors: dict[int, RoundAnchor]
    settled_tx: dict[int, tuple[bytes, int]]
    history: dict[bytes, list[tuple[int, int, bytes | None]]]
    created_block: int
    _active: dict[tuple[str, Role], bool] = field(default_factory=dict)

    def active(self, node: str, role: Role) -> bool:
        key = (node, role)
        if key not in self._active:
            self._active[key] = self.contracts.is_active(bytes.fromhex(node), role)
        return self._active[key]

    def bound_edge(self, device: str, block: int) -> str:
        """The edge the chain last bound the device to before the round's anchor ("" if never).

        A removal after the binding does not undo a contribution made before it (the coordinator
        refuses updates of removed devices at intake); a re-binding to another edge does."""
        edge: bytes | None = None
        for at, _, e in self.history.get(bytes.fromhex(device), []):
            if at > block:
                break
            if e is not None:
                edge = e
        return edge.hex() if edge is not None else ""

    def chain_devices(self, block: int) -> list[str]:
        """Devices bound to an edge and not removed as of a block."""
        out = []
        for device, events in self.history.items():
            state: bytes | None = None
            for at, _, e in events:
                if at > block:
                    break
                state = e
            if state is not None:
                out.append(device.hex())
        return out


@dataclass
class _Trail:
    """What one round hands the next, as rebuilt by this audit."""

    base: str  # the model the next round starts from
    last_receipt: dict[str, ContributionReceipt] = field(default_factory=dict)
    reputation: dict[str, float] = field(default_factory=dict)  # after the previous round
    leaves_seen: set[str] = field(default_factory=set)


@dataclass
class _RoundInputs:
    candidates: list[tuple[str, ModelUpdate]] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)
    invalid_customers: list[tuple[str, str]] = field(default_factory=list)
    receipts: list[str] = field(default_factory=list)


def _open_task(contracts: CrowdContracts, store: ContentStore, model_hash: str, report: AuditReport) -> _TaskOnChain | None:
    """Step 1: the model, its task's anchored spec, the anchors, the settlements and the registry's
    history; None (with the problem in the report) when the audit cannot start."""
    try:
        model = CODEC.decode(store.get(model_hash), ModelWeights)
        report.task_id, report.round = model.task_id, model.round
        tid = bytes.fromhex(model.task_id)
        record = contracts.task(tid)
        spec = CODEC.decode(store.get(record.model_hash.hex()), TaskSpec)
        if spec.task_id != model.task_id:
            report.problems.append("the task's anchored spec names another task id")
            return None
        anchors = {a.round: a for a in contracts.anchors(tid)}
        settled_tx = contracts.settled_rounds(tid)
    except (CrowdflError, ChainError, ValueError) as exc:
        report.problems.append(f"cannot start: {exc}")
        return None
    if model.round < 1 or model.round not in anchors:
        report.problems.append(f"round {model.round} of the task is not anchored on chain")
        return None
    # the published artifacts the rounds build on: the head they start from and the devices' front
    for what, address in (("initial model", spec.initial_model_hash), ("front model", spec.front_model_hash)):
        try:
            store.get(address)
        except CrowdflError as exc:
            report.problems.append(f"{what}: {exc}")
    try:
        history = contracts.edge_history()
    except ChainError as exc:
        report.problems.append(f"cannot read the registry's device bindings: {exc}")
        return None
    try:
        created_block = contracts.task_created_block(tid)
    except ChainError as exc:
        report.problems.append(f"cannot read the task's creation: {exc}")
        return None
    return _TaskOnChain(contracts, store, model, spec, tid, anchors, settled_tx, history, created_block)


def _audit_round(task: _TaskOnChain, r: int, trail: _Trail, report: AuditReport) -> bool:
    """Steps 2-5 for one round, then the re-run's model and manifest against the anchor; False when
    the audit cannot go on past this round."""
    anchor = task.anchors.get(r)
    if anchor is None:
        report.problems.append(f"round {r} is not anchored")
        return False
    finding = RoundFinding(r, anchor.tx_hash.hex(), anchor.block_number, anchor.model_hash.hex(), anchor.manifest_hash.hex(), float("nan"), "")
    report.rounds.append(finding)
    try:
        manifest = CODEC.decode(task.store.get(anchor.manifest_hash.hex()), RoundManifest)
    except CrowdflError as exc:
        finding.problems.append(f"manifest: {exc}")
        return False
    _check_manifest(manifest, anchor, trail.base, finding)
    inputs = _check_updates(task, r, anchor, manifest, trail, finding)
    if finding.problems:
        return False
    stored: dict[str, Any] | None = None
    remake: Callable[[Sequence[tuple[str, ModelUpdate]], AggregationResult], str] | None = None
    rebuilt_ledger: list[dict[str, Any]] = []
    if manifest.ledger_hash:
        checked = _check_selection(task, r, anchor, manifest, trail, finding)
        if checked is None:
            return False
        stored, policy, selected = checked
        remake = _ledger_rebuilder(task, r, stored, policy, selected, trail.reputation, inputs, rebuilt_ledger)
    try:
        rebuilt = build_round(
            task.spec, r, trail.base, inputs.candidates, inputs.invalid, manifest.rule, json.loads(manifest.rule_params),
            accuracy=manifest.held_out_accuracy, ledger=remake, receipts=inputs.receipts, resolve=task.store.get,
        )
    except (ValueError, CrowdflError) as exc:
        finding.problems.append(f"cannot re-run the aggregation: {exc}")
        return False
    if sha256_hex(rebuilt.model_bytes) != anchor.model_hash.hex():
        finding.problems.append("re-running the aggregation does not reproduce the anchored model")
    if stored is not None and rebuilt_ledger:
        _check_ledger_and_settlement(task, r, rebuilt_ledger[0], stored, finding)
        trail.reputation = {c: float(v) for c, v in rebuilt_ledger[0]["reputation_after"].items()}
    if sha256_hex(rebuilt.manifest_bytes) != anchor.manifest_hash.hex():
        finding.problems.append("re-running the round does not reproduce the anchored manifest")
    trail.base = anchor.model_hash.hex()
    return True


def _ledger_rebuilder(
    task: _TaskOnChain, r: int, stored: dict[str, Any], policy: LedgerPolicy, selected: Sequence[str],
    reputation: dict[str, float], inputs: _RoundInputs, out: list[dict[str, Any]],
) -> Callable[[Sequence[tuple[str, ModelUpdate]], AggregationResult], str]:
    """Step 5a: the ledger as the round's updates and history make it (``build_round`` calls this
    with the aggregation's result; the rebuilt ledger lands in ``out``)."""

    def remake(ordered: Sequence[tuple[str, ModelUpdate]], result: AggregationResult) -> str:
        again = round_ledger(
            policy, task.spec.task_id, r, stored["eligible"], selected, reputation, ordered, result,
            inputs.invalid_customers, int(stored["pool_wei"]), set(stored["rewards"]),
        )
        out.append(again)
        return sha256_hex(ledger_bytes(again))

    return remake


def _check_manifest(manifest: RoundManifest, anchor: RoundAnchor, base: str, finding: RoundFinding) -> None:
    """Step 2: the manifest agrees with its anchor (base, model, counts, Merkle root)."""
    finding.accuracy, finding.rule = manifest.held_out_accuracy, manifest.rule
    if manifest.base_model_hash != base:
        finding.problems.append("manifest's base model is not the previous round's model")
    if manifest.model_hash != anchor.model_hash.hex():
        finding.problems.append("manifest's model hash differs from the anchored one")
    if (len(manifest.accepted), len(manifest.rejected)) != (anchor.accepted, anchor.rejected):
        finding.problems.append("accepted/rejected counts differ from the anchor")
    if manifest.updates and merkle_root([bytes.fromhex(h) for h in round_leaves(manifest.updates, manifest.receipts)]).hex() != anchor.merkle_root.hex():
        finding.problems.append("Merkle root of the manifest's updates differs from the anchored root")


def _check_updates(
    task: _TaskOnChain, r: int, anchor: RoundAnchor, manifest: RoundManifest, trail: _Trail, finding: RoundFinding,
) -> _RoundInputs:
    """Step 3: every update's signature, edge, receipt, device binding and slot; the round's inputs
    to re-run (valid candidates, invalid ones with their reasons, the receipt leaves)."""
    spec, base = task.spec, trail.base
    reasons = dict(x.split(":", 1) for x in manifest.rejected)
    inputs = _RoundInputs()
    customers_seen: set[str] = set()
    for h in manifest.updates:
        try:
            sealed = parse(task.store.get(h))
            upd = CODEC.decode(sealed.body, ModelUpdate)
            verify(sealed, PublicIdentity(sealed.sender_key, bytes(32)))
        except CrowdflError as exc:
            finding.problems.append(f"update {h[:12]}: {exc}")
            continue
        status = "accepted" if h in manifest.accepted else "rejected"
        finding.updates.append(UpdateFinding(h, sealed.sender_id, upd.customer, upd.num_samples, status, reasons.get(h, "")))
        if not task.active(sealed.sender_id, Role.EDGE):
            finding.problems.append(f"update {h[:12]} is signed by {sealed.sender_id[:12]}, not an active edge on chain")
        # the device's signed receipt vouches for the update's samples and inputs, and the chain
        # binds the device to the edge that signed the update
        try:
            signed = update_receipt_checked(upd, sealed.sender_id, spec)
        except CrowdflError as exc:
            finding.problems.append(f"update {h[:12]}: receipt: {exc}")
            continue
        inputs.receipts.append(signed.hash)
        finding.updates[-1].receipt = signed.receipt
        earlier = trail.last_receipt.get(upd.customer)
        if earlier is not None and (signed.receipt.num_samples < earlier.num_samples or signed.receipt.num_batches < earlier.num_batches):
            finding.problems.append(f"update {h[:12]}: receipt of {upd.customer[:12]} counts fewer samples than its earlier one")
        trail.last_receipt[upd.customer] = signed.receipt
        if task.bound_edge(upd.customer, anchor.block_number) != sealed.sender_id:
            finding.problems.append(
                f"update {h[:12]} for device {upd.customer[:12]} comes from edge {sealed.sender_id[:12]}, "
                "but the chain binds the device to another edge (or to none)"
            )
        # a signed update belongs to exactly one task, round and customer slot: a coordinator
        # must not re-use an old one, or count a customer twice
        if h in trail.leaves_seen:
            finding.problems.append(f"update {h[:12]} was already anchored in an earlier round")
        trail.leaves_seen.add(h)
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
            inputs.candidates.append((h, upd))
        else:
            inputs.invalid.append((h, reasons.get(h, "invalid").removeprefix("invalid:")))
            inputs.invalid_customers.append((upd.customer, reasons.get(h, "invalid").removeprefix("invalid:")))
    if sorted(set(inputs.receipts)) != list(manifest.receipts):
        finding.problems.append("the manifest's receipt leaves are not the receipts inside the round's updates")
    return inputs


def _check_selection(
    task: _TaskOnChain, r: int, anchor: RoundAnchor, manifest: RoundManifest, trail: _Trail, finding: RoundFinding,
) -> tuple[dict[str, Any], LedgerPolicy, Sequence[str]] | None:
    """Step 4: the stored ledger's eligible list is the chain's and its selection is the reputation
    draw's; returns (ledger, policy, selected), or None when the ledger cannot be read."""
    finding.ledger_hash = manifest.ledger_hash
    try:
        stored = parse_ledger(task.store.get(manifest.ledger_hash))
        policy = LedgerPolicy.from_json(stored["policy"])
    except (CrowdflError, ValueError, TypeError) as exc:
        finding.problems.append(f"ledger: {exc}")
        return None
    # the eligible customers are the chain's: none the registry never bound before the anchor,
    # none left out that it had bound (and not removed) when the previous round was anchored
    since = task.anchors[r - 1].block_number if r > 1 else task.created_block
    phantom = sorted(c for c in stored["eligible"] if not task.bound_edge(c, anchor.block_number))
    left_out = sorted(c for c in task.chain_devices(since) if c not in set(stored["eligible"]))
    if phantom:
        finding.problems.append(f"the eligible list names {phantom[0][:12]}, which the chain never registered to an edge")
    if left_out:
        finding.problems.append(f"the eligible list leaves out {left_out[0][:12]}, which the chain had registered and not removed")
    selected = select_customers(policy, trail.reputation, stored["eligible"], task.spec.task_id, r)
    finding.selected = len(selected)
    if list(selected) != stored["selected"]:
        finding.problems.append("the round's customers are not the ones the reputation draw selects")
    chosen = set(selected)
    for u in finding.updates:
        if u.status == "accepted" and u.customer not in chosen:
            finding.problems.append(f"accepted update {u.update_hash[:12]} is from a customer not selected for the round")
    return stored, policy, selected


def _check_ledger_and_settlement(task: _TaskOnChain, r: int, again: dict[str, Any], stored: dict[str, Any], finding: RoundFinding) -> None:
    """Step 5b: the stored ledger is the one rebuilt from the round, and the chain settled its root;
    the findings get each customer's score, reputation and reward."""
    if ledger_bytes(again) != ledger_bytes(stored):
        differs = sorted(k for k in again if again[k] != stored.get(k))
        finding.problems.append(f"the ledger does not follow from the round's updates and history ({', '.join(differs)} differ)")
    paid_unselected = sorted(c for c, v in stored["rewards"].items() if int(v) > 0 and c not in set(stored["selected"]))
    if paid_unselected:
        finding.problems.append(f"the ledger pays customer {paid_unselected[0][:12]}, who was not selected for the round")
    plan = settle(again)
    try:
        on_chain = task.contracts.settlement(task.tid, r)
    except ChainError as exc:
        on_chain = None
        finding.problems.append(f"cannot read the round's settlement: {exc}")
    if on_chain is None:
        finding.problems.append(f"round {r} is not settled on chain")
    elif (on_chain.root, on_chain.total_wei, on_chain.customers) != (plan.root, plan.total_wei, len(plan.leaves)):
        finding.problems.append(
            f"the settlement on chain (root {on_chain.root.hex()[:12]}, {on_chain.total_wei} wei) is not the one the "
            f"round's recomputed ledger implies (root {plan.root.hex()[:12]}, {plan.total_wei} wei)"
        )
    if r in task.settled_tx:
        finding.credit_tx = "0x" + task.settled_tx[r][0].hex()
    for u in finding.updates:
        u.score = again["scores"].get(u.customer)
        u.reputation = again["reputation_after"].get(u.customer)
        u.reward_wei = int(again["rewards"].get(u.customer, "0")) if u.status == "accepted" else 0
