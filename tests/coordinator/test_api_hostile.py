"""Regression tests for issue 15's coordinator API defects, against the real server (waitress)
where the server matters: deep JSON, round numbers beyond int64, chunked bodies over the limits,
silent re-registration, and the content store's rename durability."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from coordinator.api import MAX_JSON_BYTES, MAX_UPDATE_BYTES, ApiServer, create_app
from coordinator.chain import ChainConfig, connect
from coordinator.contracts import CrowdContracts
from coordinator.store import LocalContentStore
from crowdfl.identity import Identity
from crowdfl.jsonlimits import json_depth, loads_limited
from crowdfl.errors import WireError
from tests.coordinator.world import World, make_world

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def world(tmp_path: Path) -> World:
    contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    return make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path, devices=2)


@pytest.fixture
def client(world: World) -> FlaskClient:
    return create_app(world.coord, admin_token=TOKEN).test_client()


@pytest.fixture
def served(world: World) -> Iterator[ApiServer]:
    api = ApiServer(create_app(world.coord, admin_token=TOKEN))
    api.start()
    yield api
    api.stop()


def test_json_depth_never_recurses() -> None:
    assert [json_depth(b) for b in (b"1", b"[]", b'{"a": [1, {"b": []}]}', b'["[[[", "\\"[["]')] == [0, 1, 4, 1]
    assert json_depth(b"[" * 500_000) == 500_000
    with pytest.raises(WireError, match="too_deep"):
        loads_limited(b"[" * 100 + b"]" * 100, 1 << 20)
    with pytest.raises(WireError, match="bad_json"):
        loads_limited(b'{"x": NaN}', 1 << 20)
    assert loads_limited(b'{"x": [1, 2]}', 1 << 20) == {"x": [1, 2]}


def test_deeply_nested_json_does_not_kill_the_coordinator(tmp_path: Path) -> None:
    """Before: ~160 KB of ``[`` overflowed the request thread's C stack (web3 raises the recursion
    limit to 100,000): SIGSEGV, no log line. Run in a child process, so a crash fails this test
    instead of killing pytest."""
    script = textwrap.dedent(f"""
        import http.client, json, sys
        from pathlib import Path
        import web3  # noqa: F401  (raises sys.getrecursionlimit(), as in the real coordinator)
        from coordinator.api import ApiServer, create_app
        from coordinator.chain import ChainConfig, connect
        from coordinator.contracts import CrowdContracts
        from tests.coordinator.world import make_world
        tmp = Path({str(tmp_path)!r})
        w = make_world(CrowdContracts.deploy(connect(ChainConfig(kind="embedded"))), f"sqlite:///{{tmp / 'c.sqlite'}}", tmp, devices=1)
        api = ApiServer(create_app(w.coord, admin_token={TOKEN!r}))
        api.start()
        out = []
        for body in (b"[" * 200_000, b"{{\\"a\\":" * 100_000, b"[" * 40 + b"]" * 40):
            conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
            conn.request("POST", "/api/v1/participants", body=body, headers={{"Content-Type": "application/json", "Authorization": "Bearer {TOKEN}"}})
            r = conn.getresponse()
            out.append((r.status, json.loads(r.read())["error"]))
            conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
        conn.request("GET", "/api/v1/health")
        out.append((conn.getresponse().status, "health"))
        api.stop()
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"coordinator process died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == [[400, "too_deep"], [400, "too_deep"], [400, "too_deep"], [200, "health"]]


@pytest.mark.parametrize("suffix", ["", "/updates", "/ledger", "/proofs/" + "ab" * 32])
def test_round_numbers_beyond_int64_are_404_not_500(world: World, client: FlaskClient, suffix: str) -> None:
    from tests.coordinator.test_api import _publish_via_api

    task = _publish_via_api(world, client)  # an existing task: the round number reaches the database
    for rnd in (2**63, 2**64 + 5, 10**40):
        r = client.get(f"/api/v1/tasks/{task}/rounds/{rnd}{suffix}")
        assert r.status_code == 404, (rnd, suffix, r.status_code)
    assert client.get(f"/api/v1/tasks/{task}/rounds/{2**63 - 1}{suffix}").status_code == 404  # in range, not opened


def _chunked_post(port: int, path: str, total: int, content_type: str, chunk: int = 1 << 20) -> tuple[int, dict[str, object]]:
    def body() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            yield b" " * n if content_type == "application/json" else b"\x00" * n
            sent += n

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body=body(), headers={"Content-Type": content_type, **AUTH}, encode_chunked=True)
        r = conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if raw.startswith(b"{") else {"raw": raw[:200].decode(errors="replace")}
    except (BrokenPipeError, ConnectionResetError):  # the server answered 413 and closed mid-upload
        r = conn.getresponse()
        return r.status, {}
    finally:
        conn.close()


def test_chunked_bodies_over_the_limits_are_413(world: World, served: ApiServer) -> None:
    """Before: a chunked JSON body skipped the 1 MiB check, and a chunked update over 16 MiB was
    silently truncated instead of refused."""
    status, _ = _chunked_post(served.port, "/api/v1/participants", MAX_JSON_BYTES + 10, "application/json")
    assert status == 413
    status, _ = _chunked_post(served.port, "/api/v1/updates", MAX_UPDATE_BYTES + 1024 * 1024, "application/octet-stream")
    assert status == 413
    # a small chunked body still works: it is read whole, then judged
    status, body = _chunked_post(served.port, "/api/v1/updates", 1000, "application/octet-stream")
    assert status == 400 and body["error"] == "bad_magic"  # judged on all 1000 bytes
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.request("GET", "/api/v1/health")
    assert conn.getresponse().status == 200


def test_oversized_headers_and_bodies_are_refused_by_the_server(served: ApiServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.request("GET", "/api/v1/health", headers={"X-Big": "a" * (128 * 1024)})
    assert conn.getresponse().status == 431
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.putrequest("POST", "/api/v1/updates")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(MAX_UPDATE_BYTES + 10 * 1024 * 1024))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


def test_reregistering_with_another_key_or_payout_is_an_error_not_a_no_op(world: World, client: FlaskClient) -> None:
    """Before: registering a known participant again with a new key or payout answered 201 and kept the old ones."""
    dev = Identity.generate()
    body = {"role": "device", "node_id": dev.node_id, "enc_key": dev.public.enc_key.hex(), "edge": world.edge.node_id,
            "payout": "0x" + "11" * 20}
    assert client.post("/api/v1/participants", json=body, headers=AUTH).status_code == 201
    assert client.post("/api/v1/participants", json=body, headers=AUTH).status_code == 201  # the same again: fine
    for change in ({"enc_key": "ee" * 32}, {"payout": "0x" + "22" * 20}):
        r = client.post("/api/v1/participants", json={**body, **change}, headers=AUTH)
        assert r.status_code == 409 and "to rotate it, remove" in r.json["detail"], r.json
    mine = next(p for p in client.get("/api/v1/participants").json if p["node_id"] == dev.node_id)
    assert mine["enc_key"] == dev.public.enc_key.hex()
    # the explicit rotation: remove, then register with the new key
    assert client.delete(f"/api/v1/participants/{dev.node_id}", headers=AUTH).status_code == 200
    assert client.post("/api/v1/participants", json={**body, "enc_key": "ee" * 32}, headers=AUTH).status_code == 201
    mine = next(p for p in client.get("/api/v1/participants").json if p["node_id"] == dev.node_id)
    assert mine["enc_key"] == "ee" * 32 and mine["active"]


def test_content_store_fsyncs_the_folder_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the file was fsynced, the rename into place was not (lost on a power cut)."""
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    store = LocalContentStore(tmp_path / "store")
    address = store.put(b"model bytes")
    assert synced == ["dir", "file", "dir"]  # new fan-out folder, the data, the rename
    synced.clear()
    store.put(b"other bytes" * 3)
    assert "dir" in synced[synced.index("file"):]
    assert store.get(address) == b"model bytes"


def test_chain_reads_do_not_race_the_anchoring_sends() -> None:
    """Before: the audit's reads interleaved with anchoring's sends on the in-process chain, and
    either side failed now and then ("Invalid transaction nonce", or the request answered 500)."""
    import threading
    import time

    from coordinator.chain import ChainConfig, connect

    client = connect(ChainConfig(kind="embedded"))
    crowd = CrowdContracts.deploy(client)
    tid = os.urandom(32)
    crowd.create_task(tid, os.urandom(32), 100, 1.0, int(time.time()) + 3600, reward_wei=0)
    errors: list[str] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                crowd.anchors(tid)
                client.block_number()
                crowd.task(tid)
                reads += 1
            except Exception as exc:  # noqa: BLE001  (any failure is the defect)
                errors.append(f"read: {exc!r}"[:200])

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for rnd in range(1, 41):
            try:
                crowd.anchor_round(tid, rnd, os.urandom(32), os.urandom(32), os.urandom(32), 3, rnd)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"send: {exc!r}"[:200])
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[:3]
    assert reads > 0 and len(crowd.anchors(tid)) == 40


def test_the_audit_is_a_queued_rate_limited_job() -> None:
    """Before: the audit ran inside the request, one at a time behind a lock (20 callers: 0.6-16 s each)."""
    import threading

    from coordinator.audit_queue import AuditQueue, QueueFull

    release = threading.Event()
    ran: list[str] = []

    def slow_audit(model_hash: str) -> dict[str, object]:
        release.wait(60)
        ran.append(model_hash)
        return {"ok": model_hash.startswith("aa"), "lines": [model_hash], "problems": []}

    q = AuditQueue(slow_audit, max_pending=4)
    first = q.submit("aa" * 32)
    assert q.submit("aa" * 32).job_id == first.job_id  # the same model is not queued twice
    others = []
    refused = 0
    for i in range(10):
        try:
            others.append(q.submit(f"{i:02x}" * 32))
        except QueueFull:
            refused += 1
    assert len(others) + 1 <= 5 and refused >= 5  # at most max_pending wait (one may already run)
    assert q.get(first.job_id).status in ("queued", "running")
    release.set()
    done = q.wait(first.job_id, 60)
    assert done is not None and done.status == "done" and done.result == {"ok": True, "lines": ["aa" * 32], "problems": []}
    for job in others:
        finished = q.wait(job.job_id, 60)
        assert finished is not None and finished.status == "done" and finished.result["ok"] is False
    assert sorted(ran) == sorted(["aa" * 32] + [j.model_hash for j in others])  # each ran once


def test_verify_route_queues_and_result_route_answers(world: World, client: FlaskClient) -> None:
    r = client.post(f"/api/v1/models/{'00' * 32}/verify")
    assert r.status_code == 202 and r.json["status"] in ("queued", "running", "done")
    audits = client.application.extensions["crowdfl_audits"]
    audits.wait(r.json["job_id"], 60)
    body = client.get(r.json["result_url"]).json
    assert body["status"] == "done" and body["ok"] is False and body["problems"]
    assert client.get(f"/api/v1/audits/{'ab' * 16}").status_code == 404
    assert client.get("/api/v1/audits/../../etc").status_code in (400, 404)
    assert client.get("/api/v1/audits/XYZ").status_code == 400
