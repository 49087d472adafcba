"""BatchWorker: the scheduler-agnostic Prefect worker for batch schedulers.

One flow run = one batch job. The worker renders the batch script (jinja2, sandboxed,
StrictUndefined), submits it through a Transport, and follows the job with the shared
JobPoller of its cluster. It never branches on the scheduler's name: everything
scheduler-specific is in a Scheduler (slurm.py, ...).

Who reports the run's states: the flow engine inside the job reports Running and its
final state; the worker reports what only the scheduler knows: InfrastructurePending
(with the scheduler's reason) while queued, and the run's end where the engine could not
say it (run_end.py decides, for every mode). Beside this module: the job variables
(configuration.py), direct execution (direct.py), what a run directory holds
(run_directory.py), removing jobs (cancellation.py), taking over orphaned runs
(recovery.py), and Prefect calls in bulk (bulk_calls.py).
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import shlex
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, TypeVar
from uuid import UUID

import jinja2
import jinja2.sandbox
from prefect.client.schemas.objects import StateType
from prefect.states import InfrastructurePending, Running
from prefect.workers.base import BaseWorker, BaseWorkerResult

from prefect_xm.gang import gang_place
from prefect_xm.workers.arrays import (
    ARGV_FILE,
    GROUPING_DIR,
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
from prefect_xm.workers.bulk_calls import BulkPrefectCalls
from prefect_xm.workers.cancellation import BatchCancellation
from prefect_xm.workers.configuration import (
    DIRECT,
    BatchJobConfiguration,
    BatchVariables,
    job_name_prefix,
    variables_of,
)
from prefect_xm.workers.followed import FollowedRun
from prefect_xm.workers.direct import JOB_OUTPUT_LOGGER, STDERR_PREFIX, DirectOutput, direct_program
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
from prefect_xm.workers.poller import JobPoller
from prefect_xm.workers.recovery import BatchRecovery
from prefect_xm.workers.run_directory import ARRAY_TASK_FILE, ATTEMPT_FILE, ENV_FILE, environment_file
from prefect_xm.workers.run_end import RunEnd, job_end, member_run_end, requeue_end
from prefect_xm.workers.scheduler import (
    JobState,
    JobStatus,
    Scheduler,
    SubmissionError,
    SubmitRequest,
    TransientSchedulerError,
)
from prefect_xm.blocks.ssh import SSHConnection
from prefect_xm.workers.transport import LocalTransport, SSHTransport, Transport

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

TEMPLATES = Path(__file__).parent / "templates"
STDERR_TAIL_BYTES = 3000
#: files written at once when an array is prepared (SFTP requests in flight, over SSH)
FILE_WRITES_AT_ONCE = 16


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"{name}: {os.environ[name]!r} is not a number of seconds") from None


class ScriptTemplateError(ValueError):
    """The batch-script template could not be rendered (names the variable)."""


class BatchWorkerResult(BaseWorkerResult):
    """The job's identifier (infrastructure pid) and 0, or the code of a failed submit."""


C = TypeVar("C", bound=BatchJobConfiguration)
V = TypeVar("V", bound=BatchVariables)


# abc.ABC among the direct bases keeps Prefect from registering this as a worker type.
class BatchWorker(BatchCancellation, BatchRecovery, BulkPrefectCalls, BaseWorker[C, V, BatchWorkerResult], abc.ABC):
    """Prefect worker for a batch scheduler; subclasses set `type` and `scheduler`."""

    scheduler: ClassVar[Scheduler]
    _documentation_url = "https://github.com/prefect-xm/prefect-xm"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the pool's variables, from the one declaration of each (configuration.py)
        if "job_configuration" in cls.__dict__:
            cls.job_configuration_variables = variables_of(cls.job_configuration)

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

    def spawn(self, coro) -> asyncio.Task:
        """A background task of the worker's (kept until it ends; cancelled at teardown)."""
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
            undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
            # (a template may include the default scripts' run section, run.sh.j2)
            loader=jinja2.FileSystemLoader(TEMPLATES),
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
                and configuration.gangs_as_one_job())

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

    async def _member_end(self, followed: FollowedRun, job: str) -> Optional[RunEnd]:
        """A heterogeneous job's member ends as its own exit code says (the scheduler has
        one status for the whole job); None for any other job, or while it is not known."""
        scheduler = followed.poller.scheduler
        if not scheduler.het_separator or not scheduler.is_het_component(followed.job_id):
            return None
        run_dir = await self.run_directory(followed.configuration, followed.flow_run_id)
        end = member_end(await followed.transport.read_tail(f"{run_dir}/{MEMBER_EXIT_FILE}", 100),
                         await followed.transport.read_tail(f"{run_dir}/{GANG_STOP_FILE}", 200))
        stopper = None
        if end.stopped_by is not None:
            run = await self._wait_for_final(end.stopped_by, timeout=max(30.0, 3 * self.poll_interval))
            stopper = run.name if run is not None else None
        return member_run_end(job, end, stopper)

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
        pump = self.spawn(output.follow(self.poll_interval)) if output else None
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
        admin's requeue): the run takes requeue_end's state, and the same job is followed
        on; past max_requeues the job is removed."""
        job = f"{followed.poller.scheduler.name} job {followed.job_id}"
        # how many times its script started (each start counts itself in the run directory,
        # so a worker that took over the job knows the earlier requeues too)
        started = await self._attempts_started(followed)
        requeues = max(followed.tracked.requeues, started - (status.state == JobState.RUNNING))
        current = (await self._read_run(flow_run.id)).state
        end = requeue_end(job, status, current, cancel_requested=followed.cancel_requested,
                          requeues=requeues, limit=followed.configuration.max_requeues)
        if end is None:
            return
        await self._end_run(flow_run, followed, end, logger)
        if end.gives_up:
            followed.extra["gave_up"] = end.message
            followed.cancel_requested = True
            followed.cancel_task = self.spawn(
                self.cancel_job(followed.poller.scheduler, followed.job_id, followed.transport, 30, status.state,
                                followed))
            return
        followed.marked_running = False  # its next attempt is Running again when it starts
        if output is not None:
            await output.restart()

    async def _attempts_started(self, followed: FollowedRun) -> int:
        path = f"{await self.run_directory(followed.configuration, followed.flow_run_id)}/{ATTEMPT_FILE}"
        try:
            return int((await followed.transport.read_tail(path, 64) or "0").strip() or 0)
        except Exception:  # unreadable: the requeues this worker saw are the count
            return 0

    async def _finish(self, flow_run: "FlowRun", followed: FollowedRun, status: JobStatus, logger) -> None:
        """The job has ended: the run takes the state run_end decides."""
        if "gave_up" in followed.extra:
            return  # Crashed already, past its requeues
        current = (await self._read_run(flow_run.id)).state
        if current is None:
            return
        job = f"{followed.poller.scheduler.name} job {followed.job_id}"
        direct = followed.configuration.execution == DIRECT
        end = job_end(job, status, current, direct=direct, cancel_requested=followed.cancel_requested,
                      ended_by_program=followed.poller.scheduler.ended_by_program(status),
                      label=self.state_label(followed))
        if end is not None and direct:
            end = await self._member_end(followed, job) or end
        if end is not None:
            await self._end_run(flow_run, followed, end, logger, current)

    async def _end_run(self, flow_run: "FlowRun", followed: FollowedRun, end: RunEnd, logger, current=None) -> None:
        """Sets the state run_end decided, with the job's stderr where it belongs, and
        says so in the worker's log."""
        if end.running_first:
            await self._mark_running(flow_run, followed, f"{self.state_label(followed)} started", current=current)
        tail = await self._stderr_tail(followed) if end.with_stderr else ""
        state = end.state(tail, followed.extra.get("stderr_path"))
        await self._set_state(flow_run.id, state, force=end.force)
        logger.log(end.level, end.log or state.message)

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
