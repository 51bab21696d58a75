"""``crowdfl-agent`` as a separate process, the way systemd runs it, for power-loss and SIGTERM tests."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Ledger:
    released: list[tuple[int, int, int]]  # (sample_id, round, seq)
    spool: list[tuple[int, bytes]]  # (seq, payload)

    def by_round(self, round_: int) -> list[int]:
        return sorted(s for s, r, _ in self.released if r == round_)


def read_ledger(state_db: Path) -> Ledger:
    """The agent's privacy ledger and spool, read from outside (read-only) while it runs or after."""
    if not state_db.exists():
        return Ledger([], [])
    con = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=10)
    try:
        released = [(int(a), int(b), int(c)) for a, b, c in con.execute("SELECT sample_id, round, seq FROM released ORDER BY sample_id")]
        spool = [(int(a), bytes(b)) for a, b in con.execute("SELECT seq, payload FROM spool ORDER BY seq")]
    except sqlite3.OperationalError:  # schema not created yet
        return Ledger([], [])
    finally:
        con.close()
    return Ledger(released, spool)


class AgentProcess:
    """``python -m agent.cli --config FILE run`` with its log in a file; killed by whoever started it."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", "--config", str(self.config), *args],
            cwd=REPO, capture_output=True, text=True, timeout=timeout, env=self._env(), check=False,
        )

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CROWDFL_AGENT__")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            log.write(b"--- start ---\n")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(self.config), "run"],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> int:
        """Power cut: SIGKILL, no chance to flush or close anything."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def terminate(self, timeout: float) -> int:
        """systemd's stop: SIGTERM, then the exit code (SIGKILL and fail if it does not stop in time)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"the agent did not stop within {timeout}s of SIGTERM\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def write_jsonl(path: Path, reports: list) -> Path:  # type: ignore[type-arg]
    path.write_text("".join(
        json.dumps({"device_id": r.device_id, "kind": r.kind, "ts": r.ts, "power_w": r.power_w,
                    "energy_total_kwh": r.energy_total_kwh, "on": r.on}) + "\n"
        for r in reports
    ))
    return path
