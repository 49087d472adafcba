"""The experiment a launch script drives: `add` checks a work unit's jobs, then creates its
runs in the background and hands its gang to orchestration; on exit it waits for its work
units and ends its run (experiment_lifecycle.py). The runs, their tags and the reads of
them are the store's (prefect_xm.core.store)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence, Union
from uuid import UUID

from prefect.client.schemas.objects import StateType

from prefect_xm.core import orchestration, store, summary
from prefect_xm.core.args import jsonable
from prefect_xm.core.deployments import check_pool_jobs, ensure_in_launcher_deployment
from prefect_xm.core.experiment_lifecycle import ExperimentLifecycle
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
from prefect_xm.core.orchestration import Member
from prefect_xm.core.roles import AuxiliaryUnitJob, AuxiliaryUnitRole, ExperimentUnitRole, WorkUnitRole
from prefect_xm.core.runtime import Runtime, in_event_loop, install_sigterm_handler
from prefect_xm.core.status import ExperimentUnitStatus
from prefect_xm.core.work_units import AddedWorkUnits, AuxiliaryUnit, GeneratorWorkUnit, WorkUnit

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


class Experiment(ExperimentLifecycle):
    """An experiment: a Prefect flow run whose work units are subflow runs.

    Use it as a context manager (``with``/``async with``): on exit it waits for every
    work unit launched here and ends the experiment run Completed (or Failed/Cancelled);
    waiting, stopping, that end and re-attaching are ExperimentLifecycle's.
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
        self._pool_watch: Optional[asyncio.Task] = None

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
            wid = store.work_unit_of(run)
            if wid is None or not wid.isdigit():
                continue
            ident_tag = store.identity_tag_of(run)
            wu = WorkUnit(self, int(wid), dict(run.parameters or {}), run.id,
                          identity=store.identity_in(ident_tag))
            wu.link_task_run_id = run.parent_task_run_id
            wu._loaded_state, wu._job_count = store.state_type(run), store.job_count_of(run)
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
        collector = GeneratorWorkUnit(self, self._next_id)
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

        from prefect_xm.core.declarations import xm_work_unit

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
        tags = store.unit_run_tags(self.experiment_id, kind, wu.unit_tag, len(members), role.importance.value,
                                   ident_tag)
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
        wu._members = members
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

    # ---------------------------------------------------------------- with / async with

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
        if exc is None:
            self._exit_a_program_that_failed()

    async def __aenter__(self) -> "Experiment":
        await Runtime.get().arun(self._reopen())
        if self not in OPENED:
            OPENED.append(self)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await Runtime.get().arun(self._close(exc))
        if exc is None:
            self._exit_a_program_that_failed()

    def _exit_a_program_that_failed(self) -> None:
        """A launch script run as a program (`python launcher.py`) ends with the exit code
        `prefect-xm launch` gives it (summary.launch_exit_code): 1, said on stderr, when a
        work unit did not complete; raised as SystemExit where its `with` block ends.
        Under `prefect-xm launch` (which decides the exit code itself once the script has
        run), or where the `with` is not the script's own, nothing happens here."""
        import threading

        if not END_PROGRAM_THAT_FAILED or self.final_state is None or not _left_in_a_program():
            return
        if threading.current_thread() is not threading.main_thread():
            return
        code = summary.launch_exit_code([self.final_state.type])
        if code:
            state = self.final_state
            print(f"prefect-xm: experiment {self.experiment_id} ({self.experiment_title}) ended {state.name}"
                  + (f": {state.message}" if state.message else "") + f"; exiting with code {code}",
                  file=sys.stderr, flush=True)
            raise SystemExit(code)

    # Info
    def get_status(self) -> ExperimentUnitStatus:
        async def go():
            return ExperimentUnitStatus.from_state((await (await store.client()).read_flow_run(self.flow_run_id)).state)
        return Runtime.get().run(go())


#: False under `prefect-xm launch`: it runs the whole script, then decides the exit code
#: from every experiment's end (see Experiment._exit_a_program_that_failed)
END_PROGRAM_THAT_FAILED = True


def _left_in_a_program() -> bool:
    """Whether the `with` block being left is the launch script's own, run as a program
    (`python launcher.py`, `python -m ...`): the first caller outside prefect_xm is the
    `__main__` module of a file, not a test, a notebook or a library."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "prefect_xm":
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__") == "__main__" and "__file__" in frame.f_globals


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
