"""Envelopes around encoded messages: signed broadcasts, and device-to-edge channel messages.

    envelope := header body [signature]
    header   := b"CFEV" version(u8)=2 mode(u8) sender_sign_key(32) seq(u64)
                recipient_fingerprint(8) nonce(12) body_len(u32)
    mode 0, SIGNED:  body := the encoded message;  signature := Ed25519 over header || body (64)
    mode 1, CHANNEL: body := AES-256-GCM(key, nonce, message, aad = header || context) (ciphertext
                     || tag(16)); no signature

SIGNED is for what many read and anyone must be able to check (tasks, round starts, acks, model
updates). CHANNEL is for what one device sends its edge server (feature batches): the key is
pairwise and static, from the two registered X25519 keys,

    key := HKDF-SHA256(X25519(device_enc, edge_enc), salt = empty,
                       info = "crowdfl/v2 channel" || device_sign || device_enc || edge_sign || edge_enc)

so opening one costs an AES-GCM pass and no public-key operation (the edge derives a device's key
once and keeps it). The header (with ``seq`` and the random 96-bit nonce) and the ``context`` (the
MQTT topic it is published on) are the associated data; the task and round are inside the
authenticated ciphertext. What a channel tag proves is only that the device *or its edge* made the
message: both hold the key. Non-repudiation comes from the device-signed contribution receipt
(crowdfl/receipts.py) each batch carries, one signature per device per round, whose Merkle root
commits to the batches; that receipt, not the envelope, is what ties stored samples to a device
for anyone else (docs/architecture.md, "Who can forge what").

``seq`` is the sender's monotonically increasing counter: the edge keeps the (sender, seq) it
accepted (in its database), refuses a replay with other bytes and acknowledges a resend once more.

Version 1 (an Ed25519 signature and a fresh X25519 exchange on every envelope) is retired: it is
refused with ``retired_version`` (counted like every refusal). Verification order (cheapest and
least trusting first): size and layout, version, mode, recipient, known sender, then the
signature or the tag. Every failure raises :class:`WireError`.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import WireError
from .identity import Identity, PublicIdentity

ENV_MAGIC = b"CFEV"
ENV_VERSION = 2
RETIRED_VERSIONS = frozenset({1})
MODE_SIGNED = 0
MODE_CHANNEL = 1
_HEADER = struct.Struct("<4sBB32sQ8s12sI")
HEADER_SIZE = _HEADER.size
SIG_SIZE = 64
TAG_SIZE = 16
KEY_SIZE = 32
MAX_ENVELOPE_BYTES = 32 * 1024 * 1024 + HEADER_SIZE + SIG_SIZE + TAG_SIZE
_CHANNEL_INFO = b"crowdfl/v2 channel"


def fingerprint(pub: PublicIdentity) -> bytes:
    return hashlib.sha256(pub.enc_key).digest()[:8]


@dataclass(frozen=True)
class Sealed:
    """A parsed, not yet authenticated envelope."""

    raw: bytes
    mode: int
    sender_key: bytes
    seq: int
    recipient_fp: bytes
    nonce: bytes
    body: bytes
    signature: bytes  # empty for a channel envelope

    @property
    def encrypted(self) -> bool:
        return self.mode == MODE_CHANNEL

    @property
    def signed_part(self) -> bytes:
        return self.raw[: len(self.raw) - SIG_SIZE]

    @property
    def header(self) -> bytes:
        return self.raw[:HEADER_SIZE]

    @cached_property
    def sender_id(self) -> str:
        return self.sender_key.hex()

    @cached_property
    def digest(self) -> str:
        """sha256 of the whole envelope: what the edge dedupes resends by (computed once)."""
        return hashlib.sha256(self.raw).hexdigest()


@dataclass(frozen=True)
class Opened:
    sender: PublicIdentity
    seq: int
    body: bytes
    digest: str


def channel_key(device: PublicIdentity, edge: PublicIdentity, shared: bytes) -> bytes:
    """RFC 5869 HKDF-SHA256 of the X25519 shared secret, bound to both parties' four public keys."""
    info = _CHANNEL_INFO + device.sign_key + device.enc_key + edge.sign_key + edge.enc_key
    return HKDF(algorithm=SHA256(), length=KEY_SIZE, salt=None, info=info).derive(shared)


@dataclass(frozen=True)
class Channel:
    """The AEAD a device and its edge server share (derived once, then one AES-GCM per message)."""

    device: PublicIdentity
    edge: PublicIdentity
    key: bytes = field(repr=False)

    @classmethod
    def of_device(cls, device: Identity, edge: PublicIdentity) -> Channel:
        """The device's side: its X25519 key with the edge's public one."""
        try:
            shared = device.enc_private.exchange(edge.enc_public)
        except ValueError as exc:  # a low-order point gives an all-zero secret
            raise WireError("bad_key", f"edge encryption key unusable: {exc}") from None
        return cls(device.public, edge, channel_key(device.public, edge, shared))

    @classmethod
    def of_edge(cls, edge: Identity, device: PublicIdentity) -> Channel:
        """The edge's side: its X25519 key with the device's registered public one."""
        try:
            shared = edge.enc_private.exchange(device.enc_public)
        except ValueError as exc:
            raise WireError("bad_key", f"device encryption key unusable: {exc}") from None
        return cls(device, edge.public, channel_key(device, edge.public, shared))

    @cached_property
    def aead(self) -> AESGCM:
        return AESGCM(self.key)

    @cached_property
    def recipient_fp(self) -> bytes:
        return fingerprint(self.edge)

    def seal(self, body: bytes, seq: int, context: bytes = b"") -> bytes:
        if not 0 <= seq < 2**64:
            raise ValueError("seq must fit in 64 bits")
        nonce = secrets.token_bytes(12)
        header = _HEADER.pack(
            ENV_MAGIC, ENV_VERSION, MODE_CHANNEL, self.device.sign_key, seq, self.recipient_fp, nonce, len(body) + TAG_SIZE
        )
        return header + self.aead.encrypt(nonce, body, header + context)

    def open(self, sealed: Sealed, context: bytes = b"") -> bytes:
        """Authenticate and decrypt; raises WireError("decrypt_failed") for any change in header,
        context or body, or a key this channel does not hold."""
        if sealed.mode != MODE_CHANNEL:
            raise WireError("not_encrypted", "not a channel envelope")
        if sealed.sender_key != self.device.sign_key:
            raise WireError("unknown_sender", "envelope names another device than this channel's")
        if sealed.recipient_fp != self.recipient_fp:
            raise WireError("wrong_recipient", "envelope is encrypted to another key")
        try:
            return self.aead.decrypt(sealed.nonce, sealed.body, sealed.header + context)
        except InvalidTag:
            raise WireError("decrypt_failed", "authentication tag mismatch (tampered, another key or another topic)") from None


def seal(body: bytes, sender: Identity, seq: int, recipient: PublicIdentity | None = None, *, context: bytes = b"") -> bytes:
    """Sign an encoded message, or (with a recipient) seal it in the sender-recipient channel.

    ``context`` (the MQTT topic) is bound into a channel envelope as associated data."""
    if recipient is not None:
        return Channel.of_device(sender, recipient).seal(body, seq, context)
    if not 0 <= seq < 2**64:
        raise ValueError("seq must fit in 64 bits")
    header = _HEADER.pack(ENV_MAGIC, ENV_VERSION, MODE_SIGNED, sender.public.sign_key, seq, bytes(8), bytes(12), len(body))
    signed = header + body
    return signed + sender.sign(signed)


def parse(data: bytes, max_bytes: int = MAX_ENVELOPE_BYTES) -> Sealed:
    """Check layout and sizes only; nothing is trusted yet."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("malformed", f"envelope must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise WireError("oversized", f"envelope of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < HEADER_SIZE:
        raise WireError("truncated", f"envelope of {len(data)} bytes is shorter than its header")
    if data[:4] != ENV_MAGIC:
        raise WireError("bad_magic", "not a crowdfl envelope")
    version = data[4]
    if version in RETIRED_VERSIONS:
        raise WireError(
            "retired_version",
            f"envelope version {version} (a signature on every message) is no longer accepted; this build speaks "
            f"{ENV_VERSION}: update the sender",
        )
    if version != ENV_VERSION:
        raise WireError("bad_version", f"envelope version {version}, this build speaks {ENV_VERSION}")
    _, _, mode, sender_key, seq, fp, nonce, body_len = _HEADER.unpack_from(data)
    if mode not in (MODE_SIGNED, MODE_CHANNEL):
        raise WireError("malformed", f"unknown envelope mode {mode:#x}")
    trailer = SIG_SIZE if mode == MODE_SIGNED else 0
    expected = HEADER_SIZE + body_len + trailer
    if len(data) < expected:
        raise WireError("truncated", f"envelope has {len(data)} bytes, header announces {expected}")
    if len(data) > expected:
        raise WireError("trailing_bytes", f"{len(data) - expected} bytes after the {'signature' if trailer else 'body'}")
    if mode == MODE_CHANNEL and body_len < TAG_SIZE:
        raise WireError("truncated", "channel body shorter than its tag")
    body = data[HEADER_SIZE : HEADER_SIZE + body_len]
    return Sealed(data, mode, sender_key, seq, fp, nonce, body, data[HEADER_SIZE + body_len :])


def verify(sealed: Sealed, sender: PublicIdentity) -> None:
    """Check a SIGNED envelope's signature (a channel envelope has none: WireError("not_signed"))."""
    if sealed.mode != MODE_SIGNED:
        raise WireError("not_signed", "a channel envelope carries no signature (it is opened with the channel key)")
    if sealed.sender_key != sender.sign_key:
        raise WireError("unknown_sender", "envelope names a different sender key")
    try:
        sender.verifier.verify(sealed.signed_part, sealed.signature)
    except ValueError:
        raise WireError("bad_signature", f"signature of {sealed.sender_id[:16]} does not verify") from None


def open_envelope(
    data: bytes,
    *,
    lookup_sender: Callable[[str], PublicIdentity | None],
    recipient: Identity | None = None,
    require_encrypted: bool = False,
    context: bytes = b"",
) -> Opened:
    """Parse and authenticate (signature, or channel tag with ``recipient``'s key), and decrypt.

    Replays are the receiver's business: the edge refuses a (device, seq) it already stored with
    another digest and acknowledges the same envelope again (``edge_server/ingest.py``, keyed in
    its database so it survives restarts); the messages devices and edges receive (tasks, round
    starts, acks) are idempotent and retained ones are redelivered on purpose."""
    sealed = parse(data)
    if require_encrypted and not sealed.encrypted:
        raise WireError("not_encrypted", "this channel requires encrypted envelopes")
    if sealed.encrypted and recipient is None:
        raise WireError("wrong_recipient", "encrypted envelope but no recipient key here")
    if sealed.encrypted and recipient is not None and sealed.recipient_fp != fingerprint(recipient.public):
        raise WireError("wrong_recipient", "envelope is encrypted to another key")
    sender = lookup_sender(sealed.sender_id)
    if sender is None:
        raise WireError("unknown_sender", f"sender {sealed.sender_id[:16]} is not registered")
    if sealed.encrypted and recipient is not None:
        body = Channel.of_edge(recipient, sender).open(sealed, context)
    else:
        verify(sealed, sender)
        body = sealed.body
    return Opened(sender, sealed.seq, body, sealed.digest)
