"""The envelope primitives moved from pycryptodome to ``cryptography``: the wire format must not change.

Keys derived from the same seeds, and envelopes sealed by either implementation, must be
interchangeable (devices already in the field sealed with pycryptodome). The pycryptodome side
runs only where it is installed (the server venvs have it through web3).
"""

from __future__ import annotations

import hashlib
import secrets

from crowdfl.envelope import _HEADER, ENV_MAGIC, ENV_VERSION, FLAG_ENCRYPTED, fingerprint, open_envelope, seal
from crowdfl.identity import Identity, PublicIdentity
from tests.support.realparts import require_module

BODY = b"CF\x01\x14" + bytes(range(256)) * 3


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


def _pycryptodome_seal(body: bytes, sender_seed: bytes, seq: int, recipient: PublicIdentity) -> bytes:
    """The previous implementation of ``seal`` (pycryptodome), kept here as the reference."""
    from Crypto.Cipher import AES
    from Crypto.Hash import SHA256
    from Crypto.Protocol import DH
    from Crypto.Protocol.KDF import HKDF
    from Crypto.PublicKey import ECC
    from Crypto.Signature import eddsa

    eph = ECC.generate(curve="curve25519")
    eph_pub = eph.public_key().export_key(format="raw")
    shared = DH.key_agreement(eph_priv=eph, static_pub=DH.import_x25519_public_key(recipient.enc_key), kdf=lambda z: z)
    key = HKDF(shared, 32, eph_pub + recipient.enc_key, SHA256, context=b"crowdfl/v1 envelope")
    nonce = secrets.token_bytes(12)
    sign_key = eddsa.import_private_key(sender_seed)
    header = _HEADER.pack(
        ENV_MAGIC, ENV_VERSION, FLAG_ENCRYPTED, sign_key.public_key().export_key(format="raw"), seq,
        fingerprint(recipient), eph_pub, nonce, len(body) + 16,
    )
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(header)
    ct, tag = cipher.encrypt_and_digest(body)
    signed = header + ct + tag
    return signed + eddsa.new(sign_key, "rfc8032").sign(signed)


def _pycryptodome_open(env: bytes, sender: PublicIdentity, recipient_seed: bytes) -> bytes:
    from Crypto.Cipher import AES
    from Crypto.Hash import SHA256
    from Crypto.Protocol import DH
    from Crypto.Protocol.KDF import HKDF
    from Crypto.Signature import eddsa

    eddsa.new(eddsa.import_public_key(sender.sign_key), "rfc8032").verify(env[:-64], env[-64:])
    fields = _HEADER.unpack_from(env)
    eph_pub, nonce = fields[6], fields[7]
    priv = DH.import_x25519_private_key(recipient_seed)
    shared = DH.key_agreement(static_priv=priv, eph_pub=DH.import_x25519_public_key(eph_pub), kdf=lambda z: z)
    recipient_enc = priv.public_key().export_key(format="raw")
    key = HKDF(shared, 32, eph_pub + recipient_enc, SHA256, context=b"crowdfl/v1 envelope")
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(env[: _HEADER.size])
    body = env[_HEADER.size : -64]
    return cipher.decrypt_and_verify(body[:-16], body[-16:])  # type: ignore[no-any-return]


def test_envelopes_interchange_with_pycryptodome() -> None:
    require_module("Crypto", "pip install -e .[dev] (pycryptodome, the reference implementation)")
    from Crypto.Protocol import DH
    from Crypto.Signature import eddsa

    sender, recipient = Identity.generate(), Identity.generate()
    # same seeds -> same public keys in both libraries (node ids must not change on upgrade)
    assert eddsa.import_private_key(sender.sign_seed).public_key().export_key(format="raw") == sender.public.sign_key
    assert DH.import_x25519_private_key(recipient.enc_seed).public_key().export_key(format="raw") == recipient.public.enc_key

    def lookup(node: str) -> PublicIdentity | None:
        return sender.public if node == sender.node_id else None

    old = _pycryptodome_seal(BODY, sender.sign_seed, 42, recipient.public)
    opened = open_envelope(old, lookup_sender=lookup, recipient=recipient, require_encrypted=True)
    assert opened.body == BODY and opened.seq == 42 and opened.digest == hashlib.sha256(old).hexdigest()

    new = seal(BODY, sender, 43, recipient.public)
    assert _pycryptodome_open(new, sender.public, recipient.enc_seed) == BODY
    # Ed25519 is deterministic: the signed-only envelope is byte-identical across libraries
    plain = seal(BODY, sender, 44)
    sig_old = eddsa.new(eddsa.import_private_key(sender.sign_seed), "rfc8032").sign(plain[:-64])
    assert sig_old == plain[-64:]
