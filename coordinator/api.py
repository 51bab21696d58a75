"""The coordinator's HTTP API (Flask).

Public, read-only JSON for auditors and the dashboard (tasks, rounds with accuracy and anchors,
accepted/rejected updates with reasons, reputation over time, rewards, participants, proofs) and
the artifacts themselves (models, manifests, ledgers); update intake for the edge servers (signed
envelopes, so no token); and the manufacturer's admin actions behind a bearer token from the
config file. The contract is ``openapi.py``, served at /api/v1/openapi.json.

Two blueprints: ``public_blueprint`` (open to anyone) and ``admin_blueprint`` (every route behind
the bearer token, checked once, before the view).
"""

from __future__ import annotations

import hmac
import logging
from collections import Counter
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from sqlalchemy.exc import InterfaceError, OperationalError
from web3 import Web3
from werkzeug.exceptions import HTTPException

from crowdfl.errors import CrowdflError, WireError
from crowdfl.identity import PublicIdentity
from crowdfl.jsonlimits import loads_limited
from crowdfl.messages import CODEC, ModelWeights, TaskSpec, is_hex64
from crowdfl.metrics import CONTENT_TYPE
from crowdfl.serving import BackgroundHttpServer, HttpLimits

from .audit import audit_model
from .audit_queue import AuditQueue, QueueFull
from .chain import ChainError
from .claims import ClaimThrottled
from .dashboard import dashboard_blueprint, root_redirect
from .metrics import render_coordinator_metrics
from .openapi import openapi_document
from .service import Coordinator
from .store import StoreError

log = logging.getLogger(__name__)

MAX_UPDATE_BYTES = 16 * 1024 * 1024
MAX_JSON_BYTES = 1024 * 1024
MAX_PARTICIPANTS_PER_CALL = 1000
# rounds are BIGINT columns: a larger number in a URL matches no route (404), never reaches the database
MAX_ROUND = 2**63 - 1
_HEX = frozenset("0123456789abcdef")


class BadRequest(Exception):
    """A request body or parameter that fails validation; the message says which field and why."""

    def __init__(self, detail: str, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(detail)
        self.detail, self.status, self.code = detail, status, code


def _hex32(value: object, name: str) -> str:
    if not is_hex64(value):
        raise BadRequest(f"{name} must be 64 lowercase hex characters")
    return value


def _json_object(allowed: dict[str, tuple[type | tuple[type, ...], bool]], data: object, where: str = "body") -> dict[str, Any]:
    """Check a JSON object's keys and value types: unknown keys and missing required ones are errors."""
    if not isinstance(data, dict):
        raise BadRequest(f"{where} must be a JSON object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise BadRequest(f"{where}: unknown field(s) {', '.join(unknown)}")
    for name, (types, required) in allowed.items():
        if name not in data or data[name] is None:
            if required:
                raise BadRequest(f"{where}: field {name} is required")
            continue
        value = data[name]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise BadRequest(f"{where}: field {name} has the wrong type")
        if not isinstance(value, types):
            raise BadRequest(f"{where}: field {name} has the wrong type")
    return data


def _read_body(limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes, else 413: with a Content-Length and without
    one (chunked), which Flask's own limit checks only by the header."""
    if (request.content_length or 0) > limit:
        raise BadRequest(f"body larger than {limit} bytes", 413, "too_large")
    data = request.stream.read(limit + 1)
    if len(data) > limit:
        raise BadRequest(f"body larger than {limit} bytes", 413, "too_large")
    return data


def _request_json() -> Any:
    if request.mimetype != "application/json":
        raise BadRequest("send a JSON body (Content-Type: application/json)", 415, "bad_content_type")
    try:
        data = loads_limited(_read_body(MAX_JSON_BYTES), MAX_JSON_BYTES)
    except WireError as exc:
        raise BadRequest(exc.detail, 413 if exc.code == "too_large" else 400, exc.code) from None
    if data is None:
        raise BadRequest("the body is not valid JSON")
    return data


_PARTICIPANT = {
    "role": (str, True), "node_id": (str, True), "enc_key": (str, True), "edge": (str, False), "payout": (str, False),
}


def _participant_entry(raw: object, where: str) -> tuple[PublicIdentity, str, str | None, str | None]:
    d = _json_object(_PARTICIPANT, raw, where)
    role = d["role"]
    if role not in ("device", "edge"):
        raise BadRequest(f"{where}: role must be device or edge")
    node_id, enc_key = _hex32(d["node_id"], f"{where}.node_id"), _hex32(d["enc_key"], f"{where}.enc_key")
    edge = d.get("edge")
    if role == "device":
        if edge is None:
            raise BadRequest(f"{where}: a device needs its edge server's node id (edge)")
        _hex32(edge, f"{where}.edge")
    elif edge is not None:
        raise BadRequest(f"{where}: only devices have an edge")
    payout = d.get("payout")
    if payout is not None and not Web3.is_address(payout):
        raise BadRequest(f"{where}.payout must be an Ethereum address")
    return PublicIdentity.from_hex(node_id, enc_key), role, edge, payout


def create_app(coord: Coordinator, admin_token: str = "", public_rpc_url: str = "") -> Flask:
    """``admin_token`` empty: the admin actions are refused (401) for everyone. ``public_rpc_url`` is
    the JSON-RPC URL the customer page offers by default (labelled as the manufacturer's)."""
    app = Flask("crowdfl.coordinator")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPDATE_BYTES
    app.register_blueprint(dashboard_blueprint())
    app.add_url_rule("/", "root", root_redirect)
    app.register_error_handler(BadRequest, _bad_request)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(OperationalError, _database_unavailable)
    app.register_error_handler(InterfaceError, _database_unavailable)
    audits = AuditQueue(lambda model_hash: _run_audit(coord, model_hash))
    app.extensions["crowdfl_audits"] = audits
    app.register_blueprint(public_blueprint(coord, audits, public_rpc_url))
    app.register_blueprint(admin_blueprint(coord, admin_token))
    return app


def _error(code: str, detail: str, status: int) -> tuple[Response, int]:
    return jsonify({"error": code, "detail": detail}), status


def _bad_request(exc: BadRequest) -> Any:
    log.warning("%s %s refused: %s", request.method, request.path, exc.detail)
    return _error(exc.code, exc.detail, exc.status)


def _database_unavailable(exc: OperationalError | InterfaceError) -> Any:
    # e.g. PostgreSQL restarting: say so (503, retry later) instead of an anonymous 500
    first = str(exc.orig).strip().splitlines()[0][:200] if exc.orig is not None else type(exc).__name__
    log.error("%s %s: database unavailable: %s", request.method, request.path, first)
    resp, status = _error("database_unavailable", f"the coordinator's database is unavailable ({first}); retry later", 503)
    resp.headers["Retry-After"] = "5"
    return resp, status


def _http_error(exc: HTTPException) -> Any:
    return _error(exc.name.lower().replace(" ", "_"), exc.description or "", exc.code or 500)


def _task_or_404(coord: Coordinator, task_id: str) -> str:
    _hex32(task_id, "task id")
    try:
        coord.spec(task_id)
    except KeyError:
        raise BadRequest(f"no task {task_id[:16]}…", 404, "not_found") from None
    return task_id


def _run_audit(coord: Coordinator, model_hash: str) -> dict[str, Any]:
    report = audit_model(coord.contracts, coord.store, model_hash)
    return {"task_id": report.task_id, "round": report.round, "ok": report.ok, "lines": report.lines(),
            "problems": report.problems + [p for r in report.rounds for p in r.problems]}


def public_blueprint(coord: Coordinator, audits: AuditQueue, public_rpc_url: str = "") -> Blueprint:
    """Open to anyone: the read-only JSON and artifacts, the metrics, update intake (the envelope is
    signed by a registered edge, so no token), audits and claims."""
    bp = Blueprint("public", __name__)

    @bp.get("/api/v1/health")
    def health() -> Any:
        return jsonify({"status": "ok"})

    @bp.get("/api/v1/openapi.json")
    def openapi() -> Any:
        return jsonify(openapi_document())

    @bp.get("/api/v1/artifacts/<address>")
    def artifact(address: str) -> Any:
        try:
            data = coord.store.get(address)
        except StoreError as exc:
            if exc.code == "corrupt":
                log.error("content store: %s", exc)
                return _error(exc.code, exc.detail, 500)
            return _error(exc.code, exc.detail, 404 if exc.code == "missing" else 400)
        return Response(data, mimetype="application/octet-stream", headers={"X-Content-SHA256": address})

    intake: Counter[tuple[str, str]] = Counter()

    @bp.get("/metrics")
    def metrics() -> Any:
        return Response(render_coordinator_metrics(coord, intake), content_type=CONTENT_TYPE)

    @bp.post("/api/v1/updates")
    def updates() -> Any:
        if request.mimetype != "application/octet-stream":
            return _error("bad_content_type", "send the raw envelope as application/octet-stream", 415)
        result = coord.receive_update(_read_body(MAX_UPDATE_BYTES))
        intake[(result.status, result.detail.split(":", 1)[0] if result.status == "rejected" else "")] += 1
        body = {"status": result.status, "detail": result.detail, "update_hash": result.update_hash}
        if result.status == "rejected":
            body["error"] = result.detail.split(":", 1)[0]
        return jsonify(body), result.http_status

    @bp.get("/api/v1/participants")
    def participants() -> Any:
        return jsonify(coord.participants())

    @bp.get("/api/v1/tasks")
    def tasks() -> Any:
        return jsonify(coord.tasks())

    @bp.get("/api/v1/tasks/<task_id>")
    def task(task_id: str) -> Any:
        _task_or_404(coord, task_id)
        return jsonify(next(t for t in coord.tasks() if t["task_id"] == task_id))

    @bp.get("/api/v1/tasks/<task_id>/rounds")
    def rounds(task_id: str) -> Any:
        return jsonify(coord.rounds(_task_or_404(coord, task_id)))

    @bp.get(f"/api/v1/tasks/<task_id>/rounds/<int(max={MAX_ROUND}):round_>")
    def round_detail(task_id: str, round_: int) -> Any:
        detail = coord.round_detail(_task_or_404(coord, task_id), round_)
        if detail is None:
            return _error("not_found", f"round {round_} has not been opened", 404)
        return jsonify(detail)

    @bp.get(f"/api/v1/tasks/<task_id>/rounds/<int(max={MAX_ROUND}):round_>/updates")
    def round_updates(task_id: str, round_: int) -> Any:
        detail = coord.round_detail(_task_or_404(coord, task_id), round_)
        if detail is None:
            return _error("not_found", f"round {round_} has not been opened", 404)
        return jsonify(detail["updates"])

    @bp.get(f"/api/v1/tasks/<task_id>/rounds/<int(max={MAX_ROUND}):round_>/ledger")
    def ledger(task_id: str, round_: int) -> Any:
        data = coord.ledger(_task_or_404(coord, task_id), round_)
        if data is None:
            return _error("not_found", f"round {round_} is not closed", 404)
        return jsonify(data)

    @bp.get("/api/v1/chain")
    def chain_info() -> Any:
        """Where to check: the contracts' addresses and the RPC URL the manufacturer suggests."""
        return jsonify({"rpc_url": public_rpc_url, "addresses": dict(coord.contracts.addresses)})

    @bp.get(f"/api/v1/tasks/<task_id>/rounds/<int(max={MAX_ROUND}):round_>/leaves/<leaf>")
    def leaf(task_id: str, round_: int, leaf: str) -> Any:
        p = coord.leaf_proof(_task_or_404(coord, task_id), round_, _hex32(leaf, "leaf"))
        if p is None:
            return _error("not_found", "no such leaf in that round", 404)
        return jsonify(p)

    @bp.get(f"/api/v1/tasks/<task_id>/rounds/<int(max={MAX_ROUND}):round_>/claims/<customer>")
    def claim_leaf(task_id: str, round_: int, customer: str) -> Any:
        p = coord.claim_proof(_task_or_404(coord, task_id), round_, _hex32(customer, "customer"))
        if p is None:
            return _error("not_found", "nothing settled for that customer in that round", 404)
        return jsonify(p)

    @bp.post(f"/api/v1/tasks/<task_id>/rounds/<int(max={MAX_ROUND}):round_>/claims/<customer>")
    def claim(task_id: str, round_: int, customer: str) -> Any:
        # anyone may ask: the contract pays only the customer's registered payout, only a true leaf, once
        try:
            return jsonify(coord.submit_claim(_task_or_404(coord, task_id), round_, _hex32(customer, "customer")))
        except KeyError:
            return _error("not_found", "nothing settled for that customer in that round", 404)
        except ClaimThrottled as exc:  # the coordinator pays the gas: rationed (coordinator/claims.py)
            resp, status = _error("too_many_requests", str(exc), 429)
            resp.headers["Retry-After"] = exc.retry_after_header
            return resp, status
        except ChainError as exc:
            return _error("claim_failed", str(exc)[:300], 409 if exc.reverted else 503)

    @bp.get(f"/api/v1/tasks/<task_id>/rounds/<int(max={MAX_ROUND}):round_>/proofs/<customer>")
    def proof(task_id: str, round_: int, customer: str) -> Any:
        p = coord.proof(_task_or_404(coord, task_id), round_, _hex32(customer, "customer"))
        if p is None:
            return _error("not_found", "no update of this customer in that round", 404)
        return jsonify(p)

    @bp.get("/api/v1/tasks/<task_id>/reputation")
    def reputation(task_id: str) -> Any:
        return jsonify({"task_id": task_id, "history": coord.reputation_history(_task_or_404(coord, task_id))})

    @bp.get("/api/v1/customers/<node_id>")
    def customer(node_id: str) -> Any:
        found = coord.customer(_hex32(node_id, "device key"))
        if found is None:
            return _error("not_found", "no device with this key", 404)
        return jsonify(found)

    @bp.post("/api/v1/models/<model_hash>/verify")
    def verify_model(model_hash: str) -> Any:
        """Queue the audit (from the chain and the store only, not the database); fetch the result from result_url."""
        _hex32(model_hash, "model hash")
        try:
            job = audits.submit(model_hash)
        except QueueFull as exc:
            resp, status = _error("too_many_requests", str(exc), 429)
            resp.headers["Retry-After"] = "10"
            return resp, status
        return jsonify({**job.view(), "result_url": f"/api/v1/audits/{job.job_id}"}), 202

    @bp.get("/api/v1/audits/<job_id>")
    def audit_result(job_id: str) -> Any:
        if len(job_id) != 32 or not set(job_id) <= _HEX:
            raise BadRequest("job id must be 32 lowercase hex characters")
        job = audits.get(job_id)
        if job is None:
            return _error("not_found", "no such audit job (results are kept for the last 256 audits)", 404)
        return jsonify(job.view())

    @bp.get("/api/v1/tasks/<task_id>/rewards")
    def rewards(task_id: str) -> Any:
        return jsonify(coord.rewards(_task_or_404(coord, task_id)))

    @bp.get("/api/v1/tasks/<task_id>/anchors")
    def anchors(task_id: str) -> Any:
        keys = ("round", "status", "merkle_root", "model_hash", "manifest_hash", "ledger_hash", "tx_hash", "block_number",
                "gas_used", "settle_gas", "round_gas", "credit_tx", "credit_block", "anchor_attempts", "anchor_error")
        return jsonify([{k: r[k] for k in keys} for r in coord.rounds(_task_or_404(coord, task_id)) if r["status"] != "open"])

    @bp.get("/api/v1/tasks/<task_id>/model")
    def model(task_id: str) -> Any:
        latest = coord.latest_model(_task_or_404(coord, task_id))
        assert latest is not None
        round_, address = latest
        try:
            data = coord.store.get(address)
        except StoreError as exc:
            log.error("content store: %s", exc)
            return _error(exc.code, exc.detail, 500)
        return Response(data, mimetype="application/octet-stream", headers={"X-Content-SHA256": address, "X-Round": str(round_)})

    return bp


def admin_blueprint(coord: Coordinator, admin_token: str) -> Blueprint:
    """The manufacturer's actions (participants, artifacts, tasks), every one behind the bearer token."""
    bp = Blueprint("admin", __name__)

    @bp.before_request
    def require_token() -> Any:
        if request.method == "OPTIONS":
            return None  # Flask answers it without calling a view, as for every route
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        ok = bool(admin_token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), admin_token.encode())
        if not ok:
            log.warning("admin request %s %s refused: %s", request.method, request.path, "no token configured" if not admin_token else "bad or missing bearer token")
            resp, status = _error("unauthorized", "a valid bearer token is required for this action", 401)
            resp.headers["WWW-Authenticate"] = 'Bearer realm="crowdfl-coordinator"'
            return resp, status
        return None

    @bp.post("/api/v1/participants")
    def register() -> Any:
        data = _request_json()
        raw = data.get("participants") if isinstance(data, dict) and "participants" in data else [data]
        if isinstance(data, dict) and "participants" in data and len(data) != 1:
            raise BadRequest("body: with participants, send no other field")
        if not isinstance(raw, list) or not raw or len(raw) > MAX_PARTICIPANTS_PER_CALL:
            raise BadRequest(f"participants must be a list of 1 to {MAX_PARTICIPANTS_PER_CALL} objects")
        entries = [_participant_entry(p, f"participants[{i}]") for i, p in enumerate(raw)]
        known = {p["node_id"]: p for p in coord.participants()}
        for pub, role, edge, _ in entries:
            if edge is not None and (edge not in known or known[edge]["role"] != "edge" or not known[edge]["active"]):
                if not any(e[0].node_id == edge and e[1] == "edge" for e in entries):
                    raise BadRequest(f"{pub.node_id[:16]}…: edge {edge[:16]}… is not an active edge server", 422, "unknown_edge")
        try:
            coord.register(entries)
        except ValueError as exc:
            raise BadRequest(str(exc), 409, "conflict") from None
        return jsonify({"registered": [e[0].node_id for e in entries]}), 201

    @bp.delete("/api/v1/participants/<node_id>")
    def remove(node_id: str) -> Any:
        if not coord.remove(_hex32(node_id, "node id")):
            return _error("not_found", "no active participant with this node id", 404)
        return jsonify({"removed": node_id})

    @bp.post("/api/v1/artifacts")
    def upload() -> Any:
        if request.mimetype != "application/octet-stream":
            return _error("bad_content_type", "send the artifact as application/octet-stream", 415)
        data = _read_body(MAX_UPDATE_BYTES)
        if not data:
            raise BadRequest("empty artifact")
        return jsonify({"address": coord.store.put(data)}), 201

    @bp.post("/api/v1/tasks")
    def publish() -> Any:
        d = _json_object({"spec_hash": (str, True), "reward_wei": ((int, str), False)}, _request_json())
        reward = d.get("reward_wei", 0)
        if isinstance(reward, str):
            if not reward.isdigit():
                raise BadRequest("reward_wei must be a non-negative integer (a decimal string for large values)")
            reward = int(reward)
        if reward < 0 or reward >= 2**256:
            raise BadRequest("reward_wei must be in [0, 2**256)")
        try:
            spec = CODEC.decode(coord.store.get(_hex32(d["spec_hash"], "spec_hash")), TaskSpec)
            front = coord.store.get(spec.front_model_hash)
            initial = CODEC.decode(coord.store.get(spec.initial_model_hash), ModelWeights)
        except StoreError as exc:
            raise BadRequest(f"upload the task's artifacts first: {exc}", 422, "missing_artifact") from None
        except CrowdflError as exc:
            raise BadRequest(f"not a task spec / model: {exc}", 422, "bad_artifact") from None
        if initial.task_id != spec.task_id:
            raise BadRequest("the initial model belongs to another task", 422, "bad_artifact")
        try:
            spec_hash = coord.publish_task(spec, front, initial, reward_wei=reward)
        except ValueError as exc:
            raise BadRequest(str(exc), 409, "conflict") from None
        except ChainError as exc:  # publish_task queues chain work; this is a chain read failing
            raise BadRequest(f"chain unavailable: {exc}", 503, "chain_unavailable") from None
        return jsonify({"task_id": spec.task_id, "spec_hash": spec_hash}), 201

    return bp


class ApiServer(BackgroundHttpServer):
    """The coordinator's Flask app on waitress in a background thread."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, limits: HttpLimits | None = None) -> None:
        super().__init__(app, host, port, name="coordinator-api", limits=limits or HttpLimits(max_body_bytes=MAX_UPDATE_BYTES + 64 * 1024))
