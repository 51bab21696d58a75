"""crowdfl.envelope: every kind of bad envelope raises WireError with its reason, nothing recorded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdfl.envelope import HEADER_SIZE, open_envelope, seal
from crowdfl.errors import WireError
from crowdfl.identity import Identity, PublicIdentity

SENDER = Identity.generate()
RECIPIENT = Identity.generate()
BODY = b"CF\x01\x14" + b"payload" * 20


def lookup(node: str) -> PublicIdentity | None:
    return SENDER.public if node == SENDER.node_id else None


def _open(data: bytes, recipient: Identity = RECIPIENT) -> bytes:
    return open_envelope(data, lookup_sender=lookup, recipient=recipient).body


def test_round_trip_encrypted_and_signed_only() -> None:
    assert _open(seal(BODY, SENDER, 1, RECIPIENT.public)) == BODY
    plain = seal(BODY, SENDER, 2)
    assert open_envelope(plain, lookup_sender=lookup).body == BODY
    assert BODY not in seal(BODY, SENDER, 3, RECIPIENT.public)  # the payload is not readable in transit


def _reason(data: bytes, recipient: Identity = RECIPIENT) -> str:
    with pytest.raises(WireError) as e:
        _open(data, recipient)
    return e.value.code


def test_truncated() -> None:
    env = seal(BODY, SENDER, 1, RECIPIENT.public)
    for cut in (0, 10, HEADER_SIZE, len(env) - 1):
        assert _reason(env[:cut]) == "truncated"


def test_oversized_and_trailing() -> None:
    env = seal(BODY, SENDER, 1, RECIPIENT.public)
    assert _reason(env + b"x") == "trailing_bytes"
    with pytest.raises(WireError, match="oversized"):
        from crowdfl.envelope import parse

        parse(env, max_bytes=100)


def test_tampered_body_header_and_signature() -> None:
    env = bytearray(seal(BODY, SENDER, 1, RECIPIENT.public))
    for pos in (HEADER_SIZE + 3, 40, len(env) - 3):  # ciphertext, seq in the header, signature
        bad = bytearray(env)
        bad[pos] ^= 0x01
        assert _reason(bytes(bad)) in ("bad_signature", "unknown_sender")


def test_wrongly_signed() -> None:
    impostor = Identity.generate()
    env = bytearray(seal(BODY, impostor, 1, RECIPIENT.public))
    env[6:38] = SENDER.public.sign_key  # claims to be SENDER, signed with another key
    assert _reason(bytes(env)) == "bad_signature"
    assert _reason(seal(BODY, impostor, 1, RECIPIENT.public)) == "unknown_sender"


def test_wrong_version_magic_flags() -> None:
    env = bytearray(seal(BODY, SENDER, 1, RECIPIENT.public))
    v = bytearray(env)
    v[4] = 2
    assert _reason(bytes(v)) == "bad_version"
    m = bytearray(env)
    m[0:4] = b"XXXX"
    assert _reason(bytes(m)) == "bad_magic"
    f = bytearray(env)
    f[5] = 0x80
    assert _reason(bytes(f)) == "malformed"


def test_wrong_recipient() -> None:
    other = Identity.generate()
    assert _reason(seal(BODY, SENDER, 1, RECIPIENT.public), recipient=other) == "wrong_recipient"


def test_not_bytes() -> None:
    with pytest.raises(WireError, match="malformed"):
        open_envelope("text", lookup_sender=lookup)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_any_byte_flip_is_rejected(pos: int, xor: int) -> None:
    env = bytearray(seal(BODY, SENDER, 1, RECIPIENT.public))
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
