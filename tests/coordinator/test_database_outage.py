"""The coordinator while its database is unreachable (PostgreSQL restarting, a disk gone):

* the API answers 503 ``database_unavailable`` with the cause and ``Retry-After``, not an
  anonymous 500 (an edge retries 5xx answers; tests/faults/test_server_faults.py does it on a
  real PostgreSQL killed with SIGKILL);
* the serving loop of ``crowdfl-coordinator serve`` (``coordinator.cli.drive_once``) logs the
  failure and carries on; it used to let the error end the process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from coordinator.api import create_app
from coordinator.chain import ChainConfig, connect
from coordinator.cli import drive_once
from coordinator.contracts import CrowdContracts
from tests.coordinator.world import FRONT, make_world, task_parts, update_env


def _unreachable(tmp_path: Path) -> sessionmaker:  # type: ignore[type-arg]
    """Sessions on a database that cannot be opened (its folder does not exist): every use raises
    SQLAlchemy's OperationalError, as a PostgreSQL that is down does."""
    return sessionmaker(create_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'c.sqlite'}"))


def _swap_sessions(coord, sessions):  # type: ignore[no-untyped-def]
    """Point the coordinator and every part of it (views, registry, intake, engine, …) at other
    sessions, as a database going away does to all of them at once; returns what to restore."""
    parts = [coord, *(v for v in vars(coord).values() if hasattr(v, "sessions") and v is not coord.anchorer)]
    old = [(p, p.sessions) for p in parts]
    for p in parts:
        p.sessions = sessions
    return old


def _restore(old) -> None:  # type: ignore[no-untyped-def]
    for p, s in old:
        p.sessions = s


def test_api_answers_503_while_the_database_is_unreachable(tmp_path: Path) -> None:
    contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path, devices=2)
    spec, initial = task_parts(rounds=2)
    w.coord.publish_task(spec, FRONT, initial)
    w.coord.open_round(spec.task_id, 1)
    env = update_env(w.edge, spec, 1, w.devices[0], spec.initial_model_hash, 0.05, 1)
    client = create_app(w.coord).test_client()
    good = _swap_sessions(w.coord, _unreachable(tmp_path))
    try:
        for r in (
            client.post("/api/v1/updates", data=env, content_type="application/octet-stream"),
            client.get(f"/api/v1/tasks/{spec.task_id}/rounds"),
        ):
            assert r.status_code == 503, r.data
            assert r.json["error"] == "database_unavailable" and "unable to open database file" in r.json["detail"]
            assert r.headers["Retry-After"] == "5"
    finally:
        _restore(good)
    r = client.post("/api/v1/updates", data=env, content_type="application/octet-stream")
    assert r.status_code == 200 and r.json["status"] == "received"  # the retry goes through


def test_the_serving_loop_survives_an_unreachable_database(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path, devices=2)
    spec, initial = task_parts(rounds=2)
    w.coord.publish_task(spec, FRONT, initial)
    good = _swap_sessions(w.coord, _unreachable(tmp_path))
    caplog.set_level(logging.ERROR)
    drive_once(w.coord, 3600.0)  # raised OperationalError out of the loop before
    assert "cannot list the running tasks" in caplog.text
    _restore(good)
    w.coord.anchorer.sessions = _unreachable(tmp_path)
    drive_once(w.coord, 3600.0)  # the step opens round 1; the anchoring fails, is logged, and the loop goes on
    assert "anchoring pass failed" in caplog.text
    assert w.coord.current_round(spec.task_id) is not None
    w.coord.anchorer.sessions = good
    drive_once(w.coord, 3600.0)
