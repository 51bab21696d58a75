"""`crowdfl-agent verify` checks the device's receipts and rewards against the chain through its own
JSON-RPC URL, and fails when the coordinator's database is edited behind its back; `claim` pays."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from sqlalchemy import update as sql_update

from agent.chainview import SELECTORS
from agent.cli import main as agent_main
from agent.state import AgentState
from coordinator.api import create_app
from coordinator.chain import ChainConfig, connect
from coordinator.contracts import CrowdContracts, load_artifact
from coordinator.db import Reputation
from crowdfl.serving import BackgroundHttpServer
from crowdfl_sim.rpc import rpc_app
from tests.coordinator.world import FRONT, make_world, task_parts, update_env
from tests.helpers import update_receipt


def test_selectors_match_the_contract_artifacts() -> None:
    from eth_utils import function_signature_to_4byte_selector

    abis = {f["name"]: f for name in ("CrowdTasks", "Registry") for f in load_artifact(name).abi if f.get("type") == "function"}
    for signature, selector in SELECTORS.items():
        name, args = signature[:-1].split("(")
        assert [i["type"] for i in abis[name]["inputs"]] == (args.split(",") if args else []), signature
        assert "0x" + function_signature_to_4byte_selector(signature).hex() == selector, signature


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = agent_main(argv)
    return code, out.getvalue()


def test_verify_and_claim_through_the_devices_own_rpc(tmp_path: Path) -> None:
    client = connect(ChainConfig(kind="embedded"))
    contracts = CrowdContracts.deploy(client)
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path)
    spec, initial = task_parts(rounds=2)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=10**15)
    me = w.devices[0]
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    me.save(state_dir / "identity.json")
    state = AgentState(state_dir / "state.sqlite")
    for r in (1, 2):
        rs = w.coord.open_round(spec.task_id, r)
        for i, node in enumerate(rs.selected):
            assert w.coord.receive_update(update_env(w.edge, spec, r, node, rs.global_model_hash, 0.05, 10 * r + i)).status == "received"
        # the device keeps the very receipt its edge forwarded (Ed25519 signatures are deterministic)
        raw = update_receipt(me, spec.task_id, r, w.edge.node_id, 10, epsilon=spec.epsilon)
        state.release(spec.task_id, r, [1000 * r], spec.epsilon, "t", lambda seq: b"x", receipt=(bytes(32), raw))
        w.coord.close_round(spec.task_id, r)
        w.coord.anchor_pending()
    state.close()
    api = BackgroundHttpServer(create_app(w.coord), name="api")
    rpc = BackgroundHttpServer(rpc_app(client.w3), name="rpc")
    api.start()
    rpc.start()
    try:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(
            f'state_dir = "{state_dir}"\n[coordinator]\nurl = "{api.url}"\n'
            f'[chain]\nrpc_url = "{rpc.url}"\ntasks_address = "{contracts.addresses["CrowdTasks"]}"\n'
            f'registry_address = "{contracts.addresses["Registry"]}"\n'
        )
        code, text = _run(["verify", "--config", str(cfg)])
        assert code == 0, text
        assert text.count("included in the anchored round") == 2 and "claimable" in text and "verify: OK" in text

        payout = w.payouts[me.node_id]
        code, text = _run(["claim", "--config", str(cfg)])
        assert code == 0 and text.count("claimed (confirmed on chain)") == 2, text
        paid = client.balance(payout)
        assert paid > 0
        assert _run(["verify", "--config", str(cfg)])[1].count("wei claimed") == 2

        # the manufacturer's database is edited behind the coordinator's back: a larger reward is shown
        with w.coord.sessions.begin() as s:
            s.execute(sql_update(Reputation).where(Reputation.customer == me.node_id, Reputation.round == 1).values(reward_wei=str(10**15)))
        code, text = _run(["verify", "--config", str(cfg)])
        assert code == 1 and "not what the chain settled" in text and "verify: FAILED" in text, text
        assert client.balance(payout) == paid
    finally:
        api.stop()
        rpc.stop()


def test_verify_refuses_to_run_without_a_chain_url(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n')
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert _run(["verify", "--config", str(cfg)])[0] == 2
    assert "rpc_url" in err.getvalue()


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
