"""The coordinator's Flask API with the test client: dashboard JSON, model download, admin actions
behind the bearer token, body validation, and a removed device's updates refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from coordinator.api import create_app
from coordinator.chain import ChainConfig, connect
from coordinator.contracts import CrowdContracts, Role
from crowdfl.identity import Identity
from crowdfl.messages import CODEC, ModelWeights
from tests.coordinator.world import FRONT, World, make_world, task_parts, update_env

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[World, FlaskClient]:
    contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path, devices=4)
    return w, create_app(w.coord, admin_token=TOKEN).test_client()


def _publish_via_api(w: World, client: FlaskClient, rounds: int = 2, reward: Any = "1000") -> str:
    spec, initial = task_parts(rounds=rounds)
    for blob in (CODEC.encode(spec), FRONT, CODEC.encode(initial)):
        r = client.post("/api/v1/artifacts", data=blob, headers=AUTH, content_type="application/octet-stream")
        assert r.status_code == 201, r.json
    spec_hash = client.post("/api/v1/artifacts", data=CODEC.encode(spec), headers=AUTH, content_type="application/octet-stream").json["address"]
    r = client.post("/api/v1/tasks", json={"spec_hash": spec_hash, "reward_wei": reward}, headers=AUTH)
    assert r.status_code == 201, r.json
    return spec.task_id


def _audit(client: FlaskClient, model_hash: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """POST the audit (a queued job, 202), then fetch its result until it is done."""
    import time

    r = client.post(f"/api/v1/models/{model_hash}/verify")
    assert r.status_code == 202 and r.json["result_url"] == f"/api/v1/audits/{r.json['job_id']}", r.json
    deadline = time.monotonic() + timeout_s
    while (body := client.get(r.json["result_url"]).json)["status"] != "done":
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    return body


def test_admin_actions_need_the_token(setup: tuple[World, FlaskClient]) -> None:
    w, client = setup
    new = Identity.generate()
    body = {"role": "device", "node_id": new.node_id, "enc_key": new.public.enc_key.hex(), "edge": w.edge.node_id}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        r = client.post("/api/v1/participants", json=body, headers=headers)
        assert r.status_code == 401 and r.json["error"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.delete(f"/api/v1/participants/{w.devices[0].node_id}").status_code == 401
    assert client.post("/api/v1/tasks", json={"spec_hash": "00" * 32}).status_code == 401
    assert client.post("/api/v1/artifacts", data=b"x", content_type="application/octet-stream").status_code == 401
    # no token configured: nobody is admin
    open_app = create_app(w.coord, admin_token="").test_client()
    assert open_app.post("/api/v1/participants", json=body, headers={"Authorization": "Bearer "}).status_code == 401
    assert new.node_id not in {p["node_id"] for p in client.get("/api/v1/participants").json}
    r = client.post("/api/v1/participants", json=body, headers=AUTH)
    assert r.status_code == 201 and r.json["registered"] == [new.node_id]
    assert w.contracts.is_active(bytes.fromhex(new.node_id), Role.DEVICE)


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"role": "device"}, 400, "node_id is required"),
        ({"role": "fridge", "node_id": "ab" * 32, "enc_key": "cd" * 32}, 400, "role must be"),
        ({"role": "device", "node_id": "AB" * 32, "enc_key": "cd" * 32, "edge": "ef" * 32}, 400, "64 lowercase hex"),
        ({"role": "device", "node_id": "ab" * 32, "enc_key": "cd" * 32}, 400, "needs its edge"),
        ({"role": "device", "node_id": "ab" * 32, "enc_key": "cd" * 32, "edge": "ef" * 32}, 422, "not an active edge"),
        ({"role": "edge", "node_id": "ab" * 32, "enc_key": "cd" * 32, "payout": "0x12"}, 400, "payout"),
        ({"role": "edge", "node_id": "ab" * 32, "enc_key": "cd" * 32, "admin": True}, 400, "unknown field"),
        ({"role": "edge", "node_id": 5, "enc_key": "cd" * 32}, 400, "wrong type"),
        ({"participants": []}, 400, "list of 1 to"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_register_validates_every_body(setup: tuple[World, FlaskClient], body: Any, status: int, fragment: str) -> None:
    w, client = setup
    before = client.get("/api/v1/participants").json
    r = client.post("/api/v1/participants", json=body, headers=AUTH)
    assert r.status_code == status and fragment in r.json["detail"], r.json
    assert client.get("/api/v1/participants").json == before  # nothing changed


def test_bad_json_and_content_types(setup: tuple[World, FlaskClient]) -> None:
    _, client = setup
    assert client.post("/api/v1/participants", data="{not json", headers=AUTH, content_type="application/json").status_code == 400
    assert client.post("/api/v1/participants", data="x", headers=AUTH, content_type="text/plain").status_code == 415
    r = client.post("/api/v1/tasks", json={"spec_hash": "00" * 32}, headers=AUTH)
    assert r.status_code == 422 and r.json["error"] == "missing_artifact"
    assert client.post("/api/v1/tasks", json={"spec_hash": "00" * 32, "reward_wei": -1}, headers=AUTH).status_code == 400
    assert client.post("/api/v1/tasks", json={"spec_hash": "zz"}, headers=AUTH).status_code == 400
    assert client.get("/api/v1/tasks/nothex/rounds").status_code == 400
    assert client.get(f"/api/v1/tasks/{'12' * 32}/rounds").status_code == 404
    assert client.get("/api/v1/nothing").status_code == 404


def test_dashboard_json_model_download_and_removal(setup: tuple[World, FlaskClient]) -> None:
    w, client = setup
    task_id = _publish_via_api(w, client)
    tasks = client.get("/api/v1/tasks").json
    assert [t["task_id"] for t in tasks] == [task_id] and tasks[0]["on_chain"] and tasks[0]["reward_wei"] == "1000"
    # before any round the model download is the initial head
    r = client.get(f"/api/v1/tasks/{task_id}/model")
    assert r.status_code == 200 and r.headers["X-Round"] == "0"
    assert CODEC.decode(r.data, ModelWeights).round == 0
    rs = w.coord.open_round(task_id, 1)
    spec = w.coord.spec(task_id)
    for i, node in enumerate(rs.selected):
        w.coord.receive_update(update_env(w.edge, spec, 1, node, rs.global_model_hash, 0.05, i + 1))
    # an edge's update for someone it does not serve is refused and leaves no trace in the round
    assert w.coord.receive_update(update_env(w.edge, spec, 1, Identity.generate().node_id, rs.global_model_hash, 0.05, 77)).http_status == 422
    w.coord.close_round(task_id, 1)
    w.coord.anchor_pending()

    rounds = client.get(f"/api/v1/tasks/{task_id}/rounds").json
    assert rounds[0]["accuracy"] == 0.5 and (rounds[0]["accepted"], rounds[0]["rejected"]) == (4, 0)
    assert rounds[0]["tx_hash"].startswith("0x") and rounds[0]["block_number"] > 0 and rounds[0]["credit_tx"] and rounds[0]["settle_gas"] > 0
    detail = client.get(f"/api/v1/tasks/{task_id}/rounds/1").json
    assert sorted(detail["selected_customers"]) == sorted(d.node_id for d in w.devices)
    assert [u for u in detail["updates"] if u["status"] == "rejected"] == []
    assert all(u["score"] is not None for u in detail["updates"] if u["status"] == "accepted")
    rep = client.get(f"/api/v1/tasks/{task_id}/reputation").json["history"]
    assert set(rep) == {d.node_id for d in w.devices} and rep[w.devices[0].node_id][0]["round"] == 1
    assert client.get(f"/api/v1/tasks/{task_id}/rounds/1/updates").json == detail["updates"]
    me = client.get(f"/api/v1/customers/{w.devices[0].node_id}").json
    assert [(c["round"], c["status"]) for c in me["contributions"]] == [(1, "accepted")]
    assert me["reputation"] == rep[w.devices[0].node_id][-1]["reputation"] and int(me["rewards_wei"]) > 0
    # per hour of the household's usage: every released window covering the hour counts (sliding
    # windows: window_hours / stride of them); per day, every window touching the day
    per_hour = spec.epsilon * -(-spec.window_hours // spec.window_stride_hours)
    per_day = spec.epsilon * len([e for e in range(1, 24 + spec.window_hours) if e % spec.window_stride_hours == 0])
    assert me["budget"] == [{
        "task_id": task_id, "samples": 10, "epsilon": spec.epsilon, "label_epsilon": spec.label_epsilon,
        "window_hours": spec.window_hours, "window_stride_hours": spec.window_stride_hours,
        "per_hour_epsilon": per_hour, "per_day_epsilon": per_day,
    }]
    assert (me["budget_per_hour_bound"], me["budget_per_day_bound"]) == (per_hour, per_day)
    assert client.get(f"/api/v1/customers/{w.edge.node_id}").status_code == 404
    rewards = client.get(f"/api/v1/tasks/{task_id}/rewards").json
    assert rewards["rounds"][0]["paid_wei"] == "500" and rewards["rounds"][0]["credit_tx"]
    assert sum(int(c["reward_wei"]) for c in rewards["customers"]) == 500
    anchors = client.get(f"/api/v1/tasks/{task_id}/anchors").json
    assert anchors[0]["tx_hash"] == rounds[0]["tx_hash"]
    ledger = client.get(f"/api/v1/tasks/{task_id}/rounds/1/ledger").json
    assert ledger["round"] == 1 and set(ledger["scores"]) == {d.node_id for d in w.devices}
    proof = client.get(f"/api/v1/tasks/{task_id}/rounds/1/proofs/{w.devices[0].node_id}").json
    assert proof["merkle_root"] == rounds[0]["merkle_root"]
    r = client.get(f"/api/v1/tasks/{task_id}/model")
    assert r.headers["X-Round"] == "1" and r.headers["X-Content-SHA256"] == rounds[0]["model_hash"]
    verdict = _audit(client, rounds[0]["model_hash"])
    assert verdict["ok"] and verdict["lines"][0].endswith("OK")
    assert _audit(client, "00" * 32)["ok"] is False
    assert client.get(f"/api/v1/artifacts/{rounds[0]['model_hash']}").data == r.data

    # the manufacturer removes a device: its next update is refused, the chain registry follows
    gone = w.devices[1]
    r = client.delete(f"/api/v1/participants/{gone.node_id}", headers=AUTH)
    assert r.status_code == 200
    assert client.delete(f"/api/v1/participants/{gone.node_id}", headers=AUTH).status_code == 404
    assert not w.contracts.is_active(bytes.fromhex(gone.node_id), Role.DEVICE)
    rs2 = w.coord.open_round(task_id, 2)
    assert gone.node_id not in rs2.selected
    env = update_env(w.edge, spec, 2, gone.node_id, rs2.global_model_hash, 0.05, 99)
    r = client.post("/api/v1/updates", data=env, content_type="application/octet-stream")
    assert r.status_code == 422 and r.json["error"] == "removed_customer"
    row = next(p for p in client.get("/api/v1/participants").json if p["node_id"] == gone.node_id)
    assert row["active"] is False and row["on_chain"] is True


def test_openapi_documents_every_route(setup: tuple[World, FlaskClient]) -> None:
    w, client = setup
    doc = client.get("/api/v1/openapi.json").json
    assert doc["openapi"].startswith("3.")
    app = create_app(w.coord, TOKEN)
    import re

    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue  # the dashboard's pages and the root redirect
        path = re.sub(r"<(?:int(?:\([^)]*\))?:)?([a-z_]+)>", lambda m: "{" + m.group(1).rstrip("_") + "}", rule.rule)
        assert path in doc["paths"], path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in doc["paths"][path], (path, method)


def test_publishing_a_task_checks_the_spec(setup: tuple[World, FlaskClient]) -> None:
    w, client = setup
    for overrides, fragment in (({"deadline": 1}, "deadline"), ({"aggregation": "mean_of_vibes"}, "mean_of_vibes")):
        spec, initial = task_parts(**overrides)
        for blob in (FRONT, CODEC.encode(initial)):
            client.post("/api/v1/artifacts", data=blob, headers=AUTH, content_type="application/octet-stream")
        spec_hash = client.post("/api/v1/artifacts", data=CODEC.encode(spec), headers=AUTH, content_type="application/octet-stream").json["address"]
        r = client.post("/api/v1/tasks", json={"spec_hash": spec_hash}, headers=AUTH)
        assert r.status_code == 409 and fragment in r.json["detail"], r.json
    front_hash = client.post("/api/v1/artifacts", data=FRONT, headers=AUTH, content_type="application/octet-stream").json["address"]
    r = client.post("/api/v1/tasks", json={"spec_hash": front_hash}, headers=AUTH)  # not a spec at all
    assert r.status_code == 422 and r.json["error"] == "bad_artifact"
    assert client.get("/api/v1/tasks").json == []
