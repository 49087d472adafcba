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
# Verbatim scheduler outputs (copied from the team's shared/vectors: a clone of this
# repository alone must hold everything its tests read).
VECTORS = REPO / "tests" / "data" / "vectors"
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
    condition: Callable[[], T], timeout: float = 120.0, interval: float = 1.0, what: str = ""
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
# Prefect's default client settings (its retries included), as users have them: our
# clients wait out a busy SQLite server themselves (prefect_xm.api_client).
os.environ["PREFECT_HOME"] = str(_SERVER_HOME)


def cluster_is_up(script: str) -> bool:
    """`scripts/<script> status` (slurm-cluster.sh, sge-cluster.sh, ...), asked again for a
    while when it says no: on a machine busy with the suite a node can miss its
    controller's ping, or sinfo its timeout, for a moment; a service that is really
    missing stays missing. Its last reason is printed (shown with a failure)."""
    deadline = time.monotonic() + (120 if IN_CI else 10)
    while True:
        status = subprocess.run(["bash", str(REPO / "scripts" / script), "status"], capture_output=True, text=True)
        if status.returncode == 0:
            return True
        if time.monotonic() >= deadline:
            print(f"{script} status: {status.stderr.strip()[-500:]}")
            return False
        time.sleep(3)


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


def _wait_healthy(proc: subprocess.Popen, api_url: str, log: Path) -> None:
    import httpx

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited: {log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=300, what="prefect server health")


@pytest.fixture(scope="session")
def prefect_server() -> PrefectServer:
    """A real `prefect server start` on a free port, for the whole session: on a database of
    its own on PREFECT_XM_TEST_POSTGRES when set (scripts/test.sh), else on SQLite.

    The test process itself is pointed at it through PREFECT_API_URL (set above), and
    `.env()` gives subprocesses (workers, CLIs, launch scripts) the same address.
    """
    home = _SERVER_HOME
    port = _SERVER_PORT
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    database = _create_postgres_database()
    if database is not None:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database[1]
        # The template has them (and our code's are the same: it names the template).
        env["PREFECT_API_BLOCKS_REGISTER_ON_START"] = "false"
    # Loop services no test needs (no deployment schedules, no pauses): six servers share
    # two cores with everything they serve, so an idle server's cycles are the suite's.
    for service in ("SCHEDULER", "LATE_RUNS", "PAUSE_EXPIRATIONS"):
        env[f"PREFECT_SERVER_SERVICES_{service}_ENABLED"] = "false"
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

    _wait_healthy(proc, server.api_url, home / "server.log")
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


def _template_key() -> str:
    """Names the migrated template database: a new Prefect, or a change to our code
    (its block types are registered in the template), makes a new one."""
    import hashlib

    import prefect

    digest = hashlib.sha256(prefect.__version__.encode())
    for path in sorted((REPO / "prefect_xm").rglob("*.py")):
        digest.update(path.read_bytes())
    return f"pxm_template_{digest.hexdigest()[:12]}"


async def _connect_postgres():
    import asyncpg

    try:
        return await asyncpg.connect(_postgres_dsn("postgres"), timeout=30)
    except (OSError, asyncpg.PostgresError) as e:
        raise AssertionError(f"PREFECT_XM_TEST_POSTGRES={TEST_POSTGRES} does not answer ({e}): "
                             "start it with `bash scripts/postgres-cluster.sh start`") from None


def _ensure_postgres_template() -> str:
    """A database Prefect's server has migrated and registered its block types in, made
    once per machine (under a lock: the xdist processes start together). Test servers'
    databases are copies of it, so each start skips 20-30 s of migrations and imports."""
    import asyncio
    import fcntl

    template = _template_key()

    async def exists() -> bool:
        conn = await _connect_postgres()
        try:
            return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", template))
        finally:
            await conn.close()

    with open(Path(tempfile.gettempdir()) / "prefect-xm-test-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if asyncio.run(exists()):
            return template
        building = f"{template}_building"

        async def create(sql: str) -> None:
            conn = await _connect_postgres()
            try:
                for statement in sql.split(";"):
                    await conn.execute(statement)
            finally:
                await conn.close()

        asyncio.run(create(f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE); CREATE DATABASE "{building}"'))
        home = Path(tempfile.mkdtemp(prefix="pxm-template-home-"))
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_DATABASE_CONNECTION_URL=TEST_POSTGRES.rstrip("/") + "/" + building)
        # A server start does what every test server would: migrations, then block types.
        port = free_port()
        log = open(home / "server.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_healthy(proc, f"http://127.0.0.1:{port}/api", home / "server.log")
        finally:
            proc.terminate()
            proc.wait(60)
            shutil.rmtree(home, ignore_errors=True)
        # Renamed only once complete: an interrupted build never passes for a template.
        asyncio.run(create(f'ALTER DATABASE "{building}" RENAME TO "{template}"'))
        return template


def _create_postgres_database() -> tuple[str, str] | None:
    """A new database for this process's test server: (name, SQLAlchemy URL)."""
    if not TEST_POSTGRES:
        return None
    import asyncio
    import uuid

    template = _ensure_postgres_template()
    name = f"pxm_test_{uuid.uuid4().hex[:12]}"

    async def create():
        conn = await _connect_postgres()
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return name, TEST_POSTGRES.rstrip("/") + "/" + name


def _drop_postgres_database(name: str) -> None:
    import asyncio

    async def drop():
        conn = await _connect_postgres()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    try:
        asyncio.run(drop())
    except Exception as e:  # a leftover test database is not a test failure
        print(f"could not drop test database {name}: {e}", file=sys.stderr)


# ------------------------------------------------------------------ side by side
# The suite runs under pytest-xdist (`-n`, `--dist loadscope`: scripts/test.sh): each
# xdist process has its own Prefect server (above: port and PREFECT_HOME per process,
# a PostgreSQL database per server), and they share the one Slurm, SGE and sshd, as users
# of a cluster do. loadscope keeps a module's tests, and a class's, on one process: each
# BatchWorkerSuite class shares its pool, worker and scheduler scenarios, and modules
# share their module-scoped fixtures (a pool, a browser, one `prefect deploy --all`).


class RequestLog:
    """The requests a Prefect client sends, as "METHOD /api/route" in `seen`. `answer`
    (request -> response or None) answers a request in the server's place: a request the
    server lost."""

    def __init__(self, client, answer=None) -> None:
        self.seen: list[str] = []
        inner = client._client._transport

        async def handle(request, inner=inner):
            self.seen.append(f"{request.method} {request.url.path}")
            response = answer(request) if answer is not None else None
            return response if response is not None else await inner.handle_async_request(request)

        class T:
            handle_async_request = staticmethod(handle)

            async def aclose(self):
                await inner.aclose()

            async def __aexit__(self, *exc):
                await inner.__aexit__(*exc)

        client._client._transport = T()

