"""Shared by the agent tests: one small real task (TensorFlow design, int8 front) per session."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

HISTORY_START = datetime(2026, 9, 1, tzinfo=UTC)


@pytest.fixture(scope="session")
def designed_task():  # type: ignore[no-untyped-def]
    """A real task from coordinator.task_model.design_task, kept small so it builds in seconds."""
    from coordinator.task_model import TaskDesign, design_task

    return design_task(
        TaskDesign(rounds=3, epsilon=4.0, samples_per_round=16, lab_households=3, lab_days=14, local_epochs=2, seed=11),
        HISTORY_START,
    )
