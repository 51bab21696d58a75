"""The one home of the 64-hex check and of public identities read from hex."""

from __future__ import annotations

import pytest

from crowdfl.identity import Identity, PublicIdentity
from crowdfl.messages import is_hex64, sha256_hex


def test_is_hex64_accepts_digests_and_node_ids_only() -> None:
    ident = Identity.generate()
    assert is_hex64(sha256_hex(b"x"))
    assert is_hex64(ident.node_id)
    for bad in ("", "a" * 63, "a" * 65, "A" * 64, "g" + "a" * 63, " " + "a" * 63, None, 42, b"a" * 64, ["a" * 64]):
        assert not is_hex64(bad), bad


def test_public_identity_from_hex_round_trips_and_refuses_bad_keys() -> None:
    pub = Identity.generate().public
    again = PublicIdentity.from_hex(pub.sign_key.hex(), pub.enc_key.hex())
    assert again == pub and again.node_id == pub.node_id
    for sign, enc in (("zz" * 32, pub.enc_key.hex()), (pub.sign_key.hex()[:-2], pub.enc_key.hex()), (pub.sign_key.hex(), "")):
        with pytest.raises(ValueError, match="64 hex characters"):
            PublicIdentity.from_hex(sign, enc)
