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
    """A real `prefect server start` (SQLite) on a free port, for the whole session.

    The test process itself is pointed at it through PREFECT_API_URL (set above), and
    `.env()` gives subprocesses (workers, CLIs, launch scripts) the same address.
    """
    import httpx

    home = _SERVER_HOME
    port = _SERVER_PORT
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
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
        shutil.rmtree(home, ignore_errors=True)
