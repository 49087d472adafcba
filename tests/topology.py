"""Prefect's multi-process topology, as `scripts/prefect-server.sh start --workers N` runs it
in production (N API processes, the services apart, Redis), here on a port, a Redis port,
a state directory and a PostgreSQL database of its own (a copy of the tests' migrated
template), so it runs beside the suite's servers and a production one. For
tests/test_production_topology.py and the benchmarks' --topology."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
from conftest import REPO, PrefectServer, free_port

SCRIPT = REPO / "scripts" / "prefect-server.sh"
PIDFILES = ("server.pid", "services.pid", "redis.pid")


def missing() -> str | None:
    """What the topology needs and this machine lacks (None: nothing)."""
    if not conftest.TEST_POSTGRES:
        return ("PostgreSQL: PREFECT_XM_TEST_POSTGRES is not set (scripts/test.sh sets it; "
                "`bash scripts/postgres-cluster.sh start`)")
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (`apt-get install redis-server`; scripts/test.sh installs it)"
    if importlib.util.find_spec("prefect_redis") is None:
        return f"prefect-redis is not installed in {sys.prefix} (`pip install 'prefect-xm[redis]'`)"
    return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # (someone else's group: a reused id, not ours)
        return False


class Topology:
    def __init__(self, root: Path, workers: int = 2, **env: str):
        self.root = root
        self.workers = workers
        self.port = free_port()
        self.redis_port = free_port()
        self.state = root / "state"
        self.home = root / "home"
        self.extra_env = env
        self.database: tuple[str, str] | None = None
        self.groups: dict[str, int] = {}
        #: seconds `prefect-server.sh start` took
        self.start_seconds: float | None = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(
            PREFECT_XM_SERVER_STATE=str(self.state),
            PREFECT_XM_SERVER_LOGS=str(self.root),
            PREFECT_XM_SERVER_PORT=str(self.port),
            PREFECT_XM_REDIS_PORT=str(self.redis_port),
            PREFECT_XM_SERVER_VENV=sys.prefix,  # the Python running the tests runs the server
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            **self.extra_env,
        )
        if self.database:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.database[1]
        return env

    def logs(self, lines: int = 40) -> str:
        out = []
        for log in sorted(self.root.glob("prefect-xm-*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def start(self) -> PrefectServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        self.database = conftest._create_postgres_database()
        started = time.monotonic()
        out = subprocess.run(["bash", str(SCRIPT), "start", "--workers", str(self.workers)], env=self._env(),
                             capture_output=True, text=True, timeout=900)
        self.start_seconds = time.monotonic() - started
        self._read_groups()
        if out.returncode != 0:
            logs = self.logs()
            self.stop()  # what it did start (Redis, say) must not outlive the failure
            raise AssertionError(f"prefect-server.sh start --workers {self.workers} failed ({out.returncode}):\n"
                                 f"{out.stderr[-3000:]}\n{logs}")
        return PrefectServer(self.home, self.port, proc=None)

    def _read_groups(self) -> None:
        for name in PIDFILES:
            path = self.state / name
            if path.exists():
                self.groups[name] = int(path.read_text())

    def api_processes(self) -> set[int]:
        """The pids of the API processes (uvicorn's workers, in the server's process group)."""
        pgid = self.groups.get("server.pid")
        pids = set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[2]) == pgid and b"multiprocessing.spawn" in cmdline:
                pids.add(int(proc.name))
        return pids

    def redis(self, *args: str, db: int = 0) -> str:
        """redis-cli against this topology's Redis (the password through the environment)."""
        env = dict(os.environ, REDISCLI_AUTH=(self.state / "redis-password").read_text().strip())
        out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.redis_port), "-n", str(db), *args],
                             env=env, capture_output=True, text=True, timeout=60)
        return out.stdout

    def stop(self) -> list[str]:
        """`prefect-server.sh stop`; then what it left running (each its own process group,
        killed here so that nothing outlives the test) and the database is dropped.
        Returns the pid files whose processes outlived the stop: [] when it did its job."""
        self._read_groups()
        subprocess.run(["bash", str(SCRIPT), "stop"], env=self._env(), capture_output=True, text=True,
                       timeout=300)
        leftovers = [name for name, pgid in self.groups.items() if _group_alive(pgid)]
        for name in leftovers:
            os.killpg(self.groups[name], signal.SIGKILL)
        if self.database:
            conftest._drop_postgres_database(self.database[0])
            self.database = None
        return leftovers

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_for_bench(root, workers: int):
    """A topology for a benchmark: (server, its stop, what it runs on); exits saying what
    is missing."""
    import sys

    lacking = missing()
    if lacking:
        sys.exit(f"--topology: {lacking}")
    topo = Topology(root / "topology", workers=workers)
    server = topo.start()
    return server, topo.stop, (f"PostgreSQL, {workers} API processes, services apart, Redis "
                               f"({topo.start_seconds:.0f} s to start)")
