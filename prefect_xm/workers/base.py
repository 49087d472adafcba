"""BatchWorker: the scheduler-agnostic Prefect worker for batch schedulers.

One flow run = one batch job. The worker renders the batch script (jinja2, sandboxed,
StrictUndefined), submits it through a Transport, and follows the job with the shared
JobPoller of its cluster. It never branches on the scheduler's name: everything
scheduler-specific is in a Scheduler (slurm.py, ...).

Who reports the run's states: the flow engine inside the job reports Running and its
final state; the worker reports what only the scheduler knows: InfrastructurePending
(with the scheduler's reason) while queued, Crashed when the job ended without the
flow reaching a final state, Cancelled once a cancelled job is gone.
"""

from __future__ import annotations

import abc
import asyncio
import datetime
import json
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal, Optional, TypeVar
from uuid import UUID

import jinja2
import jinja2.sandbox
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import InfrastructureNotAvailable, InfrastructureNotFound
from prefect.states import Cancelled, Completed, Crashed, Failed, InfrastructurePending, Pending, Running, Scheduled
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)
from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from prefect_xm.gang import gang_place
from prefect_xm.workers.bulk_calls import BulkPrefectCalls
from prefect_xm.workers.arrays import (
    GROUPING_DIR,
    ARGV_FILE,
    TASK_EXEC,
    ArraySubmitter,
    ArrayTask,
    ArrayTooLarge,
    argv_file,
    array_directory,
    array_name,
    key_digest,
    task_env,
)
from prefect_xm.workers.hetjob import (
    GANG_STOP_FILE,
    HET_COMPONENT_FILE,
    MEMBER_EXIT_FILE,
    HetJobGatherer,
    HetMember,
    directives,
    het_script,
    member_end,
)
from prefect_xm.workers.poller import JobPoller, TrackedJob
from prefect_xm.workers.schema import compact
from prefect_xm.workers.scheduler import (
    JobState,
    JobStatus,
    Scheduler,
    SubmitRequest,
    TransientSchedulerError,
)
from prefect_xm.blocks.ssh import SSHConnection
from prefect_xm.workers.transport import LocalTransport, SSHTransport, Transport

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

TEMPLATES = Path(__file__).parent / "templates"
STDERR_TAIL_BYTES = 3000


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"{name}: {os.environ[name]!r} is not a number of seconds") from None


def check_format(pattern: "re.Pattern[str]", field: str, value: Optional[str], example: str) -> Optional[str]:
    """A job variable's value against its scheduler's syntax; the error names both."""
    if value is None or value == "":
        return None
    if not pattern.match(str(value)):
        raise ValueError(f"{field}: {value!r} is not valid; expected e.g. {example}")
    return value


def _at_least_one(v: Optional[int], info: ValidationInfo) -> Optional[int]:
    if v is not None and v < 1:
        raise ValueError(f"{info.field_name}: {v!r} must be at least 1")
    return v


def _not_negative(v: Optional[int], info: ValidationInfo) -> Optional[int]:
    if v is not None and v < 0:
        raise ValueError(f"{info.field_name}: {v!r} must be 0 or more")
    return v


#: a job variable counting what a job has at least one of (nodes, CPUs, slots, tasks),
#: its error naming the variable whichever scheduler's it is
AtLeastOne = Annotated[Optional[int], AfterValidator(_at_least_one)]
#: a job variable counting what a job may have none of (GPUs, requeues)
ZeroOrMore = Annotated[Optional[int], AfterValidator(_not_negative)]

#: what a batch job name may not hold, whatever the scheduler
JOB_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")
#: the run's environment, beside job.sh in the run directory (mode 0600)
ENV_FILE = "job.env"
#: in an array task's run directory: "<array job name> <task index>"
ARRAY_TASK_FILE = "array-task"
#: in a run directory: how many times the job's script has started (a requeued job's
#: script starts again); the program sees it as ATTEMPT_VARIABLE
ATTEMPT_FILE = "attempt"
ATTEMPT_VARIABLE = "PREFECT_XM_ATTEMPT"
#: files written at once when an array is prepared (SFTP requests in flight, over SSH)
FILE_WRITES_AT_ONCE = 16
#: flow runs per read (the server's default page, PREFECT_API_DEFAULT_LIMIT)
API_PAGE = 200
#: a stopped experiment turns its tasks Cancelling one request at a time: a cancelling
#: array task waits in steps while more of its array keep following, for so long at most
ARRAY_CANCEL_STEP = 1.0
ARRAY_CANCEL_SETTLE = 30.0
#: how long a whole array's cancel is remembered after it ended
ARRAY_CANCEL_KEPT = 600.0
#: states of a run whose job may still be live, that a worker may have to take over
RECOVERABLE_STATES = frozenset({StateType.PENDING, StateType.RUNNING, StateType.CANCELLING})
#: `execution` job variable: Prefect's flow engine on the node, or the job's program itself
ENGINE, DIRECT = "engine", "direct"
#: how much of a direct job's stdout/stderr one poll ships to the run's logs, per stream
LOG_CHUNK_BYTES = 256 * 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def job_name_prefix(text: str, empty: str) -> str:
    """`text` made safe to lead a job name: no spaces or commas, a letter first."""
    prefix = JOB_NAME_UNSAFE.sub("-", text).strip("-")[:64]
    if not prefix:
        return empty
    return prefix if prefix[:1].isalpha() else f"xm-{prefix}"


def environment_file(env: dict[str, str], run_dir: str) -> str:
    """The run's environment as a file the batch script sources (`. job.env`), and the
    count of the script's starts: each start is one attempt (POSIX sh, as SGE may use)."""
    attempts = shlex.quote(f"{run_dir}/{ATTEMPT_FILE}")
    return "".join(f"export {name}={shlex.quote(str(value))}\n" for name, value in env.items()) + (
        f"{ATTEMPT_VARIABLE}=$(( $(cat {attempts} 2>/dev/null || echo 0) + 1 ))\n"
        f'echo "${ATTEMPT_VARIABLE}" > {attempts}\n'
        f"export {ATTEMPT_VARIABLE}\n")


def direct_program(flow_run: "FlowRun", pool_env: dict[str, Any]) -> tuple[list[str], dict[str, str], Optional[str]]:
    """(argv, environment, working directory) of a job-runner run's program, for a batch
    script that runs it directly: the argv the job runner would build on the node, the
    job's env over the pool's, and none of Prefect's variables (no API URL, no key: the
    node needs neither, and the key must not travel)."""
    from prefect_xm.flows.job_runner import JobSpecError, build_argv

    parameters = flow_run.parameters or {}
    if not isinstance(parameters.get("executable"), dict):
        raise SubmissionError(
            f"execution: 'direct' runs the program of a prefect-xm job-runner run; flow run {flow_run.id} has "
            f"no 'executable' parameter (a flow of its own: set the job variable execution to 'engine')")
    try:
        argv, extra_env = build_argv(parameters["executable"], list(parameters.get("args") or []), on_node=True)
    except JobSpecError as e:
        raise SubmissionError(f"executable: {e}") from None
    env = {k: str(v) for k, v in pool_env.items() if not k.startswith("PREFECT_")}
    env.update(extra_env)
    env.update({str(k): str(v) for k, v in (parameters.get("env") or {}).items()})
    for name in env:
        if not ENV_NAME.fullmatch(name):
            raise SubmissionError(f"env: {name!r} is not a valid environment variable name")
    working_dir = parameters.get("working_dir") or None
    if working_dir is not None and (not str(working_dir).strip() or re.search(r"\s", str(working_dir))):
        raise SubmissionError(f"working_dir: {working_dir!r} must be a path without spaces or line breaks")
    return argv, env, working_dir


#: the logger (a child of the run's) under which a direct job's output lines reach its logs
JOB_OUTPUT_LOGGER = "job"
STDERR_PREFIX = "[stderr] "


class DirectOutput:
    """Ships a direct job's job.out/job.err to its run's logs: new complete lines once
    per poll while it runs, and the rest at its end (the worker's logger batches them
    to the API), each line one record of the JOB_OUTPUT_LOGGER logger."""

    def __init__(self, worker: "BatchWorker", followed: "FollowedRun", logger) -> None:
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


class ScriptTemplateError(ValueError):
    """The batch-script template could not be rendered (names the variable)."""


class SubmissionError(RuntimeError):
    """The scheduler refused the job; the message is its stderr, verbatim."""


class BatchJobConfiguration(BaseJobConfiguration):
    """Settings common to every batch scheduler; subclasses add their resources."""

    modules: list[str] = Field(default_factory=list)
    setup_commands: list[str] = Field(default_factory=list)
    extra_directives: list[str] = Field(default_factory=list)
    working_dir: Optional[str] = Field(default=None)
    job_name: Optional[str] = Field(default=None)
    script_template: Optional[str] = Field(default=None)
    run_dir: str = Field(default="~/.prefect-xm/runs")
    cluster: str = Field(default="local")
    ssh_block: Optional[str] = Field(default=None)
    submit_timeout: float = Field(default=60.0)
    execution: str = Field(default=ENGINE)
    array_size_limit: Annotated[int, AfterValidator(_at_least_one)] = Field(default=1000)
    array_throttle: AtLeastOne = Field(default=None)
    requeue: bool = Field(default=False)
    max_requeues: ZeroOrMore = Field(default=None)

    @field_validator("execution")
    @classmethod
    def _execution(cls, v: str) -> str:
        if v not in (ENGINE, DIRECT):
            raise ValueError(f"execution: {v!r} must be {ENGINE!r} or {DIRECT!r}")
        return v

    @model_validator(mode="after")
    def _cluster_of_ssh_block(self):
        # Jobs on different login nodes must not share infrastructure ids.
        if self.ssh_block and self.cluster == "local":
            self.cluster = self.ssh_block
        return self

    @field_validator("extra_directives", "modules")
    @classmethod
    def _single_lines(cls, v: list[str], info) -> list[str]:
        for item in v:
            if "\n" in item or "\r" in item:
                raise ValueError(f"{info.field_name}: {item!r} must be a single line")
        return v

    @field_validator("env")
    @classmethod
    def _environment_names(cls, v: dict) -> dict:
        for name in v:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"env: {name!r} is not a valid environment variable name")
        return v

    @field_validator("working_dir", "run_dir")
    @classmethod
    def _directive_path(cls, v: Optional[str], info) -> Optional[str]:
        # Both land in directive lines (-wd, --chdir, -o/-e): a newline would start a
        # shell line of its own, a space would cut the directive short.
        if v is not None and (not v.strip() or re.search(r"\s", v)):
            raise ValueError(f"{info.field_name}: {v!r} must be a path without spaces or line breaks")
        return v

    @field_validator("job_name")
    @classmethod
    def _job_name(cls, v: Optional[str]) -> Optional[str]:
        if v and not re.match(r"^[A-Za-z0-9_.+-]+$", v):
            raise ValueError(f"job_name: {v!r} may only hold letters, digits and _ . + -")
        return v

    @field_validator("cluster")
    @classmethod
    def _cluster_name(cls, v: str) -> str:
        if not v or ":" in v:
            raise ValueError(f"cluster: {v!r} must be a non-empty name without ':'")
        return v

    def prepare_for_flow_run(self, flow_run, deployment=None, flow=None, work_pool=None, worker_name=None, worker_id=None):
        default_command = self.command is None
        super().prepare_for_flow_run(
            flow_run, deployment=deployment, flow=flow, work_pool=work_pool,
            worker_name=worker_name, worker_id=worker_id,
        )
        if default_command:
            # The same Python as the worker: on a shared filesystem that is the one
            # with prefect installed; a site can override `command` per pool.
            self.command = f"{shlex.quote(sys.executable)} -m prefect flow-run execute"


class BatchVariables(BaseVariables):
    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # What `prefect work-pool create` and the UI store as the pool's variables: the
        # same fields, written so that Prefect's server checks a run's job variables
        # against them in a fraction of the time (see schema.py).
        return compact(super().model_json_schema(*args, **kwargs))

    modules: list[str] = Field(
        default_factory=list,
        title="Modules",
        description="Environment modules to load before the flow starts (`module load NAME`).",
    )
    setup_commands: list[str] = Field(
        default_factory=list,
        title="Setup commands",
        description="Shell lines run in the batch script before the flow starts (e.g. activating a venv).",
    )
    extra_directives: list[str] = Field(
        default_factory=list,
        title="Extra directives",
        description="More scheduler options, one per line, written after the scheduler's directive prefix (#SBATCH, #$, #PBS, #BSUB).",
    )
    working_dir: Optional[str] = Field(
        default=None,
        title="Working directory",
        description="Directory the job starts in (a path without spaces: it goes into a directive line).",
    )
    job_name: Optional[str] = Field(
        default=None,
        title="Job name",
        description="Prefix of the scheduler job name; the flow run id is always appended. Defaults to the flow run's name.",
    )
    script_template: Optional[str] = Field(
        default=None,
        title="Script template",
        description="A custom jinja2 batch-script template: a path on the worker's machine, or the template text itself.",
    )
    run_dir: str = Field(
        default="~/.prefect-xm/runs",
        title="Run directory",
        description="Where each run's batch script, stdout and stderr are kept (one subdirectory per flow run); must be visible from the compute nodes.",
    )
    cluster: str = Field(
        default="local",
        title="Cluster name",
        description="A name for the cluster, stored in each run's infrastructure id so a restarted worker finds its jobs. Defaults to the SSH block's name when one is set.",
    )
    ssh_block: Optional[str] = Field(
        default=None,
        title="SSH connection block",
        description="Name of an 'SSH Connection' block: run the scheduler's commands on that login node. Empty: on the worker's machine.",
    )
    submit_timeout: float = Field(
        default=60.0,
        title="Submit timeout (s)",
        description="How long a submission may take before it is checked and retried.",
    )
    execution: Literal["engine", "direct"] = Field(
        default="engine",
        title="Execution",
        description=(
            "'engine': the batch script starts Prefect's flow engine (`python -m prefect flow-run execute`), "
            "which needs Prefect installed and a route to the Prefect API on the compute node. 'direct' (for "
            "prefect-xm job-runner runs, the default of their deployments): the script runs the job's program "
            "itself; the worker writes the run's states from the scheduler's and ships the program's output "
            "as the run's logs, so nothing of Prefect runs on the node."
        ),
    )


    array_size_limit: int = Field(
        default=1000,
        ge=1,
        title="Array size limit",
        description=(
            "Runs of one deployment picked up together whose batch scripts differ only in their program's "
            "arguments and environment (a sweep's trials) go to the scheduler as one array of at most this "
            "many tasks, each task still its own flow run. 1: every run is its own job. Keep it at or below "
            "the site's limit (Slurm MaxArraySize, SGE max_aj_tasks); a refused array is split."
        ),
    )
    array_throttle: Optional[int] = Field(
        default=None,
        ge=1,
        title="Array throttle",
        description=(
            "At most this many tasks of one array run at once (Slurm --array=...%N, SGE -tc, Torque -t ...%N, "
            "LSF [1-N]%M, HTCondor max_materialize). Empty: as many as the scheduler allows."
        ),
    )
    requeue: bool = Field(
        default=False,
        title="Requeue",
        description=(
            "Ask the scheduler to put the job back in its queue when it is preempted or its node fails "
            "(Slurm --requeue, SGE and PBS -r y, LSF -r; HTCondor reschedules evicted jobs by itself). "
            "Whether or not this is set, a job the scheduler requeues keeps its flow run: the run goes back "
            "to Pending (named Requeued) and follows the same job; the program sees which attempt it is "
            "in PREFECT_XM_ATTEMPT (1, 2, ...), to resume from its checkpoint."
        ),
    )
    max_requeues: Optional[int] = Field(
        default=None,
        ge=0,
        title="Maximum requeues",
        description=(
            "Once the job has been requeued more times than this, the worker removes it and the run ends "
            "Crashed, saying so. Empty: no limit."
        ),
    )


async def _read_place_file(transport: Transport, run_dir: str, name: str) -> Optional[tuple[str, int]]:
    """A run directory's "<job name> <index>" file (its array task, its heterogeneous
    job's component), written before the submit; None if there is none."""
    text = await transport.read_tail(f"{run_dir}/{name}")
    if not text:
        return None
    try:
        job_name, index = text.split()
        return job_name, int(index)
    except ValueError:
        raise SubmissionError(f"unreadable {name} file: {text!r}") from None


class BatchWorkerResult(BaseWorkerResult):
    """The job's identifier (infrastructure pid) and 0, or the code of a failed submit."""


@dataclass
class FollowedRun:
    flow_run_id: UUID
    job_id: str
    poller: JobPoller
    transport: Transport
    configuration: BatchJobConfiguration
    tracked: TrackedJob
    cancel_requested: bool = False
    cancel_task: Optional[asyncio.Task] = None
    #: this worker has put the run in Running (a direct job has no engine to say so)
    marked_running: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


C = TypeVar("C", bound=BatchJobConfiguration)
V = TypeVar("V", bound=BatchVariables)


# abc.ABC among the direct bases keeps Prefect from registering this as a worker type.
class BatchWorker(BulkPrefectCalls, BaseWorker[C, V, BatchWorkerResult], abc.ABC):
    """Prefect worker for a batch scheduler; subclasses set `type` and `scheduler`."""

    scheduler: ClassVar[Scheduler]
    _documentation_url = "https://github.com/prefect-xm/prefect-xm"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.poll_interval = _env_float("PREFECT_XM_POLL_INTERVAL", 10.0)
        self.grace_period = _env_float("PREFECT_XM_QUERY_GRACE", 300.0)
        self.recovery_interval = _env_float("PREFECT_XM_RECOVERY_INTERVAL", 60.0)
        #: how long a run may stay Pending (picked up, not yet Submitting) before a run
        #: nobody is submitting is scheduled again: a live worker takes a second or two
        self.pending_grace = _env_float("PREFECT_XM_PENDING_GRACE", 60.0)
        self._transports: dict[str, Transport] = {}
        self._pollers: dict[str, JobPoller] = {}
        self._followed: dict[UUID, FollowedRun] = {}
        self._supervisor: Optional[asyncio.Task] = None
        self._background: set[asyncio.Task] = set()
        #: runs Prefect is submitting that have entered run() (see runs_on_their_way)
        self._entered_run: set[UUID] = set()
        #: arrays being cancelled as a whole, by (cluster, array id)
        self._array_cancels: dict[tuple[str, str], asyncio.Task] = {}
        #: arrays whose cancelling tasks wait to see whether the rest follow (see settle_array_cancel)
        self._array_settles: dict[tuple[str, str], asyncio.Task] = {}
        self._arrays = ArraySubmitter(self, max_wait=_env_float("PREFECT_XM_ARRAY_MAX_WAIT", 10.0))
        self._het_jobs = HetJobGatherer(self, max_wait=_env_float("PREFECT_XM_GANG_GATHER", 60.0))

    # -- lifecycle ------------------------------------------------------------------
    async def setup(self) -> None:
        await super().setup()  # (BulkPrefectCalls wraps the client)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="xm-supervisor")

    async def teardown(self, *exc_info: Any) -> None:
        tasks = [t for t in [self._supervisor, *self._background] if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for poller in self._pollers.values():
            await poller.close()
        for transport in self._transports.values():
            await transport.close()
        await super().teardown(*exc_info)

    # -- states, sent for a batch at once where they match --------------------------------
    def state_label(self, followed: FollowedRun) -> str:
        """What a run's state messages call its job: an array's tasks all say "<scheduler>
        array <id> task", so the states they take together match and go in one request
        (the task's own id is its infrastructure pid, and its log lines name it)."""
        scheduler = followed.poller.scheduler
        array = scheduler.array_of(followed.job_id)
        return f"{scheduler.name} array {array} task" if array else f"{scheduler.name} job {followed.job_id}"

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- transports and pollers: one per cluster ---------------------------------------
    async def transport_for(self, configuration: BatchJobConfiguration) -> Transport:
        """One transport per cluster, shared by every command of every run on it: over
        SSH that is one connection, whatever the number of jobs."""
        key = configuration.cluster
        if key not in self._transports:
            if configuration.ssh_block:
                connection = await SSHConnection.aload(configuration.ssh_block)
                self._transports[key] = SSHTransport(connection, self._logger)
            else:
                self._transports[key] = LocalTransport()
        return self._transports[key]

    def scheduler_for(self, configuration: BatchJobConfiguration) -> Scheduler:
        """The Scheduler for a run's job variables: `scheduler`, unless the worker type
        has dialects chosen per pool or run (xm-pbs: PBS Pro or Torque). Every decision
        about a run's job goes through this one (or its poller's, the same object)."""
        return self.scheduler

    async def poller_for(self, configuration: BatchJobConfiguration) -> JobPoller:
        scheduler = self.scheduler_for(configuration)
        key = (configuration.cluster, id(scheduler))
        if key not in self._pollers:
            self._pollers[key] = JobPoller(
                scheduler,
                await self.transport_for(configuration),
                interval=self.poll_interval,
                grace_period=self.grace_period,
            )
        return self._pollers[key]

    # -- the batch script ---------------------------------------------------------------
    def job_name(self, configuration: BatchJobConfiguration, flow_run: "FlowRun") -> str:
        # Run names are free text (an experiment's title, "my sweep"): a space would cut
        # `#SBATCH --job-name=` short and a comma breaks `squeue --name`, losing the run id
        # that finding the job by name relies on. Some schedulers want a letter first.
        return f"{job_name_prefix(configuration.job_name or flow_run.name or '', 'prefect')}-{flow_run.id}"

    async def run_directory(self, configuration: BatchJobConfiguration, flow_run_id: UUID) -> str:
        base = await (await self.transport_for(configuration)).expand_path(configuration.run_dir)
        return f"{base.rstrip('/')}/{flow_run_id}"

    def load_template(self, configuration: BatchJobConfiguration) -> str:
        custom = configuration.script_template
        if custom:
            if "\n" not in custom and os.path.isfile(os.path.expanduser(custom)):
                return Path(os.path.expanduser(custom)).read_text()
            return custom
        return (TEMPLATES / self.scheduler_for(configuration).template_name).read_text()

    def render_script(
        self, configuration: BatchJobConfiguration, flow_run: "FlowRun", run_dir: str,
        command_argv: Optional[list[str]] = None, names: Optional[dict[str, str]] = None,
    ) -> str:
        """The batch script of one run; `names` replaces the run's own names (job name,
        paths, env file) with an array's."""
        env = jinja2.sandbox.SandboxedEnvironment(
            undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
        )
        env.filters["q"] = lambda v: shlex.quote(str(v))
        context = configuration.model_dump(exclude={"env"})
        context.update(
            job_name=self.job_name(configuration, flow_run),
            run_dir=run_dir,
            stdout_path=f"{run_dir}/job.out",
            stderr_path=f"{run_dir}/job.err",
            command_argv=command_argv if command_argv is not None else shlex.split(configuration.command or ""),
            flow_run_id=str(flow_run.id),
            env_file=f"{run_dir}/{ENV_FILE}",
        )
        context.update(names or {})
        try:
            script = env.from_string(self.load_template(configuration)).render(context)
        except jinja2.UndefinedError as exc:
            raise ScriptTemplateError(
                f"script_template: the batch-script template uses an undefined variable: {exc.message}"
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise ScriptTemplateError(
                f"script_template: syntax error on line {exc.lineno}: {exc.message}"
            ) from None
        if context["env_file"] not in script:
            # without it the flow would start with neither its API URL nor its run id
            raise ScriptTemplateError(
                "script_template: the batch-script template must source the run's environment "
                "file, e.g. `. {{ env_file | q }}` before the command"
            )
        return script

    # -- submit ---------------------------------------------------------------------------
    async def run(
        self,
        flow_run: "FlowRun",
        configuration: C,
        task_status: Any = None,
    ) -> BatchWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        # kept until Prefect is done submitting the run (it records the job id after run()
        # hands it over): until then the run still counts as submitting
        self._entered_run &= self._submitting_flow_run_ids
        self._entered_run.add(flow_run.id)
        run_env = {k: v for k, v in configuration.env.items() if v is not None}
        if configuration.execution == DIRECT:
            command_argv, run_env, working_dir = direct_program(flow_run, run_env)
            if working_dir and not configuration.working_dir:
                configuration = configuration.model_copy(update={"working_dir": working_dir})
        else:
            command_argv = shlex.split(configuration.command or "")
        run_dir = await self.run_directory(configuration, flow_run.id)
        place = gang_place(flow_run.tags or [])
        one_job_with_its_gang = place is not None and self.forms_het_jobs(configuration)
        if place is not None and not one_job_with_its_gang:
            self._het_jobs.not_coming(place)  # its gang-mates need not wait for it
        if one_job_with_its_gang:
            job_id = await self._het_jobs.submit(
                HetMember(flow_run, configuration, run_dir, command_argv, run_env, logger, place=place))
        elif self.may_join_array(configuration):
            job_id = await self._arrays.submit(
                ArrayTask(flow_run, configuration, run_dir, command_argv, run_env, logger))
        else:
            job_id = await self.submit_single(flow_run, configuration, run_dir, command_argv, run_env, logger)
        pid = self.scheduler_for(configuration).infrastructure_pid(configuration.cluster, job_id)
        followed = await self._start_following(flow_run.id, job_id, configuration)
        if task_status is not None:
            task_status.started(pid)
        return await self._follow(flow_run, followed, logger)

    async def submit_single(
        self, flow_run: "FlowRun", configuration: C, run_dir: str, command_argv: list[str],
        run_env: dict[str, str], logger,
    ) -> str:
        """One run as one job: its own script, its own submit."""
        transport = await self.transport_for(configuration)
        script = self.render_script(configuration, flow_run, run_dir, command_argv)
        # The run's environment (API URL, flow run id, the API key) travels in a file only
        # its owner can read, never in the script, the submit command or the job's record.
        await transport.write_file(f"{run_dir}/{ENV_FILE}", environment_file(run_env, run_dir), 0o600)
        script_path = f"{run_dir}/job.sh"
        await transport.write_file(script_path, script, 0o700)
        logger.info(f"Rendered batch script: {script_path}")
        request = SubmitRequest(
            script_path=script_path,
            script=script,
            job_name=self.job_name(configuration, flow_run),
            run_dir=run_dir,
            variables=configuration.model_dump(exclude={"env"}),
        )
        job_id = await self.submit_job(request, transport, configuration, logger)
        logger.info(f"Submitted {self.scheduler_for(configuration).name} job {job_id} ({request.job_name})")
        return job_id

    # -- gangs as heterogeneous jobs ----------------------------------------------------------
    def forms_het_jobs(self, configuration: BatchJobConfiguration) -> bool:
        """Whether this pool's gangs go to the scheduler as one heterogeneous job: the
        scheduler has them, the pool (or the member) leaves them on, and the member runs
        its program directly (its exit code is then the member's end)."""
        return (bool(self.scheduler_for(configuration).het_separator) and configuration.execution == DIRECT
                and bool(getattr(configuration, "het_job", False)))

    async def submit_het_job(self, members: list[HetMember]) -> list[str]:
        """The gang's members as one heterogeneous job, one component each, in order;
        their component ids. Each member keeps its own run directory, batch script
        (its job step), environment file and output."""
        first = members[0]
        configuration = first.configuration
        scheduler = self.scheduler_for(configuration)
        transport = await self.transport_for(configuration)
        base = await transport.expand_path(configuration.run_dir)
        name = f"{job_name_prefix(configuration.job_name or '', 'xm')}-gang-{uuid.uuid4()}"
        het_dir = array_directory(base, name)
        components = []
        for k, m in enumerate(members):
            script = self.render_script(m.configuration, m.flow_run, m.run_dir, m.argv)
            await transport.write_file(f"{m.run_dir}/{ENV_FILE}", environment_file(m.env, m.run_dir), 0o600)
            await transport.write_file(f"{m.run_dir}/job.sh", script, 0o700)
            await transport.write_file(f"{m.run_dir}/{HET_COMPONENT_FILE}", f"{name} {k}\n", 0o600)
            names = dict(job_name=name, stdout_path=f"{het_dir}/job.out", stderr_path=f"{het_dir}/job.err")
            components.append(directives(self.render_script(m.configuration, m.flow_run, m.run_dir, m.argv, names),
                                         scheduler.directive_prefix))
        script = het_script(components, scheduler.het_separator, [m.run_dir for m in members], scheduler.het_launch)
        script_path = f"{het_dir}/job.sh"
        await transport.write_file(script_path, script, 0o700)
        request = SubmitRequest(script_path=script_path, script=script, job_name=name, run_dir=het_dir,
                                variables=configuration.model_dump(exclude={"env"}))
        job_id = await self.submit_job(request, transport, configuration, first.log)
        ids = [scheduler.het_component_id(job_id, i) for i in range(len(members))]
        for i, (m, component) in enumerate(zip(members, ids)):
            m.log.info(f"Submitted as component {i} of {scheduler.name} heterogeneous job {job_id} "
                       f"({len(members)} gang members started together, {name}): job {component}")
        return ids

    async def _het_member_end(self, flow_run: "FlowRun", followed: FollowedRun, job: str, logger) -> bool:
        """A heterogeneous job's member ends as its own exit code says (the scheduler
        has one for the whole job). True if that settled the run's state."""
        scheduler = followed.poller.scheduler
        if not scheduler.het_separator or not scheduler.is_het_component(followed.job_id):
            return False
        run_dir = await self.run_directory(followed.configuration, followed.flow_run_id)
        end = member_end(await followed.transport.read_tail(f"{run_dir}/{MEMBER_EXIT_FILE}", 100),
                         await followed.transport.read_tail(f"{run_dir}/{GANG_STOP_FILE}", 200))
        if not end.known:
            return False
        await self._mark_running(flow_run, followed, f"{job} started")  # a job too quick to be seen running
        if end.stopped_by is not None:
            # The member that ended the gang says so first: the work unit names it, not this one.
            stopper = await self._wait_for_final(end.stopped_by, timeout=max(30.0, 3 * self.poll_interval))
            who = f"gang member {stopper.name!r}" if stopper is not None else f"gang member run {end.stopped_by}"
            state = Cancelled(message=f"{job}: stopped with its gang: {who} exited with code {end.stopper_exit_code}")
            await self.client.set_flow_run_state(flow_run.id, state, force=True)
            logger.warning(state.message)
        elif end.exit_code == 0:
            await self.client.set_flow_run_state(flow_run.id, Completed(message=f"{job} exited with code 0"),
                                                 force=True)
            logger.info(f"{job} exited with code 0")
        else:
            tail = await self._stderr_tail(followed)
            stderr = f"\nLast lines of the job's stderr ({followed.extra.get('stderr_path')}):\n{tail}" if tail else ""
            state = Failed(message=f"{job}: the program exited with code {end.exit_code}.{stderr}")
            await self.client.set_flow_run_state(flow_run.id, state, force=True)
            logger.error(state.message)
        return True

    async def _wait_for_final(self, flow_run_id: str, timeout: float):
        """The run, once final (or as it is when `timeout` passes; None if unreadable)."""
        deadline = time.monotonic() + timeout
        run = None
        while True:
            try:
                run = await self.client.read_flow_run(UUID(flow_run_id))
            except Exception:
                return run
            if (run.state is not None and run.state.is_final()) or time.monotonic() > deadline:
                return run
            await asyncio.sleep(1.0)

    # -- arrays -----------------------------------------------------------------------------
    def may_join_array(self, configuration: BatchJobConfiguration) -> bool:
        scheduler = self.scheduler_for(configuration)
        return bool(scheduler.array_index_variable) and configuration.array_size_limit > 1

    def runs_on_their_way(self) -> bool:
        """Runs Prefect is submitting through this worker that have not reached run() yet
        (they may join the array being collected)."""
        self._entered_run &= self._submitting_flow_run_ids
        return bool(self._submitting_flow_run_ids - self._entered_run)

    def _array_names(self, configuration: BatchJobConfiguration, array_dir: str, name: str) -> dict[str, str]:
        index = self.scheduler_for(configuration).array_output_index
        return dict(
            job_name=name,
            run_dir=array_dir,
            stdout_path=f"{array_dir}/task-{index}.out",
            stderr_path=f"{array_dir}/task-{index}.err",
            flow_run_id=name,
            env_file=f"{array_dir}/task.env",
        )

    def array_key(self, configuration: BatchJobConfiguration, flow_run: "FlowRun") -> tuple:
        """Runs with equal keys may share an array: same scheduler, cluster and limits,
        and the same batch script once each run's own names are taken out."""
        scheduler = self.scheduler_for(configuration)
        names = self._array_names(configuration, GROUPING_DIR, "prefect-xm-array")
        script = self.render_script(configuration, flow_run, GROUPING_DIR, [f"{GROUPING_DIR}/task-exec"], names)
        # The job variables too (without what Prefect sets per run): a scheduler may submit
        # some of them beside the script (HTCondor's description, LSF's stdin options).
        variables = configuration.model_dump(mode="json", exclude={"env", "labels", "name"})
        return (id(scheduler), configuration.cluster, configuration.ssh_block, configuration.array_size_limit,
                configuration.array_throttle, key_digest(script), key_digest(json.dumps(variables, sort_keys=True)))

    async def submit_array(self, tasks: list[ArrayTask]) -> list[str]:
        """The tasks as one array; their task ids, in order."""
        first = tasks[0]
        configuration = first.configuration
        scheduler = self.scheduler_for(configuration)
        transport = await self.transport_for(configuration)
        base = await transport.expand_path(configuration.run_dir)
        name = array_name(job_name_prefix(configuration.job_name or "", "xm"))
        array_dir = array_directory(base, name)
        writes = asyncio.Semaphore(FILE_WRITES_AT_ONCE)

        async def write(path: str, text: str) -> None:
            async with writes:
                await transport.write_file(path, text, 0o600)

        # Each run's directory also says which array task it is: a worker that dies
        # between this submit and recording the task ids leaves runs its replacement
        # can only find through it (see _adopt_unrecorded_submission).
        await asyncio.gather(*(
            write(f"{task.run_dir}/{name_}", text)
            for i, task in enumerate(tasks)
            for name_, text in ((ENV_FILE, environment_file(task.env, task.run_dir)), (ARGV_FILE, argv_file(task.argv)),
                                (ARRAY_TASK_FILE, f"{name} {scheduler.array_first_index + i}\n"))))
        await transport.write_file(f"{array_dir}/tasks", "".join(f"{t.run_dir}\n" for t in tasks), 0o600)
        await transport.write_file(
            f"{array_dir}/task.env",
            task_env(array_dir, scheduler.array_index_variable, scheduler.array_first_index), 0o600)
        await transport.write_file(f"{array_dir}/task-exec", TASK_EXEC, 0o700)
        names = self._array_names(configuration, array_dir, name)
        script = self.render_script(configuration, first.flow_run, array_dir, [f"{array_dir}/task-exec"], names)
        script_path = f"{array_dir}/job.sh"
        await transport.write_file(script_path, script, 0o700)
        throttle = configuration.array_throttle
        if throttle and not scheduler.array_throttles:
            first.log.warning(f"array_throttle: {scheduler.name} arrays cannot be throttled; ignored")
            throttle = None
        request = SubmitRequest(script_path=script_path, script=script, job_name=name, run_dir=array_dir,
                                variables=configuration.model_dump(exclude={"env"}),
                                array_size=len(tasks), array_throttle=throttle)
        array_id = await self.submit_job(request, transport, configuration, first.log,
                                         argv=scheduler.array_submit_argv(request, len(tasks), throttle),
                                         parse=scheduler.parse_array_submit)
        ids = [scheduler.array_task_id(array_id, scheduler.array_first_index + i) for i in range(len(tasks))]
        for i, (task, job_id) in enumerate(zip(tasks, ids)):
            task.log.info(f"Submitted as task {scheduler.array_first_index + i} of {scheduler.name} array "
                          f"{array_id} ({len(tasks)} tasks, {name}): job {job_id}")
        return ids

    async def submit_job(
        self, request: SubmitRequest, transport: Transport, configuration: C, logger,
        argv: Optional[list[str]] = None, parse: Optional[Callable[[str], str]] = None,
    ) -> str:
        """Submit once. If the submit command fails transiently or times out, the job
        may still have been accepted: look it up by its unique name before retrying.
        `argv` and `parse` replace the scheduler's single-job ones (arrays)."""
        scheduler = self.scheduler_for(configuration)
        is_array = argv is not None
        argv = argv or scheduler.submit_argv(request)
        parse = parse or scheduler.parse_submit
        stdin = scheduler.submit_stdin(request)
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                result = await transport.run(argv, stdin=stdin, timeout=configuration.submit_timeout)
                if result.ok:
                    try:
                        return parse(result.stdout)
                    except ValueError as exc:
                        # accepted, but the id is unreadable (a site wrapper's chatter):
                        # the job exists, so find it rather than leave it untracked
                        existing = await self._find_by_name(request.job_name, transport, scheduler, is_array)
                        if existing:
                            logger.warning(f"{exc}; found the job by its name: {existing}")
                            return existing
                        raise SubmissionError(f"{argv[0]} answered without a job id: {exc}") from None
                error = scheduler.submit_error(result)
            except TransientSchedulerError as exc:
                error = exc
            if not isinstance(error, TransientSchedulerError):
                if is_array and scheduler.array_too_large(error):
                    raise ArrayTooLarge(scheduler.name, str(error))
                raise SubmissionError(f"{argv[0]} refused the job: {error}")
            logger.warning(f"Submission attempt {attempt} did not complete: {error}")
            if getattr(error, "command_ran", True):
                existing = await self._find_by_name(request.job_name, transport, scheduler, is_array)
                if existing:
                    logger.info(f"Job {existing} with this run's name exists already; not submitting again")
                    return existing
            if attempt < attempts:
                await asyncio.sleep(min(2**attempt, 30))
        raise SubmissionError(f"{argv[0]} failed {attempts} times: {error}")

    async def _find_by_name(
        self, job_name: str, transport: Transport, scheduler: Scheduler, array: bool = False,
    ) -> Optional[str]:
        """The id of the live job by this name; of an array, the array's id."""
        for _ in range(3):
            try:
                result = await transport.run(scheduler.find_by_name_argv(job_name), timeout=30)
            except TransientSchedulerError:
                await asyncio.sleep(2)
                continue
            if scheduler.find_by_name_answered(result):
                ids = scheduler.jobs_named(job_name, result.stdout)
                if not ids:
                    return None
                return (scheduler.array_of(ids[0]) or ids[0]) if array else ids[0]
            await asyncio.sleep(2)
        raise SubmissionError(
            f"could not check whether job {job_name!r} was submitted; not retrying, to avoid a duplicate"
        )

    # -- follow ---------------------------------------------------------------------------
    async def _start_following(self, flow_run_id: UUID, job_id: str, configuration: C) -> FollowedRun:
        poller = await self.poller_for(configuration)
        followed = FollowedRun(
            flow_run_id=flow_run_id,
            job_id=job_id,
            poller=poller,
            transport=await self.transport_for(configuration),
            configuration=configuration,
            tracked=poller.track(job_id),
        )
        self._followed[flow_run_id] = followed
        poller.poll_soon()
        return followed

    async def _follow(self, flow_run: "FlowRun", followed: FollowedRun, logger) -> BatchWorkerResult:
        scheduler = followed.poller.scheduler
        scheduler_name = scheduler.name
        pid = scheduler.infrastructure_pid(followed.configuration.cluster, followed.job_id)
        # Prefect takes one InfrastructurePending per run (it refuses Pending -> Pending
        # under the same name), so the state carries the first real reason: Slurm says
        # "None" until its scheduler has looked at a new job (schedulers that give no
        # reason at all are announced at once). Later reasons are logged.
        announce = True
        retry_announce = False
        announce_attempts = 0
        logged: Optional[str] = None
        direct = followed.configuration.execution == DIRECT
        output = None
        if direct:
            output = DirectOutput(self, followed, self.job_output_logger(flow_run))
            if followed.extra.get("resumed"):
                try:
                    await output.skip_shipped(await self._output_lines_shipped(flow_run.id))
                except Exception as e:  # following the job matters more than a repeated line
                    logger.warning(f"could not tell which output lines are in the logs already "
                                   f"({type(e).__name__}: {e}); shipping the output from its start")
        pump = self._spawn(output.follow(self.poll_interval)) if output else None
        requeues_seen = followed.tracked.requeues
        try:
            status = followed.tracked.status
            while not status.state.is_final:
                try:
                    # A job held in the queue sends no further update: an announcement that
                    # failed (the API busy) is retried on the poll's rhythm instead.
                    status = await asyncio.wait_for(
                        followed.tracked.updates.get(), timeout=max(self.poll_interval, 1.0) if retry_announce else None)
                except asyncio.TimeoutError:
                    status = followed.tracked.status
                retry_announce = False
                if followed.tracked.requeues > requeues_seen:
                    requeues_seen = followed.tracked.requeues
                    announce = retry_announce = False  # the Requeued state says why it waits
                    await self._requeued(flow_run, followed, status, output, logger)
                if status.state == JobState.PENDING:
                    message = f"{scheduler_name} job {followed.job_id} is queued: {status.describe()}"
                    if announce and status.reason not in ("None", "(null)"):
                        announce = await self._propose_infrastructure_pending(
                            flow_run, f"{self.state_label(followed)} is queued: {status.describe()}", logger) is False
                        announce_attempts += 1
                        retry_announce = announce and announce_attempts < 10
                    if message != logged:
                        logger.info(message)
                        logged = message
                elif status.state == JobState.RUNNING:
                    logger.info(f"{scheduler_name} job {followed.job_id} is running ({status.native_state})")
                    if direct:
                        await self._mark_running(flow_run, followed, f"{self.state_label(followed)} is running")
            for argv in scheduler.cleanup_argvs(status):
                # e.g. SGE's Eqw: final for us, but the scheduler would keep it forever
                result = await followed.transport.run(argv, timeout=60)
                logger.info(f"Removed {scheduler_name} job {followed.job_id} ({' '.join(argv)}: rc {result.returncode})")
            if output is not None:
                pump.cancel()
                await output.ship(final=True)  # everything the program wrote, before its final state
            await self._finish(flow_run, followed, status, logger)
            return BatchWorkerResult(identifier=pid, status_code=0)
        finally:
            if pump is not None:
                pump.cancel()
            followed.poller.untrack(followed.job_id)
            self._followed.pop(flow_run.id, None)

    def job_output_logger(self, flow_run: "FlowRun"):
        """The run's logger for its direct job's output lines (named apart from the
        worker's own messages, so a successor can count what reached the logs)."""
        from prefect.logging.loggers import flow_run_logger

        return flow_run_logger(flow_run=flow_run).getChild(
            JOB_OUTPUT_LOGGER, extra=dict(self.get_flow_run_logger(flow_run).extra))

    async def _output_lines_shipped(self, flow_run_id: UUID) -> dict[str, int]:
        """How many lines of job.out and job.err the run's logs hold."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        shipped = {"job.out": 0, "job.err": 0}
        offset = 0
        while True:
            logs = await self.client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset)
            for log in logs:
                if log.name.rsplit(".", 1)[-1] == JOB_OUTPUT_LOGGER:
                    shipped["job.err" if log.message.startswith(STDERR_PREFIX) else "job.out"] += 1
            if len(logs) < 200:
                return shipped
            offset += len(logs)

    async def _propose_infrastructure_pending(self, flow_run: "FlowRun", message: str, logger) -> Optional[bool]:
        """True: the run shows the message; False: not this time (try again); None: the
        run is no longer Pending, nothing to announce. Proposed without a read first:
        Prefect refuses a Pending state to a run that is Running, Cancelling or final,
        and answers with the state it is in."""
        try:
            answer = await self._set_state(flow_run.id, InfrastructurePending(message=message))
        except Exception as e:
            logger.warning(f"could not mark the run InfrastructurePending yet ({type(e).__name__}: {e}); will retry")
            return False
        if answer.accepted:
            return True
        if answer.state_type is not None and answer.state_type != StateType.PENDING.value:
            return None
        return False

    async def _requeued(self, flow_run: "FlowRun", followed: FollowedRun, status: JobStatus,
                        output: Optional[DirectOutput], logger) -> None:
        """The scheduler put the job back in its queue (preemption, a failed node, an
        admin's requeue): its run goes back to Pending, named Requeued, and the same job is
        followed on; past max_requeues the job is removed and the run ends Crashed."""
        job = f"{followed.poller.scheduler.name} job {followed.job_id}"
        # how many times its script started (each start counts itself in the run directory,
        # so a worker that took over the job knows the earlier requeues too)
        started = await self._attempts_started(followed)
        requeues = max(followed.tracked.requeues, started - (status.state == JobState.RUNNING))
        limit = followed.configuration.max_requeues
        current = (await self._read_run(flow_run.id)).state
        if current is not None and (current.type == StateType.CANCELLING or (
                current.is_final() and current.type != StateType.CRASHED)) or followed.cancel_requested:
            return  # being cancelled, or ended for good: nothing to take back
        if limit is not None and requeues > limit:
            message = (f"{job} was requeued {requeues} times ({status.describe()}), more than max_requeues="
                       f"{limit}: the worker removed it.")
            followed.extra["gave_up"] = message
            await self.client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
            logger.error(message)
            followed.cancel_requested = True
            followed.cancel_task = self._spawn(
                self.cancel_job(followed.poller.scheduler, followed.job_id, followed.transport, 30, status.state,
                                followed))
            return
        of = f" of {limit}" if limit is not None else ""
        message = (f"{job} went back to the queue ({status.describe()}): requeue {requeues}{of}. The same job "
                   f"runs again as attempt {requeues + 1} ({ATTEMPT_VARIABLE}={requeues + 1}).")
        # force: a run goes back from Running only this way (and the engine of a flow the
        # scheduler stopped may have said Crashed; the job is not over)
        await self.client.set_flow_run_state(flow_run.id, Pending(name="Requeued", message=message), force=True)
        followed.marked_running = False  # its next attempt is Running again when it starts
        logger.warning(message)
        if output is not None:
            await output.restart()

    async def _attempts_started(self, followed: FollowedRun) -> int:
        path = f"{await self.run_directory(followed.configuration, followed.flow_run_id)}/{ATTEMPT_FILE}"
        try:
            return int((await followed.transport.read_tail(path, 64) or "0").strip() or 0)
        except Exception:  # unreadable: the requeues this worker saw are the count
            return 0

    async def _finish(self, flow_run: "FlowRun", followed: FollowedRun, status: JobStatus, logger) -> None:
        """The job has ended: make the run's state say what happened."""
        job = f"{followed.poller.scheduler.name} job {followed.job_id}"
        if "gave_up" in followed.extra:
            return  # Crashed already, past its requeues
        current = (await self._read_run(flow_run.id)).state
        if current is None:
            return
        if current.type in (StateType.CANCELLING, StateType.CANCELLED) or followed.cancel_requested:
            if current.type != StateType.CANCELLED:
                await self.client.set_flow_run_state(
                    flow_run.id,
                    Cancelled(message=f"Cancelled: {job} removed ({status.describe()})."),
                    force=True,
                )
            logger.info(f"{job} ended {status.describe()}; flow run cancelled")
            return
        if followed.configuration.execution == DIRECT:
            await self._finish_direct(flow_run, followed, status, current, logger)
            return
        if status.state == JobState.COMPLETED and current.is_final():
            return
        if current.is_final() and current.type != StateType.CRASHED:
            return  # the flow reported Completed or Failed itself; that is the truth
        tail = await self._stderr_tail(followed)
        if status.state == JobState.CANCELLED:
            state = Cancelled(message=f"{job} was cancelled outside Prefect ({status.describe()}).")
            await self.client.set_flow_run_state(flow_run.id, state, force=True)
            logger.warning(state.message)
            return
        message = f"{job} ended {status.describe()} before the flow run reported a final state."
        if current.type == StateType.CRASHED and current.message:
            message += f" The flow run said: {current.message}"
        if tail:
            message += f"\nLast lines of the job's stderr ({followed.extra.get('stderr_path')}):\n{tail}"
        # force: the engine may have marked itself Crashed on the scheduler's SIGTERM
        # without knowing why; the scheduler's reason (TIMEOUT, OOM, ...) is the useful part.
        await self.client.set_flow_run_state(
            flow_run.id, Crashed(message=message), force=current.type == StateType.CRASHED
        )
        logger.error(message)

    async def _finish_direct(self, flow_run: "FlowRun", followed: FollowedRun, status: JobStatus, current,
                             logger) -> None:
        """A direct job's end is the run's end: nothing else will report it."""
        job = f"{followed.poller.scheduler.name} job {followed.job_id}"
        if current.is_final():
            return
        if await self._het_member_end(flow_run, followed, job, logger):
            return
        if status.state == JobState.COMPLETED:
            label = self.state_label(followed)
            # a job too quick to be seen running (the state just read says so)
            await self._mark_running(flow_run, followed, f"{label} started", current=current)
            await self._set_state(flow_run.id, Completed(message=f"{label} exited with code 0"), force=True)
            logger.info(f"{job} exited with code 0")
            return
        if status.state == JobState.CANCELLED:
            state = Cancelled(message=f"{job} was cancelled outside Prefect ({status.describe()}).")
            await self.client.set_flow_run_state(flow_run.id, state, force=True)
            logger.warning(state.message)
            return
        tail = await self._stderr_tail(followed)
        stderr = f"\nLast lines of the job's stderr ({followed.extra.get('stderr_path')}):\n{tail}" if tail else ""
        if followed.poller.scheduler.ended_by_program(status):
            state = Failed(message=f"{job}: the program exited with code {status.exit_code} "
                                   f"({status.describe()}).{stderr}")
        else:
            state = Crashed(message=f"{job} ended {status.describe()}.{stderr}")
        await self.client.set_flow_run_state(flow_run.id, state, force=True)
        logger.error(state.message)

    async def _mark_running(self, flow_run: "FlowRun", followed: FollowedRun, message: str, current=None) -> None:
        """Running, once, for a run still Pending (a direct job has no engine to say so).
        Read first (with the runs starting at the same time: one request), never only
        proposed: Prefect lets a Cancelled, Failed or Crashed run take Running, and a run
        the launcher cancelled before its job started must stay Cancelled."""
        if followed.marked_running:
            return
        if current is None:
            current = (await self._read_run(flow_run.id)).state
        if current is not None and current.type == StateType.PENDING:
            await self._set_state(flow_run.id, Running(message=message), force=True)
        followed.marked_running = True

    async def _stderr_tail(self, followed: FollowedRun, lines: int = 20) -> str:
        path = f"{await self.run_directory(followed.configuration, followed.flow_run_id)}/job.err"
        followed.extra["stderr_path"] = path
        try:
            text = await followed.transport.read_tail(path, STDERR_TAIL_BYTES)
        except Exception:
            return ""
        if not text:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    # -- cancel ---------------------------------------------------------------------------
    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: C, grace_seconds: int = 30
    ) -> None:
        scheduler = self.scheduler_for(configuration)
        scheduler_name, cluster, job_id = Scheduler.parse_infrastructure_pid(infrastructure_pid)
        if scheduler_name != scheduler.name or cluster != configuration.cluster:
            raise InfrastructureNotAvailable(
                f"{infrastructure_pid!r} is not a {scheduler.name} job on cluster {configuration.cluster!r}"
            )
        followed = next((f for f in self._followed.values() if f.job_id == job_id and f.configuration.cluster == cluster), None)
        array = scheduler.array_of(job_id)
        if array and (cluster, array) in self._array_cancels:
            # its whole array is being (or was) removed in one command; the task may
            # already be unfollowed, having ended by it: no command of its own
            await asyncio.shield(self._array_cancels[(cluster, array)])
            return
        if followed and array:
            await asyncio.shield(self._array_settle(cluster, array))
            if (cluster, array) in self._array_cancels:
                await asyncio.shield(self._array_cancels[(cluster, array)])
                return
        if followed and followed.cancel_task is not None:
            # our supervisor is cancelling it already (Prefect asks too): one removal, not two
            await asyncio.shield(followed.cancel_task)
            return
        if followed:
            followed.cancel_requested = True
        last = followed.tracked.status.state if followed else JobState.PENDING
        gone = await self.cancel_job(scheduler, job_id, await self.transport_for(configuration), grace_seconds, last,
                                     followed)
        if not gone:
            raise InfrastructureNotFound(f"{scheduler.name} job {job_id} not found")

    async def cancel_job(
        self,
        scheduler: Scheduler,
        job_id: str,
        transport: Transport,
        grace_seconds: float,
        last_state: JobState,
        followed: Optional[FollowedRun] = None,
    ) -> bool:
        """A grace signal first (if the job runs), then the kill. True if the scheduler
        accepted the cancel, False if it did not know the job."""
        argvs = scheduler.cancel_argvs(job_id, int(grace_seconds))
        if last_state == JobState.RUNNING and len(argvs) > 1:
            for argv in argvs[:-1]:
                await transport.run(argv, timeout=60)
            if followed:
                await self._wait_final(followed, grace_seconds)
                if followed.tracked.is_final:
                    return True
        result = await transport.run(argvs[-1], timeout=60)
        accepted = scheduler.parse_cancel(result)
        if followed:
            # A job removed while queued may leave no terminal record (SGE's qacct):
            # once it has left the queue, the poller knows it was cancelled.
            followed.tracked.cancelled = True
            followed.poller.poll_soon()
        return accepted

    async def _wait_final(self, followed: FollowedRun, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        followed.poller.poll_soon()
        while not followed.tracked.is_final and time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, self.poll_interval))
            followed.poller.poll_soon()

    # -- the supervisor: cancellations and restart recovery ----------------------------------
    async def _supervise(self) -> None:
        next_recovery = 0.0
        while True:
            try:
                if self._work_pool is not None:
                    await self._cancel_cancelling_runs()
                    if time.monotonic() >= next_recovery:
                        await self.recover_runs()
                        next_recovery = time.monotonic() + self.recovery_interval
            except asyncio.CancelledError:
                raise
            except Exception:
                self._logger.exception("Batch worker supervisor pass failed")
            await asyncio.sleep(self.poll_interval)

    async def _cancel_cancelling_runs(self) -> None:
        """Prefect only kills infrastructure of runs that never started; we watch our
        own runs for Cancelling, queued or running, with one API call per interval."""
        ids = [run_id for run_id, f in self._followed.items() if not f.cancel_requested]
        if not ids:
            return
        runs = await self._read_all_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=ids),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])),
            )
        )
        # An array's tasks wait to see whether the whole array is being stopped (then it
        # goes in one command); any other run is removed on its own at once.
        for run in runs:
            followed = self._followed.get(run.id)
            if followed is None or followed.cancel_requested:
                continue
            array = followed.poller.scheduler.array_of(followed.job_id)
            if array:
                self._array_settle(followed.configuration.cluster, array)
            else:
                self._cancel_on_its_own(followed, run)

    def _cancel_on_its_own(self, followed: FollowedRun, run: "FlowRun") -> None:
        followed.cancel_requested = True
        self.get_flow_run_logger(run).info(
            f"Flow run is cancelling: cancelling {followed.poller.scheduler.name} job {followed.job_id}"
        )
        followed.cancel_task = self._spawn(
            self.cancel_job(followed.poller.scheduler, followed.job_id, followed.transport, 30,
                            followed.tracked.status.state, followed)
        )

    def _array_settle(self, cluster: str, array: str) -> asyncio.Task:
        """The one settle_array_cancel in flight for this array (both the supervisor and
        Prefect's cancellation observer ask for it)."""
        key = (cluster, array)
        if key not in self._array_settles:
            task = self._spawn(self.settle_array_cancel(cluster, array))
            self._array_settles[key] = task
            task.add_done_callback(lambda _: self._array_settles.pop(key, None))
        return self._array_settles[key]

    async def settle_array_cancel(self, cluster: str, array: str) -> None:
        """Cancel what of an array is cancelling: the whole array in one command when
        every live task is (a stopped experiment), else each cancelling task on its own.
        The worker hears of each task as it turns Cancelling, and a stop turns them one
        request at a time: so wait, in steps, while more of the array keep following."""
        seen, deadline = -1, time.monotonic() + ARRAY_CANCEL_SETTLE
        while True:
            whole, cancelling = await self._cancel_array_if_all_cancelling(cluster, array)
            if whole is not None:
                await asyncio.shield(whole)
                return
            if len(cancelling) <= seen or time.monotonic() >= deadline:
                break
            seen = len(cancelling)
            await asyncio.sleep(ARRAY_CANCEL_STEP)
        for followed, run in cancelling:
            if not followed.cancel_requested:
                self._cancel_on_its_own(followed, run)

    async def _cancel_array_if_all_cancelling(
        self, cluster: str, array: str
    ) -> tuple[Optional[asyncio.Task], list[tuple[FollowedRun, "FlowRun"]]]:
        """One cancel of the whole array when every live task of it is cancelling (a
        stopped experiment), and that cancel's task; else None, and the live tasks that
        are cancelling, with their runs."""
        key = (cluster, array)
        if key in self._array_cancels:
            return self._array_cancels[key], []
        members = [f for f in self._followed.values()
                   if f.configuration.cluster == cluster and f.poller.scheduler.array_of(f.job_id) == array
                   and not f.tracked.is_final]
        if not members:
            return None, []
        runs = await self._read_all_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[m.flow_run_id for m in members]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.CANCELLING, StateType.CANCELLED]))))
        by_id = {m.flow_run_id: m for m in members}
        cancelling = [(by_id[r.id], r) for r in runs if r.id in by_id]
        if len(members) < 2 or len(cancelling) < len(members):
            return None, cancelling
        if key in self._array_cancels:  # asked for meanwhile
            return self._array_cancels[key], []
        for run in runs:
            self.get_flow_run_logger(run).info(
                f"Flow run is cancelling with the rest of its array: cancelling "
                f"{members[0].poller.scheduler.name} array {array} ({len(members)} tasks)")
        task = self._spawn(self.cancel_array(array, members))
        self._array_cancels[key] = task
        # kept a while for Prefect's late asks about its tasks (no second command), then
        # dropped: a long-lived worker sees many stopped arrays
        task.add_done_callback(lambda _: asyncio.get_running_loop().call_later(
            ARRAY_CANCEL_KEPT, self._array_cancels.pop, key, None))
        for member in members:
            member.cancel_requested = True
            member.cancel_task = task
        return task, []

    async def cancel_array(self, array_id: str, members: list[FollowedRun], grace_seconds: float = 30) -> None:
        """Every live task of an array, with one command per step (grace signal, kill)."""
        scheduler = members[0].poller.scheduler
        transport = members[0].transport
        argvs = scheduler.cancel_argvs(array_id, int(grace_seconds))
        if len(argvs) > 1 and any(m.tracked.status.state == JobState.RUNNING for m in members):
            for argv in argvs[:-1]:
                await transport.run(argv, timeout=60)
            deadline = time.monotonic() + grace_seconds
            while not all(m.tracked.is_final for m in members) and time.monotonic() < deadline:
                members[0].poller.poll_soon()
                await asyncio.sleep(min(1.0, self.poll_interval))
        if not all(m.tracked.is_final for m in members):
            scheduler.parse_cancel(await transport.run(argvs[-1], timeout=60))
        for member in members:
            member.tracked.cancelled = True
        members[0].poller.poll_soon()

    async def _read_all_flow_runs(self, **filters: Any) -> list["FlowRun"]:
        """Every run the filters match: the API answers at most a page per request (200
        by default), and a 1,000-task sweep is more than a page."""
        from prefect.client.schemas.sorting import FlowRunSort

        runs: dict[UUID, "FlowRun"] = {}
        offset = 0
        while True:
            page = await self.client.read_flow_runs(**filters, sort=FlowRunSort.ID_DESC,
                                                    limit=API_PAGE, offset=offset)
            runs.update((r.id, r) for r in page)  # (a run moved between pages is read once)
            if len(page) < API_PAGE:
                return list(runs.values())
            offset += API_PAGE

    async def recover_runs(self) -> list[UUID]:
        """Find this pool's runs whose jobs nobody follows (their worker died or was
        restarted) and follow them to the end. Never submits anything."""
        assert self._work_pool is not None
        runs = await self._read_all_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[self._work_pool.name])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=list(RECOVERABLE_STATES))
                )
            ),
        )
        online = await self._online_worker_names()
        adopted: list[UUID] = []
        for run in runs:
            if run.id in self._followed or run.id in self._submitting_flow_run_ids:
                continue
            owner = (run.labels or {}).get("prefect.worker.name")
            if owner and owner != self.name and owner in online:
                continue  # a live worker follows it
            # The list is a snapshot: a run we followed may have ended and been let go
            # since (a Cancelling one would get a second removal of its own). Its state
            # now, then our own books with no await between, tell whether it is orphaned.
            try:
                run = await self.client.read_flow_run(run.id)
            except Exception as exc:
                self._logger.warning("Cannot recover flow run %s: %s", run.id, exc)
                continue
            if run.state is None or run.state.type not in RECOVERABLE_STATES:
                continue
            if run.id in self._followed or run.id in self._submitting_flow_run_ids:
                continue
            if not run.infrastructure_pid:
                await self._adopt_unrecorded_submission(run)
                continue
            try:
                scheduler_name, cluster, job_id = Scheduler.parse_infrastructure_pid(run.infrastructure_pid)
            except ValueError:
                continue
            # Before its configuration is read (API calls), the worker type's own scheduler
            # tells which pids are its jobs: every dialect of a type carries its name.
            if scheduler_name != self.scheduler.name:
                continue
            try:
                configuration = await self.job_configuration.resolve_for_flow_run(
                    run, client=self.client, work_pool=self._work_pool,
                    worker_name=self.name, worker_id=self.backend_id,
                )
            except Exception as exc:
                self._logger.warning("Cannot recover flow run %s: %s", run.id, exc)
                continue
            if configuration.cluster != cluster:
                continue
            logger = self.get_flow_run_logger(run)
            logger.info(f"Worker {self.name!r} resumes following {scheduler_name} job {job_id}")
            followed = await self._start_following(run.id, job_id, configuration)
            followed.extra["resumed"] = True  # its output may be partly in the logs already
            if run.state and run.state.type == StateType.CANCELLING:
                followed.cancel_requested = True
                followed.cancel_task = self._spawn(
                    self.cancel_job(followed.poller.scheduler, job_id, followed.transport, 30, JobState.UNKNOWN,
                                    followed)
                )
            self._spawn(self._follow(run, followed, logger))
            adopted.append(run.id)
        return adopted

    async def _adopt_unrecorded_submission(self, run: "FlowRun") -> None:
        """A worker that died between the submit and recording the job id leaves a
        Submitting run without a pid; its job (if any) is found by its unique name, or
        its array task through its run directory. A run with no job is Crashed: left
        Submitting, nothing would ever end it. One that died before Submitting leaves a
        Pending run that certainly has no job: it is scheduled again."""
        if run.state is None or run.state.type != StateType.PENDING:
            return
        if run.state.name == "Pending":
            await self._reschedule_abandoned(run)
            return
        try:
            run = await self.client.read_flow_run(run.id)  # the listing may predate its pid
            if run.infrastructure_pid or run.state is None or run.state.name != "Submitting":
                return
            configuration = await self.job_configuration.resolve_for_flow_run(
                run, client=self.client, work_pool=self._work_pool,
                worker_name=self.name, worker_id=self.backend_id,
            )
            job_id = await self._find_unrecorded_job(configuration, run)
        except Exception as exc:
            self._logger.warning("Cannot check flow run %s for an unrecorded job: %s", run.id, exc)
            return
        scheduler = self.scheduler_for(configuration)
        logger = self.get_flow_run_logger(run)
        if job_id is None:
            message = (f"The worker stopped while submitting this run, and {scheduler.name} knows no job of "
                       f"it: it was never submitted, or its job ended long ago. Nothing was resubmitted.")
            await self.client.set_flow_run_state(run.id, Crashed(message=message))
            logger.error(message)
            return
        pid = scheduler.infrastructure_pid(configuration.cluster, job_id)
        await self.client.update_flow_run(run.id, infrastructure_pid=pid)
        logger.info(f"Found {scheduler.name} job {job_id} submitted by a worker that died; following it")
        followed = await self._start_following(run.id, job_id, configuration)
        self._spawn(self._follow(run, followed, logger))

    async def _reschedule_abandoned(self, run: "FlowRun") -> None:
        """A run Pending for longer than any live worker takes to reach Submitting:
        Prefect's worker submits nothing before Submitting, so it goes back to the queue."""
        since = run.state.timestamp
        if since is None or (datetime.datetime.now(datetime.timezone.utc) - since).total_seconds() < self.pending_grace:
            return
        message = "Its worker stopped before submitting it; scheduled again (nothing had been submitted)."
        result = await self.client.set_flow_run_state(run.id, Scheduled(message=message))
        if getattr(getattr(result, "status", None), "value", "ACCEPT") == "ACCEPT":
            self.get_flow_run_logger(run).warning(message)

    async def _find_unrecorded_job(self, configuration: C, run: "FlowRun") -> Optional[str]:
        """The job of a run submitted without its id recorded: its heterogeneous job's
        component or its array task, if its run directory names one, else the job by the
        run's unique name."""
        transport = await self.transport_for(configuration)
        scheduler = self.scheduler_for(configuration)
        run_dir = await self.run_directory(configuration, run.id)
        component = await _read_place_file(transport, run_dir, HET_COMPONENT_FILE)
        if component:
            het_id = await self._find_by_name(component[0], transport, scheduler)
            return scheduler.het_component_id(scheduler.het_job_of(het_id), component[1]) if het_id else None
        task = await _read_place_file(transport, run_dir, ARRAY_TASK_FILE)
        if task:
            array_id = await self._find_by_name(task[0], transport, scheduler, array=True)
            return scheduler.array_task_id(array_id, task[1]) if array_id else None
        return await self._find_by_name(self.job_name(configuration, run), transport, scheduler)

    async def _online_worker_names(self) -> set[str]:
        assert self._work_pool is not None
        workers = await self.client.read_workers_for_work_pool(self._work_pool.name)
        return {w.name for w in workers if str(getattr(w, "status", "")).upper().endswith("ONLINE")}
