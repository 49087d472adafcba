"""Restart recovery: a batch worker takes over the runs of its pool whose jobs nobody
follows (their worker died or was restarted), finds the job of a run its worker
submitted without recording the id, and schedules again a run abandoned before any
submit. It never submits anything.

A mixin of BatchWorker (it starts following through the worker's own machinery)."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Optional
from uuid import UUID

from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType

from prefect_xm.workers.hetjob import HET_COMPONENT_FILE
from prefect_xm.workers.run_directory import ARRAY_TASK_FILE, read_place_file
from prefect_xm.workers.run_end import abandoned_before_submit, never_submitted
from prefect_xm.workers.scheduler import JobState, Scheduler

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from prefect_xm.workers.configuration import BatchJobConfiguration

#: states of a run whose job may still be live, that a worker may have to take over
RECOVERABLE_STATES = frozenset({StateType.PENDING, StateType.RUNNING, StateType.CANCELLING})


class BatchRecovery:
    """Taking over orphaned runs (see the module docstring)."""

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
            followed.resumed = True
            if run.state and run.state.type == StateType.CANCELLING:
                followed.cancel_requested = True
                followed.cancel_task = self.spawn(
                    self.cancel_job(followed.poller.scheduler, job_id, followed.transport, 30, JobState.UNKNOWN,
                                    followed)
                )
            self.spawn(self._follow(run, followed, logger))
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
            end = never_submitted(scheduler.name)
            await self.client.set_flow_run_state(run.id, end.state(), force=end.force)
            logger.log(end.level, end.message)
            return
        pid = scheduler.infrastructure_pid(configuration.cluster, job_id)
        await self.client.update_flow_run(run.id, infrastructure_pid=pid)
        logger.info(f"Found {scheduler.name} job {job_id} submitted by a worker that died; following it")
        followed = await self._start_following(run.id, job_id, configuration)
        self.spawn(self._follow(run, followed, logger))

    async def _reschedule_abandoned(self, run: "FlowRun") -> None:
        """A run Pending for longer than any live worker takes to reach Submitting:
        Prefect's worker submits nothing before Submitting, so it goes back to the queue."""
        since = run.state.timestamp
        if since is None or (datetime.datetime.now(datetime.timezone.utc) - since).total_seconds() < self.pending_grace:
            return
        end = abandoned_before_submit()
        result = await self.client.set_flow_run_state(run.id, end.state(), force=end.force)
        if getattr(getattr(result, "status", None), "value", "ACCEPT") == "ACCEPT":
            self.get_flow_run_logger(run).log(end.level, end.message)

    async def _find_unrecorded_job(self, configuration: "BatchJobConfiguration", run: "FlowRun") -> Optional[str]:
        """The job of a run submitted without its id recorded: its heterogeneous job's
        component or its array task, if its run directory names one, else the job by the
        run's unique name."""
        transport = await self.transport_for(configuration)
        scheduler = self.scheduler_for(configuration)
        run_dir = await self.run_directory(configuration, run.id)
        component = await read_place_file(transport, run_dir, HET_COMPONENT_FILE)
        if component:
            het_id = await self._find_by_name(component[0], transport, scheduler)
            return scheduler.het_component_id(scheduler.het_job_of(het_id), component[1]) if het_id else None
        task = await read_place_file(transport, run_dir, ARRAY_TASK_FILE)
        if task:
            array_id = await self._find_by_name(task[0], transport, scheduler, array=True)
            return scheduler.array_task_id(array_id, task[1]) if array_id else None
        return await self._find_by_name(self.job_name(configuration, run), transport, scheduler)

    async def _online_worker_names(self) -> set[str]:
        assert self._work_pool is not None
        workers = await self.client.read_workers_for_work_pool(self._work_pool.name)
        return {w.name for w in workers if str(getattr(w, "status", "")).upper().endswith("ONLINE")}
