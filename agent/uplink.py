"""The uplink: publishes the spool over MQTT (QoS 1) until the edge server acknowledges.

The broker's PUBACK only says the broker has the message; an entry leaves the spool when the edge
signs an ``Ack`` for its sequence number. Until then it is republished every ``resend_after_s``;
the edge's dedupe on (device, seq) makes a resend harmless.
"""

from __future__ import annotations

import logging
import time

from crowdfl.mqtt import MqttLink

from .state import AgentState

log = logging.getLogger(__name__)


class Uplink:
    def __init__(self, link: MqttLink, state: AgentState, resend_after_s: float = 30.0) -> None:
        self.link = link
        self.state = state
        self.resend_after_s = resend_after_s
        self._last_sent: dict[int, float] = {}

    def flush(self, now: float | None = None, limit: int = 100) -> int:
        """Publish spooled envelopes that were never sent in this run or are due for a resend."""
        if not self.link.connected.is_set():
            return 0
        now = time.monotonic() if now is None else now
        sent = 0
        for item in self.state.pending(limit):
            last = self._last_sent.get(item.seq)
            if last is not None and now - last < self.resend_after_s:
                continue
            info = self.link.publish(item.topic, item.payload, qos=1)
            if info.rc != 0:
                log.warning("publish of seq %d failed (rc=%s); will retry", item.seq, info.rc)
                break
            self._last_sent[item.seq] = now
            self.state.mark_attempt(item.seq)
            if last is not None:
                log.info("resent seq %d (attempt %d, not yet acknowledged by the edge)", item.seq, item.attempts + 1)
            sent += 1
        return sent

    def acknowledged(self, seqs: list[int]) -> int:
        for s in seqs:
            self._last_sent.pop(s, None)
        return self.state.acknowledge(seqs)
