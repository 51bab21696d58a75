"""`crowdfl-coordinator serve` as the systemd unit runs it: start, publish a task, stop on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from crowdfl_sim.broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_publishes_a_task_and_stops_cleanly(tmp_path: Path) -> None:
    broker = EmbeddedBroker()
    broker.start()
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(  # api_port 0: the OS picks a free port, the log line says which
        f'state_dir = "{tmp_path / "state"}"\napi_port = 0\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n[chain]\nkind = "embedded"\n'
    )
    env = {**os.environ, "CROWDFL_CONFIG": str(cfg), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "serve", "--new-task", "--rounds", "2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        port = 0
        for line in proc.stdout:  # ends if the process dies
            lines.append(line)
            m = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/tasks", timeout=5) as r:
            tasks = json.loads(r.read())
        assert len(tasks) == 1 and tasks[0]["status"] == "running", tasks
        rounds: list[dict[str, object]] = []
        for _ in range(60):  # the round driver opens round 1 on its first pass, just after the API is up
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/tasks/{tasks[0]['task_id']}/rounds", timeout=5) as r:
                rounds = json.loads(r.read())
            if rounds:
                break
            threading.Event().wait(0.5)
        assert rounds and rounds[0]["round"] == 1 and rounds[0]["status"] == "open"  # waiting for customers
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert 'crowdfl_coordinator_rounds{status="open"} 1' in r.read().decode()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, "".join(lines) + out
        assert "stopped cleanly" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.stop()
