"""The dashboard shows amounts in ETH, exactly (BigInt), cut never rounded up, the wei on hover."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support.realparts import find_executable, require_real_part

APP_JS = Path(__file__).resolve().parents[2] / "coordinator/dashboard/static/app.js"
CASES = {
    "0": "0",
    "1000000000000000000": "1",
    "999999999999999999": "0.999999",  # one wei short of 1 ETH is not shown as 1
    "1500000000000000": "0.0015",
    "123456789012345678901234": "123456.789012",  # beyond 2^53: exact
    "1": "<0.000001",  # something is owed, even if it rounds to nothing
    "abc": "—",
}


def test_wei_to_eth_under_node() -> None:
    node = find_executable("node")
    require_real_part("node", node is not None, "apt-get install nodejs (the contracts' compiler needs it too)")
    script = (
        f"const {{ weiToEth }} = require({json.dumps(str(APP_JS))});"
        f"const cases = {json.dumps(list(CASES))};"
        "console.log(JSON.stringify(cases.map((c) => weiToEth(c)).concat([weiToEth(10 ** 18), weiToEth(250000000000000000)])));"
    )
    done = subprocess.run([str(node), "-e", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [*CASES.values(), "1", "0.25"]

# the pages themselves are checked in Chromium by tests/coordinator/test_dashboard.py
