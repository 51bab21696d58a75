"""What the chain says, read by the device itself through its own JSON-RPC URL (no web3 on a Pi).

Raw ``eth_call`` over urllib with hand-written ABI encoding: only the few static types and the
``bytes32[]`` that crowdfl's views take. The 4-byte selectors are constants; a test recomputes them
(keccak-256 of the signatures) from the committed contract artifacts, so a contract change that
moves them fails the tests, not a device in the field.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from crowdfl.errors import CrowdflError

# function signature -> selector (checked against contracts/build by tests/agent/test_chainview.py)
SELECTORS = {
    "verifyInclusion(bytes32,uint32,bytes32,bytes32[])": "0xad6a6a89",
    "roundAnchor(bytes32,uint32)": "0xa012d60a",
    "settlement(bytes32,uint32)": "0x6ebfcf12",
    "isClaimed(bytes32,uint32,bytes32)": "0x214ed264",
    "edgeOf(bytes32)": "0xb089b412",
}


class ChainViewError(CrowdflError):
    def __init__(self, detail: str) -> None:
        super().__init__("chain_view", detail)


def _word(value: int) -> bytes:
    if not 0 <= value < 2**256:
        raise ValueError(f"{value} does not fit a uint256")
    return value.to_bytes(32, "big")


def _b32(value: bytes) -> bytes:
    if len(value) != 32:
        raise ValueError("bytes32 values must be 32 bytes")
    return bytes(value)


def encode_call(signature: str, *args: int | bytes | Sequence[bytes]) -> str:
    """Calldata for a call whose arguments are uint/bytes32 words and at most trailing bytes32[] arrays."""
    head: list[bytes] = []
    tail: list[bytes] = []
    n = len(args)
    for a in args:
        if isinstance(a, (bytes, bytearray)):
            head.append(_b32(a))
        elif isinstance(a, int):
            head.append(_word(a))
        else:  # bytes32[]: offset in the head, length and items in the tail
            head.append(_word(32 * n + sum(len(t) for t in tail)))
            tail.append(_word(len(a)) + b"".join(_b32(x) for x in a))
    return SELECTORS[signature] + (b"".join(head) + b"".join(tail)).hex()


def decode_words(data: str, count: int) -> list[int]:
    raw = bytes.fromhex(data[2:] if data.startswith("0x") else data)
    if len(raw) < 32 * count:
        raise ChainViewError(f"expected {count} words, got {len(raw)} bytes")
    return [int.from_bytes(raw[32 * i : 32 * i + 32], "big") for i in range(count)]


@dataclass(frozen=True)
class ChainView:
    rpc_url: str
    tasks_address: str
    registry_address: str
    timeout_s: float = 10.0

    def call(self, to: str, data: str) -> str:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_call", "params": [{"to": to, "data": data}, "latest"]}).encode()
        req = urllib.request.Request(self.rpc_url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                answer = json.loads(resp.read(1 << 20))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ChainViewError(f"JSON-RPC {self.rpc_url}: {exc}") from None
        if not isinstance(answer, dict) or "error" in answer or not isinstance(answer.get("result"), str):
            raise ChainViewError(f"eth_call failed: {answer.get('error') if isinstance(answer, dict) else answer!r}")
        return str(answer["result"])

    def verify_inclusion(self, task_id: bytes, round_: int, leaf: bytes, proof: Sequence[bytes]) -> bool:
        data = encode_call("verifyInclusion(bytes32,uint32,bytes32,bytes32[])", task_id, round_, leaf, proof)
        return decode_words(self.call(self.tasks_address, data), 1)[0] == 1

    def anchor_root(self, task_id: bytes, round_: int) -> bytes | None:
        words = decode_words(self.call(self.tasks_address, encode_call("roundAnchor(bytes32,uint32)", task_id, round_)), 6)
        return None if words[5] == 0 else words[0].to_bytes(32, "big")

    def settlement(self, task_id: bytes, round_: int) -> tuple[bytes, int, int] | None:
        """(root, total wei, claimed wei) of a settled round, None when not settled."""
        words = decode_words(self.call(self.tasks_address, encode_call("settlement(bytes32,uint32)", task_id, round_)), 4)
        return None if words[0] == 0 else (words[0].to_bytes(32, "big"), words[1], words[2])

    def is_claimed(self, task_id: bytes, round_: int, customer: bytes) -> bool:
        data = encode_call("isClaimed(bytes32,uint32,bytes32)", task_id, round_, customer)
        return decode_words(self.call(self.tasks_address, data), 1)[0] == 1

    def edge_of(self, device: bytes) -> bytes:
        return decode_words(self.call(self.registry_address, encode_call("edgeOf(bytes32)", device)), 1)[0].to_bytes(32, "big")
