"""Plumbing the two server roles share (never imported by the agent: it needs werkzeug and SQLAlchemy)."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine
from werkzeug.serving import BaseWSGIServer, make_server


class BackgroundHttpServer:
    """A WSGI app on a threaded werkzeug server in a background thread (127.0.0.1 unless told otherwise)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, name: str = "http") -> None:
        self._server: BaseWSGIServer = make_server(host, port, app, threaded=True)
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)
        self._server.server_close()


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
