"""Shared by the agent tests: one small real task (TensorFlow design, int8 front) per session."""

from __future__ import annotations

import importlib.util
from datetime import datetime, timezone

import pytest

HISTORY_START = datetime(2026, 9, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="session")
def designed_task():  # type: ignore[no-untyped-def]
    """A real task from coordinator.task_model.design_task, kept small so it builds in seconds."""
    if importlib.util.find_spec("tensorflow") is None:
        # scripts/test-agent-pythons.sh runs the agent's tests in device venvs (Python 3.10-3.13,
        # no TensorFlow); the tests that need a freshly designed task run in the full venv.
        pytest.skip("designing a task needs TensorFlow (the coordinator's side); not in this agent-only venv")
    from coordinator.task_model import TaskDesign, design_task

    return design_task(
        # windows sliding by an hour (not the default task's daily stride): the agent tests release
        # 16 samples a round from 4-day logs, with the caps off where they say so
        TaskDesign(rounds=3, epsilon=4.0, samples_per_round=16, lab_households=3, lab_days=14, local_epochs=2, seed=11,
                   window_stride_hours=1),
        HISTORY_START,
    )
