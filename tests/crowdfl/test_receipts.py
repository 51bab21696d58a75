"""Receipts: signed by the device, tamper-evident, and they tie a batch to the device by a proof."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from crowdfl.errors import WireError
from crowdfl.identity import Identity
from crowdfl.messages import FeatureBatch
from crowdfl.receipts import batch_digest, batch_proof, open_receipt, verify_batch_proof
from tests.helpers import with_receipt


def _batch(round_: int, seed: int) -> FeatureBatch:
    rng = np.random.default_rng(seed)
    return FeatureBatch("ab" * 32, round_, np.arange(seed * 10, seed * 10 + 5, dtype=np.uint64), rng.random((5, 8), dtype=np.float32),
                        np.zeros(5, np.int8), 4.0, 1.0)


def test_receipts_cover_every_batch_and_prove_each_one() -> None:
    device, edge = Identity.generate(), Identity.generate()
    history: dict[tuple[str, str], list[tuple[bytes, int]]] = {}
    batches = [with_receipt(_batch(r, r), device, edge.node_id, history) for r in (1, 2, 3)]
    last = open_receipt(batches[-1].receipt).receipt
    assert (last.num_samples, last.num_batches, last.device, last.edge) == (15, 3, device.node_id, edge.node_id)
    digests = [batch_digest(b) for b in batches]
    for d in digests:  # a third party ties each batch to the device's signed receipt
        assert verify_batch_proof(d, batch_proof(digests, d), last.batches_root)
    changed = batch_digest(dataclasses.replace(batches[0], labels=np.ones(5, np.int8)))
    assert not verify_batch_proof(changed, batch_proof(digests, digests[0]), last.batches_root)


def test_a_receipt_changed_after_signing_does_not_open() -> None:
    device = Identity.generate()
    raw = with_receipt(_batch(1, 1), device, "cd" * 32).receipt
    bad = bytearray(raw)
    bad[20] ^= 1
    with pytest.raises(WireError):
        open_receipt(bytes(bad))
    with pytest.raises(WireError, match="bad_receipt"):
        open_receipt(b"")


def test_digest_from_the_encoding_equals_the_re_encoded_digest() -> None:
    """The edge hashes the decrypted encoding with the receipt field emptied instead of encoding
    the decoded batch again: the same digest the device's receipt commits to."""
    from crowdfl.messages import CODEC
    from crowdfl.receipts import batch_digest_of_encoding

    device = Identity.generate()
    for r in (1, 2, 3):
        b = with_receipt(_batch(r, r), device, "cd" * 32)
        enc = CODEC.encode(b)
        assert batch_digest_of_encoding(enc, len(b.receipt)) == batch_digest(b)
        assert batch_digest_of_encoding(CODEC.encode(dataclasses.replace(b, receipt=b"")), 0) == batch_digest(b)
        with pytest.raises(WireError):
            batch_digest_of_encoding(enc, len(b.receipt) + 1)


def test_decode_receipt_checks_fields_but_not_the_signature() -> None:
    from crowdfl.receipts import decode_receipt

    device = Identity.generate()
    raw = bytearray(with_receipt(_batch(1, 1), device, "cd" * 32).receipt)
    raw[-1] ^= 1  # signature only
    assert decode_receipt(bytes(raw)).receipt.device == device.node_id
    with pytest.raises(WireError, match="bad_receipt"):
        open_receipt(bytes(raw))
    with pytest.raises(WireError, match="bad_receipt"):
        decode_receipt(bytes(raw[:30]) + bytes(64))


def test_the_fixed_layout_fast_path_decodes_as_the_codec_does() -> None:
    from crowdfl.receipts import RECEIPT_CODEC, ContributionReceipt, _decode_fixed, decode_receipt

    device = Identity.generate()
    raw = with_receipt(_batch(2, 3), device, "cd" * 32).receipt
    body = memoryview(raw)[:-64]
    fast = _decode_fixed(body)
    slow = RECEIPT_CODEC.decode(body, ContributionReceipt)
    assert fast is not None and dataclasses.asdict(fast) == dataclasses.asdict(slow)
    assert decode_receipt(raw).receipt.batches_root == slow.batches_root
    # a layout it does not take (a 63-character field) is left to the codec, which names the error
    odd = RECEIPT_CODEC.encode(dataclasses.replace(slow, edge="c" * 63))
    assert _decode_fixed(memoryview(odd)) is None
    with pytest.raises(WireError, match="bad_receipt"):
        decode_receipt(odd + bytes(64))
