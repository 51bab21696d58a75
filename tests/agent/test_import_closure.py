"""The device agent must not pull in TensorFlow (or web3/Flask): the Pi's venv does not have them."""

from __future__ import annotations

import subprocess
import sys

from tests.agent.process import REPO


def test_agent_imports_no_tensorflow() -> None:
    code = (
        "import agent.cli, agent.service, agent.sources, crowdfl.front, agent.verify, agent.chainview; import sys; "
        'assert "tensorflow" not in sys.modules; '
        'bad = sorted(m for m in ("tensorflow", "keras", "web3", "flask", "sqlalchemy") if m in sys.modules); '
        "assert not bad, bad; "
        'assert "crowdfl.household" not in sys.modules, "the agent loads the household generator at import"; '
        'assert "crowdfl_sim" not in sys.modules'
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
