"""Façade over crowdfl's deployed contracts (Registry + CrowdTasks) for the coordinator.

The rest of the code speaks Python types (bytes keys, Role, float epsilon); this module
turns them into contract calls through a ChainClient and checks what comes back, since
chain data is external input: a value of the wrong type or length raises ChainError.
ABI and bytecode come from the committed artifacts in contracts/build/ (see
contracts/README.md), found next to the package or at an explicit path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract

from coordinator.chain import ChainClient, ChainError, Receipt

__all__ = [
    "Artifact",
    "ChainError",
    "CrowdContracts",
    "Receipt",
    "Role",
    "RoundAnchor",
    "RoundEntries",
    "Settlement",
    "TaskRecord",
    "find_build_dir",
    "load_artifact",
]

CONTRACT_NAMES = ("Registry", "CrowdTasks")
ZERO_ADDRESS = "0x" + "00" * 20
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_UINT256_MAX = 2**256 - 1


class Role(IntEnum):
    DEVICE = 1
    EDGE = 2


@dataclass(frozen=True)
class Settlement:
    round: int
    root: bytes
    total_wei: int
    claimed_wei: int
    customers: int


@dataclass(frozen=True)
class RoundAnchor:
    """One round's commitment as read back from the RoundAnchored event."""

    task_id: bytes
    round: int
    merkle_root: bytes
    model_hash: bytes
    manifest_hash: bytes
    accepted: int
    rejected: int
    tx_hash: bytes
    block_number: int


@dataclass(frozen=True)
class RoundEntries:
    """A round's ScoresSet (values x1000) or Credited (wei) event as read back from the chain."""

    round: int
    values: dict[bytes, int]
    tx_hash: bytes
    block_number: int


@dataclass(frozen=True)
class TaskRecord:
    """A task as stored on chain; ``epsilon`` is ``epsilon_milli / 1000``."""

    task_id: bytes
    model_hash: bytes
    rounds: int
    epsilon_milli: int
    deadline: int
    pool_wei: int
    anchored_rounds: int

    @property
    def epsilon(self) -> float:
        return self.epsilon_milli / 1000


@dataclass(frozen=True)
class Artifact:
    """A compiled contract as committed in contracts/build/<name>.json."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    compiler_version: str
    source_sha256: str


def find_build_dir(build_dir: Path | str | None = None) -> Path:
    """Explicit path first, then package data (``coordinator/contracts_build``), then the source checkout."""
    candidates = (
        [Path(build_dir)]
        if build_dir is not None
        else [
            Path(__file__).resolve().parent / "contracts_build",
            Path(__file__).resolve().parent.parent / "contracts" / "build",
        ]
    )
    for candidate in candidates:
        if (candidate / f"{CONTRACT_NAMES[0]}.json").is_file():
            return candidate
    raise FileNotFoundError(f"no contract artifacts in {', '.join(str(c) for c in candidates)}")


def load_artifact(name: str, build_dir: Path | str | None = None) -> Artifact:
    path = find_build_dir(build_dir) / f"{name}.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        abi, bytecode = raw["abi"], raw["bytecode"]
        version, source_sha = raw["compiler"]["version"], raw["sourceSha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"bad artifact {path}: {exc}") from exc
    if not isinstance(abi, list) or not isinstance(bytecode, str) or not bytecode.startswith("0x") or len(bytecode) < 4:
        raise ValueError(f"bad artifact {path}: abi must be a list and bytecode a 0x hex string")
    return Artifact(name=name, abi=abi, bytecode=bytecode, compiler_version=str(version), source_sha256=str(source_sha))


class CrowdContracts:
    """The coordinator's handle on Registry and CrowdTasks; all writes go through ChainClient."""

    def __init__(self, client: ChainClient, registry: Contract, tasks: Contract, from_block: int = 0) -> None:
        self.client = client
        self.registry = registry
        self.tasks = tasks
        self.from_block = from_block  # where event scans start (the deployment block)
        self.addresses: dict[str, str] = {"Registry": str(registry.address), "CrowdTasks": str(tasks.address)}
        self.deploy_receipts: dict[str, Receipt] = {}

    # ------------------------------------------------------------ construction

    @classmethod
    def deploy(cls, client: ChainClient, build_dir: Path | str | None = None) -> CrowdContracts:
        reg_art = load_artifact("Registry", build_dir)
        tasks_art = load_artifact("CrowdTasks", build_dir)
        reg_addr, reg_rcpt = client.deploy(reg_art.abi, reg_art.bytecode)
        tasks_addr, tasks_rcpt = client.deploy(tasks_art.abi, tasks_art.bytecode, reg_addr)
        self = cls(
            client,
            client.contract(reg_addr, reg_art.abi),
            client.contract(tasks_addr, tasks_art.abi),
            from_block=reg_rcpt.block_number,
        )
        self.deploy_receipts = {"Registry": reg_rcpt, "CrowdTasks": tasks_rcpt}
        return self

    @classmethod
    def at(
        cls,
        client: ChainClient,
        addresses: Mapping[str, str],
        build_dir: Path | str | None = None,
        from_block: int = 0,
        check: bool = True,
    ) -> CrowdContracts:
        """Attach to deployed contracts, checking they hold code and are wired together
        (``check=False``: the chain is unreachable now; calls fail until it is back)."""
        checked: dict[str, str] = {}
        for name in CONTRACT_NAMES:
            addr = addresses.get(name)
            if not isinstance(addr, str) or not Web3.is_address(addr):
                raise ValueError(f"addresses[{name!r}] must be an address, got {addr!r}")
            checked[name] = Web3.to_checksum_address(addr)
            if check and len(client.code_at(checked[name])) == 0:
                raise ChainError(f"no contract code at {name} address {checked[name]}")
        self = cls(
            client,
            client.contract(checked["Registry"], load_artifact("Registry", build_dir).abi),
            client.contract(checked["CrowdTasks"], load_artifact("CrowdTasks", build_dir).abi),
            from_block=from_block,
        )
        if not check:
            return self
        wired = _address(client.call(self.tasks.functions.registry()), "CrowdTasks.registry()")
        if wired != checked["Registry"]:
            raise ChainError(f"CrowdTasks uses registry {wired}, not {checked['Registry']}")
        return self

    # ------------------------------------------------------------ registry

    def register_many(self, entries: Sequence[tuple[bytes, Role, str | None]]) -> Receipt:
        """Enrol a batch in one transaction (keep batches to a few hundred: block gas limit)."""
        if len(entries) == 0:
            raise ValueError("no entries to register")
        keys, roles, payouts = [], [], []
        for i, (key, role, payout) in enumerate(entries):
            keys.append(_b32(key, f"entries[{i}].key"))
            roles.append(int(Role(role)))
            payouts.append(_payout(payout, f"entries[{i}].payout"))
        return self.client.transact(self.registry.functions.registerMany(keys, roles, payouts))

    def register(self, key: bytes, role: Role, payout: str | None = None) -> Receipt:
        return self.register_many([(key, role, payout)])

    def remove(self, key: bytes) -> Receipt:
        return self.client.transact(self.registry.functions.remove(_b32(key, "key")))

    def is_active(self, key: bytes, role: Role) -> bool:
        result = self.client.call(self.registry.functions.isActive(_b32(key, "key"), int(Role(role))))
        return _bool(result, "isActive")

    def bind_edges(self, pairs: Sequence[tuple[bytes, bytes]]) -> Receipt:
        """Bind devices to their edge servers on chain (both must be active)."""
        if not pairs:
            raise ValueError("no devices to bind")
        devices = [_b32(d, f"pairs[{i}].device") for i, (d, _) in enumerate(pairs)]
        edges = [_b32(e, f"pairs[{i}].edge") for i, (_, e) in enumerate(pairs)]
        return self.client.transact(self.registry.functions.bindEdges(devices, edges))

    def edge_of(self, device: bytes) -> bytes | None:
        """The edge an active device is bound to on chain, None if unbound."""
        raw = _out_b32(self.client.call(self.registry.functions.edgeOf(_b32(device, "device"))), "edgeOf")
        return None if raw == bytes(32) else raw

    def task_created_block(self, task_id: bytes) -> int:
        """Block of the task's TaskCreated event (0 when none is found)."""
        tid = _b32(task_id, "task_id")
        blocks = [
            _out_uint(ev.get("blockNumber"), "log.blockNumber", _UINT64_MAX)
            for ev in self.client.logs(self.tasks.events.TaskCreated(), {"taskId": tid}, from_block=self.from_block)
            if not ev.get("removed") and str(ev.get("address", "")).lower() == str(self.tasks.address).lower()
        ]
        return min(blocks) if blocks else 0

    def edge_history(self) -> dict[bytes, list[tuple[int, int, bytes | None]]]:
        """device -> [(block, log index, edge or None when removed)] from the Registry's EdgeBound and Removed events.

        The audit asks which edge a device was bound to when its round was anchored, so a device
        removed later does not fail an audit of rounds it took part in."""
        out: dict[bytes, list[tuple[int, int, bytes | None]]] = {}
        for event, is_bind in ((self.registry.events.EdgeBound(), True), (self.registry.events.Removed(), False)):
            for ev in self.client.logs(event, {}, from_block=self.from_block):
                if ev.get("removed"):
                    continue
                if str(ev.get("address", "")).lower() != str(self.registry.address).lower():
                    raise ChainError(f"registry log from unexpected address {ev.get('address')!r}")
                args = ev.get("args")
                if not isinstance(args, Mapping):
                    raise ChainError("registry log without decoded args")
                key = _out_b32(args.get("device") if is_bind else args.get("key"), "registry log key")
                at = (_out_uint(ev.get("blockNumber"), "log.blockNumber", _UINT64_MAX), _out_uint(ev.get("logIndex", 0), "log.logIndex", _UINT64_MAX))
                out.setdefault(key, []).append((*at, _out_b32(args.get("edge"), "EdgeBound.edge") if is_bind else None))
        for entries in out.values():
            entries.sort(key=lambda e: (e[0], e[1]))
        return out

    def payout_of(self, key: bytes) -> str | None:
        addr = _address(self.client.call(self.registry.functions.payoutOf(_b32(key, "key"))), "payoutOf")
        return None if int(addr, 16) == 0 else addr

    # ------------------------------------------------------------ tasks + anchors

    def create_task(
        self,
        task_id: bytes,
        model_hash: bytes,
        rounds: int,
        epsilon: float,
        deadline: int,
        reward_wei: int = 0,
    ) -> Receipt:
        if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        epsilon_milli = _to_milli(epsilon)
        fn = self.tasks.functions.createTask(
            _b32(task_id, "task_id"),
            _b32(model_hash, "model_hash"),
            _uint(rounds, "rounds", _UINT32_MAX, minimum=1),
            _uint(epsilon_milli, "epsilon * 1000", _UINT32_MAX),
            _uint(deadline, "deadline", _UINT64_MAX),
        )
        return self.client.transact(fn, value=_uint(reward_wei, "reward_wei", _UINT256_MAX))

    def task_exists(self, task_id: bytes) -> bool:
        raw = self.client.call(self.tasks.functions.task(_b32(task_id, "task_id")))
        if not isinstance(raw, (list, tuple)) or len(raw) != 7:
            raise ChainError(f"task(): expected 7 values, got {raw!r}")
        return _bool(raw[0], "task().exists")

    def task(self, task_id: bytes) -> TaskRecord:
        raw = self.client.call(self.tasks.functions.task(_b32(task_id, "task_id")))
        if not isinstance(raw, (list, tuple)) or len(raw) != 7:
            raise ChainError(f"task(): expected 7 values, got {raw!r}")
        exists, model_hash, rounds, eps, deadline, pool, anchored = raw
        if not _bool(exists, "task().exists"):
            raise ChainError(f"no such task 0x{task_id.hex()}")
        record = TaskRecord(
            task_id=bytes(task_id),
            model_hash=_out_b32(model_hash, "task().modelHash"),
            rounds=_out_uint(rounds, "task().rounds", _UINT32_MAX),
            epsilon_milli=_out_uint(eps, "task().epsilonMilli", _UINT32_MAX),
            deadline=_out_uint(deadline, "task().deadline", _UINT64_MAX),
            pool_wei=_out_uint(pool, "task().pool", _UINT256_MAX),
            anchored_rounds=_out_uint(anchored, "task().anchoredRounds", _UINT32_MAX),
        )
        if record.anchored_rounds > record.rounds:
            raise ChainError(f"task(): {record.anchored_rounds} anchored of {record.rounds} rounds")
        return record

    def anchor_round(
        self,
        task_id: bytes,
        round: int,
        merkle_root: bytes,
        model_hash: bytes,
        manifest_hash: bytes,
        accepted: int,
        rejected: int,
    ) -> Receipt:
        fn = self.tasks.functions.anchorRound(
            _b32(task_id, "task_id"),
            _uint(round, "round", _UINT32_MAX, minimum=1),
            _b32(merkle_root, "merkle_root"),
            _b32(model_hash, "model_hash"),
            _b32(manifest_hash, "manifest_hash"),
            _uint(accepted, "accepted", _UINT32_MAX),
            _uint(rejected, "rejected", _UINT32_MAX),
        )
        return self.client.transact(fn)

    def anchors(self, task_id: bytes) -> list[RoundAnchor]:
        """Every anchored round of a task, from RoundAnchored events, checked and ordered 1..n."""
        tid = _b32(task_id, "task_id")
        events = self.client.logs(self.tasks.events.RoundAnchored(), {"taskId": tid}, from_block=self.from_block)
        by_round: dict[int, RoundAnchor] = {}
        for ev in events:
            if ev.get("removed"):
                continue
            anchor = self._anchor_from_event(ev, tid)
            if anchor.round in by_round:
                raise ChainError(f"round {anchor.round} of task 0x{tid.hex()} anchored twice in the logs")
            by_round[anchor.round] = anchor
        ordered = [by_round[r] for r in sorted(by_round)]
        if [a.round for a in ordered] != list(range(1, len(ordered) + 1)):
            raise ChainError(f"anchored rounds are not 1..n: {[a.round for a in ordered]}")
        return ordered

    def verify_inclusion(self, task_id: bytes, round: int, leaf: bytes, proof: Sequence[bytes]) -> bool:
        fn = self.tasks.functions.verifyInclusion(
            _b32(task_id, "task_id"),
            _uint(round, "round", _UINT32_MAX),
            _b32(leaf, "leaf"),
            [_b32(p, f"proof[{i}]") for i, p in enumerate(proof)],
        )
        return _bool(self.client.call(fn), "verifyInclusion")

    def anchor_update(
        self, task_id: bytes, round: int, update_hash: bytes, edge_key: bytes, customer_key: bytes
    ) -> Receipt:
        """Per-update baseline for the gas benchmark; refused unless both keys are enrolled."""
        fn = self.tasks.functions.anchorUpdate(
            _b32(task_id, "task_id"),
            _uint(round, "round", _UINT32_MAX, minimum=1),
            _b32(update_hash, "update_hash"),
            _b32(edge_key, "edge_key"),
            _b32(customer_key, "customer_key"),
        )
        return self.client.transact(fn)

    # ------------------------------------------------------------ reputation

    def set_scores(self, task_id: bytes, round: int, scores: Mapping[bytes, float]) -> Receipt:
        """One transaction per round; scores are stored x1000 as uint32 (e.g. 0.875 -> 875)."""
        keys, milli = [], []
        for key, score in scores.items():
            if not isinstance(score, (int, float)) or not math.isfinite(score) or score < 0:
                raise ValueError(f"score for 0x{bytes(key).hex()} must be finite and >= 0, got {score!r}")
            keys.append(_b32(key, "score key"))
            milli.append(_uint(_to_milli(score), "score * 1000", _UINT32_MAX))
        fn = self.tasks.functions.setScores(
            _b32(task_id, "task_id"), _uint(round, "round", _UINT32_MAX, minimum=1), keys, milli
        )
        return self.client.transact(fn)

    def scores_set(self, task_id: bytes) -> dict[int, RoundEntries]:
        """Every round's ScoresSet event of a task (a round is scored once)."""
        return self._round_entries(self.tasks.events.ScoresSet(), "scoresMilli", task_id)

    def credits(self, task_id: bytes) -> dict[int, RoundEntries]:
        """Every round's Credited event of a task (a round is credited once)."""
        return self._round_entries(self.tasks.events.Credited(), "amounts", task_id)

    def _round_entries(self, event: Any, values_name: str, task_id: bytes) -> dict[int, RoundEntries]:
        tid = _b32(task_id, "task_id")
        out: dict[int, RoundEntries] = {}
        for ev in self.client.logs(event, {"taskId": tid}, from_block=self.from_block):
            if ev.get("removed"):
                continue
            if str(ev.get("address", "")).lower() != str(self.tasks.address).lower():
                raise ChainError(f"{event.event_name} log from unexpected address {ev.get('address')!r}")
            args = ev.get("args")
            if not isinstance(args, Mapping) or _out_b32(args.get("taskId"), "taskId") != tid:
                raise ChainError(f"{event.event_name} log without this task's decoded args")
            r = _out_uint(args.get("round"), f"{event.event_name}.round", _UINT32_MAX, minimum=1)
            keys, values = args.get("keys"), args.get(values_name)
            if not isinstance(keys, (list, tuple)) or not isinstance(values, (list, tuple)) or len(keys) != len(values):
                raise ChainError(f"{event.event_name}: keys and values do not pair up")
            if r in out:
                raise ChainError(f"{event.event_name}: round {r} appears twice in the logs")
            out[r] = RoundEntries(
                round=r,
                values={_out_b32(k, "key"): _out_uint(v, "value", _UINT256_MAX) for k, v in zip(keys, values, strict=True)},
                tx_hash=_out_b32(ev.get("transactionHash"), "log.transactionHash"),
                block_number=_out_uint(ev.get("blockNumber"), "log.blockNumber", _UINT64_MAX),
            )
        return out

    def reputation_of(self, key: bytes) -> float:
        raw = self.client.call(self.tasks.functions.reputationOf(_b32(key, "key")))
        return _out_uint(raw, "reputationOf", _UINT32_MAX) / 1000

    # ------------------------------------------------------------ settlement

    def settle_round(self, task_id: bytes, round: int, root: bytes, total_wei: int, customers: int) -> Receipt:
        """One constant-size transaction per round: the root over its settlement leaves and its total."""
        fn = self.tasks.functions.settleRound(
            _b32(task_id, "task_id"), _uint(round, "round", _UINT32_MAX, minimum=1), _b32(root, "root"),
            _uint(total_wei, "total_wei", _UINT256_MAX), _uint(customers, "customers", _UINT32_MAX),
        )
        return self.client.transact(fn)

    def settlement(self, task_id: bytes, round: int) -> Settlement | None:
        """A round's settlement as the contract holds it; None when the round is not settled."""
        raw = self.client.call(self.tasks.functions.settlement(_b32(task_id, "task_id"), _uint(round, "round", _UINT32_MAX)))
        if not isinstance(raw, (list, tuple)) or len(raw) != 4:
            raise ChainError(f"settlement(): expected 4 values, got {raw!r}")
        root = _out_b32(raw[0], "settlement().root")
        if root == bytes(32):
            return None
        return Settlement(
            round, root, _out_uint(raw[1], "settlement().total", _UINT256_MAX),
            _out_uint(raw[2], "settlement().claimed", _UINT256_MAX), _out_uint(raw[3], "settlement().customers", _UINT32_MAX),
        )

    def settled_rounds(self, task_id: bytes) -> dict[int, tuple[bytes, int]]:
        """round -> (tx hash, block) of every RoundSettled event of a task."""
        tid = _b32(task_id, "task_id")
        out: dict[int, tuple[bytes, int]] = {}
        for ev in self.client.logs(self.tasks.events.RoundSettled(), {"taskId": tid}, from_block=self.from_block):
            if ev.get("removed"):
                continue
            if str(ev.get("address", "")).lower() != str(self.tasks.address).lower():
                raise ChainError(f"RoundSettled log from unexpected address {ev.get('address')!r}")
            args = ev.get("args")
            if not isinstance(args, Mapping) or _out_b32(args.get("taskId"), "taskId") != tid:
                raise ChainError("RoundSettled log without this task's decoded args")
            r = _out_uint(args.get("round"), "RoundSettled.round", _UINT32_MAX, minimum=1)
            out[r] = (_out_b32(ev.get("transactionHash"), "log.transactionHash"), _out_uint(ev.get("blockNumber"), "log.blockNumber", _UINT64_MAX))
        return out

    def is_claimed(self, task_id: bytes, round: int, customer: bytes) -> bool:
        fn = self.tasks.functions.isClaimed(_b32(task_id, "task_id"), _uint(round, "round", _UINT32_MAX), _b32(customer, "customer"))
        return _bool(self.client.call(fn), "isClaimed")

    def claim(
        self, task_id: bytes, round: int, customer: bytes, reputation_milli: int, amount_wei: int, proof: Sequence[bytes],
        signer: LocalAccount | str | None = None,
    ) -> Receipt:
        """Claim a customer's settled reward (anyone may send it; the payout address is paid)."""
        fn = self.tasks.functions.claim(
            _b32(task_id, "task_id"), _uint(round, "round", _UINT32_MAX, minimum=1), _b32(customer, "customer"),
            _uint(reputation_milli, "reputation_milli", _UINT32_MAX), _uint(amount_wei, "amount_wei", _UINT256_MAX),
            [_b32(p, f"proof[{i}]") for i, p in enumerate(proof)],
        )
        if signer is None:
            return self.client.transact(fn)
        return self.client.transact(fn, signer=signer if isinstance(signer, LocalAccount) else Account.from_key(signer))

    # ------------------------------------------------------------ rewards

    def credit(self, task_id: bytes, round: int, amounts_wei: Mapping[bytes, int]) -> Receipt:
        """Move wei from the task's pool to the keys' payout balances (pull pattern)."""
        keys = [_b32(k, "credit key") for k in amounts_wei]
        amounts = [_uint(v, "amount", _UINT256_MAX) for v in amounts_wei.values()]
        fn = self.tasks.functions.credit(
            _b32(task_id, "task_id"), _uint(round, "round", _UINT32_MAX, minimum=1), keys, amounts
        )
        return self.client.transact(fn)

    def owed_to(self, payout: str) -> int:
        raw = self.client.call(self.tasks.functions.owedTo(_payout(payout, "payout")))
        return _out_uint(raw, "owedTo", _UINT256_MAX)

    def withdraw(self, payout_account: LocalAccount | str) -> Receipt:
        """Sent by the payout account itself (msg.sender is who gets paid); it pays the gas."""
        signer = payout_account if isinstance(payout_account, LocalAccount) else Account.from_key(payout_account)
        return self.client.transact(self.tasks.functions.withdraw(), signer=signer)

    def reclaim(self, task_id: bytes) -> Receipt:
        """Return a finished (or expired) task's unspent pool to the owner."""
        return self.client.transact(self.tasks.functions.reclaim(_b32(task_id, "task_id")))

    # ------------------------------------------------------------ internals

    def _anchor_from_event(self, ev: Mapping[str, Any], task_id: bytes) -> RoundAnchor:
        if str(ev.get("address", "")).lower() != str(self.tasks.address).lower():
            raise ChainError(f"RoundAnchored log from unexpected address {ev.get('address')!r}")
        args = ev.get("args")
        if not isinstance(args, Mapping):
            raise ChainError("RoundAnchored log without decoded args")
        if _out_b32(args.get("taskId"), "RoundAnchored.taskId") != task_id:
            raise ChainError("RoundAnchored log for another task")
        return RoundAnchor(
            task_id=task_id,
            round=_out_uint(args.get("round"), "RoundAnchored.round", _UINT32_MAX, minimum=1),
            merkle_root=_out_b32(args.get("merkleRoot"), "RoundAnchored.merkleRoot"),
            model_hash=_out_b32(args.get("globalModelHash"), "RoundAnchored.globalModelHash"),
            manifest_hash=_out_b32(args.get("manifestHash"), "RoundAnchored.manifestHash"),
            accepted=_out_uint(args.get("accepted"), "RoundAnchored.accepted", _UINT32_MAX),
            rejected=_out_uint(args.get("rejected"), "RoundAnchored.rejected", _UINT32_MAX),
            tx_hash=_out_b32(ev.get("transactionHash"), "log.transactionHash"),
            block_number=_out_uint(ev.get("blockNumber"), "log.blockNumber", _UINT64_MAX),
        )


def _to_milli(value: float) -> int:
    """Float to the contract's x1000 integer units (half to even); module-level because
    methods here take a parameter named ``round``."""
    return round(value * 1000)


# ---------------------------------------------------------------- validation
# Inputs (caller mistakes) raise ValueError; outputs (chain data) raise ChainError.


def _b32(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        got = f"{len(value)} bytes" if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise ValueError(f"{what} must be 32 bytes, got {got}")
    return bytes(value)


def _uint(value: object, what: str, maximum: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{what} must be an int in [{minimum}, {maximum}], got {value!r}")
    return value


def _payout(value: str | None, what: str) -> str:
    if value is None:
        return ZERO_ADDRESS
    if not isinstance(value, str) or not Web3.is_address(value):
        raise ValueError(f"{what} must be an address or None, got {value!r}")
    return str(Web3.to_checksum_address(value))


def _out_b32(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ChainError(f"{what}: expected 32 bytes from chain, got {value!r}")
    return bytes(value)


def _out_uint(value: object, what: str, maximum: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ChainError(f"{what}: expected int in [{minimum}, {maximum}] from chain, got {value!r}")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ChainError(f"{what}: expected bool from chain, got {value!r}")
    return value


def _address(value: object, what: str) -> str:
    if not isinstance(value, str) or not Web3.is_address(value):
        raise ChainError(f"{what}: expected an address from chain, got {value!r}")
    return str(Web3.to_checksum_address(value))
