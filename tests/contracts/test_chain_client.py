"""coordinator.chain on the embedded chain: config checks, signing, confirmations, error mapping."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import pytest
from eth_account import Account
from web3.middleware import Web3Middleware
from web3.types import RPCEndpoint, RPCResponse

from coordinator.chain import ChainClient, ChainConfig, ChainError, _decode_revert, connect
from coordinator.contracts import CrowdContracts, Role


def new_key() -> bytes:
    return os.urandom(32)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"kind": "ipc"}, "kind"),
        ({"kind": "rpc", "private_key": "0x" + "11" * 32}, "rpc_url"),
        ({"kind": "rpc", "rpc_url": "http://127.0.0.1:1"}, "private_key"),
        ({"confirmations": -1}, "confirmations"),
        ({"gas_price_wei": 0}, "gas_price_wei"),
        ({"receipt_timeout_s": 0}, "timeouts"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        ChainConfig(**kwargs)


def test_embedded_signs_with_a_funded_local_key(client: ChainClient) -> None:
    assert client.address not in client.w3.eth.accounts  # not a node-managed account
    assert client.balance(client.address) > 10**21
    key = "0x" + "42" * 32
    fixed = connect(ChainConfig(private_key=key))
    assert fixed.address == Account.from_key(key).address
    assert fixed.balance(fixed.address) > 0


def test_chain_id_mismatch_is_refused(client: ChainClient) -> None:
    with pytest.raises(ChainError, match="config expects"):
        connect(ChainConfig(chain_id=client.chain_id + 1))


def test_confirmations_wait_for_depth() -> None:
    client = connect(ChainConfig(confirmations=3))
    receipt = client.send_value(client.new_account().address, 1)
    assert client.block_number() >= receipt.block_number + 3


def test_unreachable_rpc_is_a_chain_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    cfg = ChainConfig(kind="rpc", rpc_url=f"http://127.0.0.1:{port}", private_key="0x" + "11" * 32, receipt_timeout_s=2)
    with pytest.raises(ChainError, match="chain id"):
        connect(cfg)


def test_mined_revert_carries_reason(client: ChainClient, crowd: CrowdContracts) -> None:
    # Explicit gas skips the estimate (the usual dry run), so the revert is mined and replayed.
    fn = crowd.registry.functions.remove(new_key())
    with pytest.raises(ChainError, match="not registered") as err:
        client.transact(fn, gas=200_000)
    assert err.value.reverted


class _DropReceiptStatus(Web3Middleware):
    """Makes eth-tester answer like EthereumJS 0.9.0: receipts without ``status``."""

    def response_processor(self, method: RPCEndpoint, response: RPCResponse) -> RPCResponse:
        result = response.get("result")
        if method == "eth_getTransactionReceipt" and isinstance(result, dict):
            response = {**response, "result": {k: v for k, v in result.items() if k != "status"}}
        return response


def test_status_less_receipts(client: ChainClient, crowd: CrowdContracts) -> None:
    client.w3.middleware_onion.add(_DropReceiptStatus, name="drop_status")
    key = new_key()
    crowd.register(key, Role.DEVICE, None)  # success: has a log
    assert crowd.is_active(key, Role.DEVICE)
    client.send_value(client.new_account().address, 5)  # success without logs, none expected
    with pytest.raises(ChainError, match="not registered") as err:
        client.transact(crowd.registry.functions.remove(new_key()), gas=200_000)
    assert err.value.reverted
    with pytest.raises(ChainError, match="failed"):  # out of gas: all gas used
        client.transact(crowd.registry.functions.register(new_key(), 1, client.address), gas=30_000)


def test_nonces_are_counted_locally_across_threads(client: ChainClient) -> None:
    target = client.new_account().address
    errors: list[BaseException] = []

    def send(n: int) -> None:
        try:
            for _ in range(n):
                client.send_value(target, 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(5,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert client.balance(target) == 15
    assert client.w3.eth.get_transaction_count(client.account.address) == 15


def _error_data(reason: bytes) -> bytes:
    padded = reason + b"\x00" * (-len(reason) % 32)
    return bytes.fromhex("08c379a0") + (32).to_bytes(32, "big") + len(reason).to_bytes(32, "big") + padded


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_error_data(b"not registered"), "not registered"),
        (_error_data(b"x" * 40), "x" * 40),
        (bytes.fromhex("4e487b71") + (0x11).to_bytes(32, "big"), "panic 0x11"),
        (b"", None),
        (b"\x00" * 32, None),  # an ordinary return value
        (_error_data(b"not registered")[:-1], None),  # truncated
        (_error_data(b"ok") + b"\x00" * 32, None),  # trailing garbage
        (bytes.fromhex("08c379a0") + (64).to_bytes(32, "big") + bytes(64), None),  # wrong offset
    ],
)
def test_decode_revert_data(data: bytes, expected: str | None) -> None:
    """EthereumJS 0.9.0 returns revert data as an eth_call result; only exact encodings count."""
    assert _decode_revert(data) == expected
