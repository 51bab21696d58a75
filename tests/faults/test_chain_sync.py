"""A two-sealer @ethereumjs/client 0.9.0 network whose block announcements get lost.

Node 1 drops every incoming NewBlock / NewBlockHashes message (preload.cjs, hook 5) while a file
exists, as a node does whose announcements are lost under load. Without the sync nudge
(preload.cjs, 4) the network stalled for good at the first lost announcement (Clique lets neither
signer seal two blocks in a row, so nothing else is announced, and 0.9.0's periodic sync only
looks at the peer head from the handshake); ``CROWDFL_SYNC_NUDGE=0`` shows it. With the nudge,
node 1 fetches the blocks it was not told about and both keep sealing, on one chain.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.poa_chain import PoaChain, drop_announcements_file, ethereumjs_missing, head, start_clique_chain
from tests.support.realparts import require_real_part

pytestmark = [pytest.mark.slow, pytest.mark.realpart]


@pytest.fixture
def two_sealers(tmp_path: Path) -> Iterator[PoaChain]:
    why = ethereumjs_missing()
    require_real_part("@ethereumjs/client", why is None, why or "")
    chain = start_clique_chain(tmp_path / "chain", sealers=2, period_s=1)
    try:
        yield chain
    finally:
        chain.stop()


def _wait(cond, timeout: float, why) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s\n{why()}")
        time.sleep(0.2)


def test_lost_block_announcements_do_not_stall_two_sealers(two_sealers: PoaChain) -> None:
    chain = two_sealers
    drop = drop_announcements_file(chain.nodes[1].data_dir)
    drop.touch()
    try:
        _wait(lambda: "dropped an incoming NewBlock" in chain.nodes[1].log_text(), 60, chain.log_text)
        start = max(head(chain, 0), head(chain, 1))
        # every block of node 0 reaches node 1 only through the nudge, and node 1 must have it
        # before either may seal the next: six more blocks on both nodes means the sync recovered six times
        _wait(lambda: min(head(chain, 0), head(chain, 1)) >= start + 6, 90, lambda: chain.log_text()[-6000:])
        assert "Sync nudge" in chain.nodes[1].log_text()
    finally:
        drop.unlink(missing_ok=True)
    n = min(head(chain, 0), head(chain, 1))
    blocks = [chain.rpc("eth_getBlockByNumber", [hex(n), False], node=i)["hash"] for i in (0, 1)]
    assert blocks[0] == blocks[1], "the sealers forked"
