"""Gas per round: one Merkle-root anchor per round (crowdfl) against one transaction per update.

    .venv/bin/python bench/gas.py                  # 10, 100 and 1,000 updates on the embedded chain, ~1 min
    .venv/bin/python bench/gas.py --sizes 10 100   # fewer
    .venv/bin/python bench/gas.py --rpc URL --key HEX --gas-price-wei 1000000000   # any JSON-RPC chain
    .venv/bin/python bench/gas.py --poa --sizes 10 100   # starts the EthereumJS Clique harness (1 s blocks)

Both sides run on the same freshly deployed contracts in the same run. The baseline is
CrowdTasks.anchorUpdate: the update's hash, edge and customer checked against the registry and
recorded, one transaction each (what anchoring without a Merkle tree costs). crowdfl's side is
CrowdTasks.anchorRound: the Merkle root over all the round's update hashes, the model and manifest
hashes, one transaction; every update stays provable with its Merkle proof (verifyInclusion).
The round's setScores transaction (reputation mirror, one per round, grows with the customers
scored) is shown beside it for completeness. On the EthereumJS Clique chain each sequential
transaction waits for a block (1 s at the test period), so 1,000 baseline transactions take
over 15 minutes there; the gas figures do not depend on the chain.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.chain import ChainConfig, ChainError, connect  # noqa: E402
from coordinator.contracts import CrowdContracts, Role  # noqa: E402
from crowdfl.merkle import merkle_proof, merkle_root  # noqa: E402


def measure(cfg: ChainConfig, n: int) -> dict[str, float]:
    contracts = CrowdContracts.deploy(connect(cfg))
    edge = os.urandom(32)
    devices = [os.urandom(32) for _ in range(n)]
    entries = [(edge, Role.EDGE, None)] + [(d, Role.DEVICE, None) for d in devices]
    for i in range(0, len(entries), 200):
        contracts.register_many(entries[i : i + 200])
    updates = [os.urandom(32) for _ in range(n)]
    deadline = int(time.time()) + 86400

    merkle_task = os.urandom(32)
    contracts.create_task(merkle_task, os.urandom(32), 1, 4.0, deadline)
    t0 = time.perf_counter()
    leaves = sorted(updates)
    root = merkle_root(leaves)
    receipt = contracts.anchor_round(merkle_task, 1, root, os.urandom(32), os.urandom(32), n, 0)
    merkle_s = time.perf_counter() - t0
    proof = merkle_proof(leaves, n // 2)
    assert contracts.verify_inclusion(merkle_task, 1, leaves[n // 2], proof)
    try:
        scores_gas = contracts.set_scores(merkle_task, 1, {d: 0.5 for d in devices}).gas_used
    except ChainError:
        scores_gas = float("nan")  # above the block gas limit: would be split over transactions

    per_task = os.urandom(32)
    contracts.create_task(per_task, os.urandom(32), 1, 4.0, deadline)
    t0 = time.perf_counter()
    per_update_gas = sum(contracts.anchor_update(per_task, 1, u, edge, d).gas_used for u, d in zip(updates, devices, strict=True))
    per_update_s = time.perf_counter() - t0
    return {
        "merkle_gas": receipt.gas_used, "merkle_s": merkle_s, "scores_gas": scores_gas,
        "per_update_gas": per_update_gas, "per_update_s": per_update_s, "proof_len": len(proof),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--rpc", default=None, help="JSON-RPC URL (default: the embedded eth-tester chain)")
    p.add_argument("--key", default=None, help="funded private key (hex) for --rpc")
    p.add_argument("--chain-id", type=int, default=None)
    p.add_argument("--gas-price-wei", type=int, default=None)
    p.add_argument("--poa", action="store_true", help="start the EthereumJS Clique chain of tests/support/poa_chain.py")
    args = p.parse_args(argv)
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
                return run(chain.chain_config(confirmations=0), f"EthereumJS Clique chain ({chain.rpc_url}, 1 s blocks)", args.sizes)
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
    return run(cfg, where, args.sizes)


def run(cfg: ChainConfig, where: str, sizes: list[int]) -> int:
    print(f"gas per round on the {where}; baseline: one anchorUpdate transaction per update")
    header = (f"{'updates':>8} {'merkle root (1 tx)':>19} {'one tx per update':>18} {'ratio':>8} "
              f"{'per update: merkle':>19} {'baseline':>9} {'proof':>6} {'setScores':>10} {'time merkle':>12} {'baseline':>9}")
    print(header)
    for n in sizes:
        m = measure(cfg, n)
        ratio = m["per_update_gas"] / m["merkle_gas"]
        scores = f"{m['scores_gas']:>10,.0f}" if m["scores_gas"] == m["scores_gas"] else f"{'n/a':>10}"
        print(
            f"{n:>8} {m['merkle_gas']:>19,.0f} {m['per_update_gas']:>18,.0f} {ratio:>7.1f}x "
            f"{m['merkle_gas'] / n:>19,.0f} {m['per_update_gas'] / n:>9,.0f} {m['proof_len']:>6} {scores} "
            f"{m['merkle_s']:>11.3f}s {m['per_update_s']:>8.1f}s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
