"""Hostile input against the real coordinator API (waitress, in this process): deep and huge JSON,
NaN, traversal, malformed/truncated/bit-flipped/re-signed update envelopes, rounds beyond int64,
oversized headers, an audit flood and a request flood. After each kind the API still serves and
nothing was stored (participants, tasks and the content store unchanged). No real part beyond
the server itself is needed, so this runs everywhere."""

from __future__ import annotations

import http.client
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.api import ApiServer, create_app
from coordinator.chain import ChainConfig, connect
from coordinator.contracts import CrowdContracts
from crowdfl.identity import Identity
from tests.coordinator.world import World, make_world, task_parts, update_env

TOKEN = "hostile-suite-token"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[World, ApiServer, Path]]:
    contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path, devices=2)
    api = ApiServer(create_app(w.coord, admin_token=TOKEN))
    api.start()
    try:
        yield w, api, tmp_path
    finally:
        api.stop()


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             chunked: bool = False) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if chunked and body is not None:
            conn.request(method, path, body=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]), headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    except (BrokenPipeError, ConnectionResetError):
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_hostile_http_input_against_the_real_coordinator_api(served: tuple[World, ApiServer, Path], capsys: pytest.CaptureFixture[str]) -> None:
    w, api, tmp = served
    port = api.port
    admin_json = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    octet = {"Content-Type": "application/octet-stream"}
    spec, _ = task_parts()
    good_update = update_env(w.edge, spec, 1, w.devices[0].node_id, "00" * 32, 0.05, 1)
    stranger = Identity.generate()

    def flip(raw: bytes, at: int) -> bytes:
        b = bytearray(raw)
        b[at % len(b)] ^= 0x01
        return bytes(b)

    def snapshot() -> tuple[object, ...]:
        files = sorted(str(p.relative_to(tmp)) for p in (tmp).rglob("*") if p.is_file() and "store" in p.parts)
        return (json.dumps(w.coord.participants(), sort_keys=True), json.dumps(w.coord.tasks(), sort_keys=True, default=str), files)

    Kind = Callable[[], list[tuple[str, str, bytes | None, dict[str, str], bool]]]
    traversal = ["/api/v1/artifacts/..%2f..%2f..%2fetc%2fpasswd", "/api/v1/artifacts/../../etc/passwd",
                 "/api/v1/artifacts/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/api/v1/customers/..%2f..%2fetc%2fpasswd",
                 "/api/v1/tasks/..%2f..%2f/rounds", "/api/v1/audits/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
                 "/dashboard/..%2f..%2fcoordinator%2fapi.py", "/static/..%2f..%2fapi.py"]
    kinds: dict[str, Kind] = {
        "deep_json": lambda: [("POST", "/api/v1/participants", b"[" * n, admin_json, False) for n in (1000, 100_000, 500_000)],
        "huge_json": lambda: [("POST", "/api/v1/participants", b" " * (2 * 1024 * 1024), admin_json, chunked) for chunked in (False, True)],
        "nan_inf_json": lambda: [("POST", "/api/v1/tasks", b'{"spec_hash": NaN}', admin_json, False),
                                 ("POST", "/api/v1/tasks", b'{"spec_hash": "' + b"0" * 64 + b'", "reward_wei": Infinity}', admin_json, False)],
        "traversal": lambda: [("GET", p, None, {}, False) for p in traversal],
        "malformed_update": lambda: [("POST", "/api/v1/updates", os.urandom(n), octet, False) for n in (0, 1, 100, 5000)],
        "truncated_update": lambda: [("POST", "/api/v1/updates", good_update[:n], octet, False) for n in (10, 60, len(good_update) - 1)],
        "bit_flipped_update": lambda: [("POST", "/api/v1/updates", flip(good_update, i * 97), octet, False) for i in range(6)],
        "re_signed_update": lambda: [("POST", "/api/v1/updates", update_env(stranger, spec, 1, w.devices[0].node_id, "00" * 32, 0.05, 2), octet, False)],
        "oversized_update": lambda: [("POST", "/api/v1/updates", b"\x00" * (17 * 1024 * 1024), octet, True)],
        "round_beyond_int64": lambda: [("GET", f"/api/v1/tasks/{spec.task_id}/rounds/{2**64}{s}", None, {}, False) for s in ("", "/updates", "/ledger")],
        "oversized_headers": lambda: [("GET", "/api/v1/health", None, {"X-Junk": "a" * 200_000}, False)],
        "bad_token": lambda: [("POST", "/api/v1/participants", b"{}", {**admin_json, "Authorization": "Bearer " + "x" * 5000}, False)],
    }
    before = snapshot()
    statuses: Counter[int] = Counter()
    sent = Counter()
    for kind, make in kinds.items():
        for method, path, body, headers, chunked in make():
            status, raw = _request(port, method, path, body, headers, chunked)
            statuses[status] += 1
            sent[kind] += 1
            assert 400 <= status < 500, (kind, path[:80], status, raw[:200])
            assert b"root:" not in raw  # no file from outside the store was served
        assert _request(port, "GET", "/api/v1/health")[0] == 200, kind
        assert snapshot() == before, f"{kind} changed stored state"

    # floods: junk from 8 threads, and the audit (queued, rate limited)
    flood: Counter[int] = Counter()
    lock = threading.Lock()

    def junk(n: int) -> None:
        for i in range(n):
            status, _ = _request(port, "POST", "/api/v1/updates", os.urandom(64 + i), octet)
            with lock:
                flood[status] += 1

    threads = [threading.Thread(target=junk, args=(25,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    sent["flood"] = sum(flood.values())
    assert sum(flood.values()) == 200 and all(400 <= s < 500 for s in flood), flood
    audit = Counter(_request(port, "POST", f"/api/v1/models/{os.urandom(32).hex()}/verify")[0] for _ in range(30))
    sent["audit_flood"] = 30
    assert set(audit) <= {202, 429}, audit  # queued, or told to come back (429); never run inside the request
    assert _request(port, "GET", "/api/v1/health")[0] == 200
    assert snapshot() == before
    summary = {"kinds": len(kinds) + 2, "requests": sum(sent.values()), "statuses": dict(sorted((statuses + flood + audit).items())),
               "server_errors": sum(n for s, n in (statuses + flood + audit).items() if s >= 500), "crashes": 0}
    with capsys.disabled():
        print("\n[hostile http] " + json.dumps(summary, sort_keys=True))
