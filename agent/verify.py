"""``crowdfl-agent verify`` and ``claim``: the device checks, through its own JSON-RPC URL, that each
of its signed receipts is a leaf of an anchored round, and what it can claim.

The coordinator only supplies Merkle proofs and figures; the chain decides. A receipt whose proof
does not lead to the anchored root, or a reward figure whose leaf is not under the settled root,
is reported as a failure: the manufacturer's word is not taken for either.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crowdfl.errors import CrowdflError
from crowdfl.merkle import verify_proof

from .chainview import ChainView

Fetch = Callable[[str, str], Any]  # (method, path) -> decoded JSON, or None on 404


def coordinator_json(base_url: str, timeout_s: float = 15.0) -> Fetch:
    def fetch(method: str, path: str) -> Any:
        req = urllib.request.Request(base_url.rstrip("/") + path, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise CrowdflError("coordinator", f"{method} {path}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise CrowdflError("coordinator", f"{method} {path}: {exc}") from None

    return fetch


@dataclass
class RoundCheck:
    task_id: str
    round: int
    samples: int
    included: bool = False
    claim_wei: int = 0
    claimed: bool = False
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    rounds: list[RoundCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.included and not r.problems for r in self.rounds)

    def lines(self) -> list[str]:
        out = []
        for r in self.rounds:
            state = "included in the anchored round" if r.included else "NOT included"
            claim = f"{r.claim_wei} wei {'claimed' if r.claimed else 'claimable'}" if r.claim_wei or r.claimed else "nothing to claim"
            out.append(f"task {r.task_id[:12]} round {r.round}: receipt for {r.samples} samples {state}; {claim}")
            out.extend(f"  PROBLEM: {p}" for p in r.problems)
        out.append(f"verify: {'OK' if self.ok else 'FAILED'} ({len(self.rounds)} receipt(s) checked against the chain)")
        return out


def verify(receipts: list[tuple[str, int, bytes, int]], customer: str, chain: ChainView, fetch: Fetch) -> VerifyReport:
    """``receipts``: (task, round, signed receipt, samples) of every round the device contributed to."""
    report = VerifyReport()
    key = bytes.fromhex(customer)
    for task_id, round_, raw, samples in receipts:
        check = RoundCheck(task_id, round_, samples)
        report.rounds.append(check)
        tid = bytes.fromhex(task_id)
        leaf = hashlib.sha256(raw).digest()
        try:
            if chain.anchor_root(tid, round_) is None:
                check.problems.append("the round is not anchored on chain")
                continue
            proof = fetch("GET", f"/api/v1/tasks/{task_id}/rounds/{round_}/leaves/{leaf.hex()}")
            if proof is None:
                check.problems.append("the coordinator has no proof for this receipt")
                continue
            check.included = chain.verify_inclusion(tid, round_, leaf, [bytes.fromhex(p) for p in proof["proof"]])
            if not check.included:
                check.problems.append("the coordinator's proof does not lead to the anchored root")
            settled = chain.settlement(tid, round_)
            claim = fetch("GET", f"/api/v1/tasks/{task_id}/rounds/{round_}/claims/{customer}")
            if settled is None:
                check.problems.append("the round is not settled on chain")
            elif claim is not None:
                amount, rep = int(claim["amount_wei"]), int(claim["reputation_milli"])
                claim_leaf = hashlib.sha256(
                    tid + round_.to_bytes(4, "big") + key + rep.to_bytes(4, "big") + amount.to_bytes(32, "big")
                ).digest()
                if not verify_proof(claim_leaf, [bytes.fromhex(p) for p in claim["proof"]], settled[0]):
                    check.problems.append(
                        f"the coordinator says {amount} wei at reputation {rep / 1000:g}, which is not what the chain settled"
                    )
                else:
                    check.claim_wei = amount
                check.claimed = chain.is_claimed(tid, round_, key)
        except (CrowdflError, KeyError, ValueError, TypeError) as exc:
            check.problems.append(f"cannot check: {exc}")
    return report


def claim(receipts: list[tuple[str, int, bytes, int]], customer: str, chain: ChainView, fetch: Fetch) -> list[str]:
    """Ask for every unclaimed, verified reward to be paid (anyone may send a claim; the contract pays
    only the registered payout), then confirm on the device's own chain view."""
    out = []
    report = verify(receipts, customer, chain, fetch)
    for r in report.rounds:
        if r.problems or r.claimed or not r.claim_wei:
            continue
        answer = fetch("POST", f"/api/v1/tasks/{r.task_id}/rounds/{r.round}/claims/{customer}")
        done = chain.is_claimed(bytes.fromhex(r.task_id), r.round, bytes.fromhex(customer))
        out.append(f"task {r.task_id[:12]} round {r.round}: {r.claim_wei} wei {'claimed (confirmed on chain)' if done else 'NOT claimed'}"
                   + (f", tx {answer.get('tx_hash')}" if isinstance(answer, dict) and answer.get("tx_hash") else ""))
    return out
