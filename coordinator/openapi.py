"""The coordinator API's contract (OpenAPI 3.1), served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

_HASH = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_WEI = {"type": "string", "pattern": "^[0-9]+$", "description": "wei, decimal string (exceeds JSON's safe integers)"}
_ERROR = {
    "description": "error with a reason",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


_AUDIT_JOB = {"type": "object", "properties": {
    "job_id": {"type": "string"}, "model_hash": {"type": "string"}, "status": {"enum": ["queued", "running", "done"]},
    "result_url": {"type": "string"}, "ok": {"type": "boolean"}, "lines": {"type": "array"}, "problems": {"type": "array"}}}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _get(summary: str, schema: dict[str, Any], params: list[str] = (), binary: bool = False) -> dict[str, Any]:  # type: ignore[assignment]
    ok = {"description": "OK", "content": {"application/octet-stream": {}}} if binary else _json(schema)
    return {"get": {
        "summary": summary,
        "parameters": [{"$ref": f"#/components/parameters/{p}"} for p in params],
        "responses": {"200": ok, "400": _ERROR, "404": _ERROR},
    }}


def _admin(method: str, summary: str, body: dict[str, Any] | None, created: dict[str, Any], params: list[str] = (), binary: bool = False) -> dict[str, Any]:  # type: ignore[assignment]
    op: dict[str, Any] = {
        "summary": summary + " (admin)",
        "security": [{"bearer": []}],
        "parameters": [{"$ref": f"#/components/parameters/{p}"} for p in params],
        "responses": {"200" if method == "delete" else "201": _json(created), "400": _ERROR, "401": _ERROR,
                      "404": _ERROR, "409": _ERROR, "415": _ERROR, "422": _ERROR},
    }
    if body is not None:
        ctype = "application/octet-stream" if binary else "application/json"
        op["requestBody"] = {"required": True, "content": {ctype: {"schema": body}}}
    return {method: op}


def openapi_document() -> dict[str, Any]:
    rnd = {
        "type": "object",
        "properties": {
            "round": {"type": "integer"}, "status": {"enum": ["open", "closed", "anchored"]},
            "accuracy": {"type": ["number", "null"], "description": "held-out accuracy of the round's global model"},
            "selected": {"type": "integer"}, "accepted": {"type": "integer"}, "rejected": {"type": "integer"},
            "model_hash": _HASH, "manifest_hash": _HASH, "merkle_root": _HASH, "ledger_hash": _HASH,
            "tx_hash": {"type": ["string", "null"]}, "block_number": {"type": ["integer", "null"]},
            "gas_used": {"type": ["integer", "null"]}, "settled": {"type": "boolean"},
            "settle_gas": {"type": ["integer", "null"], "description": "gas of the round's settleRound transaction"},
            "round_gas": {"type": "integer", "description": "the round's whole coordinator-side gas: anchor + settlement"},
            "credit_tx": {"type": ["string", "null"], "description": "the round's settleRound transaction"},
            "anchor_attempts": {"type": "integer"}, "anchor_error": {"type": ["string", "null"]},
        },
    }
    paths: dict[str, Any] = {
        "/api/v1/health": _get("liveness", {"type": "object"}),
        "/api/v1/openapi.json": _get("this document", {"type": "object"}),
        "/api/v1/artifacts/{address}": _get("an artifact by its sha256 (models, manifests, ledgers, updates)", {}, ["address"], binary=True),
        "/api/v1/artifacts": _admin("post", "upload an artifact (a task spec, front model, initial model)", {"type": "string", "format": "binary"},
                                    {"type": "object", "properties": {"address": _HASH}}, binary=True),
        "/api/v1/updates": {"post": {
            "summary": "an edge server submits a signed ModelUpdate envelope (authenticated by its signature)",
            "requestBody": {"required": True, "content": {"application/octet-stream": {}}},
            "responses": {"200": _json(_ref("Intake")), "400": _ERROR, "403": _ERROR, "404": _ERROR, "409": _ERROR,
                          "415": _ERROR, "422": _ERROR},
        }},
        "/api/v1/participants": {
            **_get("registered devices and edge servers", {"type": "array", "items": _ref("Participant")}),
            **_admin("post", "register participants", {"oneOf": [_ref("NewParticipant"), {
                "type": "object", "required": ["participants"], "additionalProperties": False,
                "properties": {"participants": {"type": "array", "items": _ref("NewParticipant"), "minItems": 1, "maxItems": 1000}}}]},
                {"type": "object", "properties": {"registered": {"type": "array", "items": _HASH}}}),
        },
        "/api/v1/participants/{node_id}": _admin(
            "delete", "remove a participant: its later updates are refused, the chain registry follows", None,
            {"type": "object", "properties": {"removed": _HASH}}, ["node_id"]),
        "/api/v1/tasks": {
            **_get("tasks", {"type": "array", "items": _ref("Task")}),
            **_admin("post", "publish a task whose spec, front and initial model were uploaded as artifacts", {
                "type": "object", "required": ["spec_hash"], "additionalProperties": False,
                "properties": {"spec_hash": _HASH, "reward_wei": {"oneOf": [{"type": "integer", "minimum": 0}, _WEI]}}},
                {"type": "object", "properties": {"task_id": _HASH, "spec_hash": _HASH}}),
        },
        "/api/v1/tasks/{task_id}": _get("one task and its progress", _ref("Task"), ["task_id"]),
        "/api/v1/tasks/{task_id}/rounds": _get(
            "per-round accuracy, participants, accepted/rejected, anchor tx and block", {"type": "array", "items": rnd}, ["task_id"]),
        "/api/v1/tasks/{task_id}/rounds/{round}": _get(
            "one round: selected customers, every update with its status, reason, score and reward", {
                "allOf": [rnd, {"type": "object", "properties": {
                    "selected_customers": {"type": "array", "items": _HASH},
                    "updates": {"type": "array", "items": {"type": "object", "properties": {
                        "update_hash": _HASH, "customer": _HASH, "edge": _HASH, "status": {"enum": ["received", "accepted", "rejected"]},
                        "reason": {"type": ["string", "null"]}, "num_samples": {"type": "integer"},
                        "score": {"type": ["number", "null"]}, "reputation": {"type": ["number", "null"]}, "reward_wei": _WEI}}}}}]},
            ["task_id", "round"]),
        "/api/v1/tasks/{task_id}/rounds/{round}/ledger": _get(
            "the round's ledger (selection, scores, reputations, rewards) as anchored through the manifest",
            {"type": "object"}, ["task_id", "round"]),
        "/api/v1/tasks/{task_id}/rounds/{round}/proofs/{customer}": _get(
            "a customer's update and its Merkle proof against the anchored root", {"type": "object", "properties": {
                "update_hash": _HASH, "status": {"type": "string"}, "reason": {"type": ["string", "null"]},
                "proof": {"type": "array", "items": _HASH}, "merkle_root": _HASH}}, ["task_id", "round", "customer"]),
        "/api/v1/tasks/{task_id}/rounds/{round}/leaves/{leaf}": _get(
            "Merkle proof of an update or device-receipt hash against the round's anchored root (check it on chain)",
            {"type": "object", "properties": {"leaf": _HASH, "proof": {"type": "array", "items": _HASH}, "merkle_root": _HASH}},
            ["task_id", "round", "leaf"]),
        "/api/v1/tasks/{task_id}/rounds/{round}/claims/{customer}": {
            **_get("a customer's settlement leaf (reputation x 1000, wei) and its proof against the settled root", {
                "type": "object", "properties": {"reputation_milli": {"type": "integer"}, "amount_wei": _WEI,
                                                 "proof": {"type": "array", "items": _HASH}}}, ["task_id", "round", "customer"]),
            "post": {
                "summary": "send the customer's claim on its behalf (the contract pays only its registered payout, once); "
                           "the coordinator pays the gas, so it sends one claim per customer and round at a time, waits "
                           "after a failed one and sends a limited number a minute (429 with Retry-After otherwise)",
                "parameters": [{"$ref": f"#/components/parameters/{p}"} for p in ("task_id", "round", "customer")],
                "responses": {"200": _json({"type": "object"}), "404": _ERROR, "409": _ERROR, "429": _ERROR, "503": _ERROR},
            },
        },
        "/api/v1/chain": _get("the contracts' addresses and the JSON-RPC URL the manufacturer suggests to customers",
                              {"type": "object", "properties": {"rpc_url": {"type": "string"}, "addresses": {"type": "object"}}}),
        "/api/v1/tasks/{task_id}/rounds/{round}/updates": _get(
            "the round's updates with status, reason, score, reputation and reward", {"type": "array", "items": {"type": "object"}},
            ["task_id", "round"]),
        "/api/v1/tasks/{task_id}/reputation": _get(
            "reputation over time: history maps customer -> [{round, score, reputation, reward_wei, selected}]",
            {"type": "object", "properties": {"task_id": _HASH, "history": {"type": "object", "additionalProperties": {
                "type": "array", "items": {"type": "object", "properties": {
                    "round": {"type": "integer"}, "score": {"type": ["number", "null"]}, "reputation": {"type": "number"},
                    "reward_wei": _WEI, "selected": {"type": "boolean"}}}}}}}, ["task_id"]),
        "/api/v1/tasks/{task_id}/rewards": _get("rewards per round and per customer", {"type": "object", "properties": {
            "pool_wei": _WEI, "rounds": {"type": "array"}, "customers": {"type": "array", "items": {"type": "object", "properties": {
                "customer": _HASH, "reputation": {"type": "number"}, "reward_wei": _WEI, "rounds": {"type": "object"}}}}}},
            ["task_id"]),
        "/api/v1/customers/{node_id}": _get(
            "a device's own view: contributions (with proofs to fetch), reputation history, rewards, samples used and the privacy each task spends per hour and per day of the household's usage", {
                "type": "object", "properties": {"reputation": {"type": ["number", "null"]}, "rewards_wei": _WEI,
                                                 "reputation_history": {"type": "array"}, "contributions": {"type": "array"},
                                                 "budget": {"type": "array"}, "budget_per_hour_bound": {"type": "number"},
                                                 "budget_per_day_bound": {"type": "number"}}}, ["node_id"]),
        "/api/v1/models/{model_hash}/verify": {"post": {
            "summary": "queue an audit of a global model from the chain and the content store alone (no database); "
                       "one runs at a time, a model already queued is not queued twice; fetch the result from result_url",
            "parameters": [{"$ref": "#/components/parameters/model_hash"}],
            "responses": {"202": _json(_AUDIT_JOB), "400": _ERROR, "429": _ERROR},
        }},
        "/api/v1/audits/{job_id}": {"get": {
            "summary": "an audit job: status queued | running | done; when done also ok, lines, problems, task_id, round",
            "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}],
            "responses": {"200": _json(_AUDIT_JOB), "400": _ERROR, "404": _ERROR},
        }},
        "/api/v1/tasks/{task_id}/anchors": _get("anchors: round, hashes, tx and block of the anchor, scores and credit",
                                                {"type": "array", "items": rnd}, ["task_id"]),
        "/api/v1/tasks/{task_id}/model": _get(
            "download the newest global model (ModelWeights wire bytes; X-Content-SHA256 and X-Round headers)", {},
            ["task_id"], binary=True),
    }
    params = {
        name: {"name": name, "in": "path", "required": True, "schema": schema}
        for name, schema in {"task_id": _HASH, "node_id": _HASH, "customer": _HASH, "address": _HASH, "model_hash": _HASH,
                             "leaf": _HASH, "round": {"type": "integer", "minimum": 1}}.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "crowdfl coordinator", "version": "1",
                 "description": "Tasks, rounds, participants, reputation, rewards, anchors and artifacts of a crowdfl "
                                "coordinator. Admin actions need `Authorization: Bearer <admin_token>` (coordinator config)."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "parameters": params,
            "schemas": {
                "Error": {"type": "object", "required": ["error", "detail"],
                          "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}},
                "Intake": {"type": "object", "properties": {"status": {"enum": ["received", "duplicate", "rejected"]},
                                                            "detail": {"type": "string"}, "update_hash": {"type": "string"},
                                                            "error": {"type": "string"}}},
                "NewParticipant": {"type": "object", "required": ["role", "node_id", "enc_key"], "additionalProperties": False,
                                   "properties": {"role": {"enum": ["device", "edge"]}, "node_id": _HASH, "enc_key": _HASH,
                                                  "edge": _HASH, "payout": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"}}},
                "Participant": {"type": "object", "properties": {
                    "node_id": _HASH, "role": {"enum": ["device", "edge"]}, "edge": {"type": ["string", "null"]},
                    "payout": {"type": ["string", "null"]}, "active": {"type": "boolean"}, "on_chain": {"type": "boolean"}}},
                "Task": {"type": "object", "properties": {
                    "task_id": _HASH, "spec_hash": _HASH, "status": {"enum": ["running", "done"]}, "title": {"type": "string"},
                    "rounds": {"type": "integer"}, "epsilon": {"type": "number"}, "aggregation": {"type": "string"},
                    "reward_wei": _WEI, "current_round": {"type": "integer"}, "on_chain": {"type": "boolean"}}},
            },
        },
    }
