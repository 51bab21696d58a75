"""Plumbing the two server roles share (never imported by the agent: it needs waitress and SQLAlchemy)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine
from waitress import wasyncore
from waitress.server import BaseWSGIServer, MultiSocketServer, create_server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP client may cost the server. waitress enforces them before the app runs: a
    body (chunked too) over ``max_body_bytes`` is answered 413, headers over ``max_header_bytes``
    431, a connection idle for ``idle_timeout_s`` is closed, and at most ``max_connections`` are
    open at once (more wait in the listen backlog)."""

    max_body_bytes: int = 16 * 1024 * 1024 + 64 * 1024  # the largest update envelope, with room to spare
    max_header_bytes: int = 64 * 1024
    idle_timeout_s: int = 60
    max_connections: int = 100
    threads: int = 8

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_header_bytes", "idle_timeout_s", "max_connections", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HttpLimits.{name} must be positive")

    def waitress_options(self) -> dict[str, Any]:
        return {
            "max_request_body_size": self.max_body_bytes,
            "max_request_header_size": self.max_header_bytes,
            "channel_timeout": self.idle_timeout_s,
            "connection_limit": self.max_connections,
            "threads": self.threads,
            "cleanup_interval": max(1, min(30, self.idle_timeout_s // 2)),
            "ident": "crowdfl",
            "expose_tracebacks": False,
            "clear_untrusted_proxy_headers": True,
        }


class BackgroundHttpServer:
    """A WSGI app on waitress (a production WSGI server, not werkzeug's development one) in a
    background thread, on 127.0.0.1 unless told otherwise, with :class:`HttpLimits`."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, name: str = "http", limits: HttpLimits | None = None
    ) -> None:
        self.limits = limits or HttpLimits()
        self._map: dict[int, Any] = {}
        self._server: BaseWSGIServer | MultiSocketServer = create_server(
            app, map=self._map, host=host, port=port, **self.limits.waitress_options()
        )
        self.host = host
        self.port = int(self._server.effective_port)  # type: ignore[union-attr]
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._server.run()
        except Exception:  # the loop ends when stop() closes every channel; anything else is logged
            if self._map:
                log.exception("HTTP server loop failed")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every open connection, let the worker threads finish, join."""
        wasyncore.close_all(self._map, ignore_all=True)
        self._map.clear()
        self._server.task_dispatcher.shutdown()  # type: ignore[union-attr]
        self._thread.join(timeout=10)


def make_engine(url: str, metadata: MetaData) -> Engine:
    """An engine with the role's tables created; SQLite in WAL mode with durable commits."""
    engine = create_engine(url, future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

    metadata.create_all(engine)
    return engine
