"""End-to-end helpers: batch-worker subprocesses, command-counting wrappers, deployments.

Tests drive everything as a user would: `prefect work-pool create`, `prefect worker
start`, deployments, the Prefect API; the scheduler is the real one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType

from conftest import REPO, PrefectServer, wait_for

FLOWS = REPO / "tests" / "flows"


def run(coro):
    return asyncio.run(coro)


class CountingWrappers:
    """A directory of wrappers (put first on PATH) that log each call of the wrapped
    commands, one line per call: '<command> <args>'."""

    def __init__(self, root: Path, commands: list[str]):
        self.dir = root / "bin"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = root / "calls.log"
        self.log.touch()
        for command in commands:
            real = shutil.which(command)
            assert real, f"{command} not on PATH"
            wrapper = self.dir / command
            kill = root / f"kill-after-{command}"
            wrapper.write_text(
                "#!/bin/sh\n"
                f'printf "%s\\n" "{command} $*" >> {self.log}\n'
                # kill_after(): the command runs, then its caller's process group dies
                # before the answer reaches it (one call claims the request)
                f'if [ -e {kill} ] && mv {kill} {kill}.claimed 2>/dev/null; then\n'
                f'  out=$({real} "$@"); rc=$?\n'
                f'  kill -9 "-$(cat {kill}.claimed)"\n'
                f'  printf "%s\\n" "$out"; exit $rc\n'
                'fi\n'
                f'exec {real} "$@"\n'
            )
            wrapper.chmod(0o755)
        self.root = root

    def kill_after(self, command: str, process_group: int) -> None:
        """The next call of `command` completes, then SIGKILLs `process_group` (a
        worker dying between a submit and reading its answer)."""
        (self.root / f"kill-after-{command}").write_text(str(process_group))

    def disarm(self, command: str) -> bool:
        """Take back a kill_after no call has claimed yet (True); False: one has, and
        its caller is dying or dead."""
        try:
            (self.root / f"kill-after-{command}").unlink()
            return True
        except FileNotFoundError:
            return False

    def calls(self, command: str) -> list[str]:
        return [ln for ln in self.log.read_text().splitlines() if ln.split(" ", 1)[0] == command]


class WorkerProcess:
    """`prefect worker start` for a pool, as a subprocess with its own log."""

    def __init__(self, server: PrefectServer, pool: str, worker_type: str, workdir: Path,
                 name: str | None = None, path_prefix: Path | None = None, python: str | None = None,
                 **env: str):
        self.server = server
        #: the Python (of an install) that runs the worker: this one by default
        self.python = python or sys.executable
        self.pool = pool
        self.worker_type = worker_type
        self.name = name or f"worker-{uuid.uuid4().hex[:6]}"
        self.workdir = workdir
        self.path_prefix = path_prefix
        self.extra_env = env
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []

    def start(self) -> "WorkerProcess":
        env = self.server.env(**{
            "PREFECT_XM_POLL_INTERVAL": "1",
            "PREFECT_XM_RECOVERY_INTERVAL": "5",
            # Each query is a write on the server (the pool's and queue's last poll): at 1 s
            # an idle worker cost its server 5% of a core, and the suite runs a dozen.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "0",
            "PREFECT_WORKER_ENABLE_CANCELLATION": "true",
            **self.extra_env,  # a test's (or a benchmark's) own settings win
        })
        env["PATH"] = os.pathsep.join(
            [str(self.path_prefix)] * bool(self.path_prefix) + [str(Path(self.python).parent), env["PATH"]]
        )
        # a replacement worker of the same name must not overwrite its predecessor's log
        n = len(self.logs)
        while (log := self.workdir / f"{self.name}-{n}.log").exists():
            n += 1
        self.logs.append(log)
        self.proc = subprocess.Popen(
            [self.python, "-m", "prefect", "worker", "start", "--pool", self.pool,
             "--type", self.worker_type, "--name", self.name],
            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(lambda: "started" in log.read_text() or self._died(), 120, what=f"worker {self.name} to start")
        return self

    def _died(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"worker exited: {self.log_text()[-3000:]}")
        return False

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in self.logs if p.exists())

    def kill(self) -> None:
        """SIGKILL, as an OOM killer or a lost node would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def create_pool(server: PrefectServer, name: str, worker_type: str, *, cli: bool = False) -> None:
    """A pool of `worker_type` with the worker's default base job template.

    With cli=True through `prefect work-pool create`, as a user would; else through the
    API with the template from the function that command calls (test_worker_schemas proves
    the CLI finds our types): the CLI imports every installed collection, 10+ s of CPU."""
    if cli:
        out = subprocess.run(
            [sys.executable, "-m", "prefect", "work-pool", "create", name, "--type", worker_type],
            env=server.env(), capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.base import BaseWorker

    import prefect_xm.workers  # noqa: F401  (registers the xm-* types)

    worker_class = BaseWorker.get_worker_class_from_type(worker_type)
    assert worker_class is not None, worker_type

    async def create():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(
                name=name, type=worker_type, base_job_template=worker_class.get_default_base_job_template()))

    asyncio.run(create())


@contextlib.contextmanager
def worker_pool(server: PrefectServer, root: Path, worker_type: str):
    """A new pool of `worker_type`, created as a user would (the CLI), with a worker of it
    running for as long as the block lasts; yields the pool's name."""
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    pool = f"{worker_type}-{uuid.uuid4().hex[:6]}"
    create_pool(server, pool, worker_type, cli=True)
    worker = WorkerProcess(server, pool, worker_type, root).start()
    try:
        yield pool
    finally:
        worker.stop()


async def deploy(entrypoint: str, pool: str, name: str, job_variables: dict | None = None):
    from prefect import flow

    f = await flow.from_source(source=str(FLOWS), entrypoint=entrypoint)
    return await f.deploy(
        name=name, work_pool_name=pool, job_variables=job_variables or {},
        print_next_steps=False, build=False, push=False,
    )


async def start_run(deployment_id, parameters: dict | None = None, job_variables: dict | None = None) -> FlowRun:
    async with get_client() as client:
        return await client.create_flow_run_from_deployment(
            deployment_id, parameters=parameters or {}, job_variables=job_variables or {}
        )


async def start_runs(deployment_id, count: int, parameters: dict | None = None,
                     job_variables: dict | None = None) -> list[FlowRun]:
    """`count` runs of one deployment, created side by side through one client, as a
    launcher adding a sweep does."""
    async with get_client() as client:
        return list(await asyncio.gather(*(
            client.create_flow_run_from_deployment(
                deployment_id, parameters=parameters or {}, job_variables=job_variables or {})
            for _ in range(count))))


async def start_runs_together(deployment_id, parameters: list[dict], job_variables: dict | None = None,
                              delay: float = 3.0) -> list[FlowRun]:
    """Runs of one deployment, one per parameter set, due at the same moment: the worker
    picks them all up in one query, as it does the trials of a sweep added together (runs
    created one by one may straddle two of its queries).

    They are created due in an hour, then all made due at once, some seconds ahead: on a
    loaded machine creating them can take longer than any fixed delay, while moving their
    time is one light write each. The gap is the longer of `delay` and what creating them
    took (a measure of how slow the server is answering just now)."""
    import datetime

    from prefect.states import Scheduled

    def in_(seconds: float) -> datetime.datetime:
        return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)

    async with get_client() as client:
        started = time.monotonic()
        runs = list(await asyncio.gather(*(
            client.create_flow_run_from_deployment(
                deployment_id, parameters=p, job_variables=job_variables or {},
                state=Scheduled(scheduled_time=in_(3600)))
            for p in parameters)))
        when = in_(max(delay, time.monotonic() - started))
        await asyncio.gather(*(
            client.set_flow_run_state(r.id, Scheduled(scheduled_time=when), force=True) for r in runs))
        return [await client.read_flow_run(r.id) for r in runs]


async def read_runs(run_ids) -> list[FlowRun]:
    from prefect.client.schemas.filters import FlowRunFilter

    async with get_client() as client:
        return await client.read_flow_runs(flow_run_filter=FlowRunFilter(id={"any_": list(run_ids)}))


async def read_run(run_id) -> FlowRun:
    async with get_client() as client:
        return await client.read_flow_run(run_id)


def state_of(run_id) -> StateType | None:
    fr = run(read_run(run_id))
    return fr.state.type if fr.state else None


def wait_final(run_id, timeout: float = 240) -> FlowRun:
    def final():
        fr = run(read_run(run_id))
        return fr if fr.state and fr.state.is_final() else None

    return wait_for(final, timeout, interval=1, what=f"flow run {run_id} to reach a final state")
