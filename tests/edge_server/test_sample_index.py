"""edge_server.store's in-memory sample index agrees with a plain set, whatever order ids come in."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_server.store import _SampleIndex


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=40, unique=True), min_size=1, max_size=30),
       st.lists(st.integers(0, 2**63 - 1), max_size=20, unique=True))
def test_index_matches_a_set(batches: list[list[int]], preloaded: list[int]) -> None:
    index = _SampleIndex(lambda device, task: np.array(preloaded, np.uint64))
    truth = set(preloaded)
    index.seen("d", "t", np.zeros(0, np.uint64))  # load the stored ids
    for batch in batches:
        fresh = [x for x in batch if x not in truth]
        if not fresh:
            continue
        ids = np.array(fresh, np.uint64)
        assert not index.any_seen("d", "t", ids)
        index.extend("d", "t", ids)
        truth.update(fresh)
        probe = np.array(sorted(truth)[:50] + [x + 1 for x in fresh if x + 1 < 2**64], np.uint64)
        assert index.seen("d", "t", probe).tolist() == [int(x) in truth for x in probe]


def test_many_small_batches_cross_the_merge_threshold() -> None:
    index = _SampleIndex(lambda device, task: np.zeros(0, np.uint64))
    index.seen("d", "t", np.zeros(0, np.uint64))
    rng = np.random.default_rng(0)
    order = rng.permutation(20_000).astype(np.uint64)
    for chunk in np.array_split(order, 200):  # out of order: the insert path, and several merges
        assert not index.any_seen("d", "t", chunk)
        index.extend("d", "t", chunk)
    assert index.seen("d", "t", np.arange(20_001, dtype=np.uint64)).tolist() == [True] * 20_000 + [False]
