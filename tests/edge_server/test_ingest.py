"""edge_server.ingest: every bad batch is rejected with its reason; good ones persist exactly once."""

from __future__ import annotations

from dataclasses import replace
import numpy as np
import pytest

from crowdfl.envelope import seal
from crowdfl.identity import Identity, short_id
from crowdfl.messages import CODEC, FeatureBatch
from crowdfl.mqtt import Incoming, feature_topic
from edge_server.ingest import Ingestor
from edge_server.store import EdgeStore
from tests.helpers import make_spec, with_receipt

SPEC = make_spec()


@pytest.fixture
def setup(edge_db_url: str):  # type: ignore[no-untyped-def]
    edge, device = Identity.generate(), Identity.generate()
    store = EdgeStore(edge_db_url)
    store.register_devices([(device.node_id, device.public.enc_key.hex())])
    ing = Ingestor(edge, store, {SPEC.task_id: SPEC}.get)
    ing.refresh_devices()
    yield edge, device, store, ing
    store.close()


def batch(ids: list[int], **kw: object) -> FeatureBatch:
    n = len(ids)
    b = FeatureBatch(SPEC.task_id, 1, np.array(ids, np.uint64), np.full((n, 8), 0.1, np.float32), np.zeros(n, np.int8), SPEC.epsilon, SPEC.clip_l1)
    return replace(b, **kw)  # type: ignore[arg-type]


def msg(edge: Identity, device: Identity, b: FeatureBatch, seq: int, encrypt: bool = True, topic: str | None = None) -> Incoming:
    if not b.receipt and len(b.sample_ids) and b.epsilon > 0:
        b = with_receipt(b, device, edge.node_id)
    sealed_on = feature_topic(short_id(edge.node_id), short_id(device.node_id))
    env = seal(CODEC.encode(b), device, seq, edge.public if encrypt else None, context=sealed_on.encode())
    return Incoming(topic or sealed_on, env, False)


def test_good_batch_is_persisted_and_acknowledged(setup) -> None:  # type: ignore[no-untyped-def]
    edge, device, store, ing = setup
    out = ing.drain([msg(edge, device, batch([1, 2, 3]), 1)])
    assert out.acks == {device.node_id: [1]} and not out.rejections
    data = store.customer_data(device.node_id, SPEC.task_id, 8)
    assert data.sample_ids.tolist() == [1, 2, 3] and data.features.shape == (3, 8)


def test_resend_is_acknowledged_but_stored_once(setup) -> None:  # type: ignore[no-untyped-def]
    edge, device, store, ing = setup
    m = msg(edge, device, batch([1, 2]), 5)
    ing.drain([m])
    out = ing.drain([m, m])
    assert out.acks == {device.node_id: [5, 5]} and not out.accepted and not out.rejections
    assert len(store.customer_data(device.node_id, SPEC.task_id, 8).sample_ids) == 2
    assert ing.stats.duplicates == 2


def test_duplicate_within_one_drain(setup) -> None:  # type: ignore[no-untyped-def]
    edge, device, store, ing = setup
    m = msg(edge, device, batch([1, 2]), 5)
    out = ing.drain([m, m])
    assert len(out.accepted) == 1 and out.acks[device.node_id] == [5, 5]


def _reason(setup, m: Incoming) -> str:  # type: ignore[no-untyped-def]
    _, device, store, ing = setup
    before = store.customer_data(device.node_id, SPEC.task_id, 8).sample_ids.tolist()
    out = ing.drain([m])
    assert not out.accepted and len(out.rejections) == 1
    assert store.customer_data(device.node_id, SPEC.task_id, 8).sample_ids.tolist() == before
    return out.rejections[0][0]


def test_each_bad_batch_has_its_reason(setup) -> None:  # type: ignore[no-untyped-def]
    edge, device, store, ing = setup
    stranger = Identity.generate()
    other_edge = Identity.generate()
    f = np.full((2, 8), 0.1, np.float32)
    nan = f.copy()
    nan[0, 0] = np.nan
    cases = {
        "unknown_sender": msg(edge, stranger, batch([1, 2]), 1),
        "bad_topic": msg(other_edge, device, batch([1, 2]), 1),
        "topic_mismatch": msg(edge, device, batch([1, 2]), 1, topic=feature_topic(short_id(edge.node_id), short_id(stranger.node_id))),
        "not_encrypted": msg(edge, device, batch([1, 2]), 1, encrypt=False),
        "non_finite": msg(edge, device, batch([1, 2], features=nan), 2),
        "out_of_bound": msg(edge, device, batch([1, 2], features=f * 1000), 3),
        "bad_shape": msg(edge, device, batch([1, 2], features=np.zeros((2, 5), np.float32)), 4),
        "privacy_mismatch": msg(edge, device, batch([1, 2], epsilon=9.0), 5),
        "bad_label": msg(edge, device, batch([1, 2], labels=np.array([0, 7], np.int8)), 6),
        "bad_ids": msg(edge, device, batch([1, 1]), 7),
        "bad_round": msg(edge, device, batch([1, 2], round=99), 8),
        "unknown_task": msg(edge, device, batch([1, 2], task_id="cd" * 32), 9),
    }
    for reason, m in cases.items():
        assert _reason(setup, m) == reason, reason
    tampered = bytearray(msg(edge, device, batch([1, 2]), 10).payload)
    tampered[-70] ^= 1
    assert _reason(setup, Incoming(cases["non_finite"].topic, bytes(tampered), False)) == "decrypt_failed"
    assert _reason(setup, Incoming(cases["non_finite"].topic, b"garbage", False)) == "truncated"
    assert store.rejection_counts()["bad_label"] == 1


def test_seq_reuse_and_sample_reuse(setup) -> None:  # type: ignore[no-untyped-def]
    edge, device, store, ing = setup
    ing.drain([msg(edge, device, batch([1, 2]), 1)])
    assert _reason(setup, msg(edge, device, batch([3, 4]), 1)) == "seq_reuse"
    assert _reason(setup, msg(edge, device, batch([2, 5]), 2)) == "sample_reuse"


def test_bad_messages_do_not_stop_good_ones(setup) -> None:  # type: ignore[no-untyped-def]
    edge, device, store, ing = setup
    out = ing.drain([
        Incoming("crowdfl/v1/feat/x/y", b"junk", False),
        msg(edge, device, batch([1, 2]), 1),
        msg(edge, device, batch([3], features=np.full((1, 8), np.inf, np.float32)), 2),
        msg(edge, device, batch([4]), 3),
    ])
    assert [a.seq for a in out.accepted] == [1, 3]
    assert store.customer_data(device.node_id, SPEC.task_id, 8).sample_ids.tolist() == [1, 2, 4]


def test_seq_beyond_the_database_column_is_a_rejection(setup) -> None:  # type: ignore[no-untyped-def]
    """A seq of 2^63 or more would fail the drain's whole transaction; it must cost only itself."""
    edge, device, store, ing = setup
    top = msg(edge, device, batch([2]), 2**63 - 1)
    out = ing.drain([msg(edge, device, batch([1]), 2**64 - 1), top])
    assert [r[0] for r in out.rejections] == ["bad_seq"] and [a.seq for a in out.accepted] == [2**63 - 1]
    assert ing.drain([top]).acks == {device.node_id: [2**63 - 1]}  # the resend is a duplicate


def test_sample_reuse_is_caught_after_a_restart_and_within_a_drain(setup, edge_db_url: str) -> None:  # type: ignore[no-untyped-def]
    edge, device, store, ing = setup
    ing.drain([msg(edge, device, batch([10, 11]), 1)])
    fresh = EdgeStore(edge_db_url)  # a restarted edge: the index is rebuilt from the stored batches
    try:
        again = Ingestor(edge, fresh, {SPEC.task_id: SPEC}.get)
        again.refresh_devices()
        out = again.drain([msg(edge, device, batch([11, 12]), 2), msg(edge, device, batch([20]), 3), msg(edge, device, batch([20, 21]), 4)])
        assert [r[0] for r in out.rejections] == ["sample_reuse", "sample_reuse"] and [a.seq for a in out.accepted] == [3]
        assert fresh.customer_data(device.node_id, SPEC.task_id, 8).sample_ids.tolist() == [10, 11, 20]
    finally:
        fresh.close()


def test_a_replayed_envelope_is_taken_once_after_a_restart(setup, edge_db_url: str) -> None:  # type: ignore[no-untyped-def]
    """The replay guard of the feature path is the edge's database (crowdfl.envelope keeps none):
    a captured envelope played again to a restarted edge is acknowledged, not stored twice."""
    edge, device, store, ing = setup
    captured = msg(edge, device, batch([1, 2]), 9)
    ing.drain([captured])
    fresh = EdgeStore(edge_db_url)
    try:
        again = Ingestor(edge, fresh, {SPEC.task_id: SPEC}.get)
        again.refresh_devices()
        out = again.drain([captured])
        assert out.acks == {device.node_id: [9]} and not out.accepted and not out.rejections
        assert again.stats.duplicates == 1
        assert fresh.customer_data(device.node_id, SPEC.task_id, 8).sample_ids.tolist() == [1, 2]
    finally:
        fresh.close()


def test_rejection_text_is_stored_safely(setup) -> None:  # type: ignore[no-untyped-def]
    """Topic text comes from outside: NUL bytes (PostgreSQL refuses them) and length are bounded."""
    _, _, store, ing = setup
    out = ing.drain([Incoming("crowdfl/v1/feat/\x00" + "x" * 500, b"junk", False)])
    assert out.rejections and store.rejection_counts() == {"bad_topic": 1}


def test_a_worker_pool_gives_the_same_outcomes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Verify/decrypt in worker processes: same accepted, duplicates and reasons as inline, same order."""
    edge, device = Identity.generate(), Identity.generate()
    good = [msg(edge, device, batch([i]), i) for i in range(1, 30)]
    tampered = bytearray(msg(edge, device, batch([99]), 99).payload)
    tampered[-5] ^= 1
    mixed = [*good[:10], good[3], Incoming(good[0].topic, bytes(tampered), False), msg(edge, device, batch([5, 100]), 100), *good[10:]]
    outcomes = []
    for workers in (0, 2):
        store = EdgeStore(f"sqlite:///{tmp_path / f'edge-{workers}.sqlite'}")
        store.register_devices([(device.node_id, device.public.enc_key.hex())])
        ing = Ingestor(edge, store, {SPEC.task_id: SPEC}.get, workers=workers)
        ing.refresh_devices()
        try:
            out = ing.drain(mixed)
            outcomes.append(([a.seq for a in out.accepted], out.acks, [r[0] for r in out.rejections], ing.stats.duplicates))
        finally:
            ing.close()
            store.close()
    assert outcomes[0] == outcomes[1]
    accepted, _, reasons, dups = outcomes[0]
    assert accepted == list(range(1, 30)) and reasons == ["decrypt_failed", "sample_reuse"] and dups == 1
