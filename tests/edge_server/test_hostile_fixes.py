"""Regression tests for issue 15's edge defects: unknown senders, coordinator refusals that are
only temporary, and refused control messages that showed in no metric."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from crowdfl.identity import Identity
from crowdfl.mqtt import Incoming
from edge_server.ingest import Ingestor
from edge_server.store import EdgeStore
from edge_server.submit import CoordinatorClient
from tests.edge_server.test_ingest import SPEC, batch, msg


@pytest.fixture
def store(edge_db_url: str) -> Iterator[EdgeStore]:
    s = EdgeStore(edge_db_url)
    yield s
    s.close()


def test_unknown_senders_never_reload_the_device_table(store: EdgeStore) -> None:
    """Before: every message from an unregistered key reloaded every device (165 ms at 3,000)."""
    edge = Identity.generate()
    store.register_devices([(f"{i:064x}", "00" * 32) for i in range(3000)])
    ing = Ingestor(edge, store, {SPEC.task_id: SPEC}.get)
    ing.refresh_devices()
    reloads = 0
    full_load = store.active_devices

    def counting() -> dict[str, str]:
        nonlocal reloads
        reloads += 1
        return full_load()

    store.active_devices = counting  # type: ignore[method-assign]
    strangers = [Identity.generate() for _ in range(20)]
    flood = [msg(edge, strangers[i % 20], batch([i + 1]), i + 1) for i in range(200)]
    out = ing.drain(flood)
    assert [r[0] for r in out.rejections] == ["unknown_sender"] * 200 and not out.accepted
    assert reloads == 0
    # a device registered after the edge loaded its table is found by its key, without a reload
    late = Identity.generate()
    store.register_devices([(late.node_id, late.public.enc_key.hex())])
    out = ing.drain([msg(edge, late, batch([1, 2]), 1)])
    assert out.acks == {late.node_id: [1]} and reloads == 0


def test_an_unknown_sender_is_looked_up_again_once_its_negative_entry_expires(store: EdgeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_server.ingest as ingest

    edge, dev = Identity.generate(), Identity.generate()
    ing = Ingestor(edge, store, {SPEC.task_id: SPEC}.get)
    assert ing.drain([msg(edge, dev, batch([1]), 1)]).rejections[0][0] == "unknown_sender"
    store.register_devices([(dev.node_id, dev.public.enc_key.hex())])
    # inside the negative entry's lifetime the device is still unknown (no query per message) ...
    assert ing.drain([msg(edge, dev, batch([1]), 1)]).rejections[0][0] == "unknown_sender"
    # ... and once it has expired the device's next resend is accepted
    monkeypatch.setattr(ingest, "UNKNOWN_SENDER_TTL_S", 0.0)
    assert ing.drain([msg(edge, dev, batch([1]), 1)]).acks == {dev.node_id: [1]}


class _Script(BaseHTTPRequestHandler):
    answers: list[tuple[int, dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        code, body = self.answers.pop(0)
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, list[tuple[int, dict[str, str]]]]]:
    answers: list[tuple[int, dict[str, str]]] = []
    handler = type("H", (_Script,), {"answers": answers})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}", answers
    server.shutdown()
    server.server_close()


def test_temporary_refusals_are_retried_and_final_ones_are_not(scripted: tuple[str, list[tuple[int, dict[str, str]]]]) -> None:
    """Before: any 4xx was final, so an update sent before the edge was registered was dropped."""
    url, answers = scripted
    client = CoordinatorClient(url, timeout_s=10)
    answers += [
        (403, {"status": "rejected", "error": "unknown_sender", "detail": "unknown_sender: not a registered edge server"}),
        (422, {"status": "rejected", "error": "unknown_customer", "detail": "unknown_customer"}),
        (404, {"status": "rejected", "error": "unknown_task", "detail": "unknown_task"}),
        (429, {"error": "too_many_requests", "detail": "slow down"}),
        (200, {"status": "received", "detail": ""}),
        (409, {"status": "rejected", "error": "round_closed", "detail": "round_closed: round 1 is not open"}),
        (403, {"status": "rejected", "error": "bad_signature", "detail": "bad_signature: ..."}),
    ]
    results = [client.submit(b"env") for _ in range(7)]
    assert [(r.status, r.final, r.reached) for r in results[:4]] == [("retry", False, True)] * 4
    assert results[4].status == "received" and results[4].final
    assert [(r.status, r.final) for r in results[5:]] == [("rejected", True), ("rejected", True)]
    unreachable = CoordinatorClient("http://127.0.0.1:1", timeout_s=2).submit(b"env")
    assert unreachable.status == "retry" and not unreachable.reached


def test_refused_control_messages_are_counted(edge_db_url: str) -> None:
    from crowdfl.envelope import seal
    from edge_server.api import render_metrics
    from crowdfl.mqtt import PREFIX
    from tests.edge_server.fakes import RecordingCoordinator, make_world
    from tests.edge_server.test_service import _server

    world = make_world(devices=1)
    coord_like = Identity.generate()  # not the coordinator: its signature must be refused
    edge = _server(world, edge_db_url, RecordingCoordinator())
    try:
        forged = seal(b"\x00" * 16, coord_like, time.time_ns())
        edge._control(Incoming(f"{PREFIX}/tasks/{'ab' * 8}", forged, True))
        edge._control(Incoming(f"{PREFIX}/tasks/{'ab' * 8}/round", b"garbage", True))
        assert sum(edge.stats.control_rejected.values()) == 2
        text = render_metrics(edge)
        assert "crowdfl_edge_control_rejected_total{reason=" in text
    finally:
        edge.store.close()


def test_authentic_envelopes_refused_for_good_are_nacked(store: EdgeStore) -> None:
    """Before: a permanent refusal was never answered, so the device resent it every 30 s for ever."""
    import numpy as np

    edge, dev = Identity.generate(), Identity.generate()
    store.register_devices([(dev.node_id, dev.public.enc_key.hex())])
    ing = Ingestor(edge, store, {SPEC.task_id: SPEC}.get)
    good = msg(edge, dev, batch([1, 2]), 1)
    bad_label = msg(edge, dev, batch([3], labels=np.array([99], np.int8)), 2)
    reused = msg(edge, dev, batch([1]), 3)  # sample 1 again
    unknown_task = msg(edge, dev, batch([4], task_id="ee" * 32), 4)  # the spec may still arrive: no answer
    tampered = bytearray(msg(edge, dev, batch([6]), 6).payload)
    tampered[-1] ^= 1  # the channel tag no longer verifies: anyone could have sent it, no answer
    out = ing.drain([good, bad_label, reused, unknown_task, Incoming(good.topic, bytes(tampered), False)])
    assert out.acks == {dev.node_id: [1]}
    assert out.nacks == {dev.node_id: [(2, "bad_label"), (3, "sample_reuse")]}
    assert sorted(r[0] for r in out.rejections) == ["bad_label", "decrypt_failed", "sample_reuse", "unknown_task"]
