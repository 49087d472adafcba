"""Shared fixtures: a real Prefect server, the real single-node Slurm, helpers to wait
on conditions (never fixed sleeps)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO.parent / "shared" / "vectors"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
# Tests talk to the real server of the `prefect_server` fixture, never to a temporary one.
os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"

T = TypeVar("T")

# Prefect reads its settings when it is first imported, so the address of the test
# server is fixed here, before any test module imports prefect; the session fixture
# `prefect_server` starts the server there on first use.
_SERVER_HOME = Path(tempfile.mkdtemp(prefix="pxm-prefect-home-"))


def wait_for(
    condition: Callable[[], T], timeout: float = 120.0, interval: float = 0.5, what: str = ""
) -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what or condition}: last={last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVER_PORT = free_port()
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_SERVER_PORT}/api"
# The test server is Prefect's embedded SQLite one. Under a burst of writes (50 runs
# submitted at once) it answers 503 "database is locked" for a while, and Prefect's own
# worker then crashes a run it was submitting once its client has retried 5 times. More
# retries (inherited by workers, launchers and jobs) ride out the burst; production
# setups with many concurrent runs should use PostgreSQL (README).
os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "9")
os.environ["PREFECT_HOME"] = str(_SERVER_HOME)


def require_service(name: str, available: bool, how: str) -> None:
    """Skip locally when a real service is missing; fail in CI, where a skip proves nothing."""
    if available:
        return
    message = f"{name} is not available: {how}"
    if IN_CI:
        pytest.fail(message + " (CI=true: tests that need it fail instead of skipping)")
    pytest.skip(message)


class PrefectServer:
    def __init__(self, home: Path, port: int, proc: subprocess.Popen):
        self.home = home
        self.port = port
        self.proc = proc
        self.api_url = f"http://127.0.0.1:{port}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess (worker, CLI, launch script) that talks to this server."""
        env = dict(os.environ)
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        env.update(extra)
        return env


@pytest.fixture(scope="session")
def prefect_server() -> PrefectServer:
    """A real `prefect server start` on a free port, for the whole session: on a database of
    its own on PREFECT_XM_TEST_POSTGRES when set (scripts/test.sh), else on SQLite.

    The test process itself is pointed at it through PREFECT_API_URL (set above), and
    `.env()` gives subprocesses (workers, CLIs, launch scripts) the same address.
    """
    import httpx

    home = _SERVER_HOME
    port = _SERVER_PORT
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    database = _create_postgres_database()
    if database is not None:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database[1]
    # The UI asks the server where its API is; without this it says 127.0.0.1:4200.
    env["PREFECT_SERVER_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = PrefectServer(home, port, proc)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited: {(home / 'server.log').read_text()[-3000:]}")
        try:
            return httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=120, what="prefect server health")
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if database is not None:
            _drop_postgres_database(database[0])
        shutil.rmtree(home, ignore_errors=True)


#: The SQLAlchemy URL of a PostgreSQL server (no database) for the test servers
#: (scripts/postgres-cluster.sh; scripts/test.sh sets it). Unset: SQLite in PREFECT_HOME.
TEST_POSTGRES = os.environ.get("PREFECT_XM_TEST_POSTGRES", "")


def _postgres_dsn(database: str) -> str:
    return TEST_POSTGRES.replace("postgresql+asyncpg://", "postgresql://", 1).rstrip("/") + "/" + database


def _create_postgres_database() -> tuple[str, str] | None:
    """A new database for this process's test server: (name, SQLAlchemy URL)."""
    if not TEST_POSTGRES:
        return None
    import asyncio
    import uuid

    import asyncpg

    name = f"pxm_test_{uuid.uuid4().hex[:12]}"

    async def create():
        try:
            conn = await asyncpg.connect(_postgres_dsn("postgres"), timeout=30)
        except (OSError, asyncpg.PostgresError) as e:
            raise AssertionError(f"PREFECT_XM_TEST_POSTGRES={TEST_POSTGRES} does not answer ({e}): "
                                 "start it with `bash scripts/postgres-cluster.sh start`") from None
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return name, TEST_POSTGRES.rstrip("/") + "/" + name


def _drop_postgres_database(name: str) -> None:
    import asyncio

    import asyncpg

    async def drop():
        conn = await asyncpg.connect(_postgres_dsn("postgres"), timeout=30)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    try:
        asyncio.run(drop())
    except Exception as e:  # a leftover test database is not a test failure
        print(f"could not drop test database {name}: {e}", file=sys.stderr)


# ------------------------------------------------------------------ side by side
# The suite runs under pytest-xdist (`-n`, `--dist loadgroup`: scripts/test.sh): each
# xdist process has its own Prefect server (above: port and PREFECT_HOME per process),
# and they share the one Slurm, SGE and sshd, as users of a cluster do. Tests that share
# an expensive fixture stay on one process: each BatchWorkerSuite class (its pool, worker
# and scheduler scenarios), and modules marked with an xdist_group of their own.


def pytest_collection_modifyitems(config, items):
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and hasattr(cls, "harness") and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 2)[0] + "::" + cls.__name__))
