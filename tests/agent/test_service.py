"""agent.service without a broker: messages are handed to ``Agent.handle`` as the MQTT link would."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from agent.privacy import HourCaps, PrivacyPolicy
from agent.service import Agent
from agent.state import AgentState
from agent.usage_log import UsageLog
from crowdfl.artifacts import ArtifactError
from crowdfl.envelope import seal
from crowdfl.identity import Identity, short_id
from crowdfl.messages import CODEC, RoundStart
from crowdfl.mqtt import Incoming, MqttLink, MqttSettings, round_topic, task_topic
from tests.agent.conftest import HISTORY_START
from tests.agent.world import household_reports


class Parts:
    def __init__(self, tmp: Path, designed) -> None:  # type: ignore[no-untyped-def]
        self.tmp, self.designed = tmp, designed
        self.coord, self.edge, self.device = Identity.generate(), Identity.generate(), Identity.generate()
        self.fetches = 0
        self.fail_fetches = 0
        usage = UsageLog(tmp / "usage.sqlite")
        usage.append(household_reports("svc-home", HISTORY_START, days=4))
        usage.close()

    def fetch(self, h: str) -> bytes:
        self.fetches += 1
        if self.fail_fetches:
            self.fail_fetches -= 1
            raise ArtifactError("unreachable", "coordinator down")
        assert h == self.designed.spec.front_model_hash
        return self.designed.front_tflite

    def agent(self) -> Agent:
        short = short_id(self.device.node_id)
        link = MqttLink(MqttSettings(), f"agent-{short}", Agent.subscriptions(short))  # never started
        return Agent(
            self.device, self.coord.public, self.edge.public, UsageLog(self.tmp / "usage.sqlite"),
            AgentState(self.tmp / "state.sqlite"), link, self.fetch, self.tmp / "models",
            # caps off: these tests release many overlapping windows from a 4-day log to exercise the
            # ledger and spool; the owner's default caps are tested below and in test_accountant.py
            PrivacyPolicy(8.0, caps=HourCaps()), np.random.default_rng(0),
        )

    def task_msg(self) -> Incoming:
        spec = self.designed.spec
        return Incoming(task_topic(spec.task_id), seal(CODEC.encode(spec), self.coord, time.time_ns()), True)

    def round_msg(self, n: int) -> Incoming:
        spec = self.designed.spec
        rs = RoundStart(spec.task_id, n, spec.initial_model_hash, (self.device.node_id,), spec.deadline)
        return Incoming(round_topic(spec.task_id), seal(CODEC.encode(rs), self.coord, time.time_ns()), True)


def close(agent: Agent) -> None:
    agent.state.close()
    agent.usage_log.close()


def test_join_is_retried_at_the_round_when_the_model_fetch_failed(tmp_path: Path, designed_task) -> None:  # type: ignore[no-untyped-def]
    parts = Parts(tmp_path, designed_task)
    parts.fail_fetches = 1
    agent = parts.agent()
    try:
        agent.handle(parts.task_msg())
        assert not agent.tasks and agent.stats.rejected_messages == 1
        agent.handle(parts.round_msg(1))  # the retained task is not sent again; the round brings the retry
        assert designed_task.spec.task_id in agent.tasks and parts.fetches == 2
        assert agent.state.released_in_round(designed_task.spec.task_id, 1) == designed_task.spec.samples_per_round
        assert len(agent.state.pending()) == 1
    finally:
        close(agent)


def test_a_restarted_agent_does_not_contribute_to_a_round_twice(tmp_path: Path, designed_task, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    parts = Parts(tmp_path, designed_task)
    first = parts.agent()
    first.handle(parts.task_msg())
    first.handle(parts.round_msg(1))
    spooled = first.state.pending()
    budget = first.state.budget()
    close(first)

    caplog.set_level(logging.INFO, logger="agent.service")
    second = parts.agent()  # after a power cut: the broker delivers the retained task and round again
    try:
        second.handle(parts.task_msg())
        second.handle(parts.round_msg(1))
        assert second.state.pending() == spooled  # the same envelope waits for its resend, nothing new
        assert second.state.budget() == budget
        assert second.stats.contributions == 0 and "already contributed" in caplog.text
        second.handle(parts.round_msg(2))  # the next round is contributed as usual, with fresh samples
        assert second.state.budget().samples_released == 2 * designed_task.spec.samples_per_round
    finally:
        close(second)


def test_a_round_with_no_fresh_sample_yet_is_retried_while_it_is_current(tmp_path: Path, designed_task) -> None:  # type: ignore[no-untyped-def]
    parts = Parts(tmp_path, designed_task)
    (tmp_path / "usage.sqlite").unlink()  # a new device: its first usage poll is not stored yet
    for extra in ("-wal", "-shm"):
        (tmp_path / f"usage.sqlite{extra}").unlink(missing_ok=True)
    agent = parts.agent()
    agent.retry_every_s = 0.0
    try:
        agent.handle(parts.task_msg())
        agent.handle(parts.round_msg(1))
        assert agent.state.budget().samples_released == 0 and agent._waiting
        agent.usage_log.append(household_reports("svc-home", HISTORY_START, days=4))
        agent.step(timeout=0.01)  # the retry finds the samples now
        spec = designed_task.spec
        assert agent.state.released_in_round(spec.task_id, 1) == spec.samples_per_round
        assert not agent._waiting
        agent.step(timeout=0.01)  # and does not contribute twice
        assert agent.state.budget().samples_released == spec.samples_per_round
    finally:
        close(agent)


def test_metrics_endpoint_reports_budget_and_spool(tmp_path: Path, designed_task) -> None:  # type: ignore[no-untyped-def]
    import urllib.request

    from agent.metrics import MetricsServer

    parts = Parts(tmp_path, designed_task)
    agent = parts.agent()
    server = MetricsServer(agent)
    server.start()
    try:
        agent.handle(parts.task_msg())
        agent.handle(parts.round_msg(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            text = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        n = designed_task.spec.samples_per_round
        assert f"crowdfl_agent_samples_released {n}" in text
        assert "crowdfl_agent_spool_pending 1" in text and "crowdfl_agent_mqtt_connected 0" in text
        assert f'crowdfl_agent_epsilon_spent{{task="{designed_task.spec.task_id[:16]}"}} {n * designed_task.spec.epsilon:g}' in text
        per_hour = agent.state.hour_budget().max_epsilon_per_hour
        assert per_hour >= designed_task.spec.epsilon  # at least one window on every hour it read
        assert f"crowdfl_agent_epsilon_max_per_hour {per_hour:g}" in text
    finally:
        server.stop()
        close(agent)


def test_the_agent_releases_only_what_the_hour_caps_allow_and_then_refuses(tmp_path: Path, designed_task) -> None:  # type: ignore[no-untyped-def]
    parts = Parts(tmp_path, designed_task)
    spec = designed_task.spec
    cap = 2 * spec.epsilon  # each hour may be in at most two released windows
    agent = parts.agent()
    agent.policy = PrivacyPolicy(8.0, caps=HourCaps(per_hour=cap))
    try:
        agent.handle(parts.task_msg())
        for n in range(1, 6):
            agent.handle(parts.round_msg(n))
        released = agent.state.budget().samples_released
        assert 0 < released < 5 * spec.samples_per_round  # 4 days of log: the cap, not the rounds, is the limit
        assert agent.state.spent_epsilon() <= cap + 1e-9
        assert agent.state.hour_budget().max_epsilon_per_hour == pytest.approx(cap)
        assert agent.stats.budget_refusals >= 1  # the last rounds found nothing within the caps
    finally:
        close(agent)


def test_a_device_draws_its_release_noise_from_the_os_csprng(tmp_path: Path, designed_task, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The exact discrete Laplace sampler on the OS CSPRNG (rng=None) on a device, never the agent's
    seeded numpy generator; only a simulation that asks for reproducible runs gets that."""
    import agent.service as service

    seen: list[object] = []
    real = service.privatise_features

    def spy(features, spec, rng=None):  # type: ignore[no-untyped-def]
        seen.append(rng)
        return real(features, spec, rng)

    monkeypatch.setattr(service, "privatise_features", spy)
    parts = Parts(tmp_path, designed_task)
    agent = parts.agent()
    try:
        agent.handle(parts.task_msg())
        agent.handle(parts.round_msg(1))
        assert seen == [None], seen
        agent.simulated_noise = True
        assert agent.noise_source() is agent.rng
    finally:
        close(agent)


def test_with_the_owners_defaults_the_default_stride_costs_each_hour_epsilon_once(tmp_path: Path, designed_task) -> None:  # type: ignore[no-untyped-def]
    """The default device (caps per hour and per day on) and a task on the default stride (24-hour
    windows every 25 hours): every window is released, no hour carries more than the per-sample
    epsilon and no day more than twice it. The same device holds a task sliding by one hour to its caps."""
    import dataclasses

    from agent.config import PrivacySettings

    from coordinator.task_model import TaskDesign

    owner = PrivacySettings()
    stride = TaskDesign().window_stride_hours
    daily = dataclasses.replace(designed_task, spec=dataclasses.replace(designed_task.spec, window_stride_hours=stride))
    parts = Parts(tmp_path, daily)
    agent = parts.agent()
    agent.policy = PrivacyPolicy(owner.max_epsilon, owner.require_label_privacy, HourCaps(owner.max_epsilon_per_hour, owner.max_epsilon_per_day))
    assert agent.policy == PrivacyPolicy()  # what a device gets when its owner sets nothing
    try:
        agent.handle(parts.task_msg())
        agent.handle(parts.round_msg(1))
        agent.handle(parts.round_msg(2))
        from agent.privacy import releasable
        from agent.samples import samples_from_log

        windows = releasable(samples_from_log(agent.usage_log, daily.spec).ids, daily.spec)
        assert len(windows) >= 2 and (windows % stride == 0).all()  # the log's complete windows on the stride
        assert agent.state.budget().samples_released == len(windows)  # every one of them, within the caps
        hours = agent.state.hour_budget()
        assert hours.max_epsilon_per_hour == pytest.approx(daily.spec.epsilon)  # no hour in two windows
        assert hours.max_epsilon_per_day <= 2 * daily.spec.epsilon + 1e-9
        assert hours.hours_accounted == 24 * len(windows)
        assert agent.stats.budget_refusals == 0  # round 2 found no fresh window, not a cap
    finally:
        close(agent)

    sliding_dir = tmp_path / "sliding"
    sliding_dir.mkdir()
    parts = Parts(sliding_dir, designed_task)  # stride 1: a window ending every hour
    agent = parts.agent()
    agent.policy = PrivacyPolicy()
    try:
        agent.handle(parts.task_msg())
        for n in range(1, 4):
            agent.handle(parts.round_msg(n))
        hours = agent.state.hour_budget()
        assert 0 < agent.state.budget().samples_released < designed_task.spec.samples_per_round
        assert hours.max_epsilon_per_hour <= owner.max_epsilon_per_hour + 1e-9
        assert hours.max_epsilon_per_day <= owner.max_epsilon_per_day + 1e-9
        assert agent.stats.budget_refusals >= 1  # the later rounds found nothing within the caps
    finally:
        close(agent)


def test_a_full_disk_leaves_the_round_unreleased_counted_and_retried(tmp_path: Path, designed_task) -> None:  # type: ignore[no-untyped-def]
    """The state database refuses to grow (a full SD card; real SQLITE_FULL through ``max_page_count``
    and a release too big for the pages left): the agent used to die on it, its ROLLBACK raising
    "no transaction is active" and hiding the cause. Now nothing is kept of the release, the
    failure is counted, and the round is retried once there is room."""
    parts = Parts(tmp_path, designed_task)
    agent = parts.agent()
    agent.retry_every_s = 0.0
    spec = designed_task.spec
    release = agent.state.release

    def bulky_release(*args, **kwargs):  # type: ignore[no-untyped-def]
        # pad the spooled envelope so that it needs new pages (the real one fits in the empty tables' root pages)
        seal_fn = args[5] if len(args) > 5 else kwargs.pop("seal")
        return release(*args[:5], lambda seq: seal_fn(seq) + b"\0" * 200_000 if full else seal_fn(seq), *args[6:], **kwargs)

    full = True
    agent.state.release = bulky_release  # type: ignore[method-assign]
    try:
        agent.handle(parts.task_msg())
        db = agent.state._db
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        agent.handle(parts.round_msg(1))
        assert agent.stats.storage_errors == 1
        assert agent.state.budget().samples_released == 0 and not agent.state.pending() and agent._waiting
        agent.step(timeout=0.01)  # still full: retried, counted again, nothing half-kept
        assert agent.stats.storage_errors == 2 and agent.state.budget().samples_released == 0
        db.execute("PRAGMA max_page_count = 1073741823")
        full = False
        agent.step(timeout=0.01)
        assert agent.state.released_in_round(spec.task_id, 1) == spec.samples_per_round
        assert len(agent.state.pending()) == 1 and not agent._waiting
    finally:
        close(agent)


def test_the_usage_log_takes_reports_again_after_a_full_disk(tmp_path: Path) -> None:
    usage = UsageLog(tmp_path / "usage.sqlite")
    try:
        db = usage._db
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        reports = household_reports("full-home", HISTORY_START, days=2)
        with pytest.raises(sqlite3.OperationalError):
            usage.append(reports)
        assert not db.in_transaction  # no transaction left open to refuse every later BEGIN
        db.execute("PRAGMA max_page_count = 1073741823")
        assert usage.append(reports) == len(reports)
    finally:
        usage.close()
