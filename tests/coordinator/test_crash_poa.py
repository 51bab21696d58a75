"""A coordinator in its own process, killed with SIGKILL at several points, on the real EthereumJS
Clique chain behind an endpoint the test takes down and brings back. Nothing accepted is lost and
nothing is anchored twice; ``crowdfl audit`` then verifies the final model from the chain and a
copy of the store alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from coordinator.chain import connect
from coordinator.contracts import CrowdContracts
from crowdfl_sim.cli import main as crowdfl_main
from tests.coordinator.tcp_proxy import TcpProxy
from tests.coordinator.world import FRONT, make_world, task_parts, update_env
from tests.support.poa_chain import GAS_PRICE_WEI, PoaChain

pytestmark = [pytest.mark.slow, pytest.mark.realpart]
REPO = Path(__file__).resolve().parents[2]


class Proc:
    """The coordinator process: started, killed -9, restarted on the same config."""

    def __init__(self, cfg_path: Path, port_file: Path, log: Path) -> None:
        self.cfg_path, self.port_file, self.log = cfg_path, port_file, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.coordinator.coordinator_proc", str(self.cfg_path)],
                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _wait(lambda: self.port_file.exists() and self.port_file.read_text().strip() != "", 60, self.log_text)
        self.url = f"http://127.0.0.1:{self.port_file.read_text().strip()}"

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def post_update(self, env: bytes) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(self.url + "/api/v1/updates", data=env, headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def _wait(cond: Callable[[], bool], timeout_s: float, why: Callable[[], str] = lambda: "") -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s\n{why()}")


@pytest.fixture
def proxy(clique_chain: PoaChain) -> Iterator[TcpProxy]:
    p = TcpProxy(int(urlparse(clique_chain.rpc_url).port or 0))
    yield p
    p.down()


def test_kill9_and_chain_outage_lose_nothing_and_anchor_once(
    clique_chain: PoaChain, proxy: TcpProxy, tmp_path: Path, db_url: str
) -> None:
    contracts = CrowdContracts.deploy(connect(clique_chain.chain_config()))
    w = make_world(contracts, db_url, tmp_path, devices=4)
    spec, initial = task_parts(rounds=2)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=10**6)
    tid = bytes.fromhex(spec.task_id)
    (tmp_path / "addresses.json").write_text(json.dumps(contracts.addresses))
    cfg = {
        "rpc_url": proxy.url, "private_key": clique_chain.private_key, "chain_id": clique_chain.chain_id,
        "gas_price_wei": GAS_PRICE_WEI, "addresses": contracts.addresses, "identity": str(tmp_path / "id.json"),
        "db_url": db_url, "store": str(tmp_path / "store"), "port_file": str(tmp_path / "port"), "receipt_timeout_s": 10.0,
    }
    cfg_path = tmp_path / "proc.json"
    cfg_path.write_text(json.dumps(cfg))
    proc = Proc(cfg_path, tmp_path / "port", tmp_path / "proc.log")
    rounds_url = f"/api/v1/tasks/{spec.task_id}/rounds"
    try:
        proc.start()
        _wait(lambda: bool(proc.get(rounds_url)), 30, proc.log_text)
        base = proc.get(f"{rounds_url}/1")["base_model_hash"]
        envs = [update_env(w.edge, spec, 1, d.node_id, base, 0.05, i + 1) for i, d in enumerate(w.devices)]
        for env in envs[:2]:
            assert proc.post_update(env)[1]["status"] == "received"
        proc.kill9()  # 1: killed with updates received, round open

        proc.start()
        detail = proc.get(f"{rounds_url}/1")
        assert detail["status"] == "open" and len(detail["updates"]) == 2  # nothing lost
        assert proc.post_update(envs[0])[1]["status"] == "duplicate"
        for env in envs[2:]:
            assert proc.post_update(env)[1]["status"] == "received"
        _wait(lambda: proc.get(rounds_url)[0]["status"] != "open", 30, proc.log_text)
        proc.kill9()  # 2: killed right after the close, most likely while its anchor is in flight
        proc.start()
        _wait(lambda: proc.get(rounds_url)[0]["settled"], 60, proc.log_text)
        assert proc.get(rounds_url)[0]["accepted"] == 4

        proxy.down()  # 3: the chain becomes unreachable; round 2 closes, its anchoring waits
        _wait(lambda: len(proc.get(rounds_url)) == 2, 30, proc.log_text)
        base2 = proc.get(f"{rounds_url}/2")["base_model_hash"]
        for i, d in enumerate(w.devices):
            assert proc.post_update(update_env(w.edge, spec, 2, d.node_id, base2, 0.05, 10 + i))[1]["status"] == "received"
        _wait(lambda: proc.get(rounds_url)[1]["anchor_attempts"] >= 1, 60, proc.log_text)
        assert proc.get(rounds_url)[1]["status"] == "closed"
        proc.kill9()  # 4: killed after the close, before anchoring (chain still down)
        proc.start()
        # The restarted coordinator tries to anchor again (a condition, not a pause) and, the
        # chain being down, leaves the round closed.
        tried = proc.get(rounds_url)[1]["anchor_attempts"]
        _wait(lambda: proc.get(rounds_url)[1]["anchor_attempts"] > tried, 60, proc.log_text)
        assert proc.get(rounds_url)[1]["status"] == "closed"
        proxy.up()  # the chain is back: anchored, scored and credited, once
        _wait(lambda: proc.get(rounds_url)[1]["settled"], 90, proc.log_text)
        final = proc.get(rounds_url)
    finally:
        proc.stop()

    anchors = contracts.anchors(tid)
    assert [a.round for a in anchors] == [1, 2]
    assert [r["tx_hash"] for r in final] == ["0x" + a.tx_hash.hex() for a in anchors]
    assert sorted(contracts.settled_rounds(tid)) == [1, 2]
    assert contracts.task(tid).pool_wei == 0

    # the audit from the command line: any JSON-RPC endpoint, a copy of the store, the addresses
    code = crowdfl_main(["audit", final[1]["model_hash"], "--store", str(tmp_path / "store"), "--rpc", clique_chain.rpc_url,
                         "--addresses", str(tmp_path / "addresses.json")])
    assert code == 0
    forged = w.store.put(b"not a model")
    assert crowdfl_main(["audit", forged, "--store", str(tmp_path / "store"), "--rpc", clique_chain.rpc_url,
                         "--addresses", str(tmp_path / "addresses.json")]) == 1
