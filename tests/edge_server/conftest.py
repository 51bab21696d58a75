"""The edge store runs on SQLite and on PostgreSQL: store and ingest tests take ``edge_db_url`` for both."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.realpart)])
def edge_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database per test: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edge.sqlite'}"
    server = request.getfixturevalue("postgres_server")  # skips (or fails under CI=true) without PostgreSQL
    return str(server.create_database(f"edge_{uuid.uuid4().hex[:12]}"))
