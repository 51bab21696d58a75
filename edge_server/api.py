"""The edge's operations endpoint (Flask): ``/healthz`` for systemd/monitoring, ``/metrics`` for Prometheus.

It binds 127.0.0.1 by default: a node exporter or a reverse proxy on the host scrapes it, the
edge never exposes its own HTTP port to the network.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, jsonify

from crowdfl.serving import BackgroundHttpServer, HttpLimits

from .config import EDGE_HTTP_LIMITS

from crowdfl.metrics import CONTENT_TYPE, Exposition

if TYPE_CHECKING:
    from .service import EdgeServer

log = logging.getLogger(__name__)


def health(server: EdgeServer) -> tuple[dict[str, Any], int]:
    """ok (200), degraded (200: no broker, which a restart would not fix) or failing (503)."""
    threads = server.threads_alive()
    db_ok = server.store.ping()
    mqtt_ok = server.link.connected.is_set()
    failing = not db_ok or not threads or not all(threads.values())
    status = "failing" if failing else ("ok" if mqtt_ok else "degraded")
    body = {
        "status": status,
        "database": db_ok,
        "mqtt_connected": mqtt_ok,
        "threads": threads,
        "tasks": len(server.tasks),
        "training_queue": server.queue_depth,
        "inbox": server.link.inbox.qsize(),
    }
    return body, 503 if failing else 200


def render_metrics(server: EdgeServer) -> str:
    ing, st = server.ingestor.stats, server.stats
    x = Exposition()
    x.counter("crowdfl_edge_messages_total", "Feature messages taken from the MQTT inbox.", ing.messages)
    x.counter("crowdfl_edge_batches_accepted_total", "Feature batches verified, decrypted, validated and stored.", ing.accepted)
    x.counter("crowdfl_edge_batches_duplicate_total", "Resent batches already stored (acknowledged again, stored once).", ing.duplicates)
    rejected = dict(ing.rejected)  # one C-level copy: safe while the ingest thread counts
    x.counter(
        "crowdfl_edge_messages_rejected_total", "Feature messages rejected, by reason.",
        {(("reason", r),): float(n) for r, n in rejected.items()},
    )
    control = dict(st.control_rejected)
    x.counter(
        "crowdfl_edge_control_rejected_total", "Task and round messages refused (bad signature, not the coordinator's, malformed), by reason.",
        {(("reason", r),): float(n) for r, n in control.items()},
    )
    x.counter("crowdfl_edge_samples_stored_total", "Noisy feature samples stored.", ing.samples)
    x.counter("crowdfl_edge_drains_total", "Inbox drains (one database transaction each).", ing.drains)
    x.gauge("crowdfl_edge_inbox_depth", "Messages received from the broker and not yet processed.", server.link.inbox.qsize())
    x.counter("crowdfl_edge_inbox_dropped_total", "Messages dropped because the inbox was full (devices resend).", server.link.dropped)
    x.gauge("crowdfl_edge_mqtt_connected", "1 while connected to the MQTT broker.", 1 if server.link.connected.is_set() else 0)
    x.gauge("crowdfl_edge_training_queue_depth", "Customers waiting to be trained.", server.queue_depth)
    x.counter("crowdfl_edge_trained_total", "Per-customer training runs that produced an update.", st.trained)
    x.counter("crowdfl_edge_train_failures_total", "Training runs that failed (retried with back-off).", st.train_failures)
    x.counter("crowdfl_edge_jobs_rescheduled_total", "Training jobs re-created from the database (restart, failure).", st.rescheduled)
    x.histogram("crowdfl_edge_train_seconds", "Wall time to train one customer's dense layers.", st.train_time)
    x.counter("crowdfl_edge_updates_submitted_total", "Updates the coordinator took (received or duplicate).", st.submitted)
    x.counter("crowdfl_edge_updates_duplicate_total", "Submissions the coordinator already had (resent after a crash).", st.submit_duplicates)
    x.counter("crowdfl_edge_updates_rejected_total", "Updates the coordinator refused.", st.submit_rejected)
    x.counter("crowdfl_edge_update_submit_retries_total", "Submissions deferred because the coordinator was unreachable.", st.submit_retries)
    try:
        unsubmitted = server.store.counts()["unsubmitted_updates"]
    except Exception:  # the scrape must still answer when the database does not
        log.exception("metrics: database count failed")
        unsubmitted = float("nan")
    x.gauge("crowdfl_edge_updates_unsubmitted", "Updates saved and not yet taken by the coordinator.", unsubmitted)
    x.gauge("crowdfl_edge_start_time_seconds", "Unix time the edge server started.", server.started_at)
    return x.render()


def create_app(server: EdgeServer) -> Flask:
    app = Flask("crowdfl.edge")

    @app.get("/healthz")
    def healthz() -> Any:
        body, code = health(server)
        return jsonify(body), code

    @app.get("/metrics")
    def metrics() -> Any:
        return Response(render_metrics(server), mimetype=None, content_type=CONTENT_TYPE)

    return app


class HttpServer(BackgroundHttpServer):
    """The edge's health and metrics app on waitress in a background thread (GET only: tiny bodies)."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, limits: HttpLimits | None = None) -> None:
        super().__init__(app, host, port, name="edge-http", limits=limits or EDGE_HTTP_LIMITS)
