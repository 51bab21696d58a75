"""Gas per round, coordinator side: anchor + settlement (crowdfl) against per-update anchoring and
against per-key settlement, at 10 to 10,000 customers, plus the cost of one customer's claim.

    .venv/bin/python bench/gas.py                        # 10, 100, 1,000, 10,000 customers, embedded chain (~15 min)
    .venv/bin/python bench/gas.py --quick                # 10 and 100 (writes gas.quick.json)
    .venv/bin/python bench/gas.py --rpc URL --key HEX --gas-price-wei 1000000000   # any JSON-RPC chain
    .venv/bin/python bench/gas.py --poa --sizes 10 100   # starts the EthereumJS Clique harness (1 s blocks)

All sides run on freshly deployed contracts in the same run, with one update per customer:
- crowdfl: anchorRound (Merkle root over the round's update and receipt hashes) + settleRound (root
  over the (customer, reputation, reward) leaves and the total): two transactions whose size does
  not depend on the number of customers;
- baseline "per update": anchorUpdate, one transaction per update (registry checked each time);
- baseline "per key": the settlement crowdfl had before, setScores + credit with every key in the
  calldata, split into transactions of 500 keys when one would exceed the block gas limit;
- a claim: one customer's pull payment with its Merkle proof (log2 of the customers long).
Gas is deterministic up to calldata bytes (random keys), so one run per size is shown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.chain import ChainConfig, connect  # noqa: E402
from coordinator.contracts import CrowdContracts, Role  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from coordinator.settlement import settle  # noqa: E402
from crowdfl.merkle import merkle_proof, merkle_root  # noqa: E402


CHUNK = 500  # keys per setScores/credit transaction when one would not fit a block
SAMPLE_UPDATES = 100


def measure(cfg: ChainConfig, n: int) -> dict[str, float]:
    client = connect(cfg)
    contracts = CrowdContracts.deploy(client)
    edge = os.urandom(32)
    devices = [os.urandom(32) for _ in range(n)]
    # the baselines send the same transaction shape for every update / every 500 keys, so they are
    # measured on a sample and scaled linearly (py-evm takes ~0.4 s a transaction on the 2-core machine)
    sample_updates, sample_keys = min(n, SAMPLE_UPDATES), min(n, CHUNK)
    payout = client.new_account().address
    enrolled = devices[: max(sample_updates, sample_keys)]
    entries = [(edge, Role.EDGE, None)] + [(d, Role.DEVICE, payout) for d in enrolled]
    if devices[n // 2] not in enrolled:
        entries.append((devices[n // 2], Role.DEVICE, payout))  # the claimant
    for i in range(0, len(entries), 200):
        contracts.register_many(entries[i : i + 200])
    updates = [os.urandom(32) for _ in range(n)]
    receipts = [os.urandom(32) for _ in range(n)]
    deadline = int(time.time()) + 86400
    pool = 10**18

    # crowdfl: one anchor and one settlement per round, measured in full at every size
    task = os.urandom(32)
    contracts.create_task(task, os.urandom(32), 1, 4.0, deadline, pool)
    t0 = time.perf_counter()
    leaves = sorted(updates + receipts)
    anchor = contracts.anchor_round(task, 1, merkle_root(leaves), os.urandom(32), os.urandom(32), n, 0)
    ledger = {
        "task_id": task.hex(), "round": 1, "scores": {d.hex(): 0.5 for d in devices},
        "reputation_after": {d.hex(): 0.7 for d in devices}, "rewards": {d.hex(): str(pool // n) for d in devices},
    }
    plan = settle(ledger)
    settlement = contracts.settle_round(task, 1, plan.root, plan.total_wei, len(plan.leaves))
    crowdfl_s = time.perf_counter() - t0
    assert contracts.verify_inclusion(task, 1, leaves[n // 2], merkle_proof(leaves, n // 2))
    leaf, proof = plan.proof(devices[n // 2].hex())
    claim = contracts.claim(task, 1, devices[n // 2], leaf.reputation_milli, leaf.amount_wei, proof)

    # baseline: the per-key settlement crowdfl had before (setScores + credit), one 500-key chunk
    keyed = os.urandom(32)
    contracts.create_task(keyed, os.urandom(32), 1, 4.0, deadline, pool)
    t0 = time.perf_counter()
    chunk = devices[:sample_keys]
    chunk_gas = contracts.set_scores(keyed, 1, {d: 0.5 for d in chunk}).gas_used
    chunk_gas += contracts.credit(keyed, 1, {d: pool // n for d in chunk}).gas_used
    per_key_s = (time.perf_counter() - t0) * n / sample_keys
    per_key_gas = chunk_gas * n / sample_keys

    # baseline: one anchoring transaction per update
    per_task = os.urandom(32)
    contracts.create_task(per_task, os.urandom(32), 1, 4.0, deadline)
    t0 = time.perf_counter()
    sampled = sum(contracts.anchor_update(per_task, 1, u, edge, d).gas_used for u, d in zip(updates[:sample_updates], devices, strict=False))
    per_update_s = (time.perf_counter() - t0) * n / sample_updates
    return {
        "customers": n, "anchor_gas": anchor.gas_used, "settle_gas": settlement.gas_used,
        "crowdfl_round_gas": anchor.gas_used + settlement.gas_used, "crowdfl_s": crowdfl_s,
        "per_key_settlement_gas": per_key_gas, "per_key_round_gas": anchor.gas_used + per_key_gas, "per_key_s": per_key_s,
        "per_key_measured_keys": sample_keys,
        "per_update_anchor_gas": sampled * n / sample_updates, "per_update_s": per_update_s,
        "per_update_measured": sample_updates,
        "claim_gas": claim.gas_used, "claim_proof_len": len(proof),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--quick", action="store_true", help="10 and 100 customers only; writes gas.quick.json")
    p.add_argument("--rpc", default=None, help="JSON-RPC URL (default: the embedded eth-tester chain)")
    p.add_argument("--key", default=None, help="funded private key (hex) for --rpc")
    p.add_argument("--chain-id", type=int, default=None)
    p.add_argument("--gas-price-wei", type=int, default=None)
    p.add_argument("--poa", action="store_true", help="start the EthereumJS Clique chain of tests/support/poa_chain.py")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [10, 100]
    if any(n < 1 for n in args.sizes):
        p.error("sizes must be >= 1")
    if args.poa:
        import tempfile

        from tests.support.poa_chain import ethereumjs_missing, start_clique_chain

        missing = ethereumjs_missing()
        if missing:
            p.error(f"--poa: {missing}")
        with tempfile.TemporaryDirectory(prefix="crowdfl-gas-poa-") as tmp:
            chain = start_clique_chain(Path(tmp), sealers=1, period_s=1)
            try:
                return run(chain.chain_config(confirmations=0), f"EthereumJS Clique chain ({chain.rpc_url}, 1 s blocks)", args.sizes, write=False)
            finally:
                chain.stop()
    if args.rpc:
        if not args.key:
            p.error("--rpc needs --key")
        cfg = ChainConfig(kind="rpc", rpc_url=args.rpc, private_key=args.key, chain_id=args.chain_id, poa=True,
                          gas_price_wei=args.gas_price_wei)
        where = f"JSON-RPC chain at {args.rpc}"
    else:
        cfg = ChainConfig(kind="embedded")
        where = "embedded chain (eth-tester + py-evm)"
    return run(cfg, where, args.sizes, quick=args.quick or args.sizes != [10, 100, 1000, 10000], write=not args.rpc)


def run(cfg: ChainConfig, where: str, sizes: list[int], quick: bool = False, write: bool = True) -> int:
    print(f"gas of one round, coordinator side, on the {where}; one update per customer")
    print(f"{'customers':>9} {'crowdfl: anchor+settle':>23} {'per-key settlement':>19} {'per-update anchoring':>21} "
          f"{'crowdfl vs 10':>14} {'one claim':>10} {'proof':>6} {'time crowdfl':>13} {'per-key':>8} {'per-update':>11}")
    rows = []
    for n in sizes:
        m = measure(cfg, n)
        rows.append(m)
        vs = m["crowdfl_round_gas"] / rows[0]["crowdfl_round_gas"]
        print(
            f"{n:>9,} {m['crowdfl_round_gas']:>23,.0f} {m['per_key_round_gas']:>19,.0f} {m['per_update_anchor_gas']:>21,.0f} "
            f"{vs:>13.3f}x {m['claim_gas']:>10,.0f} {m['claim_proof_len']:>6} {m['crowdfl_s']:>12.2f}s "
            f"{m['per_key_s']:>7.1f}s {m['per_update_s']:>10.1f}s",
            flush=True,
        )
    print("per-key settlement = the anchor + setScores + credit in 500-key transactions; per-update anchoring = anchorUpdate each;")
    print(f"both baselines measured on min(n, {CHUNK}) keys / min(n, {SAMPLE_UPDATES}) updates and scaled linearly (same transaction each time);")
    print("crowdfl's anchor, settlement and claim measured in full at every size")
    if write:
        write_result("gas", {"where": where, "rows": rows}, quick=quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
