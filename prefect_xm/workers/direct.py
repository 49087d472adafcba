"""Direct execution: a batch job that runs a prefect-xm job's program itself, with
nothing of Prefect on the node. The worker builds the program's argv and environment
from the job-runner run's parameters, and ships its output to the run's logs."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any, Awaitable, Optional, Protocol

from prefect_xm.job_spec import JobSpecError, job_program
from prefect_xm.workers.configuration import ENV_NAME
from prefect_xm.workers.scheduler import SubmissionError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from prefect_xm.workers.followed import FollowedRun

#: how much of a direct job's stdout/stderr one poll ships to the run's logs, per stream
LOG_CHUNK_BYTES = 256 * 1024


def direct_program(flow_run: "FlowRun", pool_env: dict[str, Any]) -> tuple[list[str], dict[str, str], Optional[str]]:
    """(argv, environment, working directory) of a job-runner run's program, for a batch
    script that runs it directly: the argv the job runner would build on the node, the
    job's env over the pool's, and none of Prefect's variables (no API URL, no key: the
    node needs neither, and the key must not travel)."""
    parameters = flow_run.parameters or {}
    if not isinstance(parameters.get("executable"), dict):
        raise SubmissionError(
            f"execution: 'direct' runs the program of a prefect-xm job-runner run; flow run {flow_run.id} has "
            f"no 'executable' parameter (a flow of its own: set the job variable execution to 'engine')")
    try:
        job = job_program(parameters, on_node=True)
    except JobSpecError as e:
        raise SubmissionError(f"executable: {e}") from None
    env = {k: str(v) for k, v in pool_env.items() if not k.startswith("PREFECT_")}
    env.update(job.env)
    for name in env:
        if not ENV_NAME.fullmatch(name):
            raise SubmissionError(f"env: {name!r} is not a valid environment variable name")
    working_dir = job.working_dir
    if working_dir is not None and (not str(working_dir).strip() or re.search(r"\s", str(working_dir))):
        raise SubmissionError(f"working_dir: {working_dir!r} must be a path without spaces or line breaks")
    return job.argv, env, working_dir


class RunDirectories(Protocol):
    """What DirectOutput asks of its worker (BatchWorker): where a run's files are."""

    def run_directory(self, configuration: Any, flow_run_id: Any) -> Awaitable[str]: ...


#: the logger (a child of the run's) under which a direct job's output lines reach its logs
JOB_OUTPUT_LOGGER = "job"
STDERR_PREFIX = "[stderr] "


class DirectOutput:
    """Ships a direct job's job.out/job.err to its run's logs: new complete lines once
    per poll while it runs, and the rest at its end (the worker's logger batches them
    to the API), each line one record of the JOB_OUTPUT_LOGGER logger."""

    def __init__(self, worker: RunDirectories, followed: "FollowedRun", logger) -> None:
        self.worker, self.followed, self.logger = worker, followed, logger
        self.offsets = {"job.out": 0, "job.err": 0}
        self.partial = {"job.out": b"", "job.err": b""}
        self._lock = asyncio.Lock()

    async def skip_shipped(self, shipped: dict[str, int]) -> None:
        """Start after the first `shipped[name]` lines of each file: a worker that
        follows a job its predecessor was shipping does not ship them twice. The run's
        logs on the server say how many arrived (a line its predecessor had not yet
        sent is not among them, and is shipped)."""
        async with self._lock:
            run_dir = await self.worker.run_directory(self.followed.configuration, self.followed.flow_run_id)
            for name, lines in shipped.items():
                offset = 0
                while lines > 0:
                    data = await self.followed.transport.read_from(f"{run_dir}/{name}", offset, LOG_CHUNK_BYTES)
                    if not data:
                        break
                    if data.count(b"\n") >= lines:
                        end = -1
                        for _ in range(lines):
                            end = data.index(b"\n", end + 1)
                        offset += end + 1
                        break
                    # the chunk's lines, and the start of one its newline (further on) counts
                    lines -= data.count(b"\n")
                    offset += len(data)
                self.offsets[name] = offset

    async def follow(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.ship()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a missed read is read again at the next poll
                self.logger.debug(f"could not read the job's output yet: {e}")

    async def ship(self, final: bool = False) -> None:
        async with self._lock:
            run_dir = await self.worker.run_directory(self.followed.configuration, self.followed.flow_run_id)
            for name in ("job.out", "job.err"):
                while True:
                    data = await self.followed.transport.read_from(f"{run_dir}/{name}", self.offsets[name],
                                                                   LOG_CHUNK_BYTES)
                    if not data:
                        break
                    self.offsets[name] += len(data)
                    text = self.partial[name] + data
                    lines = text.split(b"\n")
                    self.partial[name] = lines.pop()
                    self._emit(name, lines)
                    if len(data) < LOG_CHUNK_BYTES:
                        break
                if final and self.partial[name]:
                    self._emit(name, [self.partial[name]])
                    self.partial[name] = b""

    async def restart(self) -> None:
        """The job was requeued and its script will write its output again: Slurm starts
        job.out and job.err anew (what was shipped stays in the logs), the others append."""
        async with self._lock:
            run_dir = await self.worker.run_directory(self.followed.configuration, self.followed.flow_run_id)
            for name, offset in self.offsets.items():
                if offset and not await self.followed.transport.read_from(f"{run_dir}/{name}", offset - 1, 1):
                    self.offsets[name], self.partial[name] = 0, b""

    def _emit(self, name: str, lines: list[bytes]) -> None:
        prefix = STDERR_PREFIX if name == "job.err" else ""
        for line in lines:
            self.logger.info(prefix + line.decode("utf-8", errors="replace").rstrip("\r"))
