"""The envelope format is standard cryptography, checked against an independent implementation.

Keys derived from the same seeds, and envelopes sealed by either implementation (``cryptography``
here, pycryptodome as the reference), must be interchangeable; version 1 envelopes, which devices
sealed before the channel envelopes, are refused with their own reason. The pycryptodome side
runs only where it is installed (the server venvs have it through web3).
"""

from __future__ import annotations

import hashlib
import secrets
import struct

import pytest

from crowdfl.envelope import _HEADER, ENV_MAGIC, ENV_VERSION, MODE_CHANNEL, Channel, fingerprint, open_envelope, seal
from crowdfl.errors import WireError
from crowdfl.identity import Identity, PublicIdentity
from tests.support.realparts import require_module

BODY = b"CF\x01\x14" + bytes(range(256)) * 3
TOPIC = b"crowdfl/v1/feat/0123456789abcdef/fedcba9876543210"


def test_rfc8032_ed25519_vector() -> None:
    """RFC 8032 section 7.1, test 1: the signing key's public half and signature are standard."""
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    ident = Identity(seed, bytes(32))
    assert ident.public.sign_key.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert ident.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


def test_rfc7748_x25519_vector() -> None:
    """RFC 7748 section 6.1: Alice's public key from her private scalar."""
    alice = Identity(bytes(32), bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    assert alice.public.enc_key.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


def _pycryptodome_v1_seal(body: bytes, sender_seed: bytes, seq: int, recipient: PublicIdentity) -> bytes:
    """A version 1 envelope (Ed25519 signature + ephemeral X25519 on every message), as devices
    sealed before: built here with pycryptodome, independently of crowdfl's code."""
    from Crypto.Cipher import AES
    from Crypto.Hash import SHA256
    from Crypto.Protocol import DH
    from Crypto.Protocol.KDF import HKDF
    from Crypto.PublicKey import ECC
    from Crypto.Signature import eddsa

    v1_header = struct.Struct("<4sBB32sQ8s32s12sI")
    eph = ECC.generate(curve="curve25519")
    eph_pub = eph.public_key().export_key(format="raw")
    shared = DH.key_agreement(eph_priv=eph, static_pub=DH.import_x25519_public_key(recipient.enc_key), kdf=lambda z: z)
    key = HKDF(shared, 32, eph_pub + recipient.enc_key, SHA256, context=b"crowdfl/v1 envelope")
    nonce = secrets.token_bytes(12)
    sign_key = eddsa.import_private_key(sender_seed)
    header = v1_header.pack(
        ENV_MAGIC, 1, 1, sign_key.public_key().export_key(format="raw"), seq, fingerprint(recipient), eph_pub, nonce, len(body) + 16,
    )
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(header)
    ct, tag = cipher.encrypt_and_digest(body)
    signed = header + ct + tag
    return signed + eddsa.new(sign_key, "rfc8032").sign(signed)


def _pycryptodome_channel_key(own_enc_seed: bytes, peer_enc: bytes, device: PublicIdentity, edge: PublicIdentity) -> bytes:
    """The version 2 channel key, from the spec in crowdfl/envelope.py, with pycryptodome."""
    from Crypto.Hash import SHA256
    from Crypto.Protocol import DH
    from Crypto.Protocol.KDF import HKDF

    priv = DH.import_x25519_private_key(own_enc_seed)
    shared = DH.key_agreement(static_priv=priv, static_pub=DH.import_x25519_public_key(peer_enc), kdf=lambda z: z)
    info = b"crowdfl/v2 channel" + device.sign_key + device.enc_key + edge.sign_key + edge.enc_key
    return HKDF(shared, 32, b"", SHA256, context=info)  # type: ignore[no-any-return]


def _pycryptodome_channel_seal(body: bytes, key: bytes, device: PublicIdentity, edge: PublicIdentity, seq: int, topic: bytes) -> bytes:
    from Crypto.Cipher import AES

    nonce = secrets.token_bytes(12)
    header = _HEADER.pack(ENV_MAGIC, ENV_VERSION, MODE_CHANNEL, device.sign_key, seq, fingerprint(edge), nonce, len(body) + 16)
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(header + topic)
    ct, tag = cipher.encrypt_and_digest(body)
    return header + ct + tag


def _pycryptodome_channel_open(env: bytes, key: bytes, topic: bytes) -> bytes:
    from Crypto.Cipher import AES

    nonce = _HEADER.unpack_from(env)[6]
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(env[: _HEADER.size] + topic)
    body = env[_HEADER.size :]
    return cipher.decrypt_and_verify(body[:-16], body[-16:])  # type: ignore[no-any-return]


def test_envelopes_interchange_with_pycryptodome() -> None:
    require_module("Crypto", "pip install -e .[dev] (pycryptodome, the reference implementation)")
    from Crypto.Protocol import DH
    from Crypto.Signature import eddsa

    device, edge = Identity.generate(), Identity.generate()
    # same seeds -> same public keys in both libraries (node ids must not change on upgrade)
    assert eddsa.import_private_key(device.sign_seed).public_key().export_key(format="raw") == device.public.sign_key
    assert DH.import_x25519_private_key(edge.enc_seed).public_key().export_key(format="raw") == edge.public.enc_key

    def lookup(node: str) -> PublicIdentity | None:
        return device.public if node == device.node_id else None

    # the channel key is standard X25519 + HKDF-SHA256: both ends, both libraries agree
    key = _pycryptodome_channel_key(device.enc_seed, edge.public.enc_key, device.public, edge.public)
    assert key == _pycryptodome_channel_key(edge.enc_seed, device.public.enc_key, device.public, edge.public)
    assert key == Channel.of_edge(edge, device.public).key == Channel.of_device(device, edge.public).key

    theirs = _pycryptodome_channel_seal(BODY, key, device.public, edge.public, 42, TOPIC)
    opened = open_envelope(theirs, lookup_sender=lookup, recipient=edge, require_encrypted=True, context=TOPIC)
    assert opened.body == BODY and opened.seq == 42 and opened.digest == hashlib.sha256(theirs).hexdigest()
    ours = seal(BODY, device, 43, edge.public, context=TOPIC)
    assert _pycryptodome_channel_open(ours, key, TOPIC) == BODY

    # Ed25519 is deterministic: the signed envelope's signature is byte-identical across libraries
    plain = seal(BODY, device, 44)
    assert eddsa.new(eddsa.import_private_key(device.sign_seed), "rfc8032").sign(plain[:-64]) == plain[-64:]


def test_version_1_envelopes_are_refused_with_their_own_reason() -> None:
    """A device that was not updated still seals version 1: refused before any crypto, with a
    reason that says what to do (the edge counts it like every refusal)."""
    require_module("Crypto", "pip install -e .[dev] (pycryptodome, the reference implementation)")
    device, edge = Identity.generate(), Identity.generate()
    old = _pycryptodome_v1_seal(BODY, device.sign_seed, 42, edge.public)
    with pytest.raises(WireError) as e:
        open_envelope(old, lookup_sender=lambda n: device.public, recipient=edge, context=TOPIC)
    assert e.value.code == "retired_version" and "update the sender" in e.value.detail
