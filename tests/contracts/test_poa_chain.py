"""coordinator.chain + CrowdContracts on a real Clique PoA chain (@ethereumjs/client 0.9.0).

Slow (real blocks): about one block period per transaction. Skipped without
tests/support/ethereumjs/node_modules, failed under CI=true.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from web3 import HTTPProvider, Web3
from web3.exceptions import ExtraDataLengthError

from coordinator.chain import ChainError, connect
from coordinator.contracts import CrowdContracts, Role
from crowdfl.merkle import merkle_proof, merkle_root
from eth_account import Account

from tests.support.poa_chain import (  # fixtures come from tests/contracts/conftest.py
    PoaChain,
    clique_signer,
    ethereumjs_missing,
    open_seal_gate,
)
from tests.support.realparts import require_real_part

pytestmark = [pytest.mark.slow, pytest.mark.realpart]


def new_key() -> bytes:
    return os.urandom(32)


def _is_clique_block(chain: PoaChain, number: str = "latest", node: int = 0) -> bool:
    block = chain.rpc("eth_getBlockByNumber", [number, False], node=node)
    return len(bytes.fromhex(block["extraData"][2:])) == 97 and int(block["difficulty"], 16) in (1, 2)


def _deploy_and_anchor(chain: PoaChain) -> tuple[CrowdContracts, bytes, list[bytes], dict[str, float]]:
    """The coordinator's whole on-chain round: enrol, create a task, anchor two rounds."""
    timings: dict[str, float] = {}
    client = connect(chain.chain_config())
    assert client.address == chain.signers[0] or client.address in chain.signers

    t0 = time.monotonic()
    crowd = CrowdContracts.deploy(client)
    timings["deploy"] = time.monotonic() - t0

    edge, devices = new_key(), [new_key() for _ in range(10)]
    t0 = time.monotonic()
    crowd.register_many([(edge, Role.EDGE, None)] + [(d, Role.DEVICE, client.new_account().address) for d in devices])
    timings["registerMany(11)"] = time.monotonic() - t0
    assert crowd.is_active(devices[0], Role.DEVICE)

    task_id = new_key()
    crowd.create_task(task_id, new_key(), 3, 1.0, int(time.time()) + 3600, reward_wei=10**15)
    leaves = [new_key() for _ in range(7)]
    for rnd in (1, 2):
        t0 = time.monotonic()
        crowd.anchor_round(task_id, rnd, merkle_root(leaves), new_key(), new_key(), len(leaves), rnd)
        timings[f"anchorRound {rnd}"] = time.monotonic() - t0
    return crowd, task_id, leaves, timings


def test_deploy_and_anchor_on_clique(clique_chain: PoaChain, capsys: pytest.CaptureFixture[str]) -> None:
    assert _is_clique_block(clique_chain)
    crowd, task_id, leaves, timings = _deploy_and_anchor(clique_chain)

    anchors = crowd.anchors(task_id)
    assert [(a.round, a.accepted, a.rejected) for a in anchors] == [(1, 7, 1), (2, 7, 2)]
    assert all(a.merkle_root == merkle_root(leaves) for a in anchors)
    for i, leaf in enumerate(leaves):
        assert crowd.verify_inclusion(task_id, 2, leaf, merkle_proof(leaves, i))
    assert not crowd.verify_inclusion(task_id, 2, new_key(), merkle_proof(leaves, 0))
    assert crowd.task(task_id).anchored_rounds == 2

    # A refusal found by the dry run (EthereumJS returns revert data from eth_call) ...
    with pytest.raises(ChainError, match="already anchored") as err:
        crowd.anchor_round(task_id, 2, new_key(), new_key(), new_key(), 1, 0)
    assert err.value.reverted
    # ... and one that is mined: no receipt status on this client, so no logs = failed, and
    # the eth_call replay recovers the reason.
    stale = crowd.tasks.functions.anchorRound(task_id, 1, new_key(), new_key(), new_key(), 1, 0)
    with pytest.raises(ChainError, match="already anchored") as err:
        crowd.client.transact(stale, gas=300_000)
    assert err.value.reverted
    assert len(crowd.anchors(task_id)) == 2

    with capsys.disabled():
        print(f"\n[clique 1 s, 1 signer] started in {clique_chain.started_in_s:.1f} s; " + _fmt(timings))


def test_reattach_and_removed_device(clique_chain: PoaChain) -> None:
    crowd, task_id, _, _ = _deploy_and_anchor(clique_chain)
    again = CrowdContracts.at(connect(clique_chain.chain_config(confirmations=0)), crowd.addresses)
    assert [a.round for a in again.anchors(task_id)] == [1, 2]
    edge, device = new_key(), new_key()
    again.register_many([(edge, Role.EDGE, None), (device, Role.DEVICE, None)])
    again.anchor_update(task_id, 3, new_key(), edge, device)
    again.remove(device)
    with pytest.raises(ChainError, match="inactive device"):
        again.anchor_update(task_id, 3, new_key(), edge, device)


def test_clique_blocks_need_the_poa_middleware(clique_chain: PoaChain) -> None:
    plain = Web3(HTTPProvider(clique_chain.rpc_url))
    with pytest.raises(ExtraDataLengthError):
        plain.eth.get_block("latest")
    client = connect(clique_chain.chain_config())
    assert len(client.w3.eth.get_block("latest")["proofOfAuthorityData"]) == 97


def test_two_sealers(clique_two_sealers: PoaChain, capsys: pytest.CaptureFixture[str]) -> None:
    chain = clique_two_sealers
    crowd, task_id, _, timings = _deploy_and_anchor(chain)
    # The second node saw the same anchors: they travelled over the loopback peer link.
    other = CrowdContracts.at(connect(chain.chain_config(rpc_url=chain.nodes[1].rpc_url)), crowd.addresses)
    deadline = time.monotonic() + 30
    while len(other.anchors(task_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [a.tx_hash for a in other.anchors(task_id)] == [a.tx_hash for a in crowd.anchors(task_id)]
    # Clique lets a signer seal at most every other block here, so a head past 2 means both
    # signers sealed; and each node counts the other as its peer.
    assert int(chain.rpc("eth_blockNumber", []), 16) > 2
    assert [int(chain.rpc("net_peerCount", [], node=i), 16) for i in (0, 1)] == [1, 1]
    assert _is_clique_block(chain, node=1)
    # Peer first, seal after: node 0 alone sealed block 1 and node 1 built on it, so there was
    # never a fork at genesis (both nodes hold the same blocks 1-3).
    node0 = Account.from_key(chain.private_key).address
    (node1,) = [s for s in chain.signers if s != node0]
    assert [clique_signer(chain, n) for n in (1, 2, 3)] == [node0, node1, node0]
    for n in (1, 2, 3):
        assert chain.rpc("eth_getBlockByNumber", [hex(n), False], node=0)["hash"] == (
            chain.rpc("eth_getBlockByNumber", [hex(n), False], node=1)["hash"]
        )
    with capsys.disabled():
        started = f"started in {chain.started_in_s:.1f} s ({chain.attempts} attempt(s))"
        print(f"\n[clique 1 s, 2 signers] {started}; " + _fmt(timings))


def test_seal_gate_holds_the_miner(tmp_path: Path) -> None:
    """A sealer behind a closed gate (preload.cjs) seals nothing, and seals as soon as it opens."""
    reason = ethereumjs_missing()
    require_real_part("@ethereumjs/client", reason is None, reason or "")
    from tests.support import poa_chain

    key = Account.create()
    genesis = tmp_path / "crowdfl.json"
    genesis.write_text(json.dumps(poa_chain._genesis([key.address], 1)))
    key_file = tmp_path / "signer.key"
    key_file.write_text(key.key.hex().removeprefix("0x"))
    gate = tmp_path / "node" / "seal.gate"
    args = ["--gethGenesis", str(genesis), "--unlock", str(key_file), "--mine", "--isSingleNode", "--maxPeers", "0"]
    node = poa_chain._start_node(tmp_path / "node", args, seal_gate=gate)
    chain = PoaChain("gate", poa_chain.CLIQUE_CHAIN_ID, key.key.hex(), [key.address], 1, [node])
    try:
        poa_chain._wait_for_rpc(node, 90)
        poa_chain._wait_for_log(node, "seal gate closed", 90)
        # The miner re-tries every 100 ms; three block periods without a block show the gate holds.
        held_since = time.monotonic()
        while time.monotonic() - held_since < 3.0:
            assert int(chain.rpc("eth_blockNumber", []), 16) == 0
            time.sleep(0.2)
        open_seal_gate(gate)
        poa_chain._wait_for_block(chain, 2, 60)
        assert clique_signer(chain, 1) == key.address
    finally:
        chain.stop()


def test_dev_poa_chain(dev_chain: PoaChain, capsys: pytest.CaptureFixture[str]) -> None:
    """``--dev=poa`` as the client ships it: printed key, 10 s blocks. One transaction only."""
    assert _is_clique_block(dev_chain)
    client = connect(dev_chain.chain_config(confirmations=0))
    assert client.chain_id == 123456
    t0 = time.monotonic()
    receipt = client.send_value(client.new_account().address, 12345)
    elapsed = time.monotonic() - t0
    assert receipt.gas_used == 21_000
    with capsys.disabled():
        print(f"\n[dev=poa 10 s] started in {dev_chain.started_in_s:.1f} s; one transfer {elapsed:.1f} s")


def _fmt(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
