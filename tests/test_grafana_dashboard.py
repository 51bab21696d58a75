"""The sample Grafana dashboard only queries metrics the roles actually export."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_queried_metric_is_exported() -> None:
    dash = json.loads((ROOT / "hardware/grafana/crowdfl-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    queried = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"crowdfl_[a-z_]+", e)}
    sources = "".join((ROOT / f).read_text() for f in ("agent/metrics.py", "edge_server/api.py", "coordinator/metrics.py"))
    exported = set(re.findall(r'"(crowdfl_[a-z_]+)"', sources))
    assert queried <= exported, sorted(queried - exported)
    assert {m.split("_")[1] for m in queried} == {"agent", "edge", "coordinator"}
