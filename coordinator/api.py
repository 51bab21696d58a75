"""The coordinator's HTTP API (Flask): update intake, artifacts, tasks, rounds, proofs."""

from __future__ import annotations

import logging
import threading
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.serving import BaseWSGIServer, make_server

from .service import Coordinator
from .store import StoreError

log = logging.getLogger(__name__)

MAX_UPDATE_BYTES = 16 * 1024 * 1024


def create_app(coord: Coordinator) -> Flask:
    app = Flask("crowdfl.coordinator")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPDATE_BYTES

    @app.get("/api/v1/health")
    def health() -> Any:
        return jsonify({"status": "ok"})

    @app.get("/api/v1/artifacts/<address>")
    def artifact(address: str) -> Any:
        try:
            data = coord.store.get(address)
        except StoreError as exc:
            if exc.code == "corrupt":
                log.error("content store: %s", exc)
                return jsonify({"error": exc.code, "detail": exc.detail}), 500
            return jsonify({"error": exc.code, "detail": exc.detail}), 404 if exc.code == "missing" else 400
        return Response(data, mimetype="application/octet-stream", headers={"X-Content-SHA256": address})

    @app.post("/api/v1/updates")
    def updates() -> Any:
        if request.mimetype != "application/octet-stream":
            return jsonify({"error": "bad_content_type", "detail": "send the raw envelope as application/octet-stream"}), 415
        result = coord.receive_update(request.get_data(cache=False))
        body = {"status": result.status, "detail": result.detail, "update_hash": result.update_hash}
        if result.status == "rejected":
            body["error"] = result.detail.split(":", 1)[0]
        return jsonify(body), result.http_status

    @app.get("/api/v1/tasks")
    def tasks() -> Any:
        return jsonify(coord.tasks())

    @app.get("/api/v1/tasks/<task_id>/rounds")
    def rounds(task_id: str) -> Any:
        return jsonify(coord.rounds(task_id))

    @app.get("/api/v1/tasks/<task_id>/rounds/<int:round_>/proofs/<customer>")
    def proof(task_id: str, round_: int, customer: str) -> Any:
        p = coord.proof(task_id, round_, customer)
        if p is None:
            return jsonify({"error": "not_found", "detail": "no update of this customer in that round"}), 404
        return jsonify(p)

    return app


class ApiServer:
    """The Flask app on a werkzeug server in a background thread (127.0.0.1 unless told otherwise)."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server: BaseWSGIServer = make_server(host, port, app, threaded=True)
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="coordinator-api", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)
