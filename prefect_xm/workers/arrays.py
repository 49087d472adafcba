"""Sweeps as scheduler arrays.

Flow runs a worker picks up together whose batch scripts would differ only in each
run's argv and environment (the trials of a sweep) go to the scheduler as ONE array
submission. Each task still belongs to its own flow run: its own task id
(`slurm:<cluster>:<job>_<task>`), run directory, job.out/job.err, states and cancel.

How a task finds its own program, with nothing the user passed ever parsed by a shell:
- every run's directory holds its `job.env` (as for single jobs) and `job.argv`, the
  argv NUL-terminated argument by argument;
- the array's directory holds `tasks` (line k: the run directory of the k-th task),
  `task.env`, which the batch script sources where a single job sources its job.env
  (it picks the task's line by the scheduler's task-index variable, sources that run's
  job.env and sends stdout/stderr to that run's files), and `task-exec`, the command
  the script execs: it reads job.argv into a bash array and execs it.

Which runs form one array: those whose array script (the pool's template rendered
with the array's names in place of the run's) is the same text, on the same cluster
and scheduler. A refusal for the array's size splits it in halves, down to single
submits, and the run's log says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

from prefect_xm.workers.scheduler import SchedulerError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

logger = logging.getLogger("prefect_xm.arrays")

#: the per-run file holding the program's argv, NUL-terminated argument by argument
ARGV_FILE = "job.argv"
#: stands for the array's directory while runs are grouped (it is named at submission)
GROUPING_DIR = "/prefect-xm-array"

TASK_EXEC = """#!/bin/bash
# prefect-xm: run this array task's program. Its argv is read from the run's own file,
# one NUL-terminated argument each, into a bash array: no argument is parsed by a shell.
argv=()
while IFS= read -r -d '' arg; do argv+=("$arg"); done < "$XM_TASK_DIR/job.argv"
exec "${argv[@]}"
"""


def task_env(array_dir: str, index_variable: str, first_index: int) -> str:
    """The fragment the array's batch script sources in place of a run's job.env (POSIX
    sh: SGE may run the script under /bin/sh)."""
    from shlex import quote

    return (
        "# prefect-xm array: which flow run this task is, from the scheduler's task index\n"
        f"XM_ARRAY_DIR={quote(array_dir)}\n"
        f'XM_TASK_DIR=$(sed -n "$((${{{index_variable}:-0}} - {first_index} + 1))p" "$XM_ARRAY_DIR/tasks" 2>/dev/null)\n'
        'if [ -z "$XM_TASK_DIR" ]; then\n'
        f'  echo "prefect-xm: no task {index_variable}=${{{index_variable}:-}} in $XM_ARRAY_DIR/tasks" >&2\n'
        "  exit 97\n"
        "fi\n"
        "export XM_TASK_DIR\n"
        '. "$XM_TASK_DIR/job.env"\n'
        'exec >>"$XM_TASK_DIR/job.out" 2>>"$XM_TASK_DIR/job.err"\n'
    )


def argv_file(argv: list[str]) -> str:
    for arg in argv:
        if "\0" in arg:
            raise ValueError(f"argv: {arg!r} holds a NUL character, which no program argument can")
    return "".join(f"{arg}\0" for arg in argv)


def array_directory(base_run_dir: str, array_name: str) -> str:
    return f"{base_run_dir.rstrip('/')}/{array_name}"


class RunConfiguration(Protocol):
    """What of a run's job configuration (a BatchJobConfiguration) grouping reads.
    Protocols, not base.py's classes: the worker uses this module, not the reverse."""

    cluster: str
    ssh_block: Optional[str]
    array_size_limit: int


class ArrayWorker(Protocol):
    """What of the worker (a BatchWorker) the array submitter calls."""

    def array_key(self, configuration: Any, flow_run: "FlowRun") -> tuple: ...

    def runs_on_their_way(self) -> bool: ...

    async def submit_single(self, flow_run: "FlowRun", configuration: Any, run_dir: str, command_argv: list[str],
                            run_env: dict[str, str], logger: Any) -> str: ...

    async def submit_array(self, tasks: list["ArrayTask"]) -> list[str]: ...


@dataclass
class ArrayTask:
    """One run waiting to join an array."""

    flow_run: "FlowRun"
    configuration: RunConfiguration
    run_dir: str
    argv: list[str]
    env: dict[str, str]
    log: Any  # the run's logger
    key: tuple = ()
    job_id: "asyncio.Future[str]" = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ArraySubmitter:
    """Collects the runs a worker submits together and submits them as arrays.

    A batch closes when every run the worker is submitting has arrived here or gone its
    own way (Prefect starts all runs of one pick-up side by side, each after a few API
    calls of its own: on a busy server, seconds), or `max_wait` after the first, should
    one never arrive: a sweep of 200 runs is one batch, a lone run does not wait."""

    def __init__(self, worker: ArrayWorker, *, max_wait: float = 10.0):
        self.worker = worker
        self.max_wait = max_wait
        self.waiting: list[ArrayTask] = []
        self._first = 0.0
        self._flusher: Optional[asyncio.Task] = None
        self.submit_calls = 0

    async def submit(self, task: ArrayTask) -> str:
        """The task's job id once its array (or its own single job) is submitted."""
        task.key = self.worker.array_key(task.configuration, task.flow_run)
        if not self.waiting:
            self._first = time.monotonic()
        self.waiting.append(task)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_when_settled(), name="xm-arrays")
        return await asyncio.shield(task.job_id)

    def _settled(self) -> bool:
        return time.monotonic() - self._first >= self.max_wait or not self.worker.runs_on_their_way()

    async def _flush_when_settled(self) -> None:
        while not self._settled():
            await asyncio.sleep(0.05)
        batch, self.waiting = self.waiting, []
        groups: dict[tuple, list[ArrayTask]] = {}
        for task in batch:
            groups.setdefault(task.key, []).append(task)
        try:
            await asyncio.gather(*(self._submit_group(tasks) for tasks in groups.values()))
        finally:
            for task in batch:
                if not task.job_id.done():
                    task.job_id.set_exception(RuntimeError("the array submission ended without a job id"))
            if self.waiting:  # runs that arrived while this batch was being submitted
                self._flusher = asyncio.get_running_loop().create_task(self._flush_when_settled(), name="xm-arrays")

    async def _submit_group(self, tasks: list[ArrayTask]) -> None:
        configuration = tasks[0].configuration
        limit = max(1, int(configuration.array_size_limit or 1))
        chunks = [tasks[i : i + limit] for i in range(0, len(tasks), limit)]
        await asyncio.gather(*(self._submit_chunk(chunk) for chunk in chunks))

    async def _submit_chunk(self, tasks: list[ArrayTask]) -> None:
        if len(tasks) == 1:
            task = tasks[0]
            try:
                self.submit_calls += 1
                task.job_id.set_result(await self.worker.submit_single(
                    task.flow_run, task.configuration, task.run_dir, task.argv, task.env, task.log))
            except BaseException as exc:  # the run's own submit error, raised from its run()
                task.job_id.set_exception(exc)
            return
        try:
            self.submit_calls += 1
            ids = await self.worker.submit_array(tasks)
        except ArrayTooLarge as exc:
            half = (len(tasks) + 1) // 2
            for task in tasks:
                task.log.warning(
                    f"{exc.scheduler} refused an array of {len(tasks)} tasks ({exc}); "
                    f"submitting arrays of at most {half} instead")
            await asyncio.gather(self._submit_chunk(tasks[:half]), self._submit_chunk(tasks[half:]))
            return
        except BaseException as exc:
            for task in tasks:
                task.job_id.set_exception(exc)
            return
        for task, job_id in zip(tasks, ids):
            task.job_id.set_result(job_id)


class ArrayTooLarge(SchedulerError):
    """The scheduler refused an array for its size (MaxArraySize, max_aj_tasks...)."""

    def __init__(self, scheduler: str, message: str):
        super().__init__(message)
        self.scheduler = scheduler


def array_name(prefix: str) -> str:
    return f"{prefix}-array-{uuid.uuid4()}"


def key_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()

