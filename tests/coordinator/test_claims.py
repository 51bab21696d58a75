"""Claims the coordinator sends on a customer's behalf cost it gas, so they are rationed
(coordinator/claims.py): one per customer and round in flight, a wait after a failed one, a cap a
minute; a refusal is a 429 with Retry-After, no transaction is sent, and every outcome is counted."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from coordinator.api import create_app
from coordinator.chain import ChainConfig, ChainError, connect
from coordinator.claims import ClaimLimits, ClaimSender, ClaimThrottled
from coordinator.contracts import CrowdContracts
from tests.coordinator.world import FRONT, make_world, task_parts, update_env

TASK, OTHER = "aa" * 32, "bb" * 32
ALICE, BOB, CAROL = "a1" * 32, "b2" * 32, "c3" * 32


class FakeChain:
    """The two calls a ClaimSender makes; ``claim`` can fail, or run a hook while it is "in flight"."""

    def __init__(self) -> None:
        self.claimed: set[tuple[bytes, int, bytes]] = set()
        self.sent: list[tuple[bytes, int, bytes]] = []
        self.fail: ChainError | None = None
        self.while_sending: Any = None

    def is_claimed(self, tid: bytes, round_: int, key: bytes) -> bool:
        return (tid, round_, key) in self.claimed

    def claim(self, tid: bytes, round_: int, key: bytes, rep: int, amount: int, proof: list[bytes]) -> Any:
        self.sent.append((tid, round_, key))
        if self.while_sending is not None:
            self.while_sending()
        if self.fail is not None:
            raise self.fail
        self.claimed.add((tid, round_, key))
        return SimpleNamespace(tx_hash=bytes([len(self.sent)]) * 32)


def _leaf(task_id: str, round_: int, customer: str) -> dict[str, Any] | None:
    if customer == CAROL:
        return None  # nothing settled for her
    return {"reputation_milli": 500, "amount_wei": "7", "proof": []}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _sender(limits: ClaimLimits) -> tuple[ClaimSender, FakeChain, Clock]:
    chain, clock = FakeChain(), Clock()
    return ClaimSender(chain, _leaf, limits, clock), chain, clock  # type: ignore[arg-type]


def test_a_second_request_while_the_first_is_in_flight_is_refused_without_a_transaction() -> None:
    sender, chain, _ = _sender(ClaimLimits())
    refused: list[ClaimThrottled] = []

    def again() -> None:
        with pytest.raises(ClaimThrottled) as exc:
            sender.submit_claim(TASK, 1, ALICE)
        refused.append(exc.value)

    chain.while_sending = again
    assert sender.submit_claim(TASK, 1, ALICE)["status"] == "claimed"
    assert len(chain.sent) == 1 and refused[0].reason == "in_progress"
    chain.while_sending = None
    assert sender.submit_claim(TASK, 1, ALICE) == {"status": "already_claimed"}  # after it: the chain's answer
    assert len(chain.sent) == 1
    assert sender.counts == {("claimed", ""): 1, ("throttled", "in_progress"): 1, ("already_claimed", ""): 1}


def test_after_a_failed_claim_the_same_leaf_waits_and_others_do_not() -> None:
    sender, chain, clock = _sender(ClaimLimits(per_minute=100, retry_after_s=60))
    chain.fail = ChainError("execution reverted", reverted=True)
    with pytest.raises(ChainError):
        sender.submit_claim(TASK, 1, ALICE)
    clock.now += 20
    with pytest.raises(ClaimThrottled) as exc:
        sender.submit_claim(TASK, 1, ALICE)
    assert exc.value.reason == "recent_failure" and exc.value.retry_after_s == pytest.approx(40)
    assert exc.value.retry_after_header == "40"
    assert len(chain.sent) == 1  # the refused one sent nothing
    with pytest.raises(ChainError):  # another round of the same customer is another leaf
        sender.submit_claim(TASK, 2, ALICE)
    chain.fail = None
    assert sender.submit_claim(OTHER, 1, ALICE)["status"] == "claimed"
    clock.now += 40
    assert sender.submit_claim(TASK, 1, ALICE)["status"] == "claimed"  # the wait is over
    assert len(chain.sent) == 4
    assert sender.counts[("failed", "reverted")] == 2 and sender.counts[("throttled", "recent_failure")] == 1


def test_the_coordinator_sends_at_most_per_minute_claims() -> None:
    sender, chain, clock = _sender(ClaimLimits(per_minute=2))
    for customer in (ALICE, BOB):
        assert sender.submit_claim(TASK, 1, customer)["status"] == "claimed"
    clock.now += 30
    with pytest.raises(ClaimThrottled) as exc:
        sender.submit_claim(OTHER, 1, ALICE)
    assert exc.value.reason == "rate" and exc.value.retry_after_s == pytest.approx(30)
    assert sender.submit_claim(TASK, 1, ALICE) == {"status": "already_claimed"}  # answered from the chain, not rationed
    with pytest.raises(KeyError):  # nothing settled: no transaction either, and not rationed
        sender.submit_claim(TASK, 1, CAROL)
    clock.now += 30
    assert sender.submit_claim(OTHER, 1, ALICE)["status"] == "claimed"  # the window moved on
    assert len(chain.sent) == 3
    assert sender.counts[("throttled", "rate")] == 1 and sender.counts[("not_found", "")] == 1
    # a refused request releases its slot: the same leaf is not stuck "in progress"
    sender.limits = ClaimLimits(per_minute=0)
    for _ in range(2):
        with pytest.raises(ClaimThrottled) as exc:
            sender.submit_claim(OTHER, 2, BOB)
        assert exc.value.reason == "rate"


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        ClaimLimits(per_minute=-1)
    with pytest.raises(ValueError):
        ClaimLimits(retry_after_s=float("nan"))


def test_over_http_a_throttled_claim_is_a_429_sends_nothing_and_is_counted(tmp_path: Path) -> None:
    contracts = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    w = make_world(contracts, f"sqlite:///{tmp_path / 'c.sqlite'}", tmp_path)
    spec, initial = task_parts(rounds=1)
    w.coord.publish_task(spec, FRONT, initial, reward_wei=10**15)
    rs = w.coord.open_round(spec.task_id, 1)
    for i, node in enumerate(rs.selected):
        assert w.coord.receive_update(update_env(w.edge, spec, 1, node, rs.global_model_hash, 0.05, i + 1)).status == "received"
    w.coord.close_round(spec.task_id, 1)
    w.coord.anchor_pending()
    paid = [c["customer"] for c in w.coord.rewards(spec.task_id)["customers"] if int(c["reward_wei"]) > 0]
    assert len(paid) >= 2
    w.coord.claims.limits = ClaimLimits(per_minute=1)
    client = create_app(w.coord).test_client()
    url = f"/api/v1/tasks/{spec.task_id}/rounds/1/claims/"
    w3, me = contracts.client.w3, contracts.client.account.address

    first = client.post(url + paid[0])
    assert first.status_code == 200 and first.json["status"] == "claimed", first.json
    nonce = w3.eth.get_transaction_count(me)
    second = client.post(url + paid[1])
    assert second.status_code == 429, second.json
    assert second.json["error"] == "too_many_requests" and "claims a minute" in second.json["detail"]
    assert 1 <= int(second.headers["Retry-After"]) <= 60
    assert w3.eth.get_transaction_count(me) == nonce  # no transaction, no gas
    assert not contracts.is_claimed(bytes.fromhex(spec.task_id), 1, bytes.fromhex(paid[1]))
    again = client.post(url + paid[0])
    assert again.status_code == 200 and again.json == {"status": "already_claimed"}

    metrics = client.get("/metrics").get_data(as_text=True)
    for outcome, reason in (("claimed", ""), ("throttled", "rate"), ("already_claimed", "")):
        assert f'crowdfl_coordinator_claims_total{{outcome="{outcome}",reason="{reason}"}} 1.0' in metrics, metrics


def test_the_limits_come_from_the_config_file_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.config import load
    from crowdfl.errors import ConfigError

    cfg = tmp_path / "coordinator.toml"
    cfg.write_text("[claims]\nper_minute = 5\n")
    monkeypatch.setenv("CROWDFL_COORDINATOR__CLAIMS__RETRY_AFTER_S", "7")
    assert load(cfg).claims == ClaimLimits(per_minute=5, retry_after_s=7.0)
    cfg.write_text("[claims]\nper_minute = -1\n")
    with pytest.raises(ConfigError, match="per_minute"):
        load(cfg)
