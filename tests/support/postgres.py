"""A throwaway PostgreSQL cluster (Debian's initdb + pg_ctl) for SQLAlchemy tests.

PostgreSQL refuses to run as root, so under root every server command runs as the ``postgres``
user through ``runuser``, in a folder under /tmp that this user owns (pytest's tmp folders are
root-only). The server listens on 127.0.0.1 and a free port, with its unix socket in the same
folder; TCP logins use scram-sha-256 with a generated password. Durability is switched off
(``fsync=off`` etc.): the cluster lives for one test session.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.realparts import find_executable, free_port, require_real_part

HOST = "127.0.0.1"
SUPERUSER = "crowdfl"
DEFAULT_DATABASE = "crowdfl_test"
RUN_AS = "postgres"  # only used when we are root


def find_bindir() -> tuple[Path | None, str]:
    """The newest /usr/lib/postgresql/N/bin, else wherever initdb is on PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [
            int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")
        ],
    )
    for bindir in reversed(candidates):
        if all(
            (Path(bindir) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")
        ):
            return Path(bindir), ""
    initdb = find_executable("initdb")
    if initdb and find_executable("pg_ctl"):
        return Path(initdb).resolve().parent, ""
    return (
        None,
        "initdb/pg_ctl not found (apt-get install postgresql; see .ci/install-system.sh)",
    )


def _driver_missing() -> str:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed in the venv (pip install 'psycopg[binary]')"
    return ""


def availability() -> tuple[bool, str]:
    bindir, why = find_bindir()
    if bindir is None:
        return False, why
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return (
                False,
                f"running as root but there is no {RUN_AS!r} user to run PostgreSQL as",
            )
        if find_executable("runuser") is None:
            return False, "running as root but runuser is missing"
    why = _driver_missing()
    return (not why), why


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    database: str
    base_dir: Path
    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default test database."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh database (e.g. one per test module); returns its SQLAlchemy URL."""
        _run_as_pg(
            self.bin_dir,
            self.base_dir,
            [
                "createdb",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                self.user,
                name,
            ],
        )
        return self.url_for(name)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (FileNotFoundError, PermissionError):
            return ""


def _run_as_pg(
    bindir: Path, base: Path, args: Sequence[str], timeout: float = 60.0
) -> str:
    """Run a PostgreSQL tool (as ``postgres`` under root); raise with its output on failure."""
    cmd = [str(bindir / args[0]), *args[1:]]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")
    result = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        cwd=base,
        env=env,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode})\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result.stdout


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(RUN_AS)
        os.chown(path, entry.pw_uid, entry.pw_gid)


@contextmanager
def running_postgres(
    start_timeout: int = 60, attempts: int = 3, crash_safe: bool = False
) -> Iterator[PostgresServer]:
    """initdb, start on a free port, create ``crowdfl_test``; ``pg_ctl stop -m fast`` on exit.

    ``crash_safe``: keep ``synchronous_commit`` on (PostgreSQL's default, and production's), so a
    commit the server acknowledged survives a SIGKILL of the server. The default harness turns it
    off for speed: then a kill -9 loses the last commits (they sit in the WAL buffers, in shared
    memory), which the fault tests showed. ``fsync`` stays off either way: it only matters when
    the operating system itself goes down."""
    bindir, why = find_bindir()
    if bindir is None:
        raise RuntimeError(why)
    base = Path(
        tempfile.mkdtemp(prefix="crowdfl-pg-")
    )  # 0700, under /tmp so RUN_AS can reach it
    _own(base)
    data_dir, socket_dir, log_path = base / "data", base / "sock", base / "postgres.log"
    password = secrets.token_urlsafe(18)
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    _own(pwfile)
    socket_dir.mkdir(mode=0o700)
    _own(socket_dir)
    started = False
    try:
        _run_as_pg(
            bindir,
            base,
            [
                "initdb",
                "-D",
                str(data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            timeout=120,
        )
        pwfile.unlink()
        conf = data_dir / "postgresql.conf"
        for attempt in range(attempts):
            port = free_port()
            with conf.open(
                "a"
            ) as fh:  # later settings win, so retries just append again
                fh.write(
                    "\n# crowdfl test harness\n"
                    f"listen_addresses = '{HOST}'\n"
                    f"port = {port}\n"
                    f"unix_socket_directories = '{socket_dir}'\n"
                    f"fsync = off\nsynchronous_commit = {'on' if crash_safe else 'off'}\nfull_page_writes = off\n"
                    "max_connections = 50\nshared_buffers = 32MB\n"
                )
            try:
                _run_as_pg(
                    bindir,
                    base,
                    [
                        "pg_ctl",
                        "-D",
                        str(data_dir),
                        "-l",
                        str(log_path),
                        "-w",
                        "-t",
                        str(start_timeout),
                        "start",
                    ],
                    timeout=start_timeout + 10,
                )
                started = True
                break
            except RuntimeError as exc:
                if attempt == attempts - 1:
                    log = (
                        log_path.read_text(errors="replace")
                        if log_path.exists()
                        else ""
                    )
                    raise RuntimeError(f"{exc}\n--- postgres log ---\n{log}") from exc
        server = PostgresServer(
            HOST,
            port,
            SUPERUSER,
            password,
            DEFAULT_DATABASE,
            base,
            bindir,
            data_dir,
            socket_dir,
            log_path,
        )
        server.create_database(DEFAULT_DATABASE)
        yield server
    finally:
        try:
            if started or (data_dir / "postmaster.pid").exists():
                _stop(bindir, base, data_dir)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _stop(bindir: Path, base: Path, data_dir: Path) -> None:
    try:
        _run_as_pg(
            bindir,
            base,
            ["pg_ctl", "-D", str(data_dir), "-m", "fast", "-w", "-t", "30", "stop"],
            timeout=40,
        )
    except (RuntimeError, subprocess.TimeoutExpired):
        # Last resort so no postmaster outlives the test run.
        pidfile = data_dir / "postmaster.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        raise


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One cluster per test session; use ``create_database`` for isolation."""
    ok, why = availability()
    require_real_part("postgresql", ok, why)
    with running_postgres() as server:
        yield server


def kill9(server: PostgresServer) -> None:
    """Crash the cluster as a power cut would: SIGKILL to the postmaster's whole process group (the
    postmaster and every backend at once), then wait until none is left."""
    import signal
    import time

    pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("postgres processes still alive 30 s after SIGKILL")
        time.sleep(0.05)


def restart(server: PostgresServer, timeout: int = 60) -> None:
    """Start a cluster again after :func:`kill9` (crash recovery replays its WAL); waits until it accepts connections."""
    _run_as_pg(
        server.bin_dir, server.base_dir,
        ["pg_ctl", "-D", str(server.data_dir), "-l", str(server.log_path), "-w", "-t", str(timeout), "start"],
        timeout=timeout + 10,
    )
