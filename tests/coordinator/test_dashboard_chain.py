"""The customer page checks against the chain through a JSON-RPC URL the customer sets."""

from __future__ import annotations

import re
from pathlib import Path

from agent.chainview import SELECTORS

STATIC = Path(__file__).resolve().parents[2] / "coordinator" / "dashboard" / "static"


def test_customer_page_selectors_are_the_contracts() -> None:
    js = (STATIC / "customer.js").read_text()
    found = dict(re.findall(r'(\w+): "(0x[0-9a-f]{8})"', js))
    by_name = {sig.split("(")[0]: sel for sig, sel in SELECTORS.items()}  # checked against the artifacts in test_agent_verify
    assert found and all(by_name[name] == sel for name, sel in found.items()), found


def test_customer_page_reads_roots_from_its_own_rpc_not_the_coordinator() -> None:
    js = (STATIC / "customer.js").read_text()
    assert "p.merkle_root" not in js  # the coordinator's root is never the reference
    assert 'method: "eth_call"' in js and "rpc-url" in js and "localStorage" in js
