"""Signed and optionally encrypted envelopes around encoded messages.

    envelope := header body signature
    header   := b"CFEV" version(u8) flags(u8) sender_sign_key(32) seq(u64)
                recipient_fingerprint(8) ephemeral_x25519(32) nonce(12) body_len(u32)
    body     := AES-256-GCM(ciphertext || tag(16)) when encrypted, else the encoded message
    signature:= Ed25519 over header || body (64)

Encryption is to the recipient's X25519 key with a fresh ephemeral key per envelope; the AES key
is HKDF-SHA256 of the shared secret, salted with both public keys. The header is the GCM
associated data, so no header byte can change without detection even before the signature is
checked. ``seq`` is the sender's monotonically increasing counter: a receiver that keeps the
(sender, seq) it accepted (the edge does, in its database) detects replays and takes resends once.

Verification order (cheapest and least trusting first): size and layout, version, recipient,
known sender, signature, decryption. Every failure raises :class:`WireError`.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import WireError
from .identity import Identity, PublicIdentity

ENV_MAGIC = b"CFEV"
ENV_VERSION = 1
FLAG_ENCRYPTED = 0x01
_HEADER = struct.Struct("<4sBB32sQ8s32s12sI")
HEADER_SIZE = _HEADER.size
SIG_SIZE = 64
TAG_SIZE = 16
MAX_ENVELOPE_BYTES = 32 * 1024 * 1024 + HEADER_SIZE + SIG_SIZE + TAG_SIZE
_KDF_INFO = b"crowdfl/v1 envelope"


def fingerprint(pub: PublicIdentity) -> bytes:
    return hashlib.sha256(pub.enc_key).digest()[:8]


@dataclass(frozen=True)
class Sealed:
    """A parsed, not yet verified envelope."""

    raw: bytes
    flags: int
    sender_key: bytes
    seq: int
    recipient_fp: bytes
    ephemeral: bytes
    nonce: bytes
    body: bytes
    signature: bytes

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def signed_part(self) -> bytes:
        return self.raw[: len(self.raw) - SIG_SIZE]

    @property
    def header(self) -> bytes:
        return self.raw[:HEADER_SIZE]

    @property
    def sender_id(self) -> str:
        return self.sender_key.hex()

    @cached_property
    def digest(self) -> str:
        """sha256 of the whole envelope: the content address of what was signed (computed once)."""
        return hashlib.sha256(self.raw).hexdigest()


@dataclass(frozen=True)
class Opened:
    sender: PublicIdentity
    seq: int
    body: bytes
    digest: str


def _aes_key(shared: bytes, ephemeral: bytes, recipient_enc: bytes) -> bytes:
    """RFC 5869 HKDF-SHA256 (salt = both public keys, info = the protocol label)."""
    return HKDF(algorithm=SHA256(), length=32, salt=ephemeral + recipient_enc, info=_KDF_INFO).derive(shared)


def seal(body: bytes, sender: Identity, seq: int, recipient: PublicIdentity | None = None) -> bytes:
    """Sign (and, with a recipient, encrypt) an encoded message."""
    if not 0 <= seq < 2**64:
        raise ValueError("seq must fit in 64 bits")
    if recipient is not None:
        eph = X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        key = _aes_key(eph.exchange(recipient.enc_public), eph_pub, recipient.enc_key)
        nonce = secrets.token_bytes(12)
        flags, fp = FLAG_ENCRYPTED, fingerprint(recipient)
        body_len = len(body) + TAG_SIZE
    else:
        eph_pub, nonce, flags, fp = bytes(32), bytes(12), 0, bytes(8)
        body_len = len(body)
    header = _HEADER.pack(ENV_MAGIC, ENV_VERSION, flags, sender.public.sign_key, seq, fp, eph_pub, nonce, body_len)
    if recipient is not None:
        payload = AESGCM(key).encrypt(nonce, body, header)  # ciphertext || tag(16)
    else:
        payload = body
    signed = header + payload
    return signed + sender.sign(signed)


def parse(data: bytes, max_bytes: int = MAX_ENVELOPE_BYTES) -> Sealed:
    """Check layout and sizes only; nothing is trusted yet."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("malformed", f"envelope must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise WireError("oversized", f"envelope of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < HEADER_SIZE + SIG_SIZE:
        raise WireError("truncated", f"envelope of {len(data)} bytes is shorter than header and signature")
    magic, version, flags, sender_key, seq, fp, eph, nonce, body_len = _HEADER.unpack_from(data)
    if magic != ENV_MAGIC:
        raise WireError("bad_magic", "not a crowdfl envelope")
    if version != ENV_VERSION:
        raise WireError("bad_version", f"envelope version {version}, this build speaks {ENV_VERSION}")
    if flags & ~FLAG_ENCRYPTED:
        raise WireError("malformed", f"unknown envelope flags {flags:#x}")
    expected = HEADER_SIZE + body_len + SIG_SIZE
    if len(data) < expected:
        raise WireError("truncated", f"envelope has {len(data)} bytes, header announces {expected}")
    if len(data) > expected:
        raise WireError("trailing_bytes", f"{len(data) - expected} bytes after the signature")
    if flags & FLAG_ENCRYPTED and body_len < TAG_SIZE:
        raise WireError("truncated", "encrypted body shorter than its tag")
    body = data[HEADER_SIZE : HEADER_SIZE + body_len]
    return Sealed(data, flags, sender_key, seq, fp, eph, nonce, body, data[-SIG_SIZE:])


def verify(sealed: Sealed, sender: PublicIdentity) -> None:
    if sealed.sender_key != sender.sign_key:
        raise WireError("unknown_sender", "envelope names a different sender key")
    try:
        sender.verifier.verify(sealed.signed_part, sealed.signature)
    except ValueError:
        raise WireError("bad_signature", f"signature of {sealed.sender_id[:16]} does not verify") from None


def decrypt(sealed: Sealed, recipient: Identity) -> bytes:
    if not sealed.encrypted:
        return sealed.body
    if sealed.recipient_fp != fingerprint(recipient.public):
        raise WireError("wrong_recipient", "envelope is encrypted to another key")
    try:
        # raises ValueError for a low-order point (all-zero shared secret)
        shared = recipient.enc_private.exchange(X25519PublicKey.from_public_bytes(sealed.ephemeral))
    except ValueError as exc:
        raise WireError("decrypt_failed", f"bad ephemeral key: {exc}") from None
    key = _aes_key(shared, sealed.ephemeral, recipient.public.enc_key)
    try:
        return AESGCM(key).decrypt(sealed.nonce, sealed.body, sealed.header)
    except InvalidTag:
        raise WireError("decrypt_failed", "authentication tag mismatch") from None


def open_envelope(
    data: bytes,
    *,
    lookup_sender: Callable[[str], PublicIdentity | None],
    recipient: Identity | None = None,
    require_encrypted: bool = False,
) -> Opened:
    """Parse, authenticate and decrypt.

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
    verify(sealed, sender)
    body = decrypt(sealed, recipient) if sealed.encrypted and recipient is not None else sealed.body
    return Opened(sender, sealed.seq, body, sealed.digest)
