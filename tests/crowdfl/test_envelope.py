"""crowdfl.envelope: every kind of bad envelope raises WireError with its reason, nothing recorded."""
# Channel envelopes (device -> edge) are sealed under a key both ends derive from their registered
# X25519 keys, with the topic as associated data; signed envelopes carry an Ed25519 signature.

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdfl.envelope import HEADER_SIZE, MODE_CHANNEL, SIG_SIZE, Channel, open_envelope, parse, seal, verify
from crowdfl.errors import WireError
from crowdfl.identity import Identity, PublicIdentity

SENDER = Identity.generate()
RECIPIENT = Identity.generate()
BODY = b"CF\x01\x14" + b"payload" * 20
TOPIC = b"crowdfl/v1/feat/aaaa/bbbb"


def lookup(node: str) -> PublicIdentity | None:
    return SENDER.public if node == SENDER.node_id else None


def _open(data: bytes, recipient: Identity = RECIPIENT, context: bytes = TOPIC) -> bytes:
    return open_envelope(data, lookup_sender=lookup, recipient=recipient, context=context).body


def _seal(body: bytes = BODY, sender: Identity = SENDER, seq: int = 1) -> bytes:
    return seal(body, sender, seq, RECIPIENT.public, context=TOPIC)


def test_round_trip_channel_and_signed() -> None:
    env = _seal()
    assert _open(env) == BODY
    assert parse(env).mode == MODE_CHANNEL and len(env) == HEADER_SIZE + len(BODY) + 16  # no signature
    plain = seal(BODY, SENDER, 2)
    assert open_envelope(plain, lookup_sender=lookup).body == BODY
    assert BODY not in _seal(seq=3)  # the payload is not readable in transit


def test_both_ends_derive_the_same_channel_and_only_they() -> None:
    device_side = Channel.of_device(SENDER, RECIPIENT.public)
    edge_side = Channel.of_edge(RECIPIENT, SENDER.public)
    assert device_side.key == edge_side.key
    other = Channel.of_device(Identity.generate(), RECIPIENT.public)
    assert other.key != device_side.key
    env = device_side.seal(BODY, 7, TOPIC)
    assert edge_side.open(parse(env), TOPIC) == BODY
    # nonces are fresh: the same message twice gives two different envelopes
    assert device_side.seal(BODY, 7, TOPIC) != env


def test_topic_is_bound_as_associated_data() -> None:
    """Moved to another topic (e.g. another device's), the tag no longer verifies."""
    env = _seal()
    assert _reason(env, context=b"crowdfl/v1/feat/aaaa/cccc") == "decrypt_failed"
    assert _reason(env, context=b"") == "decrypt_failed"


def test_channel_envelope_has_no_signature_to_verify() -> None:
    with pytest.raises(WireError, match="not_signed"):
        verify(parse(_seal()), SENDER.public)


def _reason(data: bytes, recipient: Identity = RECIPIENT, context: bytes = TOPIC) -> str:
    with pytest.raises(WireError) as e:
        _open(data, recipient, context)
    return e.value.code


def test_truncated() -> None:
    env = _seal()
    for cut in (0, 10, HEADER_SIZE, len(env) - 1):
        assert _reason(env[:cut]) == "truncated"
    signed = seal(BODY, SENDER, 2)
    with pytest.raises(WireError, match="truncated"):
        parse(signed[: len(signed) - SIG_SIZE])


def test_oversized_and_trailing() -> None:
    env = _seal()
    assert _reason(env + b"x") == "trailing_bytes"
    with pytest.raises(WireError, match="oversized"):
        from crowdfl.envelope import parse

        parse(env, max_bytes=100)


def test_tampered_body_header_and_tag() -> None:
    env = bytearray(_seal())
    for pos in (HEADER_SIZE + 3, 40, 55, len(env) - 3):  # ciphertext, seq, nonce, tag
        bad = bytearray(env)
        bad[pos] ^= 0x01
        assert _reason(bytes(bad)) == "decrypt_failed"
    signed = bytearray(seal(BODY, SENDER, 2))
    for pos in (HEADER_SIZE + 3, 40, len(signed) - 3):  # body, seq, signature
        bad = bytearray(signed)
        bad[pos] ^= 0x01
        with pytest.raises(WireError, match="bad_signature"):
            open_envelope(bytes(bad), lookup_sender=lookup)


def test_wrongly_sealed() -> None:
    impostor = Identity.generate()
    env = bytearray(_seal(sender=impostor))
    env[6:38] = SENDER.public.sign_key  # claims to be SENDER, sealed under the impostor's channel
    assert _reason(bytes(env)) == "decrypt_failed"
    assert _reason(_seal(sender=impostor)) == "unknown_sender"
    signed = bytearray(seal(BODY, impostor, 1))
    signed[6:38] = SENDER.public.sign_key  # claims to be SENDER, signed with another key
    with pytest.raises(WireError, match="bad_signature"):
        open_envelope(bytes(signed), lookup_sender=lookup)


def test_wrong_version_magic_mode() -> None:
    env = bytearray(_seal())
    v = bytearray(env)
    v[4] = 3
    assert _reason(bytes(v)) == "bad_version"
    v[4] = 1  # the retired version 1: its own reason, whatever follows
    assert _reason(bytes(v)) == "retired_version"
    m = bytearray(env)
    m[0:4] = b"XXXX"
    assert _reason(bytes(m)) == "bad_magic"
    f = bytearray(env)
    f[5] = 0x80
    assert _reason(bytes(f)) == "malformed"


def test_wrong_recipient() -> None:
    other = Identity.generate()
    assert _reason(_seal(), recipient=other) == "wrong_recipient"


def test_not_bytes() -> None:
    with pytest.raises(WireError, match="malformed"):
        open_envelope("text", lookup_sender=lookup)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_any_byte_flip_is_rejected(pos: int, xor: int) -> None:
    env = bytearray(_seal())
    env[pos % len(env)] ^= xor
    with pytest.raises(WireError):
        _open(bytes(env))


def test_identity_file_permissions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "id.json"
    ident, created = Identity.load_or_create(path)
    assert created and (path.stat().st_mode & 0o777) == 0o600
    again, created2 = Identity.load_or_create(path)
    assert not created2 and again.node_id == ident.node_id
    path.chmod(0o644)
    from crowdfl.errors import ConfigError

    with pytest.raises(ConfigError, match="key_permissions"):
        Identity.load(path)


def test_identity_save_fsyncs_the_file_then_its_folder(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Before: the key file was fsynced, the rename into place was not, so a power cut right after
    first boot could leave no key file and the next boot a new identity the chain does not know."""
    import os

    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        synced.append(("dir " if os.path.isdir(target) else "file ") + os.path.relpath(target, tmp_path))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    Identity.generate().save(tmp_path / "state" / "identity.json")
    # the new folder's entry in its parent, the key itself, then the rename in the new folder
    assert synced == ["dir .", "file state/identity.json.tmp", "dir state"]
    synced.clear()
    Identity.generate().save(tmp_path / "state" / "other.json")
    assert synced == ["file state/other.json.tmp", "dir state"]
