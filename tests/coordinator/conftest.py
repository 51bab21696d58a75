"""Coordinator test fixtures: the database parametrised over SQLite and PostgreSQL, the PoA chain."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.support.poa_chain import clique_chain  # noqa: F401  (PoA fixture)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.realpart)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh coordinator database: a SQLite file, or a new database on the test PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.sqlite'}"
    server = request.getfixturevalue("postgres_server")
    return str(server.create_database(f"coord_{uuid.uuid4().hex[:12]}"))


@pytest.fixture(autouse=True)
def _remember_identities(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Every Identity a test generates is kept by node id, so update_env can sign its device receipts."""
    from crowdfl.identity import Identity
    from tests.coordinator import world

    original = Identity.generate.__func__  # type: ignore[attr-defined]

    def generate(cls):  # type: ignore[no-untyped-def]
        ident = original(cls)
        world.KEYS[ident.node_id] = ident
        return ident

    monkeypatch.setattr(Identity, "generate", classmethod(generate))
    yield
    world.KEYS.clear()
