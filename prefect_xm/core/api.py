"""The public Experiment API: experiments, as ``xm`` and ``xm_local`` export them
(create_experiment, get_experiment, list_experiments); the work-unit handles that
`add` returns are in work_units.py.

An experiment is driven from the process running its launch script: adding a work unit
checks its jobs, then creates its runs in the background and hands its gang to
orchestration; on exit the experiment waits for its work units and ends its run. The
runs, their tags and the reads of them are the store's (prefect_xm.core.store).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
import os
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence, Union
from uuid import UUID

from prefect.client.schemas.objects import StateType

from prefect_xm.core import orchestration, store, summary
from prefect_xm.core.args import jsonable
from prefect_xm.core.deployments import check_pool_jobs, ensure_in_launcher_deployment
from prefect_xm.core.job_blocks import (
    Executable,
    Job,
    JobGroup,
    Packageable,
    apply_args,
    flatten_jobs,
    package_spec,
    start_deadline_of,
)
from prefect_xm.core.metadata import MetadataContext, metadata_context
from prefect_xm.core.orchestration import POLL_SECONDS, Member
from prefect_xm.core.roles import AuxiliaryUnitJob, AuxiliaryUnitRole, ExperimentUnitRole, WorkUnitRole
from prefect_xm.core.runtime import Runtime, dual, in_event_loop, install_sigterm_handler
from prefect_xm.core.status import ExperimentUnitStatus
from prefect_xm.core.work_units import AddedWorkUnits, AuxiliaryUnit, UnitNames, WorkUnit

log = logging.getLogger("prefect_xm")

#: Experiments created or opened in this process (the CLI prints their results).
OPENED: list = []
#: work units whose runs are created at once in the background (experiment.add returns at
#: once): a bulk request's worth, so each step of their creation (links, unit runs, job
#: runs) goes to the server as one request for all of them
CREATION_CONCURRENCY = int(os.environ.get("PREFECT_XM_CREATION_CONCURRENCY", "100"))

class PackagedLater:
    """What package_async returns: awaitable once package() has run (awaiting it before
    waits for that call, as in XManager); `result()` for sync code."""

    def __init__(self, future: "concurrent.futures.Future[Executable]") -> None:
        self._future = future

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def result(self, timeout: Optional[float] = None) -> Executable:
        if not self._future.done():
            raise RuntimeError("package_async: call experiment.package() first; it packages what was queued")
        return self._future.result(timeout)


# ------------------------------------------------------------------------ experiment


class Experiment:
    """An experiment: a Prefect flow run whose work units are subflow runs.

    Use it as a context manager (``with``/``async with``): on exit it waits for every
    work unit launched here and ends the experiment run Completed (or Failed/Cancelled).
    """

    def __init__(self, experiment_id: store.ExperimentId, experiment_title: str, flow_run_id: UUID) -> None:
        self.experiment_id = experiment_id
        self.experiment_title = experiment_title
        self.flow_run_id = flow_run_id
        self._work_units: dict[int, WorkUnit] = {}
        self._by_identity: dict[str, WorkUnit] = {}
        self._next_id = 1
        self._auxiliary_units: list[AuxiliaryUnit] = []
        self._package_queue: list[tuple[Packageable, concurrent.futures.Future]] = []
        self._loaded = False
        self._summary = summary.SummaryArtifact(self)
        self._stopped = False
        self._creating: Optional[asyncio.Semaphore] = None
        self._reads = orchestration.SharedReads()
        #: what the work units write together (made with the runtime's client)
        self._writes: Optional[orchestration.Writes] = None
        self._heartbeat: Optional[asyncio.Task] = None

    def __repr__(self) -> str:
        return f"Experiment(experiment_id={self.experiment_id!r}, title={self.experiment_title!r})"

    @property
    def context(self) -> MetadataContext:
        """XManager's metadata context: its title is the experiment's title and its flow
        run's name (set_title renames both)."""
        async def set_title(title: str) -> None:
            client = await store.client()
            await client.update_flow_run(self.flow_run_id, name=title)
            self.experiment_title = title
            self._summary.mark_dirty()

        return metadata_context(lambda: self.experiment_title, set_title)

    @property
    def summary_artifact_key(self) -> str:
        return self._summary.key

    # ---------------------------------------------------------------- loading

    async def _load(self) -> None:
        """Reads this experiment's work units from Prefect (for reopened experiments)."""
        if self._loaded:
            return
        client = await store.client()
        runs = await store.experiment_runs(client, self.experiment_id)
        for run in runs:
            wid = store.tag_value(run.tags, store.TAG_WORK_UNIT)
            if wid is None or not wid.isdigit():
                continue
            ident_tag = next((t for t in run.tags if t.startswith(store.TAG_IDENTITY)), None)
            wu = WorkUnit(self, int(wid), dict(run.parameters or {}), run.id,
                          identity=ident_tag[len(store.TAG_IDENTITY):] if ident_tag else None)
            wu.link_task_run_id = run.parent_task_run_id
            wu._loaded_state, wu._job_count = store.state_type(run), store.tag_value(run.tags, store.TAG_JOB_COUNT)
            if wu.work_unit_id not in self._work_units:
                self._work_units[wu.work_unit_id] = wu
                if ident_tag:
                    self._by_identity[ident_tag] = wu
        self._next_id = max(self._work_units, default=0) + 1
        self._loaded = True

    @property
    def work_units(self) -> dict[int, WorkUnit]:
        """{work_unit_id: WorkUnit}, in order of creation (ids start at 1)."""
        if not self._loaded and not in_event_loop():
            Runtime.get().run(self._load())
        return dict(sorted(self._work_units.items()))

    @property
    def work_unit_count(self) -> int:
        """How many work units the experiment has (XManager's name)."""
        return len(self.work_units)

    # ---------------------------------------------------------------- package / add

    def package(self, packageables: Sequence[Packageable] = ()) -> list[Executable]:
        """Turns Packageables into Executables (no build step: paths are resolved), and
        those queued with package_async, as XManager's package() does."""
        if isinstance(packageables, Packageable):
            raise ValueError("experiment.package takes a list of Packageables")
        queued, self._package_queue = self._package_queue, []
        for packageable, future in queued:
            try:
                future.set_result(package_spec(packageable))
            except Exception as e:  # raised where it is awaited, as XManager's
                future.set_exception(e)
        return [package_spec(p) for p in packageables]

    def package_async(self, packageable: Packageable) -> "PackagedLater":
        """Queues `packageable` for the next package() call; returns an awaitable of its
        Executable (XManager's way of packaging what a script decides on piecemeal)."""
        if not isinstance(packageable, Packageable):
            raise ValueError(f"experiment.package_async takes one xm.Packageable, got {packageable!r}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._package_queue.append((packageable, future))
        return PackagedLater(future)

    def add(self, job: Any, args: Optional[Mapping[str, Any]] = None, *, role: Optional[ExperimentUnitRole] = None,
            identity: Optional[str] = None) -> WorkUnit:
        """Adds a work unit running `job` (a Job, a JobGroup or a job generator); with
        `role=xm.AuxiliaryUnitRole(...)`, or `job` an `xm.AuxiliaryUnitJob`, an auxiliary
        unit (see AuxiliaryUnit).

        args follow XManager: for a Job ``{'args': {...}, 'env_vars': {...}}``, for a
        JobGroup ``{member: {'args': ...}}``, for a generator its keyword arguments.
        With `identity`, a work unit of the same identity that already exists in this
        experiment is returned instead of launching a new one. Returns the WorkUnit
        (awaitable, so ``await experiment.add(...)`` works in async scripts).
        """
        if isinstance(args, (list, tuple)):
            return self._add_each(job, args, role, identity)
        job, role, resolved, display_args = self._unit_of(job, args, role)
        if resolved is None:  # a job generator
            if not self._loaded:
                Runtime.get().run(self._load())
            # An async generator only records jobs: it runs to its end on the runtime loop.
            resolved, display_args = Runtime.get().run(self._generate(job, args))
        return Runtime.get().run(self._add(flatten_jobs(resolved), display_args, identity,
                                           start_deadline_of(resolved), role))

    @staticmethod
    def _unit_of(job: Any, args: Optional[Mapping[str, Any]], role: Optional[ExperimentUnitRole]
                 ) -> tuple[Any, ExperimentUnitRole, Optional[Union[Job, JobGroup]], Any]:
        """(job, role, its jobs with the args applied, the args it shows), checked before
        anything is submitted; for a job generator, its jobs are None (it runs later)."""
        if args is not None and not isinstance(args, Mapping):
            raise ValueError(f"experiment.add args must be a dict, got {args!r}")
        job, role = _unit_role(job, role)
        if isinstance(job, (Job, JobGroup)):
            resolved = apply_args(job, args)
            return job, role, resolved, jsonable(args) if args else _default_display_args(resolved)
        if callable(job):
            return job, role, None, None
        raise ValueError(f"experiment.add: expected a Job, a JobGroup or a job generator, got {job!r}")

    def _add_each(self, job: Any, args_list: Sequence[Any], role: Optional[ExperimentUnitRole],
                  identity: Optional[str]) -> list[WorkUnit]:
        """`add(job, args=[{...}, {...}])`: a work unit per args (as xm-slurm has it; on a
        batch pool the worker submits them as one array). Every args is checked before any
        work unit is added."""
        return AddedWorkUnits(self.add(job, args, role=role)
                              for args in self._checked_args_list(job, args_list, identity))

    @staticmethod
    def _checked_args_list(job: Any, args_list: Sequence[Any], identity: Optional[str]) -> Sequence[Any]:
        if identity:
            raise ValueError(f"experiment.add: identity={identity!r} names one work unit; with a list of args, "
                             f"add them one by one, each with its own identity")
        for i, args in enumerate(args_list):
            if not isinstance(args, Mapping):
                raise ValueError(f"experiment.add args[{i}] must be a dict, got {args!r}")
            inner = job.job if isinstance(job, AuxiliaryUnitJob) else job
            if isinstance(inner, (Job, JobGroup)):
                try:
                    apply_args(inner, args)
                except ValueError as e:
                    raise ValueError(f"experiment.add args[{i}]: {e}") from None
        return args_list

    async def add_async(self, job: Any, args: Optional[Mapping[str, Any]] = None, *,
                        role: Optional[ExperimentUnitRole] = None, identity: Optional[str] = None) -> WorkUnit:
        if isinstance(args, (list, tuple)):
            return [await self.add_async(job, a, role=role) for a in self._checked_args_list(job, args, identity)]
        job, role, resolved, display_args = self._unit_of(job, args, role)
        if resolved is None:  # a job generator
            if not self._loaded:
                await Runtime.get().arun(self._load())
            resolved, display_args = await self._generate(job, args)
        return await Runtime.get().arun(self._add(flatten_jobs(resolved), display_args, identity,
                                                  start_deadline_of(resolved), role))

    def _generate(self, generator: Callable[..., Any], args: Optional[Mapping[str, Any]]
                  ) -> Awaitable[tuple[JobGroup, Any]]:
        """Calls a job generator with the work unit it fills in (XManager's `work_unit`),
        here, in the caller's thread; returns an awaitable of the work unit's jobs and the
        args it shows, which runs an async generator's coroutine to its end first."""
        collector = _GeneratorWorkUnit(self, self._next_id)
        result = generator(collector, **dict(args or {}))

        async def generated() -> tuple[JobGroup, Any]:
            if asyncio.iscoroutine(result):
                await result
            return collector.group(), jsonable(dict(args or {}))
        return generated()

    async def _add(self, members: dict[str, Job], display_args: Any, identity: Optional[str],
                   start_deadline: float, role: ExperimentUnitRole) -> WorkUnit:
        from prefect.client.schemas.actions import DeploymentFlowRunCreate
        from prefect.states import Pending, to_state_create

        from prefect_xm.flows.declarations import xm_work_unit

        await self._load()
        ident_tag = store.identity_tag(identity) if identity else None  # '' = none, as in XManager
        if ident_tag is not None:
            if ident_tag in self._by_identity:
                return self._by_identity[ident_tag]
        await check_pool_jobs(members)
        params = {key: job.executor.runner_parameters(job.executable.runner_parameters(job.args, job.env_vars))
                  for key, job in members.items()}

        # Everything above checked the input; what follows talks to the server and runs in
        # the background, so a sweep's adds run at Python speed (as in XManager).
        parameters = display_args if isinstance(display_args, dict) else {"args": display_args}
        if isinstance(role, AuxiliaryUnitRole):
            wid, kind = len(self._auxiliary_units) + 1, store.KIND_AUXILIARY_UNIT
            wu: WorkUnit = AuxiliaryUnit(self, wid, parameters, role, identity=identity)
            self._auxiliary_units.append(wu)
        else:
            wid, kind = self._next_id, store.KIND_WORK_UNIT
            self._next_id += 1
            wu = WorkUnit(self, wid, parameters, None, identity=identity)
            self._work_units[wid] = wu
        tags = [store.TAG_XM, store.TAG_KIND + kind, store.experiment_tag(self.experiment_id), wu.unit_tag,
                store.TAG_JOB_COUNT + str(len(members)), store.TAG_IMPORTANCE + role.importance.value]
        if ident_tag:
            tags.append(ident_tag)
        wu.start_deadline = start_deadline
        wu._created = asyncio.get_running_loop().create_future()
        if ident_tag:
            self._by_identity[ident_tag] = wu
        ms = [Member(key, job, params[key]) for key, job in members.items()]

        async def create() -> None:
            client = await store.client()
            link_id = await self._writes.links.create(self.flow_run_id, f"{kind}-{wid}",
                                                      f"xm.{kind.replace('-', '_')}", str(wid))
            create = DeploymentFlowRunCreate(
                name=f"{self.experiment_title}-{wu.unit_label}", parameters=parameters, tags=tags,
                parent_task_run_id=link_id, state=to_state_create(Pending()),
                # one run per unit however often the request is sent (a retried bulk request)
                idempotency_key=f"prefect-xm:{self.flow_run_id}:{kind}-{wid}")
            deployment_id = await ensure_in_launcher_deployment(client, xm_work_unit)
            try:
                wu.flow_run_id = await self._writes.creations.create(deployment_id, create)
            except BaseException as e:  # (no run will set its link's state: the link says why)
                self._writes.links.finish(link_id, StateType.FAILED, f"the work unit's run was not created: {e}")
                raise
            wu.link_task_run_id = link_id

        wu._task = asyncio.ensure_future(self._run_work_unit(wu, ms, create))
        return wu

    def _creation_slots(self) -> asyncio.Semaphore:
        """How many work units are being created at once (their runs, links and jobs):
        enough to fill the bulk requests, few enough to bound what waits in memory."""
        if self._creating is None:
            self._creating = asyncio.Semaphore(CREATION_CONCURRENCY)
        return self._creating

    def creation_errors(self) -> dict[int, BaseException]:
        return {wid: wu.creation_error for wid, wu in self._work_units.items() if wu.creation_error is not None}

    # ---------------------------------------------------------------- orchestration

    async def _run_work_unit(self, wu: WorkUnit, members: list[Member],
                             create: Optional[Callable[[], Awaitable[None]]] = None) -> None:
        """Creates the work unit's run (`create`), submits its gang, and watches it to its
        end."""
        client = await store.client()
        if self._writes is None:
            self._writes = orchestration.Writes.to(client)
        # The slots bound how many units are being created at once (their links and run,
        # their jobs' links); their job runs wait outside them, gathering into bulk requests.
        async with self._creation_slots():
            if create is not None:
                try:
                    await create()
                except BaseException as e:
                    # No run to put the error on: the work unit and the experiment's end say it.
                    wu.creation_error = e
                    log.error("work unit %s could not be created: %s: %s", wu.work_unit_id, type(e).__name__, e)
                    raise
                finally:
                    if wu._created is not None and not wu._created.done():
                        wu._created.set_result(None)
            if not self._stopped:
                # (a link that failed is tried again by submit_gang, which reports its error)
                await asyncio.gather(*(orchestration.link(self._writes, wu, m) for m in members if m.flow_run_id is None),
                                     return_exceptions=True)
        outcomes = [] if self._stopped else await orchestration.submit_gang(client, wu, members, self._writes)
        await orchestration.watch_gang(client, wu, members, outcomes, reads=self._reads, writes=self._writes,
                                       stopped=lambda: self._stopped)
        self._summary.mark_dirty()  # (rewritten in the background; at once when the experiment ends)

    # ---------------------------------------------------------------- summary

    async def summary_rows(self) -> list[dict[str, Any]]:
        return await summary.summary_rows(await store.client(), self.experiment_id)

    # ---------------------------------------------------------------- wait / stop / close

    async def _wait_all(self) -> dict[int, ExperimentUnitStatus]:
        await self._load()
        tasks = [wu._task for wu in self._work_units.values() if wu._task is not None]
        if tasks:
            gathered = asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
            if summary.PROGRESS_HOOK is None:
                await gathered
            else:
                last = None
                while True:
                    # (a read of every unit: spaced out as the shared reads are, by its pages)
                    pages = -(-len(self._work_units) // store.READ_PAGE)
                    done, _ = await asyncio.wait({gathered}, timeout=POLL_SECONDS * max(1.0, pages / 2))
                    try:
                        counts = await summary.work_unit_counts(await store.client(), self.experiment_id)
                        if counts != last:
                            last = counts
                            summary.PROGRESS_HOOK(self, counts)
                    except Exception as e:  # progress is cosmetic
                        log.debug("progress: %s", e)
                    if done:
                        break
        failed = self.creation_errors()
        if failed:
            raise RuntimeError(f"{len(failed)} work unit(s) could not be created: " + "; ".join(
                f"work unit {wid}: {type(e).__name__}: {e}" for wid, e in sorted(failed.items())))
        # one paged read for every unit (not a read each); a unit not yet final (one this
        # launcher does not drive) is waited for on its own
        client = await store.client()
        units = sorted(self._work_units.items())
        runs = {r.id: r for r in await store.read_runs(client, tags=[], ids=[wu.flow_run_id for _, wu in units
                                                                              if wu.flow_run_id is not None])}
        statuses = {}
        for wid, wu in units:
            run = runs.get(wu.flow_run_id)
            status = ExperimentUnitStatus.from_state(run.state) if run is not None and run.state else None
            statuses[wid] = status if status is not None and status.is_final else await wu._wait()
        return statuses

    def wait_until_complete(self) -> Any:
        """Waits until every work unit is final; returns {work_unit_id: status}."""
        return dual(self._wait_all)

    async def _stop(self, reason: str = "experiment stopped by the user") -> None:
        from prefect.states import Cancelled, Cancelling

        await self._load()
        self._stopped = True
        client = await store.client()
        units = [*self._work_units.values(), *self._auxiliary_units]
        local_ids = {wu.flow_run_id for wu in units if wu._task is not None}
        wus = await store.experiment_runs(client, self.experiment_id)
        wus += await store.experiment_runs(client, self.experiment_id, store.KIND_AUXILIARY_UNIT)
        for r in wus:
            if store.state_type(r) not in store.FINAL:
                # (proposed: a unit whose own end lands after this read keeps it)
                await client.set_flow_run_state(r.id, Cancelling(message=reason))
        # Work units driven by another (or no) process: cancel their jobs directly.
        jobs = await store.experiment_runs(client, self.experiment_id, store.KIND_JOB)
        for r in jobs:
            wid = store.tag_value(r.tags, store.TAG_WORK_UNIT)
            wu = self._work_units.get(int(wid)) if wid and wid.isdigit() else None
            aid = store.tag_value(r.tags, store.TAG_AUXILIARY_UNIT)
            if aid and aid.isdigit() and 0 < int(aid) <= len(self._auxiliary_units):
                wu = self._auxiliary_units[int(aid) - 1]
            if wu is not None and wu.flow_run_id in local_ids:
                continue
            if store.state_type(r) not in store.FINAL:
                await store.cancel_pool_run(client, r.id, reason)
        tasks = [wu._task for wu in units if wu._task is not None]
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
        # Work units nobody drives (their launcher is gone): record them as Cancelled.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * orchestration.CANCEL_DEADLINE_SECONDS / 3
        while True:
            wus = await store.experiment_runs(client, self.experiment_id)
            left = [r for r in wus if store.state_type(r) not in store.FINAL]
            if not left or loop.time() > deadline:
                break
            jobs = await store.experiment_runs(client, self.experiment_id, store.KIND_JOB)
            for r in left:
                wid = store.tag_value(r.tags, store.TAG_WORK_UNIT)
                mine = [j for j in jobs if store.tag_value(j.tags, store.TAG_WORK_UNIT) == wid]
                if all(store.state_type(j) in store.FINAL for j in mine):
                    await client.set_flow_run_state(r.id, Cancelled(message=reason), force=True)
            await asyncio.sleep(POLL_SECONDS)
        self._summary.mark_dirty()
        await self._finish_run(reason)

    def stop(self) -> Any:
        """Cancels every work unit of the experiment and ends its run Cancelled."""
        return dual(self._stop)

    async def _finish_run(self, stop_reason: Optional[str] = None) -> str:
        if self._writes is not None:
            await self._writes.links.drain()  # (the links show their units' ends before the experiment's)
        state = await self._final_state(stop_reason)
        client = await store.client()
        if self._heartbeat is not None:
            # (before the final state: a beat after it would start a wait for the next one)
            self._heartbeat.cancel()
            self._heartbeat = None
        await client.set_flow_run_state(self.flow_run_id, state, force=True)
        await self._summary.refresh()
        return state.type.value

    async def _final_state(self, stop_reason: Optional[str] = None):
        """The experiment run's final state, from its work units' states."""
        from prefect.states import Cancelled, Completed, Failed

        client = await store.client()
        wus = await store.experiment_runs(client, self.experiment_id)
        counts: dict[StateType, int] = {}
        for r in wus:
            counts[store.state_type(r)] = counts.get(store.state_type(r), 0) + 1
        tally = ", ".join(f"{n} {t.value.lower()}" for t, n in sorted(counts.items())) or "no work units"
        failed = self.creation_errors()
        if failed:
            tally += f"; {len(failed)} could not be created (work unit {min(failed)}: {failed[min(failed)]})"
        if counts.get(StateType.FAILED, 0) + counts.get(StateType.CRASHED, 0) or failed:
            state = Failed(message=f"work units: {tally}")
        elif self._stopped or counts.get(StateType.CANCELLED, 0):
            state = Cancelled(message=f"{stop_reason or 'work units were cancelled'}: {tally}")
        else:
            state = Completed(message=f"work units: {tally}")
        return state

    async def _close(self, exc: Optional[BaseException]) -> None:
        if exc is not None and not self._stopped:
            await self._stop(f"the launch script raised {type(exc).__name__}: {exc}")
            return
        if not self._stopped:
            try:
                await self._wait_all()
            finally:  # work units that could not be created end the run Failed, saying so
                # The trials have ended: auxiliary units get their termination delay, then stop.
                await asyncio.gather(*(aux._end_after_delay() for aux in self._auxiliary_units))
                await self._finish_run()

    async def _reopen(self) -> None:
        """Opens the experiment for this launcher. Work units a dead launcher left
        unfinished are re-attached: their jobs (which went on) are watched from here."""
        from prefect.states import Running

        from prefect_xm.core import launcher

        client = await store.client()
        run = await client.read_flow_run(self.flow_run_id)
        await self._load()
        window = launcher.gone_after_seconds()
        orphans = [wu for wu in self._work_units.values()
                   if wu._task is None and wu._loaded_state is not None and wu._loaded_state not in store.FINAL]
        if orphans and store.state_type(run) not in store.FINAL:
            try:
                beat = await launcher.last_beat(client, self.flow_run_id)
            except Exception as e:  # no events API: a re-run is far likelier a restart than a twin
                log.warning("cannot read experiment %s's launcher heartbeats (%s: %s); re-attaching its "
                            "unfinished work units", self.experiment_id, type(e).__name__, e)
                beat = None
            if beat is not None and beat.is_alive(window):
                log.warning("experiment %s is driven by a live launcher (host %s, pid %s): this one only adds "
                            "work units", self.experiment_id, beat.host, beat.pid)
                orphans = []
        if orphans:
            message = (f"re-attached: {len(orphans)} unfinished work unit(s) of a launcher that is gone, "
                       f"now watched by pid {os.getpid()}")
            await client.set_flow_run_state(self.flow_run_id, Running(message=message), force=True)
            log.info("experiment %s: %s", self.experiment_id, message)
        elif store.state_type(run) != StateType.RUNNING:
            await client.set_flow_run_state(self.flow_run_id, Running(message="reopened"), force=True)
        self._stopped = False
        try:
            await launcher.ensure_gone_automation(client, window)
        except Exception as e:  # the experiment runs without it; only a dead launcher goes unseen
            log.warning("cannot set up the automation that marks experiments whose launcher is gone "
                        "(%s: %s)", type(e).__name__, e)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.ensure_future(
                launcher.keep_beating(self.flow_run_id, launcher.heartbeat_seconds(), window))
        for wu in orphans:
            wu._task = asyncio.ensure_future(self._reattach(wu))

    async def _reattach(self, wu: WorkUnit) -> None:
        """Drives a work unit whose launcher died, from its jobs' runs: pool jobs went on
        (their workers follow them); a Local job died with its launcher or lost it."""
        from prefect.states import Crashed

        client = await store.client()
        runs = await store.experiment_runs(client, self.experiment_id, store.KIND_JOB, wu.unit_tag)
        members = [Member.from_run(r) for r in runs]
        for m in members:
            if m.is_local and m.state_type not in store.FINAL:
                m.state_type = StateType.CRASHED
                m.message = "its launcher died while it ran in it (a Local job cannot be re-attached)"
                await client.set_flow_run_state(m.flow_run_id, Crashed(message=m.message), force=True)
        expected = int(wu._job_count) if wu._job_count and wu._job_count.isdigit() else len(members)
        if len(members) < expected:
            # The gang is incomplete and its missing jobs are unknown here: stop the rest.
            message = (f"its launcher died after creating {len(members)} of its {expected} jobs; "
                       f"the others were never submitted")
            await orchestration.cancel_members(client, members, message)
            await client.set_flow_run_state(wu.flow_run_id, Crashed(message=message), force=True)
            self._summary.mark_dirty()
            return
        await self._run_work_unit(wu, members)

    def __enter__(self) -> "Experiment":
        install_sigterm_handler()
        Runtime.get().run(self._reopen())
        if self not in OPENED:
            OPENED.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            Runtime.get().run(self._close(exc))
        except KeyboardInterrupt:
            Runtime.get().run(self._stop("interrupted (Ctrl-C)"))
            raise

    async def __aenter__(self) -> "Experiment":
        await Runtime.get().arun(self._reopen())
        if self not in OPENED:
            OPENED.append(self)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await Runtime.get().arun(self._close(exc))

    # Info
    def get_status(self) -> ExperimentUnitStatus:
        async def go():
            return ExperimentUnitStatus.from_state((await (await store.client()).read_flow_run(self.flow_run_id)).state)
        return Runtime.get().run(go())


class _GeneratorWorkUnit(UnitNames):
    """What a job generator receives as `work_unit`: collects its `add` calls, and knows
    the id the work unit will get (XManager predicts it too) for names built from it."""

    def __init__(self, experiment: "Experiment", work_unit_id: int) -> None:
        self._jobs: dict[str, Union[Job, JobGroup]] = {}
        self.experiment = experiment
        self.work_unit_id = work_unit_id

    def add(self, job: Union[Job, JobGroup], args: Optional[Mapping[str, Any]] = None) -> Any:
        resolved = apply_args(job, args)
        if isinstance(resolved, Job):
            base = resolved.name or resolved.executable.name
            key, n = base, 1
            while key in self._jobs:
                n += 1
                key = f"{base}_{n}"
            self._jobs[key] = resolved
        else:
            for k, v in resolved.jobs.items():
                if k in self._jobs:
                    raise ValueError(f"job key {k!r} added twice to the work unit")
                self._jobs[k] = v

        class _Done:
            def __await__(self_inner):
                async def none():
                    return None
                return none().__await__()
        return _Done()

    def group(self) -> Union[Job, JobGroup]:
        if not self._jobs:
            raise ValueError("the job generator added no jobs to its work unit")
        return JobGroup(**self._jobs)


def _unit_role(job: Any, role: Optional[ExperimentUnitRole]) -> tuple[Any, ExperimentUnitRole]:
    """(the job, its unit's role): an AuxiliaryUnitJob carries its own, as in XManager."""
    if isinstance(job, AuxiliaryUnitJob):
        return job.job, job.role
    if role is not None and not isinstance(role, ExperimentUnitRole):
        raise ValueError(f"experiment.add role: expected xm.WorkUnitRole() or xm.AuxiliaryUnitRole(...), got {role!r}")
    return job, role or WorkUnitRole()


def _default_display_args(job: Union[Job, JobGroup]) -> dict[str, Any]:
    if isinstance(job, Job):
        j = job.args.to_json()
        return j if isinstance(j, dict) else {"args": j}
    return {k: _default_display_args(v) for k, v in job.jobs.items()}


# ------------------------------------------------------------- create / get / list


async def _create(experiment_title: str, identity: Optional[str]) -> Experiment:
    from prefect.states import Running

    from prefect_xm.flows.declarations import launched_experiment

    client = await store.client()
    if identity is not None:
        tag = store.identity_tag(identity, store.TAG_EXPERIMENT_IDENTITY)
        found = await store.read_runs(client, tags=[store.TAG_KIND + store.KIND_EXPERIMENT, tag], limit=1)
        if found:
            return _experiment_from_run(found[0])
    exp_id = store.new_experiment_id()
    tags = [store.TAG_XM, store.TAG_KIND + store.KIND_EXPERIMENT, store.experiment_tag(exp_id)]
    if identity is not None:
        tags.append(store.identity_tag(identity, store.TAG_EXPERIMENT_IDENTITY))
    run = await client.create_flow_run(
        launched_experiment, name=experiment_title, tags=tags,
        parameters={}, state=Running(message=f"experiment {exp_id}"),
    )
    exp = Experiment(exp_id, experiment_title, run.id)
    exp._loaded = True
    OPENED.append(exp)
    return exp


async def adopt_flow_run(flow_run_id: UUID, experiment_title: str) -> Experiment:
    """Makes a running xm-experiment flow run (started from a deployment) an experiment:
    tags it, names it after the title, returns its Experiment (the flow drives it)."""
    client = await store.client()
    run = await client.read_flow_run(flow_run_id)
    tagged = store.tag_value(run.tags or [], store.TAG_EXPERIMENT)
    exp_id = store.experiment_id_of(tagged) if tagged else store.new_experiment_id()
    tags = list(dict.fromkeys(list(run.tags or []) + [store.TAG_XM, store.TAG_KIND + store.KIND_EXPERIMENT,
                                                       store.experiment_tag(exp_id)]))
    await client.update_flow_run(flow_run_id, name=experiment_title, tags=tags)
    exp = Experiment(exp_id, experiment_title, flow_run_id)
    exp._loaded = True
    return exp


async def drive_adopted(experiment: Experiment, add_work_units: Callable[[Experiment], Awaitable[None]]):
    """What the xm-experiment flow does with the experiment it adopted, from the flow's
    event loop: `add_work_units(experiment)`, then waits for them; stops them all if
    either raises. Returns ({work_unit_id: status}, the experiment's final state): the
    flow ends its own run in that state, so it is not set here; the summary is."""
    runtime = Runtime.get()
    try:
        await add_work_units(experiment)
        statuses = await runtime.arun(experiment._wait_all())
    except BaseException as e:
        await runtime.arun(experiment._stop(f"the experiment flow raised {type(e).__name__}: {e}"))
        raise
    state = await runtime.arun(experiment._final_state())
    await runtime.arun(experiment._summary.refresh())
    return statuses, state


def _experiment_from_run(run) -> Experiment:
    exp_id = store.experiment_id_of(store.tag_value(run.tags, store.TAG_EXPERIMENT))
    return Experiment(exp_id, run.name, run.id)


def create_experiment(experiment_title: Optional[str] = None, *, identity: Optional[str] = None) -> Experiment:
    """Creates an experiment (a Prefect flow run named `experiment_title`).

    With `identity`, an existing experiment created with the same identity is reopened
    instead, so re-running a launch script adds to it (and `add(identity=...)` skips
    work units it already has).
    """
    title = experiment_title or "experiment"
    if not isinstance(title, str):
        raise ValueError(f"experiment_title must be a string, got {experiment_title!r}")
    if identity is not None:
        store.identity_tag(identity, store.TAG_EXPERIMENT_IDENTITY)
    return _AsyncOrSync(title, identity)  # type: ignore[return-value]


class _AsyncOrSync:
    """create_experiment's result: usable as `with`, `async with` or directly."""

    def __init__(self, title: str, identity: Optional[str]) -> None:
        self._title, self._identity = title, identity
        self._exp: Optional[Experiment] = None
        if not in_event_loop():
            self._exp = Runtime.get().run(_create(title, identity))

    def __getattr__(self, name: str) -> Any:
        if self._exp is None:
            raise RuntimeError("use `async with create_experiment(...)` in async code")
        return getattr(self._exp, name)

    def __enter__(self) -> Experiment:
        assert self._exp is not None
        return self._exp.__enter__()

    def __exit__(self, *exc) -> None:
        assert self._exp is not None
        self._exp.__exit__(*exc)

    async def __aenter__(self) -> Experiment:
        if self._exp is None:
            self._exp = await Runtime.get().arun(_create(self._title, self._identity))
        return await self._exp.__aenter__()

    async def __aexit__(self, *exc) -> None:
        assert self._exp is not None
        await self._exp.__aexit__(*exc)

    def __repr__(self) -> str:
        return repr(self._exp)


async def _get(experiment_id: Union[str, UUID]) -> Experiment:
    client = await store.client()
    text = str(experiment_id)
    try:
        run = await client.read_flow_run(UUID(text))
        if store.TAG_KIND + store.KIND_EXPERIMENT not in (run.tags or []):
            raise ValueError(f"flow run {text} is not an xm experiment")
    except ValueError as e:
        if "not an xm experiment" in str(e):
            raise
        found = await store.read_runs(client, tags=[store.TAG_KIND + store.KIND_EXPERIMENT, store.TAG_EXPERIMENT + text],
                                      limit=1)
        if not found:
            raise ValueError(f"no experiment with id {text!r} in the Prefect API ({client.api_url})") from None
        run = found[0]
    exp = _experiment_from_run(run)
    await exp._load()
    return exp


def get_experiment(experiment_id: Union[str, int, UUID]) -> Experiment:
    """The experiment with this id (its short id or its flow run id), read from Prefect."""
    return Runtime.get().run(_get(experiment_id))


async def _list(limit: Optional[int]) -> list[Experiment]:
    from prefect.client.schemas.sorting import FlowRunSort

    client = await store.client()
    runs = await store.read_runs(client, tags=[store.TAG_KIND + store.KIND_EXPERIMENT], limit=limit,
                                 sort=FlowRunSort.ID_DESC)
    runs.sort(key=lambda r: r.created or datetime.datetime.min.replace(tzinfo=datetime.timezone.utc), reverse=True)
    return [_experiment_from_run(r) for r in runs if store.tag_value(r.tags, store.TAG_EXPERIMENT)]


def list_experiments(limit: Optional[int] = None) -> list[Experiment]:
    """Experiments known to the Prefect API, newest first."""
    return Runtime.get().run(_list(limit))

