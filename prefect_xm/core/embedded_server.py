"""Prefect's embedded server, started so that a first run cannot time out.

With no PREFECT_API_URL, Prefect starts a temporary server in a subprocess the first
time a client is made, and gives it PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
(20 s) to answer. On a fresh PREFECT_HOME that server is still creating and migrating
its SQLite database when the deadline passes, and on a busy 2-core machine even a warm
start can take longer; the launch script then dies before it has done anything.

prefect-xm starts that server itself, before any Prefect client asks for it:

- under an exclusive lock in PREFECT_HOME, held until the server answers, so two launch
  scripts starting together on a fresh home never migrate the same database at once
  (the second waits, then finds the database at its head revision);
- with a deadline that only a dead or wedged server reaches (the process is watched: a
  server that exits is reported with its output at once);
- saying in one line what it is doing while the user waits;
- and it points this process's Prefect settings at it (PREFECT_API_URL and Prefect's
  global settings context), so every client, engine, log and event worker in the
  process, and every program it starts, uses this one server. It is stopped at exit,
  after Prefect's own exit handlers have flushed logs and events (atexit order).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

#: The longest wait for the server to answer. Only a wedged server reaches it: a
#: server process that exits is noticed at once.
STARTUP_DEADLINE_SECONDS = float(os.environ.get("PREFECT_XM_EMBEDDED_SERVER_DEADLINE", "600"))

_lock = threading.Lock()
_server: Optional["EmbeddedServer"] = None


def _say(line: str) -> None:
    print(f"prefect-xm: {line}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sqlite_path(connection_url: Optional[str], home: Path) -> Optional[Path]:
    """The database file of a SQLite connection URL (None for another database)."""
    if not connection_url:
        return home / "prefect.db"
    for prefix in ("sqlite+aiosqlite:///", "sqlite:///"):
        if connection_url.startswith(prefix):
            return Path(connection_url[len(prefix):])
    return None


def _block_registry_key(db: Optional[Path]) -> str:
    """What decides which block types the server registers: Prefect's version and the
    installed collections (read from package metadata, nothing imported), and the
    database they were registered in."""
    from importlib.metadata import entry_points

    import prefect

    collections = sorted(f"{ep.name}={ep.value}@{ep.dist.version if ep.dist else ''}"
                         for ep in entry_points(group="prefect.collections"))
    return "\n".join([f"prefect={prefect.__version__}", f"database={db}", *collections]) + "\n"


class EmbeddedServer:
    """One `uvicorn prefect.server.api.server:create_app` subprocess, as Prefect's own
    ephemeral server runs (no UI, ephemeral services), on a free port of 127.0.0.1."""

    def __init__(self, home: Path, say: Callable[[str], None] = _say) -> None:
        self.home = home
        self.say = say
        self.port: Optional[int] = None
        self.process: Optional[subprocess.Popen] = None
        self._log = tempfile.TemporaryFile(prefix="prefect-xm-server-")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self, register_blocks: bool) -> None:
        from prefect.settings import get_current_settings

        import prefect

        self.port = _free_port()
        env = {
            **os.environ,
            **get_current_settings().to_environment_variables(exclude_unset=True),
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        if not register_blocks:
            # Both: Prefect's memo check imports every collection before it looks.
            env["PREFECT_API_BLOCKS_REGISTER_ON_START"] = "false"
            env["PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION"] = "false"
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def _output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> None:
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        url = settings.server.database.connection_url
        db = _sqlite_path(url.get_secret_value() if url is not None else None, self.home)
        self.home.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.home / "prefect-xm-embedded-server.lock", "w")
        started = time.monotonic()
        try:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say(f"waiting for another launch script to finish starting Prefect's embedded server "
                         f"(database in {self.home})...")
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            fresh = db is not None and not db.exists()
            if fresh:
                self.say(f"starting Prefect's embedded server; first run: creating its database in {db} "
                         f"(this takes a minute once)...")
            else:
                self.say("starting Prefect's embedded server (no PREFECT_API_URL set)...")
            # Registering block types imports every installed Prefect collection (the
            # cloud ones take seconds); the types are in the database once registered.
            registry = _block_registry_key(db)
            stamp = self.home / "prefect-xm-block-types.registered"
            register_blocks = fresh or not stamp.exists() or stamp.read_text() != registry
            self._spawn(register_blocks)
            deadline = started + STARTUP_DEADLINE_SECONDS
            while not self._healthy():
                code = self.process.poll()
                if code == 3:  # uvicorn: the port was taken between our check and its bind
                    self._spawn(register_blocks)
                elif code is not None:
                    raise RuntimeError(f"Prefect's embedded server exited with code {code} while starting "
                                       f"(database in {self.home}):\n{self._output()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"Prefect's embedded server did not answer within {STARTUP_DEADLINE_SECONDS:g}s "
                        f"(PREFECT_XM_EMBEDDED_SERVER_DEADLINE; database in {self.home}):\n{self._output()}")
                time.sleep(0.1)
            if register_blocks:
                stamp.write_text(registry)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            lock_file.close()
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ensure_api() -> Optional[str]:
    """The Prefect API this process uses: PREFECT_API_URL when set; otherwise the
    embedded server, started here (once per process) when Prefect would start one.
    Returns None when there is neither (Prefect then raises its own error)."""
    global _server
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return settings.api.url
    if not settings.server.ephemeral.enabled:
        return None
    with _lock:
        if _server is None:
            server = EmbeddedServer(Path(settings.home))
            server.start()
            atexit.register(server.stop)
            _server = server
            _use(server.api_url)
    return _server.api_url


def _use(api_url: str) -> None:
    """Points this process's Prefect settings (and its children's) at `api_url`."""
    import prefect.context

    os.environ["PREFECT_API_URL"] = api_url
    prefect.context.refresh_global_settings_context()


def in_use() -> bool:
    """True when this process's API is the embedded server started here."""
    return _server is not None and os.environ.get("PREFECT_API_URL") == _server.api_url
