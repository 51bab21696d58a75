"""A transaction the node drops is not a nonce gap for ever.

EthereumJS 0.9.0 does not put back the transactions of a block that a reorg removed, and a
restarted node forgets its pool (tests/faults/test_server_faults.py met both: a sealer killed and
partitioned mid-round). The coordinator counts nonces locally; after a send that was never mined it
used to go on from nonce n+1, and every later transaction waited behind the missing n. Now a
receipt timeout makes the next send read the nonce from the chain again.
"""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.chain import ChainConfig, ChainError, connect


def test_a_dropped_transaction_leaves_no_nonce_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    client = connect(ChainConfig(kind="embedded", receipt_timeout_s=0.5, poll_interval_s=0.05))
    to = client.new_account().address
    real_send = client.w3.eth.send_raw_transaction
    dropped: list[Any] = []

    def lose_the_first(raw: Any) -> Any:
        if not dropped:  # the node answers with the hash, then forgets the transaction
            dropped.append(raw)
            from eth_utils import keccak

            return keccak(bytes(raw))
        return real_send(raw)

    monkeypatch.setattr(client.w3.eth, "send_raw_transaction", lose_the_first)
    before = client.w3.eth.get_transaction_count(client.address, "latest")
    with pytest.raises(ChainError, match="no receipt"):
        client.send_value(to, 1)
    receipt = client.send_value(to, 2)  # nonce n again (the chain's count), not n + 1
    assert receipt.block_number > 0
    assert client.w3.eth.get_transaction_count(client.address, "latest") == before + 1
    assert client.w3.eth.get_balance(to) == 2
