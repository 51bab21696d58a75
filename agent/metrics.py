"""The agent's Prometheus metrics, served by the standard library on 127.0.0.1 (no Flask on a Pi)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from crowdfl.metrics import CONTENT_TYPE, Exposition

from .service import Agent


def render_agent_metrics(agent: Agent) -> str:
    budget = agent.state.budget()
    x = Exposition()
    x.counter("crowdfl_agent_contributions_total", "Feature batches released since start.", agent.stats.contributions)
    x.gauge("crowdfl_agent_samples_released", "Samples ever released (each once), from the privacy ledger.", budget.samples_released)
    x.gauge("crowdfl_agent_epsilon_max_per_sample", "Largest epsilon spent on one released sample.", budget.max_epsilon_per_sample)
    x.gauge(
        "crowdfl_agent_epsilon_spent", "Epsilon summed over released samples, by task.",
        {(("task", t[:16]),): e for t, (_, e) in budget.by_task.items()},
    )
    hours = agent.state.hour_budget()
    x.gauge("crowdfl_agent_epsilon_max_per_hour", "Largest epsilon one hour of the usage log carries, over every release.", hours.max_epsilon_per_hour)
    x.gauge("crowdfl_agent_epsilon_max_per_day", "Largest epsilon one UTC day of the usage log carries, over every release.", hours.max_epsilon_per_day)
    x.counter(
        "crowdfl_agent_storage_errors_total", "Writes to the local state that failed (e.g. a full disk); retried, nothing half-kept.",
        agent.stats.storage_errors,
    )
    x.counter("crowdfl_agent_budget_refusals_total", "Rounds with nothing releasable within the per-hour/day caps.", agent.stats.budget_refusals)
    x.gauge("crowdfl_agent_spool_pending", "Envelopes waiting for the edge's acknowledgement.", len(agent.state.pending(limit=1_000_000)))
    x.gauge("crowdfl_agent_spool_bytes", "Bytes in the outgoing spool.", agent.state.spool_bytes())
    x.counter("crowdfl_agent_messages_rejected_total", "Inbound MQTT messages that failed verification.", agent.stats.rejected_messages)
    x.counter("crowdfl_agent_envelopes_refused_total", "Envelopes the edge refused for good (Nack), dropped from the spool.", agent.stats.refused_envelopes)
    x.counter("crowdfl_agent_tasks_refused_total", "Tasks refused by the owner's privacy policy.", agent.stats.refused_tasks)
    x.gauge("crowdfl_agent_mqtt_connected", "1 while connected to the edge's broker.", 1.0 if agent.link.connected.is_set() else 0.0)
    x.gauge("crowdfl_agent_usage_reports", "Usage reports in the local log.", agent.usage_log.count())
    return x.render()


class MetricsServer:
    """``GET /metrics`` on a loopback port, in a daemon thread."""

    def __init__(self, agent: Agent, host: str = "127.0.0.1", port: int = 0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = render_agent_metrics(agent).encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # scrapes are not worth a journal line
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="agent-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
