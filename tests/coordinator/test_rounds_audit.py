"""coordinator.service + rounds + audit on the embedded chain: intake checks, closing, anchoring, audit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.audit import audit_model
from coordinator.chain import ChainConfig, connect
from coordinator.contracts import CrowdContracts
from coordinator.db import make_sessions
from coordinator.service import Coordinator
from coordinator.store import LocalContentStore
from crowdfl.backmodel import initial_back_weights
from crowdfl.envelope import parse
from crowdfl.identity import Identity
from crowdfl.merkle import verify_proof
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, sha256_hex
from tests.coordinator.world import update_env
from tests.helpers import make_spec


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    spec0 = make_spec(rounds=2)
    initial = ModelWeights(spec0.task_id, 0, tuple(initial_back_weights(spec0, 1)))
    front = b"front-model-bytes"
    from dataclasses import replace

    spec = replace(spec0, initial_model_hash=sha256_hex(CODEC.encode(initial)), front_model_hash=sha256_hex(front))
    contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    store = LocalContentStore(tmp_path / "store")
    published: list[tuple[str, bytes, bool]] = []
    coord = Coordinator(Identity.generate(), make_sessions(f"sqlite:///{tmp_path / 'c.sqlite'}"), store, contracts,
                        lambda t, p, r: published.append((t, p, r)), evaluate=lambda w: 0.5)
    edge = Identity.generate()
    devices = [Identity.generate() for _ in range(4)]
    coord.register([(edge.public, "edge", None, None)] + [(d.public, "device", edge.node_id, None) for d in devices])
    coord.publish_task(spec, front, initial)
    return coord, spec, edge, devices, store, contracts, published




def test_intake_accepts_dedupes_and_rejects_with_reasons(world) -> None:  # type: ignore[no-untyped-def]
    coord, spec, edge, devices, store, contracts, published = world
    rs = coord.open_round(spec.task_id, 1)
    env = update_env(edge, spec, 1, devices[0].node_id, rs.global_model_hash, 0.1, 1)
    assert coord.receive_update(env).status == "received"
    assert coord.receive_update(env).status == "duplicate"
    other = update_env(edge, spec, 1, devices[0].node_id, rs.global_model_hash, 0.2, 2)
    r = coord.receive_update(other)
    assert (r.http_status, r.detail.split(":")[0]) == (409, "conflict")
    stranger_edge = Identity.generate()
    assert coord.receive_update(update_env(stranger_edge, spec, 1, devices[1].node_id, rs.global_model_hash, 0.1, 3)).http_status == 403
    wrong_base = coord.receive_update(update_env(edge, spec, 1, devices[1].node_id, "00" * 32, 0.1, 4))
    assert (wrong_base.http_status, wrong_base.detail.split(":")[0]) == (422, "wrong_base")
    bad = bytearray(update_env(edge, spec, 1, devices[2].node_id, rs.global_model_hash, 0.1, 5))
    bad[-1] ^= 1
    assert coord.receive_update(bytes(bad)).http_status == 403
    assert coord.receive_update(b"\x00" * 10).http_status == 400
    # the round's retained start message went out signed
    assert any(t.endswith("/round") and retain for t, _, retain in published)


def test_rounds_close_anchor_and_audit(world) -> None:  # type: ignore[no-untyped-def]
    coord, spec, edge, devices, store, contracts, _ = world
    seq = 10
    accepted: list[tuple[tuple[np.ndarray, ...], int]] = []  # round 2's valid updates: (weights, samples)
    for r in (1, 2):
        rs = coord.open_round(spec.task_id, r)
        for i, d in enumerate(devices):
            seq += 1
            n = 10 * (i + 1)  # unequal sample counts, so a plain mean would differ from FedAvg
            if r == 2 and d is devices[-1]:  # an invalid update of a selected customer is kept, anchored and rejected
                assert coord.receive_update(update_env(edge, spec, r, d.node_id, "00" * 32, 0.05, seq, n)).detail.startswith("wrong_base")
                continue
            env = update_env(edge, spec, r, d.node_id, rs.global_model_hash, 0.05, seq, n)
            assert coord.receive_update(env).status == "received"
            if r == 2:
                accepted.append((CODEC.decode(parse(env).body, ModelUpdate).weights, n))
        if r == 2:  # an update for a customer the edge does not serve is refused and not recorded
            assert coord.receive_update(update_env(edge, spec, 2, Identity.generate().node_id, rs.global_model_hash, 0.05, 99)).http_status == 422
        summary = coord.close_round(spec.task_id, r)
        anchored = coord.anchor_pending()
        assert [a.round for a in anchored] == [r]
        assert anchored[0].gas_used > 0
    assert (summary.accepted, summary.rejected) == (3, 1)
    # a customer's Merkle proof checks against the root anchored on chain
    p = coord.proof(spec.task_id, 2, devices[0].node_id)
    assert p is not None
    root = bytes.fromhex(p["merkle_root"])
    assert verify_proof(bytes.fromhex(p["update_hash"]), [bytes.fromhex(x) for x in p["proof"]], root)
    assert contracts.verify_inclusion(bytes.fromhex(spec.task_id), 2, bytes.fromhex(p["update_hash"]), [bytes.fromhex(x) for x in p["proof"]])
    # FedAvg over the accepted updates, weighted by samples, is what was published
    model = CODEC.decode(store.get(summary.model_hash), ModelWeights)
    assert model.round == 2 and spec.aggregation == "fedavg" and len(accepted) == 3
    total = sum(n for _, n in accepted)
    for layer, published_layer in enumerate(model.weights):
        expected = sum(w[layer].astype(np.float64) * n for w, n in accepted) / total
        plain_mean = sum(w[layer].astype(np.float64) for w, _ in accepted) / len(accepted)
        np.testing.assert_allclose(published_layer, expected, rtol=0, atol=1e-6)
        assert not np.allclose(published_layer, plain_mean, rtol=0, atol=1e-6)

    report = audit_model(contracts, store, summary.model_hash)
    assert report.ok, report.lines()
    assert [len(r.updates) for r in report.rounds] == [4, 4]
    assert any("wrong_base" in u.reason for u in report.rounds[1].updates)

    # closing again or anchoring again changes nothing
    assert coord.close_round(spec.task_id, 2).model_hash == summary.model_hash
    assert coord.anchor_pending() == []


def test_audit_detects_a_tampered_store(world) -> None:  # type: ignore[no-untyped-def]
    coord, spec, edge, devices, store, contracts, _ = world
    rs = coord.open_round(spec.task_id, 1)
    for i, d in enumerate(devices):
        coord.receive_update(update_env(edge, spec, 1, d.node_id, rs.global_model_hash, 0.05, 50 + i))
    summary = coord.close_round(spec.task_id, 1)
    coord.anchor_pending()
    assert audit_model(contracts, store, summary.model_hash).ok
    manifest = coord.rounds(spec.task_id)[0]
    # replace one accepted update's bytes: the store entry no longer matches its address
    upd = coord.proof(spec.task_id, 1, devices[1].node_id)["update_hash"]  # type: ignore[index]
    path = store.path(upd)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    report = audit_model(contracts, store, summary.model_hash)
    assert not report.ok
    assert any("altered" in p for r in report.rounds for p in r.problems)
    assert manifest["status"] == "anchored"


def test_audit_detects_a_model_that_is_not_the_aggregate(world) -> None:  # type: ignore[no-untyped-def]
    coord, spec, edge, devices, store, contracts, _ = world
    rs = coord.open_round(spec.task_id, 1)
    for i, d in enumerate(devices):
        coord.receive_update(update_env(edge, spec, 1, d.node_id, rs.global_model_hash, 0.05, 70 + i))
    summary = coord.close_round(spec.task_id, 1)
    coord.anchor_pending()
    # a forged "global model" for the same task and round, put into the store by someone
    forged = ModelWeights(spec.task_id, 1, tuple(initial_back_weights(spec, 2)))
    forged_hash = store.put(CODEC.encode(forged))
    report = audit_model(contracts, store, forged_hash)
    assert not report.ok and any("not this one" in p for p in report.problems)
    assert audit_model(contracts, store, summary.model_hash).ok


def test_multi_krum_rounds_with_too_few_updates_fall_back_to_the_median() -> None:
    from coordinator.rounds import build_round, effective_rule, rule_params
    from crowdfl.envelope import parse

    spec = make_spec(aggregation="multi_krum")
    assert effective_rule("multi_krum", 2) == "coordinate_median"
    assert effective_rule("multi_krum", 3) == "multi_krum"
    assert effective_rule("fedavg", 1) == "fedavg"
    edge = Identity.generate()
    base = "00" * 32
    ups = []
    for i in range(2):
        env = update_env(edge, spec, 1, f"{i:064x}", base, 0.1, i + 1)
        ups.append((sha256_hex(env), CODEC.decode(parse(env).body, ModelUpdate)))
    rule = effective_rule(spec.aggregation, len(ups))
    built = build_round(spec, 1, base, ups, [], rule, rule_params(rule, 2, 0.2, 0.1))
    assert built.manifest.rule == "coordinate_median" and len(built.manifest.accepted) == 2


def test_an_edge_cannot_take_another_edges_customers_slot_or_close_the_round(world) -> None:  # type: ignore[no-untyped-def]
    coord, spec, edge, devices, store, contracts, _ = world
    rogue = Identity.generate()
    coord.register([(rogue.public, "edge", None, None)])
    rs = coord.open_round(spec.task_id, 1)
    victim = devices[0].node_id
    junk = coord.receive_update(update_env(rogue, spec, 1, victim, rs.global_model_hash, 5.0, 1))
    assert (junk.http_status, junk.detail.split(":")[0]) == (403, "wrong_edge")
    for i in range(20):  # made-up customers do not count towards the round
        assert coord.receive_update(update_env(rogue, spec, 1, Identity.generate().node_id, rs.global_model_hash, 0.1, 10 + i)).http_status == 422
    assert coord.round_progress(spec.task_id, 1) == (0, 4)
    assert not store.has(junk.update_hash)
    # the customer's own edge still gets its slot
    assert coord.receive_update(update_env(edge, spec, 1, victim, rs.global_model_hash, 0.05, 2)).status == "received"


def test_audit_detects_a_coordinator_that_reuses_an_old_signed_update(world) -> None:  # type: ignore[no-untyped-def]
    from coordinator.rounds import build_round
    from crowdfl.envelope import parse
    from crowdfl.merkle import merkle_root

    coord, spec, edge, devices, store, contracts, _ = world
    rs = coord.open_round(spec.task_id, 1)
    for i, d in enumerate(devices):
        coord.receive_update(update_env(edge, spec, 1, d.node_id, rs.global_model_hash, 0.05, 90 + i))
    first = coord.close_round(spec.task_id, 1)
    coord.anchor_pending()
    # a dishonest coordinator publishes "round 2" made of round 1's signed updates
    hashes = [u["update_hash"] for u in coord.round_detail(spec.task_id, 1)["updates"]]  # type: ignore[index]
    olds = [(h, CODEC.decode(parse(store.get(h)).body, ModelUpdate)) for h in hashes]
    forged = build_round(spec, 2, first.model_hash, olds, [], "fedavg", {}, accuracy=0.9)
    model_hash, manifest_hash = store.put(forged.model_bytes), store.put(forged.manifest_bytes)
    root = merkle_root([bytes.fromhex(h) for h in forged.manifest.updates])
    contracts.anchor_round(bytes.fromhex(spec.task_id), 2, root, bytes.fromhex(model_hash), bytes.fromhex(manifest_hash), 4, 0)
    report = audit_model(contracts, store, model_hash)
    problems = [p for r in report.rounds for p in r.problems]
    assert not report.ok
    assert any("already anchored in an earlier round" in p for p in problems), problems
    assert any("not this round" in p for p in problems), problems


def test_prometheus_metrics_follow_intake_rounds_and_anchoring(world) -> None:  # type: ignore[no-untyped-def]
    from coordinator.api import create_app

    coord, spec, edge, devices, store, contracts, _ = world
    client = create_app(coord).test_client()
    rs = coord.open_round(spec.task_id, 1)
    for i, d in enumerate(devices):
        r = client.post("/api/v1/updates", data=update_env(edge, spec, 1, d.node_id, rs.global_model_hash, 0.05, 300 + i),
                        content_type="application/octet-stream")
        assert r.status_code == 200
    client.post("/api/v1/updates", data=b"junk", content_type="application/octet-stream")
    coord.close_round(spec.task_id, 1)
    text = client.get("/metrics").get_data(as_text=True)
    # prometheus-client writes labels in name order and values as floats ("4.0")
    assert 'crowdfl_coordinator_intake_total{reason="",status="received"} 4' in text
    assert 'crowdfl_coordinator_intake_total{reason="truncated",status="rejected"} 1' in text
    assert "crowdfl_coordinator_anchor_queue 1" in text and 'crowdfl_coordinator_rounds{status="closed"} 1' in text
    coord.anchor_pending()
    text = client.get("/metrics").get_data(as_text=True)
    assert "crowdfl_coordinator_anchor_queue 0" in text and 'crowdfl_coordinator_updates{status="accepted"} 4' in text


def test_intake_refuses_updates_the_devices_receipt_does_not_vouch_for(world) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import update_receipt

    coord, spec, edge, devices, store, contracts, _ = world
    rs = coord.open_round(spec.task_id, 1)
    base = rs.global_model_hash

    def send(device: Identity, seq: int, n: int = 10, **kw: object) -> object:
        receipt = update_receipt(device, spec.task_id, 1, str(kw.pop("edge_id", edge.node_id)), int(kw.pop("claimed", n)), epsilon=spec.epsilon)
        return coord.receive_update(update_env(edge, spec, 1, device, base, 0.05, seq, n=n, receipt=receipt))

    # no receipt at all
    assert coord.receive_update(update_env(edge, spec, 1, devices[0].node_id, base, 0.05, 1, receipt=b"")).detail.startswith("bad_receipt")
    # a receipt signed by another device than the update's customer
    forged = update_receipt(devices[1], spec.task_id, 1, edge.node_id, 10, epsilon=spec.epsilon)
    got = coord.receive_update(update_env(edge, spec, 1, devices[0].node_id, base, 0.05, 2, receipt=forged))
    assert got.detail.startswith("receipt_mismatch")
    # the edge claims more samples than the device released
    assert send(devices[0], 3, n=40, claimed=10).detail.startswith("receipt_samples")  # type: ignore[attr-defined]
    # a device receipt claiming more samples than one round can release (64 a batch)
    assert send(devices[0], 4, n=200, claimed=200).detail.startswith("receipt_samples")  # type: ignore[attr-defined]
    # a receipt naming another edge
    assert send(devices[0], 5, edge_id=Identity.generate().node_id).detail.startswith("receipt_mismatch")  # type: ignore[attr-defined]
    # and the honest one goes through
    assert send(devices[0], 6).status == "received"  # type: ignore[attr-defined]


def test_intake_refuses_a_device_the_chain_binds_to_another_edge(world) -> None:  # type: ignore[no-untyped-def]
    coord, spec, edge, devices, store, contracts, _ = world
    other = Identity.generate()
    coord.register([(other.public, "edge", None, None)])
    # the chain re-binds the device to the other edge behind the coordinator's database
    contracts.bind_edges([(bytes.fromhex(devices[0].node_id), bytes.fromhex(other.node_id))])
    rs = coord.open_round(spec.task_id, 1)
    got = coord.receive_update(update_env(edge, spec, 1, devices[0], rs.global_model_hash, 0.05, 1))
    assert got.http_status == 403 and got.detail.startswith("wrong_edge_on_chain")
    assert coord.receive_update(update_env(edge, spec, 1, devices[1], rs.global_model_hash, 0.05, 2)).status == "received"


def test_intake_reads_a_devices_chain_binding_once_until_the_registry_changes(world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One eth_call per device, not per update: the binding read is kept until this coordinator
    itself changes the Registry (only its key can), and a binding to another edge is never kept."""
    coord, spec, edge, devices, store, contracts, _ = world
    calls: list[bytes] = []
    real = contracts.edge_of
    monkeypatch.setattr(contracts, "edge_of", lambda device: calls.append(device) or real(device))
    assert set(coord.registry._bound_on_chain) == {d.node_id for d in devices}  # it bound them itself
    coord.registry._bound_on_chain.clear()  # as a restarted coordinator: nothing read yet
    rs = coord.open_round(spec.task_id, 1)
    assert coord.receive_update(update_env(edge, spec, 1, devices[0], rs.global_model_hash, 0.05, 1)).status == "received"
    assert coord.registry._bound_on_chain == {devices[0].node_id: edge.node_id}
    coord.receive_update(update_env(edge, spec, 1, devices[1], rs.global_model_hash, 0.05, 2))
    assert len(calls) == 2 and set(coord.registry._bound_on_chain) == {devices[0].node_id, devices[1].node_id}
    other = Identity.generate()
    coord.register([(other.public, "edge", None, None)])  # the Registry changed: read again
    assert coord.registry._bound_on_chain == {}
    newcomer = Identity.generate()
    coord.register([(newcomer.public, "device", edge.node_id, None)])  # bound by this coordinator: known at once
    assert coord.registry._bound_on_chain == {newcomer.node_id: edge.node_id}
    contracts.bind_edges([(bytes.fromhex(devices[2].node_id), bytes.fromhex(other.node_id))])
    got = coord.receive_update(update_env(edge, spec, 1, devices[2], rs.global_model_hash, 0.05, 3))
    assert got.detail.startswith("wrong_edge_on_chain") and devices[2].node_id not in coord.registry._bound_on_chain
