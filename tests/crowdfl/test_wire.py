"""crowdfl.wire: canonical round trips and strict decoding."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdfl.errors import WireError
from crowdfl.messages import CODEC, Ack, FeatureBatch, ModelUpdate, RoundStart
from crowdfl.wire import Codec, Limits, fields_equal


def _batch(n: int = 3) -> FeatureBatch:
    return FeatureBatch(
        "t" * 64, 2, np.arange(n, dtype=np.uint64), np.linspace(0, 1, n * 4, dtype=np.float32).reshape(n, 4),
        np.arange(n, dtype=np.int8) % 4, 2.5, 3.0,
    )


def test_round_trip_keeps_types_dtypes_and_values() -> None:
    b = _batch()
    out = CODEC.decode(CODEC.encode(b), FeatureBatch)
    assert fields_equal(vars(b), vars(out))
    assert out.features.dtype == np.float32 and out.sample_ids.dtype == np.uint64
    rs = RoundStart("t" * 64, 3, "h" * 64, ("a", "b"), 123)
    assert CODEC.decode(CODEC.encode(rs)) .selected == ("a", "b")
    mu = ModelUpdate("t", 1, "c", "b", (np.ones((2, 3), np.float32), np.zeros(3, np.float32)), 10, "d" * 64, 0.5)
    back = CODEC.decode(CODEC.encode(mu), ModelUpdate)
    assert [w.shape for w in back.weights] == [(2, 3), (3,)]


def test_encoding_is_canonical() -> None:
    assert CODEC.encode(_batch()) == CODEC.encode(_batch())
    # a big-endian array encodes exactly like the same values little-endian
    a = _batch()
    b = FeatureBatch(a.task_id, a.round, a.sample_ids.astype(">u8"), a.features.astype(">f4"), a.labels, a.epsilon, a.clip_l1)
    assert CODEC.encode(a) == CODEC.encode(b)


@pytest.mark.parametrize("cut", [0, 1, 3, 10, -1, -5])
def test_truncated_message_is_rejected(cut: int) -> None:
    data = CODEC.encode(_batch())
    with pytest.raises(WireError) as e:
        CODEC.decode(data[:cut])
    assert e.value.code in ("truncated", "bad_magic")


def test_trailing_bytes_wrong_magic_version_kind() -> None:
    data = CODEC.encode(_batch())
    with pytest.raises(WireError, match="trailing_bytes"):
        CODEC.decode(data + b"\x00")
    with pytest.raises(WireError, match="bad_magic"):
        CODEC.decode(b"XX" + data[2:])
    with pytest.raises(WireError, match="bad_version"):
        CODEC.decode(data[:2] + bytes([9]) + data[3:])
    with pytest.raises(WireError, match="unknown_kind"):
        CODEC.decode(data[:3] + bytes([250]) + data[4:])
    with pytest.raises(WireError, match="unexpected_kind"):
        CODEC.decode(data, Ack)


def test_oversized_inputs_are_refused_before_allocation() -> None:
    small = Codec([FeatureBatch], Limits(max_message_bytes=200, max_array_elements=5))
    with pytest.raises(WireError, match="oversized"):
        small.decode(CODEC.encode(_batch(10)))
    # an array header that announces 2^32-1 elements with only a few bytes behind it
    data = bytearray(CODEC.encode(_batch(1)))
    pos = data.index(struct.pack("<BB", 7, 1))  # uint64 sample_ids, 1-d
    data[pos + 2 : pos + 6] = struct.pack("<I", 2**32 - 1)
    with pytest.raises(WireError, match="oversized"):
        CODEC.decode(bytes(data))


def test_bad_bool_bad_utf8_bad_dtype() -> None:
    data = bytearray(CODEC.encode(RoundStart("ab", 1, "h", (), 0)))
    data[8] = 0xFF  # inside the task id text
    with pytest.raises(WireError, match="malformed"):
        CODEC.decode(bytes(data))
    with pytest.raises(WireError, match="not allowed"):
        CODEC.encode(FeatureBatch("t", 1, np.zeros(1, np.uint64), np.zeros((1, 1), np.float16), np.zeros(1, np.int8), 1.0, 1.0))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash(blob: bytes) -> None:
    try:
        CODEC.decode(blob)
    except WireError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_is_detected_or_decodes_cleanly(pos: int, value: int) -> None:
    data = bytearray(CODEC.encode(_batch()))
    data[pos % len(data)] = value
    try:
        CODEC.decode(bytes(data))
    except WireError:
        pass
