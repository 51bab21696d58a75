"""Permanent refusals are answered: the edge signs a Nack for an authentic envelope it refuses for
good, and the agent drops it from its spool instead of resending it every 30 s for ever."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from crowdfl.envelope import seal
from crowdfl.identity import Identity, short_id
from crowdfl.messages import CODEC, Ack, Nack
from crowdfl.mqtt import Incoming, ack_topic
from tests.agent.test_service import Parts, close


def _answer(parts: Parts, body: object, signer: Identity | None = None) -> Incoming:
    topic = ack_topic(short_id(parts.edge.node_id), short_id(parts.device.node_id))
    return Incoming(topic, seal(CODEC.encode(body), signer or parts.edge, time.time_ns()), False)


def test_a_nack_drops_the_envelope_from_the_spool(tmp_path: Path, designed_task) -> None:  # type: ignore[no-untyped-def]
    parts = Parts(tmp_path, designed_task)
    agent = parts.agent()
    try:
        agent.handle(parts.task_msg())
        agent.handle(parts.round_msg(1))
        agent.handle(parts.round_msg(2))
        first, second = [p.seq for p in agent.state.pending()]
        # a forged refusal (not the edge's key) and one addressed to another device change nothing
        agent.handle(_answer(parts, Nack(parts.device.node_id, np.array([first], np.uint64), ("bad_label",)), Identity.generate()))
        agent.handle(_answer(parts, Nack("ab" * 32, np.array([first], np.uint64), ("bad_label",))))
        assert [p.seq for p in agent.state.pending()] == [first, second] and agent.stats.rejected_messages == 2
        agent.handle(_answer(parts, Nack(parts.device.node_id, np.array([first], np.uint64), ("sample_reuse",))))
        assert [p.seq for p in agent.state.pending()] == [second] and agent.stats.refused_envelopes == 1
        agent.handle(_answer(parts, Ack(parts.device.node_id, np.array([second], np.uint64))))
        assert agent.state.pending() == []
        # the refused samples stay released: the ledger never hands them out again
        assert agent.state.budget().samples_released == 2 * designed_task.spec.samples_per_round
    finally:
        close(agent)
