"""Device-signed contribution receipts: what a device released for a task, in its own words.

Once per round a device signs (Ed25519, its registered key, which is its node id) a receipt for
the task: the round, the edge it sent to, how many samples it has released to the task so far,
how many batches that was, a Merkle root over the digests of those batches, and the epsilon each
sample was released at. The receipt rides inside the round's feature batch; the edge keeps it and
puts it in the update it trains from exactly those batches, so the coordinator (and anyone with
the store) can check that an update's sample count and inputs digest are the device's, not the
edge's. The receipt's hash is a leaf of the round's anchored Merkle tree.

A batch's digest is sha256 of its canonical encoding with the receipt field empty, so a batch
shown later (``crowdfl-edge evidence``) can be tied to the receipt by a Merkle proof alone: the
receipt's signature is what makes the batch the device's, whatever envelope carried it.

Pure functions, no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .errors import WireError
from .identity import Identity, Verifier
from .merkle import merkle_proof, merkle_root, verify_proof
from .messages import FeatureBatch, ModelUpdate, TaskSpec
from .wire import WIRE_VERSION, Codec

SIGNATURE_BYTES = 64
# domain separation: a receipt signature can never be mistaken for an envelope signature
_DOMAIN = b"crowdfl-contribution-receipt-v1\x00"
_HEX64 = re.compile("[0-9a-f]{64}")


@dataclass(frozen=True, eq=False)
class ContributionReceipt:
    """A device's statement of everything it has released to one task, as of one round."""

    KIND: ClassVar[int] = 24
    task_id: str
    round: int
    device: str  # node id of the signer
    edge: str  # node id of the edge server the batches were sent to
    num_samples: int  # samples released to the task so far (each released once)
    num_batches: int
    batches_root: str  # hex Merkle root over the sorted digests of those batches
    epsilon: float  # Laplace epsilon each of those samples was released at


RECEIPT_CODEC = Codec([ContributionReceipt])
# A well-formed receipt has four 64-character hex fields, so its encoding has one fixed layout:
# read in one unpack (the edge opens one per batch); anything else goes through the generic
# decoder, which gives the precise error. Both yield the same receipt for the same bytes.
_FIXED = struct.Struct("<2sBBI64sqI64sI64sqqI64sd")
_FIXED_HEAD = (b"CF", WIRE_VERSION, ContributionReceipt.KIND)


def _decode_fixed(body: memoryview) -> ContributionReceipt | None:
    if len(body) != _FIXED.size:
        return None
    (magic, version, kind, l1, task_id, round_, l2, device, l3, edge, num_samples, num_batches, l4, root, epsilon) = (
        _FIXED.unpack(body)
    )
    if (magic, version, kind) != _FIXED_HEAD or (l1, l2, l3, l4) != (64, 64, 64, 64):
        return None
    try:
        return ContributionReceipt(
            task_id.decode("ascii"), round_, device.decode("ascii"), edge.decode("ascii"), num_samples, num_batches,
            root.decode("ascii"), epsilon,
        )
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class SignedReceipt:
    receipt: ContributionReceipt
    raw: bytes  # encoding || signature: what is stored, forwarded and hashed

    @property
    def leaf(self) -> bytes:
        """The receipt's leaf in the round's Merkle tree."""
        return hashlib.sha256(self.raw).digest()

    @property
    def hash(self) -> str:
        return self.leaf.hex()


def batch_digest(batch: FeatureBatch) -> bytes:
    """sha256 of the batch's encoding without its receipt (the receipt commits to this digest)."""
    from .messages import CODEC

    return hashlib.sha256(CODEC.encode(dataclasses.replace(batch, receipt=b""))).digest()


def batch_digest_of_encoding(encoding: bytes, receipt_len: int) -> bytes:
    """:func:`batch_digest` from the batch's own encoding, without encoding it again: the receipt is
    the encoding's last field (u32 length + bytes), so the digest is over the encoding with that
    field emptied. ``receipt_len`` is the decoded receipt's length (the decoder checked the layout)."""
    cut = len(encoding) - receipt_len - 4
    if cut < 0 or encoding[cut : cut + 4] != struct.pack("<I", receipt_len):
        raise WireError("malformed", "the encoding does not end with a receipt of that length")
    h = hashlib.sha256(memoryview(encoding)[:cut])
    h.update(b"\x00\x00\x00\x00")
    return h.digest()


def batches_root(digests: Sequence[bytes]) -> str:
    """Root over the batch digests, sorted (so arrival order does not matter)."""
    return merkle_root(sorted(digests)).hex()


def batch_proof(digests: Sequence[bytes], digest: bytes) -> list[str]:
    ordered = sorted(digests)
    return [p.hex() for p in merkle_proof(ordered, ordered.index(digest))]


def verify_batch_proof(digest: bytes, proof: Sequence[str], root: str) -> bool:
    return verify_proof(digest, [bytes.fromhex(p) for p in proof], bytes.fromhex(root))


def sign_receipt(receipt: ContributionReceipt, identity: Identity) -> SignedReceipt:
    if receipt.device != identity.node_id:
        raise ValueError("a device signs only its own receipts")
    check_receipt_fields(receipt)
    body = RECEIPT_CODEC.encode(receipt)
    return SignedReceipt(receipt, body + identity.sign(_DOMAIN + body))


def decode_receipt(raw: bytes) -> SignedReceipt:
    """Decode a signed receipt and check its fields, NOT its signature; raises WireError.

    The edge's ingest does only this (a channel envelope already shows the device or the edge
    made the batch); the signature is checked once per device and round, on the receipt the edge
    puts in its update (:func:`open_receipt`), and again by the coordinator and the audit."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) <= SIGNATURE_BYTES:
        raise WireError("bad_receipt", "missing or truncated contribution receipt")
    body = memoryview(raw)[:-SIGNATURE_BYTES]
    try:
        receipt = _decode_fixed(body) or RECEIPT_CODEC.decode(body, ContributionReceipt)
    except WireError as exc:
        raise WireError("bad_receipt", f"receipt does not decode: {exc.code}: {exc.detail}") from None
    try:
        check_receipt_fields(receipt)
    except ValueError as exc:
        raise WireError("bad_receipt", str(exc)) from None
    return SignedReceipt(receipt, bytes(raw))


def open_receipt(raw: bytes) -> SignedReceipt:
    """Decode and verify a signed receipt against the key it names; raises WireError."""
    signed = decode_receipt(raw)
    body, sig, receipt = signed.raw[:-SIGNATURE_BYTES], signed.raw[-SIGNATURE_BYTES:], signed.receipt
    try:
        Verifier(bytes.fromhex(receipt.device)).verify(_DOMAIN + body, sig)
    except ValueError:
        raise WireError("bad_receipt", "receipt signature does not verify under the device's key") from None
    return signed


def check_receipt_fields(r: ContributionReceipt) -> None:
    for name in ("task_id", "device", "edge", "batches_root"):
        if not _HEX64.fullmatch(getattr(r, name)):
            raise ValueError(f"receipt.{name} must be 64 lowercase hex characters")
    if not 1 <= r.round <= 2**31 - 1:
        raise ValueError("receipt.round must be a positive 32-bit integer")
    if not 1 <= r.num_batches <= r.num_samples <= 2**31 - 1:
        raise ValueError("receipt needs 1 <= num_batches <= num_samples < 2^31")
    if not (math.isfinite(r.epsilon) and r.epsilon > 0):
        raise ValueError("receipt.epsilon must be a positive number")


def check_receipt_plausible(r: ContributionReceipt, spec: TaskSpec) -> None:
    """What the task allows a device to have released by a round: one batch a round, at most
    ``samples_per_round`` samples a batch, at the task's epsilon. A receipt beyond that claims
    samples that were never released."""
    if r.task_id != spec.task_id or not 1 <= r.round <= spec.rounds:
        raise WireError("receipt_mismatch", "receipt is for another task or a round the task does not have")
    if r.num_batches > r.round:
        raise WireError("receipt_batches", f"receipt claims {r.num_batches} batches by round {r.round} (one a round)")
    if r.num_samples > r.num_batches * spec.samples_per_round:
        raise WireError(
            "receipt_samples", f"receipt claims {r.num_samples} samples in {r.num_batches} batch(es) of at most {spec.samples_per_round}"
        )
    if r.epsilon != spec.epsilon:
        raise WireError("receipt_epsilon", f"receipt's epsilon {r.epsilon} is not the task's {spec.epsilon}")


def check_update_against_receipt(
    signed: SignedReceipt, *, task_id: str, round_: int, customer: str, edge: str, num_samples: int, inputs_digest: str
) -> None:
    """An update's claims must be the device's: same task, round, device, edge, count and inputs."""
    r = signed.receipt
    if (r.task_id, r.round) != (task_id, round_):
        raise WireError("receipt_mismatch", f"receipt is for task {r.task_id[:12]} round {r.round}")
    if r.device != customer:
        raise WireError("receipt_mismatch", "receipt is signed by another device than the update's customer")
    if r.edge != edge:
        raise WireError("receipt_mismatch", "receipt names another edge than the one that signed the update")
    if r.num_samples != num_samples:
        raise WireError("receipt_samples", f"update claims {num_samples} samples, the device released {r.num_samples}")
    if r.batches_root != inputs_digest:
        raise WireError("receipt_inputs", "update's inputs digest is not the root of the device's batches")


def update_receipt_checked(update: ModelUpdate, edge: str, spec: TaskSpec) -> SignedReceipt:
    """The device-signed receipt an update carries, opened and checked against the update's claims
    and the task's limits: what the coordinator's intake requires and the audit re-checks."""
    signed = open_receipt(update.receipt)
    check_update_against_receipt(
        signed, task_id=update.task_id, round_=update.round, customer=update.customer, edge=edge,
        num_samples=update.num_samples, inputs_digest=update.inputs_digest,
    )
    check_receipt_plausible(signed.receipt, spec)
    return signed
