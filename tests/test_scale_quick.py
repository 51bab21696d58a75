"""bench/scale.py --quick end to end on the real parts: mosquitto (TLS, ACL per account), PostgreSQL,
the EthereumJS clique chain, the real ``crowdfl-coordinator serve`` and ``crowdfl-edge run``
processes, and the light device simulator (the agent's own release, receipt and envelope code).

Every selected device's update must be accepted, anchored and settled, every device must have
released exactly one batch and received its edge's acknowledgement only after it (round 1 takes
none), and the figures the README quotes from the full run must all be there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mosquitto import find_tools
from tests.support.poa_chain import ethereumjs_missing
from tests.support.postgres import availability
from tests.support.realparts import require_real_part

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.realpart, pytest.mark.slow]


def test_scale_bench_quick(tmp_path: Path) -> None:
    tools, why = find_tools()
    require_real_part("mosquitto", tools is not None, why)
    require_real_part("postgresql", *availability())
    missing = ethereumjs_missing()
    require_real_part("@ethereumjs/client", missing is None, missing or "")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "bench/scale.py", "--quick", "--results-dir", str(tmp_path)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    record = json.loads((tmp_path / "scale.quick.json").read_text())
    assert record["quick"] is True and "bench/scale.py" in record["command"]
    rows = record["figures"]["rows"]
    assert [r["devices"] for r in rows] == [10, 100] and all(r["edges"] == 2 for r in rows)
    for r in rows:
        (rnd,) = r["per_round"]
        sim = rnd["simulator"]
        assert sim["released"] == sim["published"] == r["devices"] and sim["error_count"] == 0, sim
        assert rnd["accepted"] == rnd["selected"] == r["devices"], rnd
        assert rnd["gas"] > 100_000 and 0.0 <= rnd["accuracy"] <= 1.0
        assert r["seconds_per_round"] > 0 and r["system_cpu_s_per_device"] > 0
        # every role's processes were found and read (a ten-device round may cost the broker < 10 ms)
        assert set(rnd["cpu_s"]) == {"broker", "postgres", "chain", "coordinator", "edges"}, rnd["cpu_s"]
        assert all(rnd["cpu_s"][role] > 0 for role in ("postgres", "chain", "coordinator", "edges")), rnd["cpu_s"]
        assert set(r["peak_rss_mb"]) >= {"broker", "postgres", "chain", "coordinator", "edges", "one_edge"}
        assert r["growth_bytes_per_round"]["store"] > 0 and r["growth_bytes_per_round"]["edge_dbs"] > 0
    # nothing the bench started is left behind
    (workdir,) = [line.split()[1] for line in done.stdout.splitlines() if line.strip().startswith("workdir ")]
    leftovers = subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True, check=False).stdout.split()
    assert not leftovers, f"processes still running on {workdir}: {leftovers}"
    assert not Path(workdir).exists()
