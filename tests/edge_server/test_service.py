"""edge_server.service across restarts: lost training jobs come back, each update is submitted once.

A "crash" here is dropping an EdgeServer object without stop(): nothing in memory survives, only
the database does (the kill -9 test with real processes is test_crash_restart.py).
"""

from __future__ import annotations

import time

from crowdfl.envelope import parse
from crowdfl.messages import CODEC, Ack, ModelUpdate
from edge_server.service import EdgeServer
from edge_server.store import EdgeStore
from tests.edge_server.fakes import FakeLink, RecordingCoordinator, World, make_world


def _server(world: World, url: str, coord: RecordingCoordinator, **kw: object) -> EdgeServer:
    store = EdgeStore(url)
    store.register_devices([(d.node_id, d.public.enc_key.hex()) for d in world.devices])
    return EdgeServer(world.edge, world.coordinator.public, store, FakeLink(), coord, world.fetch, **kw)  # type: ignore[arg-type]


def _feed(server: EdgeServer, msgs: list) -> None:  # type: ignore[type-arg]
    for m in msgs:
        server.link.inbox.put(m)
    while server.drain_once():
        pass


def _run_queue(server: EdgeServer) -> int:
    n = 0
    while not server.jobs.empty():
        server._run_job(server.jobs.get_nowait())
        n += 1
    return n


def test_restart_reschedules_stored_batches_and_submits_each_update_once(edge_db_url: str) -> None:
    world = make_world(devices=3)
    d1, d2, d3 = world.devices
    coord = RecordingCoordinator(available=False)

    first = _server(world, edge_db_url, coord)
    first.ingestor.refresh_devices()
    _feed(first, world.control(selected=(d1, d2)) + [world.batch(d, i + 1, [10 * i + 1, 10 * i + 2]) for i, d in enumerate(world.devices)])
    assert first.queue_depth == 2  # d3 is not selected this round: stored, not trained
    acked = {CODEC.decode(parse(p).body, Ack).device for _, p in first.link.published}
    assert acked == {d.node_id for d in world.devices}  # acknowledged only after the commit
    first.store.close()  # crash: the in-memory queue is gone, nothing was trained

    second = _server(world, edge_db_url, coord)
    second.restore()  # task and round come from the database, before any retained MQTT message
    assert second.tasks.keys() == {world.spec.task_id} and second.rounds[world.spec.task_id].round == 1
    assert second.reconcile() == 2 and second.stats.rescheduled == 2
    assert second.reconcile() == 0  # already queued: not twice
    assert _run_queue(second) == 2
    second.submit_pending()  # the coordinator is down: saved, not submitted
    assert second.stats.trained == 2 and len(second.store.unsubmitted_updates()) == 2 and not coord.posts
    second.store.close()  # crash with two updates saved but never submitted

    coord.available = True
    third = _server(world, edge_db_url, coord)
    third.restore()
    assert third.reconcile() == 0  # trained already: no second, different update
    third.submit_pending()
    third.submit_pending()
    assert len(coord.posts) == 2 and third.stats.submitted == 2
    assert sorted(k[2] for k in coord.by_key) == sorted([d1.node_id, d2.node_id])
    assert all(len(v) == 1 for v in coord.by_key.values())
    for env in coord.posts:
        sealed = parse(env)
        upd = CODEC.decode(sealed.body, ModelUpdate)
        assert sealed.sender_id == world.edge.node_id and upd.num_samples == 2 and upd.round == 1
    assert all(sub for *_, sub in third.store.updates())
    third.store.close()


def test_resubmission_after_a_crash_between_post_and_mark_is_a_duplicate(edge_db_url: str) -> None:
    """The one window at-least-once cannot close: the coordinator got it, the edge did not record that."""
    world = make_world(devices=1)
    coord = RecordingCoordinator()
    edge = _server(world, edge_db_url, coord)
    edge.ingestor.refresh_devices()
    _feed(edge, world.control(selected=world.devices) + [world.batch(world.devices[0], 1, [1, 2, 3])])
    _run_queue(edge)
    ((_, env),) = edge.store.unsubmitted_updates()
    assert coord.submit(env).status == "received"  # POST done, then kill -9 before mark_submitted
    edge.store.close()

    again = _server(world, edge_db_url, coord)
    again.restore()
    again.submit_pending()
    assert len(coord.posts) == 2 and again.stats.submit_duplicates == 1 and again.stats.submitted == 1
    assert len(coord.by_key) == 1 and all(len(v) == 1 for v in coord.by_key.values())  # recorded once
    assert not again.store.unsubmitted_updates()
    again.store.close()


def test_failed_training_is_retried_with_back_off(edge_db_url: str) -> None:
    world = make_world(devices=1)
    coord = RecordingCoordinator()
    calls: list[str] = []

    def flaky_fetch(address: str) -> bytes:
        calls.append(address)
        if len(calls) == 1:
            raise OSError("coordinator unreachable")
        return world.fetch(address)

    edge = _server(world, edge_db_url, coord, resubmit_every_s=0.2)
    edge.fetch_artifact = flaky_fetch
    edge.ingestor.refresh_devices()
    _feed(edge, world.control(selected=world.devices) + [world.batch(world.devices[0], 1, [5, 6])])
    assert _run_queue(edge) == 1 and edge.stats.train_failures == 1 and edge.stats.trained == 0
    assert edge.reconcile() == 0  # backing off
    time.sleep(0.25)
    assert edge.reconcile() == 1 and _run_queue(edge) == 1 and edge.stats.trained == 1
    edge.submit_pending()
    assert len(coord.posts) == 1
    edge.store.close()


def test_control_messages_from_others_are_ignored(edge_db_url: str) -> None:
    world = make_world(devices=1)
    impostor = make_world(devices=1, edge=world.edge)  # same edge, another "coordinator" key
    edge = _server(world, edge_db_url, RecordingCoordinator())
    _feed(edge, impostor.control(selected=world.devices))
    assert not edge.tasks and not edge.rounds and not edge.store.task_specs()
    edge.store.close()


def test_receipt_signature_is_checked_once_when_the_update_is_built(edge_db_url: str) -> None:
    """Ingest decodes a batch's receipt and binds it to the envelope, but checks its signature only
    when building the update (one Ed25519 verify per device and round): a batch whose receipt does
    not verify is stored (the channel tag shows the device sent it) and never becomes an update."""
    import dataclasses

    from crowdfl.envelope import seal
    from crowdfl.messages import FeatureBatch
    from crowdfl.mqtt import Incoming

    world = make_world(devices=2)
    coord = RecordingCoordinator()
    edge = _server(world, edge_db_url, coord)
    edge.ingestor.refresh_devices()
    good, bad = world.devices
    forged_msg = world.batch(bad, 1, [7, 8])
    batch = CODEC.decode(
        edge.ingestor._channel(bad.public).open(parse(forged_msg.payload), forged_msg.topic.encode()), FeatureBatch
    )
    receipt = bytearray(batch.receipt)
    receipt[-1] ^= 1  # the receipt's signature no longer verifies; every field still decodes
    forged = seal(CODEC.encode(dataclasses.replace(batch, receipt=bytes(receipt))), bad, 2, world.edge.public, context=forged_msg.topic.encode())
    _feed(edge, world.control(selected=world.devices) + [world.batch(good, 1, [1, 2]), Incoming(forged_msg.topic, forged, False)])
    assert edge.ingestor.stats.accepted == 2 and not edge.ingestor.stats.rejected
    assert _run_queue(edge) == 2
    assert edge.stats.trained == 1 and edge.stats.train_failures == 1  # the forged receipt's round is refused
    edge.submit_pending()
    assert [CODEC.decode(parse(p).body, ModelUpdate).customer for p in coord.posts] == [good.node_id]
    edge.store.close()
