"""Following: from a submitted job to its run's final state. Each run waits on its
cluster's shared JobPoller, says InfrastructurePending while queued (and Running, for a
direct job), ships a direct job's output to the run's logs, and at the end, or at a
requeue, sets the one state run_end.py decides, with the job's stderr tail.

A mixin of BatchWorker (it uses the worker's pollers, transports and Prefect calls)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Optional
from uuid import UUID

from prefect.client.schemas.objects import StateType
from prefect.states import InfrastructurePending, Running
from prefect.workers.base import BaseWorkerResult

from prefect_xm.workers.configuration import DIRECT
from prefect_xm.workers.direct import JOB_OUTPUT_LOGGER, STDERR_PREFIX, DirectOutput
from prefect_xm.workers.followed import FollowedRun
from prefect_xm.workers.hetjob import GANG_STOP_FILE, MEMBER_EXIT_FILE, member_end
from prefect_xm.workers.run_directory import ATTEMPT_FILE
from prefect_xm.workers.run_end import RunEnd, job_end, member_run_end, requeue_end
from prefect_xm.workers.scheduler import JobState, JobStatus

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from prefect_xm.workers.configuration import BatchJobConfiguration

STDERR_TAIL_BYTES = 3000
#: a queued job's revised start estimate is logged at most this often: a backfill
#: scheduler revises it every cycle, and a sweep's waiting tasks would each log a line
#: per poll
ESTIMATE_LOG_SECONDS = 300.0


def queued_line_due(status: JobStatus, last: Optional[JobStatus], last_at: float, now: float) -> bool:
    """Whether a queued job's status is logged, the last one logged being `last` (at
    `last_at`): a new state or reason, or a first estimate, at once; a revised estimate
    once ESTIMATE_LOG_SECONDS have passed; the same line never twice."""
    if last is None:
        return True
    if status.describe() == last.describe():
        return False
    if (status.native_state, status.reason, bool(status.expected_start)) != (
            last.native_state, last.reason, bool(last.expected_start)):
        return True
    return now - last_at >= ESTIMATE_LOG_SECONDS


# Here rather than in base.py: _follow hands it back, and base.py imports this module.
class BatchWorkerResult(BaseWorkerResult):
    """The job's identifier (infrastructure pid) and 0, or the code of a failed submit."""


class BatchFollowing:
    """Following jobs to the ends of their runs (see the module docstring)."""

    # -- states, sent for a batch at once where they match --------------------------------
    def state_label(self, followed: FollowedRun) -> str:
        """What a run's state messages call its job: an array's tasks all say "<scheduler>
        array <id> task", so the states they take together match and go in one request
        (the task's own id is its infrastructure pid, and its log lines name it)."""
        scheduler = followed.poller.scheduler
        array = scheduler.array_of(followed.job_id)
        return f"{scheduler.name} array {array} task" if array else f"{scheduler.name} job {followed.job_id}"

    # -- follow ---------------------------------------------------------------------------
    async def _start_following(
        self, flow_run_id: UUID, job_id: str, configuration: "BatchJobConfiguration",
    ) -> FollowedRun:
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
        logged: Optional[JobStatus] = None  # the last queued status logged, and when
        logged_at = 0.0
        direct = followed.configuration.execution == DIRECT
        output = None
        if direct:
            output = DirectOutput(self, followed, self.job_output_logger(flow_run))
            if followed.resumed:
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
                    if queued_line_due(status, logged, logged_at, time.monotonic()):
                        logger.info(message)
                        logged, logged_at = status, time.monotonic()
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
            followed.gave_up = end.message
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
        if followed.gave_up is not None:
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
        state = end.state(tail, followed.stderr_path)
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
        followed.stderr_path = path
        try:
            text = await followed.transport.read_tail(path, STDERR_TAIL_BYTES)
        except Exception:
            return ""
        if not text:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    # -- a heterogeneous job's members ----------------------------------------------------
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
