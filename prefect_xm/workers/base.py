"""BatchWorker: the scheduler-agnostic Prefect worker for batch schedulers.

One flow run = one batch job. run() is the whole data flow of a run: its job is
submitted (submission.py: the batch script, then one job, an array's task or a gang's
heterogeneous job), then followed to the run's end (following.py). This module is the
Prefect shell around it: the worker's lifecycle, one transport and poller per cluster,
and the supervisor. It never branches on the scheduler's name: everything
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
import os
import shlex
import time
from typing import TYPE_CHECKING, Any, ClassVar, Optional, TypeVar
from uuid import UUID

from prefect.workers.base import BaseWorker

from prefect_xm.gang import gang_place
from prefect_xm.workers.arrays import ArraySubmitter, ArrayTask
from prefect_xm.workers.bulk_calls import BulkPrefectCalls
from prefect_xm.workers.cancellation import BatchCancellation
from prefect_xm.workers.configuration import DIRECT, BatchJobConfiguration, BatchVariables, variables_of
from prefect_xm.workers.followed import FollowedRun
from prefect_xm.workers.following import BatchFollowing, BatchWorkerResult
from prefect_xm.workers.direct import direct_program
from prefect_xm.workers.hetjob import HetJobGatherer, HetMember
from prefect_xm.workers.poller import JobPoller
from prefect_xm.workers.recovery import BatchRecovery
from prefect_xm.workers.scheduler import Scheduler
from prefect_xm.workers.submission import BatchSubmission, ScriptTemplateError
from prefect_xm.blocks.ssh import SSHConnection
from prefect_xm.workers.transport import LocalTransport, SSHTransport, Transport

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

# BatchWorkerResult and ScriptTemplateError live beside the code that makes them;
# tests and users import them from here.
__all__ = ["BatchWorker", "BatchWorkerResult", "ScriptTemplateError"]


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"{name}: {os.environ[name]!r} is not a number of seconds") from None


C = TypeVar("C", bound=BatchJobConfiguration)
V = TypeVar("V", bound=BatchVariables)


# abc.ABC among the direct bases keeps Prefect from registering this as a worker type.
class BatchWorker(BatchSubmission, BatchFollowing, BatchCancellation, BatchRecovery, BulkPrefectCalls,
                  BaseWorker[C, V, BatchWorkerResult], abc.ABC):
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

    # -- where a run's files go ------------------------------------------------------------
    async def run_directory(self, configuration: BatchJobConfiguration, flow_run_id: UUID) -> str:
        base = await (await self.transport_for(configuration)).expand_path(configuration.run_dir)
        return f"{base.rstrip('/')}/{flow_run_id}"

    # -- a run: submit its job, then follow it -----------------------------------------------
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
