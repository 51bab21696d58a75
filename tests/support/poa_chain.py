"""A real Clique proof-of-authority chain for the slow tests: ``@ethereumjs/client`` 0.9.0.

Install once (nothing is installed at run time): ``npm ci --prefix tests/support/ethereumjs``.
0.9.0 is pinned exactly: 0.10.x seals only empty blocks (see shared/dependency-notes.md).

Three shapes:

* :func:`start_dev_chain` - ``--dev=poa``: the client makes a signer, prints its key on stdout
  and prefunds it; chain id 123456, 10 s blocks (fixed by the client).
* :func:`start_clique_chain` with ``sealers=1`` - our own geth-style genesis (chain id 424242,
  ``period_s`` blocks, default 1 s) sealed by a key we generate and pass with ``--unlock``.
* :func:`start_clique_chain` with ``sealers=2`` - two nodes, one signer each, peered over
  loopback RLPx; Clique only lets a signer seal every other block, so the chain moves only
  while both nodes talk. Peer first, seal after: each node's miner waits behind a seal gate
  (see preload.cjs) until both nodes count the other as a peer; then node 0 seals block 1, and
  node 1 may seal only once it holds that block. Two signers that sealed block 1 on their own
  would fork at genesis and stall for good. A lost block announcement used to stall such a
  network too (0.9.0 never refreshes a peer's head after the handshake); preload.cjs's sync
  nudge asks each peer for the headers after ours on every sync pass
  (tests/faults/test_chain_sync.py).

Every node runs with ``node --require ethereumjs/preload.cjs``: it rebinds the client's
hard-coded ``0.0.0.0`` listeners (RLPx TCP, discovery UDP) to 127.0.0.1, refuses any
non-loopback outbound connection, and fixes 0.9.0's ``--unlock <file>`` crash. Discovery is
off (``--discDns=false --discV4=false``, ``--dnsAddr 127.0.0.1``), RPC and p2p listen on free
loopback ports, data lives in a temporary folder, and :meth:`PoaChain.stop` kills each node's
process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from coordinator.chain import ChainConfig
from tests.support.realparts import free_ports, require_real_part

HOST = "127.0.0.1"
NODE_DIR = Path(__file__).resolve().parent / "ethereumjs"
CLI = NODE_DIR / "node_modules" / "@ethereumjs" / "client" / "dist" / "bin" / "cli.js"
PRELOAD = NODE_DIR / "preload.cjs"
PINNED_VERSION = "0.9.0"
DEV_CHAIN_ID = 123456
DEV_PERIOD_S = 10
CLIQUE_CHAIN_ID = 424242
# 0.9.0 crashes on eth_gasPrice after a few blocks: the chain's base fee is 7 wei, so 1 gwei is plenty.
GAS_PRICE_WEI = 10**9
_KEY_RE = re.compile(r"Private key: (0x[0-9a-fA-F]{64})")
_ENODE_RE = re.compile(r"url=(enode://[0-9a-f]{128}@127\.0\.0\.1:\d+)")
_RPC_UP = "Started JSON RPC Server"


@dataclass
class PoaNode:
    """One running client process (its own session, so its whole group can be killed)."""

    proc: subprocess.Popen[bytes]
    rpc_port: int
    p2p_port: int
    data_dir: Path
    log_path: Path
    extra: list[str] = field(default_factory=list)  # the client arguments this node was started with
    seal_gate: Path | None = None

    @property
    def rpc_url(self) -> str:
        return f"http://{HOST}:{self.rpc_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, grace_s: float = 1.0) -> None:
        """SIGTERM the process group, then SIGKILL: the client needs ~6 s to stop cleanly and
        its throwaway data dir is not worth the wait."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        _signal_group(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


@dataclass
class PoaChain:
    """A running chain and what a test needs to use it."""

    mode: str
    chain_id: int
    private_key: str = field(repr=False)  # a prefunded signer key, 0x hex
    signers: list[str]
    block_period_s: int
    nodes: list[PoaNode] = field(default_factory=list)
    started_in_s: float = 0.0
    attempts: int = 1

    @property
    def rpc_url(self) -> str:
        return self.nodes[0].rpc_url

    def chain_config(self, **overrides: Any) -> ChainConfig:
        """ChainConfig for coordinator.chain: rpc, PoA middleware, hand-set gas price."""
        settings: dict[str, Any] = {
            "kind": "rpc",
            "rpc_url": self.rpc_url,
            "private_key": self.private_key,
            "chain_id": self.chain_id,
            "poa": True,
            "gas_price_wei": GAS_PRICE_WEI,
            "confirmations": 1,
            "receipt_timeout_s": max(60.0, 6.0 * self.block_period_s),
            "poll_interval_s": min(0.25, self.block_period_s / 4),
        }
        settings.update(overrides)
        return ChainConfig(**settings)

    def rpc(self, method: str, params: list[Any], node: int = 0) -> Any:
        """Raw JSON-RPC, for checks below web3 (e.g. extraData length)."""
        return _rpc(self.nodes[node].rpc_url, method, params)

    def log_text(self) -> str:
        return "\n".join(f"--- node {i}\n{n.log_text()}" for i, n in enumerate(self.nodes))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def ethereumjs_missing() -> str | None:
    """Why the client cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not CLI.is_file():
        return "tests/support/ethereumjs/node_modules missing: run `npm ci --prefix tests/support/ethereumjs`"
    version = json.loads((CLI.parents[2] / "package.json").read_text())["version"]
    if version != PINNED_VERSION:
        return f"@ethereumjs/client {version} installed, {PINNED_VERSION} required"
    return None


def start_dev_chain(work_dir: Path, timeout_s: float = 90.0) -> PoaChain:
    """``--dev=poa``: one signer made by the client; its key is read from the client's stdout."""
    began = time.monotonic()
    node = _start_node(work_dir / "dev", ["--dev=poa", "--maxPeers", "0"])
    chain = PoaChain("dev", DEV_CHAIN_ID, "", [], DEV_PERIOD_S, [node])
    try:
        text = _wait_for_log(node, _RPC_UP, timeout_s)
        found = _KEY_RE.search(text)
        if found is None:
            raise RuntimeError("dev chain printed no signer key")
        chain.private_key = found.group(1)
        chain.signers = [Account.from_key(chain.private_key).address]
        _wait_for_rpc(node, timeout_s)
        _wait_for_block(chain, 1, timeout_s)
    except BaseException:
        chain.stop()
        raise
    chain.started_in_s = time.monotonic() - began
    return chain


def start_clique_chain(
    work_dir: Path, sealers: int = 1, period_s: int = 1, timeout_s: float = 90.0, attempts: int = 3
) -> PoaChain:
    """A Clique network from our own genesis; ``sealers`` nodes, one signer key each.

    No node seals before the nodes have peered (see the module docstring), so a slow start can
    leave them unpeered but never forked. Two-node networks are still retried when the peer link
    does not come up: 0.9.0 pings its bootnode once at start-up and never again, and under load
    that ping can be lost."""
    if sealers not in (1, 2):
        raise ValueError("sealers must be 1 or 2")
    began = time.monotonic()
    link_timeout = min(timeout_s, 20.0 + 5.0 * period_s)
    for attempt in range(1, attempts + 1):
        try:
            chain = _start_clique_once(work_dir / f"try{attempt}", sealers, period_s, timeout_s, link_timeout)
        except TimeoutError:
            if sealers == 1 or attempt == attempts:
                raise
            continue
        chain.attempts = attempt
        chain.started_in_s = time.monotonic() - began
        return chain
    raise AssertionError("unreachable")


def _start_clique_once(
    work_dir: Path, sealers: int, period_s: int, timeout_s: float, link_timeout_s: float
) -> PoaChain:
    work_dir.mkdir(parents=True, exist_ok=True)
    keys = [Account.create() for _ in range(sealers)]
    signers = sorted((k.address for k in keys), key=str.lower)
    genesis = work_dir / "crowdfl.json"  # the client names the chain after the file
    genesis.write_text(json.dumps(_genesis(signers, period_s)), encoding="utf-8")
    chain = PoaChain(
        f"clique-{sealers}", CLIQUE_CHAIN_ID, "0x" + keys[0].key.hex().removeprefix("0x"), signers, period_s
    )
    gates = [work_dir / f"node{i}" / "seal.gate" for i in range(sealers)]
    try:
        bootnode: str | None = None
        for i, key in enumerate(keys):
            key_file = work_dir / f"signer{i}.key"
            key_file.write_text(key.key.hex().removeprefix("0x"), encoding="utf-8")  # the client wants no 0x
            key_file.chmod(0o600)
            args = ["--gethGenesis", str(genesis), "--unlock", str(key_file), "--mine", "--isSingleNode"]
            args += ["--maxPeers", str(sealers - 1)]
            if bootnode is not None:
                args += ["--bootnodes", bootnode]
            node = _start_node(work_dir / f"node{i}", args, seal_gate=gates[i])
            chain.nodes.append(node)
            text = _wait_for_log(node, "Server listener up", timeout_s)
            enode = _ENODE_RE.search(text)
            if enode is None:
                raise RuntimeError(f"no enode in the client log:\n{text[-2000:]}")
            bootnode = enode.group(1)
        for node in chain.nodes:
            _wait_for_log(node, _RPC_UP, timeout_s)
            _wait_for_rpc(node, timeout_s)
        if sealers == 1:
            open_seal_gate(gates[0])
            _wait_for_block(chain, 1, timeout_s)
            return chain
        # Peer first ...
        _wait_for_peers(chain, sealers - 1, link_timeout_s)
        # ... then seal: node 0 alone seals block 1, node 1 joins once it holds that block.
        open_seal_gate(gates[0])
        _wait_for_block(chain, 1, timeout_s, node=1)
        open_seal_gate(gates[1])
        # Block 3 needs both signers (Clique: a signer may not seal two blocks in a row), so
        # reaching it on both nodes proves the peer link carries blocks both ways.
        for i in range(sealers):
            _wait_for_block(chain, 3, timeout_s, node=i)
    except BaseException:
        chain.stop()
        raise
    return chain


def kill9_node(chain: PoaChain, index: int) -> None:
    """SIGKILL one node's whole process group at once (a crash, no clean shutdown)."""
    node = chain.nodes[index]
    _signal_group(node.proc.pid, signal.SIGKILL)
    node.proc.wait(timeout=10)


def restart_node(chain: PoaChain, index: int, timeout_s: float = 90.0) -> PoaNode:
    """Start a stopped node again on its own data folder, key and seal gate (new RPC/p2p ports;
    the node dials its bootnode as at first start), and wait until its RPC answers."""
    old = chain.nodes[index]
    if old.proc.poll() is None:
        raise RuntimeError(f"node {index} is still running")
    with old.log_path.open("ab") as log:
        log.write(b"\n--- restarted by the test ---\n")
    node = _start_node(old.data_dir, old.extra, seal_gate=old.seal_gate, log_mode="ab")
    chain.nodes[index] = node
    _wait_for_log_count(node, _RPC_UP, 2, timeout_s)
    _wait_for_rpc(node, timeout_s)
    return node


def pause_node(chain: PoaChain, index: int) -> None:
    """SIGSTOP the node's process group: its peer's TCP connection stays open but nothing passes,
    as in a network partition that drops packets (or a host that hangs)."""
    _signal_group(chain.nodes[index].proc.pid, signal.SIGSTOP)


def resume_node(chain: PoaChain, index: int) -> None:
    """SIGCONT: the partition heals; what was queued on the link is delivered."""
    _signal_group(chain.nodes[index].proc.pid, signal.SIGCONT)


def drop_announcements_file(data_dir: Path) -> Path:
    """While this file exists, the node in ``data_dir`` ignores NewBlock/NewBlockHashes (preload.cjs, 5)."""
    return data_dir / "drop-announcements"


def head(chain: PoaChain, node: int = 0) -> int:
    return int(chain.rpc("eth_blockNumber", [], node=node), 16)


def clique_signer(chain: PoaChain, number: int, node: int = 0) -> str:
    """The address that sealed block ``number`` (EIP-225: ecrecover over the header without the seal)."""
    import rlp
    from eth_keys import keys
    from eth_utils import keccak, to_checksum_address

    block = chain.rpc("eth_getBlockByNumber", [hex(number), False], node=node)
    extra = bytes.fromhex(block["extraData"][2:])
    data = lambda name: bytes.fromhex(block[name][2:])  # noqa: E731
    qty = lambda name: int(block[name], 16)  # noqa: E731
    header = [
        data("parentHash"), data("sha3Uncles"), data("miner"), data("stateRoot"),
        data("transactionsRoot"), data("receiptsRoot"), data("logsBloom"), qty("difficulty"),
        qty("number"), qty("gasLimit"), qty("gasUsed"), qty("timestamp"),
        extra[:-65], data("mixHash"), data("nonce"), qty("baseFeePerGas"),
    ]
    digest = keccak(rlp.encode(header))
    public = keys.Signature(extra[-65:]).recover_public_key_from_msg_hash(digest)
    return str(to_checksum_address(public.to_canonical_address()))


def open_seal_gate(gate: Path) -> None:
    """Let the node whose ``CROWDFL_SEAL_GATE`` is ``gate`` start sealing (preload.cjs)."""
    gate.parent.mkdir(parents=True, exist_ok=True)
    gate.touch()


@pytest.fixture(scope="module")
def clique_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoaChain]:
    """One-signer Clique chain with 1 s blocks, shared by a test module."""
    _require()
    chain = start_clique_chain(tmp_path_factory.mktemp("clique1"), sealers=1, period_s=1)
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture(scope="module")
def clique_two_sealers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoaChain]:
    """Two nodes, two signers, 1 s blocks."""
    _require()
    chain = start_clique_chain(tmp_path_factory.mktemp("clique2"), sealers=2, period_s=1)
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture(scope="module")
def dev_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoaChain]:
    """The client's own ``--dev=poa`` chain (10 s blocks)."""
    _require()
    chain = start_dev_chain(tmp_path_factory.mktemp("devpoa"))
    try:
        yield chain
    finally:
        chain.stop()


# ---------------------------------------------------------------- internals


def _require() -> None:
    reason = ethereumjs_missing()
    require_real_part("@ethereumjs/client", reason is None, reason or "")


def _genesis(signers: list[str], period_s: int) -> dict[str, Any]:
    zero32 = "00" * 32
    return {
        "config": {
            "chainId": CLIQUE_CHAIN_ID,
            **{f"{fork}Block": 0 for fork in _FORKS},
            "clique": {"period": period_s, "epoch": 30000},
        },
        "nonce": "0x0",
        "timestamp": hex(int(time.time())),
        "gasLimit": hex(30_000_000),
        "difficulty": "0x1",
        "mixHash": "0x" + zero32,
        "coinbase": "0x" + "00" * 20,
        "number": "0x0",
        "gasUsed": "0x0",
        "parentHash": "0x" + zero32,
        "baseFeePerGas": "0x7",
        # Clique: 32 vanity bytes, the signer addresses, 65 bytes for the (absent) seal.
        "extraData": "0x" + zero32 + "".join(s[2:].lower() for s in signers) + "00" * 65,
        "alloc": {s[2:].lower(): {"balance": hex(10**24)} for s in signers},
    }


_FORKS = (
    "homestead",
    "eip150",
    "eip155",
    "eip158",
    "byzantium",
    "constantinople",
    "petersburg",
    "istanbul",
    "berlin",
    "london",
)


def _start_node(data_dir: Path, extra: list[str], seal_gate: Path | None = None, log_mode: str = "wb") -> PoaNode:
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("CROWDFL_SEAL_GATE", None)
    # a test drops this node's incoming block announcements while this file exists (preload.cjs, 5)
    env["CROWDFL_DROP_ANNOUNCEMENTS"] = str(drop_announcements_file(data_dir))
    if seal_gate is not None:
        env["CROWDFL_SEAL_GATE"] = str(seal_gate)
    rpc_port, p2p_port = free_ports(2, HOST)
    args = [
        shutil.which("node") or "node",
        "--require",
        str(PRELOAD),
        str(CLI),
        *extra,
        "--rpc",
        "--rpcAddr",
        HOST,
        "--rpcPort",
        str(rpc_port),
        "--port",
        str(p2p_port),
        "--extIP",
        HOST,
        "--discDns=false",
        "--discV4=false",
        "--dnsAddr",
        HOST,
        "--dataDir",
        str(data_dir),
        "--logFile=false",
        "--logLevel",
        "info",
    ]
    log_path = data_dir / "client.log"
    with log_path.open(log_mode) as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            env=env,
            start_new_session=True,  # own process group: stop() kills everything it spawned
        )
    return PoaNode(proc, rpc_port, p2p_port, data_dir, log_path, list(extra), seal_gate)


def _wait_for_log(node: PoaNode, marker: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = node.log_text() if node.log_path.exists() else ""
        if marker in text:
            return text
        if node.proc.poll() is not None:
            raise RuntimeError(f"client exited ({node.proc.returncode}) before {marker!r}:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {marker!r} from the client after {timeout_s:.0f} s:\n{text[-3000:]}")
        time.sleep(0.1)


def _wait_for_log_count(node: PoaNode, marker: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while node.log_text().count(marker) < count:
        if node.proc.poll() is not None:
            raise RuntimeError(f"client exited ({node.proc.returncode}) before {marker!r}:\n{node.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {marker!r} from the client after {timeout_s:.0f} s:\n{node.log_text()[-3000:]}")
        time.sleep(0.1)


def _wait_for_rpc(node: PoaNode, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _rpc(node.rpc_url, "eth_blockNumber", [])
            return
        except OSError:
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait_for_block(chain: PoaChain, number: int, timeout_s: float, node: int = 0) -> None:
    deadline = time.monotonic() + timeout_s
    while int(chain.rpc("eth_blockNumber", [], node=node), 16) < number:
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node} stuck below block {number}:\n{chain.log_text()[-4000:]}")
        time.sleep(0.2)


def _wait_for_peers(chain: PoaChain, peers: int, timeout_s: float) -> None:
    """Every node counts ``peers`` peers (``net_peerCount``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = [int(chain.rpc("net_peerCount", [], node=i), 16) for i in range(len(chain.nodes))]
        if all(c >= peers for c in counts):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodes not peered (peer counts {counts}):\n{chain.log_text()[-4000:]}")
        time.sleep(0.2)


def _rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    with opener.open(request, timeout=10) as response:
        reply = json.loads(response.read())
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # pgid == pid: the node was started in its own session
