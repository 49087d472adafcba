"""One poller per (worker, cluster): one batched status query per interval for all
tracked jobs, whatever their number.

Rules (see DESIGN.md, "Tracking is batched"):
- absence from the live queue means "look up the terminal record", never "completed";
- a failing query means "unknown, keep the last state"; after a grace period the
  poller says so loudly, and keeps trying;
- a job that left the queue with no terminal record is declared lost only after the
  grace period (accounting may lag);
- states only move forward, but for a requeue (`Scheduler.requeued`): the job runs
  again, and its tracker counts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from prefect_xm.workers.scheduler import (
    JobState,
    JobStatus,
    Scheduler,
    SchedulerError,
)
from prefect_xm.workers.transport import Transport

logger = logging.getLogger("prefect_xm.poller")


@dataclass
class TrackedJob:
    job_id: str
    status: JobStatus
    updates: "asyncio.Queue[JobStatus]" = field(default_factory=asyncio.Queue)
    missing_since: Optional[float] = None
    has_terminal_record: bool = False
    #: the worker removed it (scancel/qdel... accepted or "no such job")
    cancelled: bool = False
    #: when its terminal record was last asked for (monotonic; 0: never)
    last_lookup: float = 0.0
    #: how many times it was seen going back to the queue to run again
    requeues: int = 0

    @property
    def is_final(self) -> bool:
        return self.status.state.is_final


class JobPoller:
    def __init__(
        self,
        scheduler: Scheduler,
        transport: Transport,
        *,
        interval: float = 10.0,
        grace_period: float = 300.0,
        command_timeout: float = 60.0,
    ):
        self.scheduler = scheduler
        self.transport = transport
        self.interval = interval
        self.grace_period = grace_period
        self.command_timeout = command_timeout
        self.jobs: dict[str, TrackedJob] = {}
        self.failing_since: Optional[float] = None
        self._wakeup = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    # -- API for the worker -------------------------------------------------------
    def track(self, job_id: str, initial: JobState = JobState.PENDING) -> TrackedJob:
        job = self.jobs.get(job_id)
        if job is None:
            job = TrackedJob(job_id, JobStatus(job_id, initial))
            self.jobs[job_id] = job
            self._ensure_running()
        return job

    def untrack(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def poll_soon(self) -> None:
        """Ask for a poll as soon as the interval allows (e.g. after a submit or a
        cancel): at once when the poller has been idle, never twice in one interval."""
        self._wakeup.set()

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    # -- the loop -----------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="xm-poller")

    async def _run(self) -> None:
        last_poll: Optional[float] = None
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            if last_poll is not None:
                # one status query per interval, however many submits and cancels ask
                # for one sooner: 50 submissions must not cost 50 queries
                await asyncio.sleep(max(0.0, last_poll + self.interval - time.monotonic()))
            self._wakeup.clear()
            if not any(not j.is_final for j in self.jobs.values()):
                continue
            last_poll = time.monotonic()
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad poll kill tracking
                logger.exception("Polling %s jobs failed", self.scheduler.name)

    async def poll_once(self) -> None:
        live = [j for j in self.jobs.values() if not j.is_final]
        if not live:
            return
        ids = [j.job_id for j in live]
        try:
            result = await self.transport.run(
                self.scheduler.status_argv(ids), timeout=self.command_timeout
            )
            statuses = self.scheduler.parse_status(result)
        except SchedulerError as exc:
            now = time.monotonic()
            if self.failing_since is None:
                self.failing_since = now
                logger.warning("%s status query failed, keeping last states: %s", self.scheduler.name, exc)
            elif now - self.failing_since > self.grace_period:
                logger.error(
                    "%s status query failing for %.0f s (still retrying): %s",
                    self.scheduler.name, now - self.failing_since, exc,
                )
            return
        if self.failing_since is not None:
            logger.info("%s status query answers again", self.scheduler.name)
        self.failing_since = None

        need_record: list[TrackedJob] = []
        for job in live:
            status = self.scheduler.lookup(job.job_id, statuses)
            if status is None:
                if job.missing_since is None:
                    job.missing_since = time.monotonic()
                need_record.append(job)
            else:
                job.missing_since = None
                if status.state.is_final and status.exit_code is None:
                    need_record.append(job)  # the live queue lacks the exit code: ask the record
                self._update(job, status, final_ok=status.exit_code is not None)
        if need_record:
            await self._resolve_terminal(need_record, statuses)

    async def _resolve_terminal(self, jobs: list[TrackedJob], live_statuses: dict[str, JobStatus]) -> None:
        records: dict[str, JobStatus] = {}
        wanted = {j.job_id for j in jobs}
        # Schedulers with per-job lookups bound them per poll (SGE's qacct, PBS's
        # tracejob): the least recently asked go first, so none waits forever.
        by_age = [j.job_id for j in sorted(jobs, key=lambda j: (j.last_lookup, j.job_id))]
        argvs = self.scheduler.terminal_argvs_for(by_age, live_statuses)
        for argv in argvs:
            args = {arg for part in argv for arg in part.split(",")}
            named = {j for j in wanted if j in args or self.scheduler.array_of(j) in args}
            if len({self.scheduler.array_of(j) or j for j in named}) == 1:
                # a one-job (or one-array) lookup; batched ones leave nobody out
                for job_id in named:
                    self.jobs[job_id].last_lookup = time.monotonic()
        for argv in argvs:
            try:
                result = await self.transport.run(argv, timeout=self.command_timeout)
                found = self.scheduler.parse_terminal(result)
            except SchedulerError as exc:
                logger.warning("terminal lookup %s failed: %s", argv[0], exc)
                continue
            for job_id in list(wanted):
                status = self.scheduler.lookup(job_id, found)
                tracked = self.jobs.get(job_id)
                if status is not None and (status.state.is_final or (
                        tracked is not None and self.scheduler.requeued(tracked.status, status))):
                    # (a job the queue showed ending, preempted, that its record shows
                    # queued again: requeued, not ended)
                    records[job_id] = status
                    wanted.discard(job_id)
            if not wanted:
                break
        now = time.monotonic()
        for job in jobs:
            record = records.get(job.job_id)
            live = self.scheduler.lookup(job.job_id, live_statuses)
            if record is not None:
                self._update(job, record, final_ok=True)
            elif live is not None and live.state.is_final:
                self._update(job, live, final_ok=True)  # final per the queue, no details
            elif live is None and job.cancelled:
                # removed by the worker and gone from the queue: cancelled, whether or not
                # a record follows (SGE writes none for a job deleted while pending)
                self._update(
                    job,
                    JobStatus(job.job_id, JobState.CANCELLED, "CANCELLED", "removed by the worker; no terminal record"),
                    final_ok=True,
                )
            elif job.missing_since is not None and now - job.missing_since > self.grace_period:
                self._update(
                    job,
                    JobStatus(
                        job.job_id,
                        JobState.FAILED,
                        "LOST",
                        f"left the queue {now - job.missing_since:.0f} s ago and no terminal record was found",
                    ),
                    final_ok=True,
                )

    def _update(self, job: TrackedJob, status: JobStatus, *, final_ok: bool) -> None:
        if status.state.is_final and not final_ok:
            return  # announced once its terminal record is looked up (same poll)
        old = job.status
        requeued = self.scheduler.requeued(old, status)
        if status.state < old.state and not requeued:
            return  # states only move forward
        if (status.state, status.reason, status.native_state, status.expected_start) == (
                old.state, old.reason, old.native_state, old.expected_start):
            return
        if requeued:
            job.requeues += 1
        job.status = status
        job.updates.put_nowait(status)
