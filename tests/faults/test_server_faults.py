"""Faults on the coordinator's side, each in the middle of a round, on the real parts: a coordinator
process (the serving loop of ``crowdfl-coordinator serve``) on its own PostgreSQL cluster, anchoring
on a two-sealer @ethereumjs/client Clique chain.

Round 1: the coordinator is killed with SIGKILL after two of four updates, and restarted.
Round 2: PostgreSQL is killed with SIGKILL (postmaster and backends at once) after two updates;
         the API answers 503 ``database_unavailable`` meanwhile; the cluster is restarted (crash
         recovery) and the edge's retry goes through.
Round 3: one sealer of two is killed with SIGKILL once the round's updates are in: the chain can
         no longer advance (Clique: a signer may not seal two blocks in a row), the round stays
         closed with its anchoring error in the API and the metrics; the sealer is restarted on
         its data and the round is anchored and settled.
Round 4: a network partition between the sealers (SIGSTOP of one node: its TCP connections stay
         open and carry nothing, as when a link drops every packet); healed with SIGCONT.

At the end: four rounds, each with exactly four updates (a resent update is answered
``duplicate``, never counted twice); the chain holds one anchor per round whose transaction,
Merkle root and model hash are the coordinator's and whose model is in the store; every round
settled once; ``crowdfl audit`` verifies the final model from the chain and the store alone;
both sealers on the same head (no fork).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.chain import connect
from coordinator.contracts import CrowdContracts
from crowdfl_sim.cli import main as crowdfl_main
from tests.coordinator.test_crash_poa import Proc, _wait
from tests.coordinator.world import FRONT, make_world, task_parts, update_env
from tests.support import postgres as pg
from tests.support.poa_chain import (
    GAS_PRICE_WEI,
    PoaChain,
    ethereumjs_missing,
    head,
    kill9_node,
    pause_node,
    restart_node,
    resume_node,
    start_clique_chain,
)
from tests.support.realparts import require_real_part

pytestmark = [pytest.mark.slow, pytest.mark.realpart]

DEVICES = 4
ROUNDS = 4
WAIT = 120.0


@pytest.fixture
def cluster() -> Iterator[pg.PostgresServer]:
    ok, why = pg.availability()
    require_real_part("postgresql", ok, why)
    with pg.running_postgres(crash_safe=True) as server:
        yield server


@pytest.fixture
def two_sealers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoaChain]:
    why = ethereumjs_missing()
    require_real_part("@ethereumjs/client", why is None, why or "")
    chain = start_clique_chain(tmp_path_factory.mktemp("fault-clique2"), sealers=2, period_s=1)
    try:
        yield chain
    finally:
        for i in range(len(chain.nodes)):
            if chain.nodes[i].proc.poll() is None:
                resume_node(chain, i)  # a paused node must not outlive the test
        chain.stop()


def _metric(proc: Proc, name: str) -> float:
    with urllib.request.urlopen(proc.url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _why(proc: Proc, chain: PoaChain | None = None):  # type: ignore[no-untyped-def]
    """What a timed-out wait prints: the coordinator's threads' stacks and log, the chain's log."""
    import os
    import signal

    def text() -> str:
        if proc.proc is not None and proc.proc.poll() is None:
            os.kill(proc.proc.pid, signal.SIGUSR1)
            time.sleep(0.5)  # let faulthandler write the stacks before the log is read
        tail = proc.log.read_text(errors="replace")[-12000:]
        return tail + ("\n--- chain ---\n" + chain.log_text()[-3000:] if chain is not None else "")

    return text


def _post(proc: Proc, env: bytes) -> tuple[int, dict[str, Any]]:
    try:
        return proc.post_update(env)
    except (urllib.error.URLError, ConnectionError) as exc:
        return 0, {"error": str(exc)}


def test_kill9_and_partition_mid_round_count_every_update_once_and_anchor_each_round(
    cluster: pg.PostgresServer, two_sealers: PoaChain, tmp_path: Path
) -> None:
    chain = two_sealers
    db_url = cluster.create_database("coordinator_faults")
    contracts = CrowdContracts.deploy(connect(chain.chain_config()))
    w = make_world(contracts, db_url, tmp_path, devices=DEVICES)
    spec, initial = task_parts(rounds=ROUNDS)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=10**6)
    tid = bytes.fromhex(spec.task_id)
    (tmp_path / "addresses.json").write_text(json.dumps(contracts.addresses))
    cfg = {
        "rpc_url": chain.rpc_url, "private_key": chain.private_key, "chain_id": chain.chain_id,
        "gas_price_wei": GAS_PRICE_WEI, "addresses": contracts.addresses, "identity": str(tmp_path / "id.json"),
        "db_url": db_url, "store": str(tmp_path / "store"), "port_file": str(tmp_path / "port"), "receipt_timeout_s": 8.0,
    }
    (tmp_path / "proc.json").write_text(json.dumps(cfg))
    proc = Proc(tmp_path / "proc.json", tmp_path / "port", tmp_path / "proc.log")
    rounds_url = f"/api/v1/tasks/{spec.task_id}/rounds"
    envs: dict[tuple[int, int], bytes] = {}
    answers: list[tuple[int, int, int, str]] = []  # (round, device, http status, status or error)

    def env(r: int, i: int) -> bytes:
        if (r, i) not in envs:
            base = proc.get(f"{rounds_url}/{r}")["base_model_hash"]
            envs[(r, i)] = update_env(w.edge, spec, r, w.devices[i], base, 0.05, 100 * r + i)
        return envs[(r, i)]

    def send(r: int, i: int) -> str:
        code, body = _post(proc, env(r, i))
        answers.append((r, i, code, str(body.get("status") or body.get("error"))))
        return str(body.get("status") or body.get("error"))

    def rounds() -> list[dict[str, Any]]:
        return proc.get(rounds_url)  # type: ignore[no-any-return]

    def round_open(r: int) -> bool:
        got = rounds()
        return len(got) >= r and got[r - 1]["status"] == "open"

    def settled(r: int) -> bool:
        return bool(rounds()[r - 1]["settled"])

    def stalled_visibly(r: int) -> bool:
        row = rounds()[r - 1]
        return row["status"] != "open" and not row["settled"] and bool(row["anchor_error"]) and _metric(
            proc, "crowdfl_coordinator_anchor_failing") >= 1

    why = _why(proc, chain)
    try:
        proc.start()
        # -- round 1: the coordinator is killed -9 mid-round ------------------------------------
        _wait(lambda: round_open(1), 60, why)
        for i in range(DEVICES):
            env(1, i)  # what the edge holds before the fault
        assert [send(1, i) for i in (0, 1)] == ["received", "received"]
        proc.kill9()
        proc.start()
        assert len(proc.get(f"{rounds_url}/1")["updates"]) == 2  # nothing accepted was lost
        assert send(1, 0) == "duplicate"  # the edge's resend after the crash is not counted again
        assert [send(1, i) for i in (2, 3)] == ["received", "received"]
        _wait(lambda: settled(1), WAIT, why)

        # -- round 2: PostgreSQL is killed -9 mid-round ----------------------------------------------
        _wait(lambda: round_open(2), 60, why)
        for i in range(DEVICES):
            env(2, i)  # what the edge holds before the fault
        assert [send(2, i) for i in (0, 1)] == ["received", "received"]
        pg.kill9(cluster)
        assert send(2, 2) == "database_unavailable"  # a clear 503, not a 500 or a hang
        assert answers[-1][2] == 503
        assert proc.proc is not None and proc.proc.poll() is None, "the coordinator died with its database"
        pg.restart(cluster)
        _wait(lambda: send(2, 2) == "received", 60, why)  # the edge retries a 503 until it is taken
        assert send(2, 3) == "received"
        _wait(lambda: settled(2), WAIT, why)
        assert "database unavailable" in proc.log.read_text(errors="replace")

        # -- round 3: one sealer of two is killed -9 mid-round ------------------------------------------
        _wait(lambda: round_open(3), 60, why)
        for i in range(DEVICES):
            env(3, i)  # what the edge holds before the fault
        assert [send(3, i) for i in (0, 1)] == ["received", "received"]
        kill9_node(chain, 1)
        assert [send(3, i) for i in (2, 3)] == ["received", "received"]
        _wait(lambda: stalled_visibly(3), WAIT, why)  # closed, not settled, the reason in API and metrics
        restart_node(chain, 1)
        _wait(lambda: settled(3), WAIT, why)

        # -- round 4: the sealers are partitioned mid-round -----------------------------------------------
        _wait(lambda: round_open(4), 60, why)
        for i in range(DEVICES):
            env(4, i)  # what the edge holds before the fault
        assert [send(4, i) for i in (0, 1)] == ["received", "received"]
        pause_node(chain, 1)
        assert [send(4, i) for i in (2, 3)] == ["received", "received"]
        _wait(lambda: stalled_visibly(4), WAIT, why)
        resume_node(chain, 1)
        _wait(lambda: settled(4), WAIT, why)
        final = rounds()
    finally:
        proc.stop()

    # every accepted update counted exactly once
    for r in range(1, ROUNDS + 1):
        detail = w.coord.round_progress(spec.task_id, r)
        assert detail == (DEVICES, DEVICES), (r, detail)
        assert final[r - 1]["accepted"] == DEVICES
    # the chain agrees with the coordinator and its store, one anchor and one settlement per round
    anchors = contracts.anchors(tid)
    assert [a.round for a in anchors] == list(range(1, ROUNDS + 1))
    assert [r["tx_hash"] for r in final] == ["0x" + a.tx_hash.hex() for a in anchors]
    assert [r["model_hash"] for r in final] == [a.model_hash.hex() for a in anchors]
    for a in anchors:
        assert w.store.get(a.model_hash.hex())  # the store holds every anchored model (content-addressed: checked on read)
    assert sorted(contracts.settled_rounds(tid)) == list(range(1, ROUNDS + 1))
    code = crowdfl_main(["audit", final[-1]["model_hash"], "--store", str(tmp_path / "store"), "--rpc", chain.rpc_url,
                         "--addresses", str(tmp_path / "addresses.json")])
    assert code == 0
    # the two sealers ended on one chain (no fork after the kill and the partition)
    deadline = time.monotonic() + 60
    while True:
        n = min(head(chain, 0), head(chain, 1))
        hashes = [chain.rpc("eth_getBlockByNumber", [hex(n), False], node=i)["hash"] for i in (0, 1)]
        if hashes[0] == hashes[1]:
            break
        assert time.monotonic() < deadline, f"sealers disagree at block {n}: {hashes}"
        time.sleep(0.5)
