"""crowdfl.front: a device runs only the front model whose hash the task published."""

from __future__ import annotations

import hashlib

import pytest

from crowdfl.front import FrontModel, FrontModelError


def test_bytes_that_are_not_the_published_front_are_refused_before_loading() -> None:
    published = b"the manufacturer's model"
    with pytest.raises(FrontModelError) as e:
        FrontModel(b"something else", hashlib.sha256(published).hexdigest())
    assert e.value.code == "hash_mismatch"


def test_the_right_hash_on_bytes_that_are_no_model_is_a_bad_model() -> None:
    junk = b"not a flatbuffer"
    with pytest.raises(FrontModelError) as e:
        FrontModel(junk, hashlib.sha256(junk).hexdigest())
    assert e.value.code == "bad_model"
