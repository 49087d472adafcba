"""Experiments and work units on Prefect.

Prefect is the only state store:

- the experiment is a flow run of ``xm-experiment`` named after its title and tagged
  ``xm``, ``xm-kind:experiment``, ``xm-experiment:<id>``; its id is a short hex string;
- each work unit is a flow run of ``xm-work-unit`` (a subflow of the experiment run,
  linked through a task run in it) tagged ``xm-kind:work-unit``, ``xm-work-unit:<n>`` and,
  with an identity, ``xm-identity:<identity>``; its parameters are its args;
- each job is a flow run of ``xm-job-runner`` tagged ``xm-kind:job``, ``xm-job:<key>``,
  a subflow of its work unit; Local jobs run in this process, pool jobs are created
  from the ``xm-job-runner/<pool>`` deployment and run by the pool's workers.

A work unit is gang-scheduled: every member is submitted before any is watched; it is
Running once every member runs; when a member fails or crashes the others are cancelled
and the work unit fails naming it; cancelling the work unit cancels every member.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, Sequence, Union
from uuid import UUID

from prefect_xm.core.args import SequentialArgs, jsonable
from prefect_xm.core.job_blocks import (
    DEFAULT_START_DEADLINE_SECONDS,
    Executable,
    Job,
    JobGroup,
    Packageable,
    apply_args,
    flatten_jobs,
    package_spec,
    start_deadline_of,
)
from prefect_xm.core.runtime import Runtime, dual, in_event_loop
from prefect_xm.core.status import (
    ExperimentUnitError,
    ExperimentUnitFailedError,
    ExperimentUnitNotCompletedError,
    ExperimentUnitStatus,
)
from prefect_xm.core.metadata import MetadataContext, metadata_context
from prefect_xm.core.roles import AuxiliaryUnitJob, AuxiliaryUnitRole, ExperimentUnitRole, WorkUnitRole
from prefect_xm.gang import gang_tags

log = logging.getLogger("prefect_xm")

TAG_XM = "xm"
TAG_KIND = "xm-kind:"
KIND_EXPERIMENT = "experiment"
KIND_WORK_UNIT = "work-unit"
KIND_JOB = "job"
TAG_EXPERIMENT = "xm-experiment:"
TAG_EXPERIMENT_IDENTITY = "xm-experiment-identity:"
TAG_WORK_UNIT = "xm-work-unit:"
TAG_IDENTITY = "xm-identity:"
TAG_JOB = "xm-job:"
#: on a work unit's run: how many jobs it has (a launcher that died may have made fewer)
TAG_JOB_COUNT = "xm-jobs:"
KIND_AUXILIARY_UNIT = "auxiliary-unit"
TAG_AUXILIARY_UNIT = "xm-auxiliary-unit:"
TAG_IMPORTANCE = "xm-importance:"



def print_progress(experiment: "Experiment", counts: Mapping[str, int]) -> None:
    """One line on stderr: how many work units are in each state."""
    import sys

    total = sum(counts.values())
    done = sum(n for state, n in counts.items() if state.upper() in _FINAL)
    parts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
    print(f"{experiment.experiment_title} ({experiment.experiment_id}): {done}/{total} work units done: {parts}",
          file=sys.stderr, flush=True)


#: Called as PROGRESS_HOOK(experiment, counts) while an experiment waits for its work
#: units, whenever the counts of work-unit states change; None prints nothing.
PROGRESS_HOOK = None if os.environ.get("PREFECT_XM_PROGRESS", "1").lower() in ("0", "false", "no") else print_progress
#: Experiments created or opened in this process (the CLI prints their results).
OPENED: list = []

POLL_SECONDS = float(os.environ.get("PREFECT_XM_POLL_SECONDS", "1.0"))
CANCEL_DEADLINE_SECONDS = float(os.environ.get("PREFECT_XM_CANCEL_DEADLINE_SECONDS", "60"))
#: work units whose runs are created at once in the background (experiment.add returns at once)
CREATION_CONCURRENCY = int(os.environ.get("PREFECT_XM_CREATION_CONCURRENCY", "8"))

_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
_NOT_STARTED = {"SCHEDULED", "PENDING", "PAUSED"}


def _tag_value(tags: Iterable[str], prefix: str) -> Optional[str]:
    for t in tags:
        if t.startswith(prefix):
            return t[len(prefix):]
    return None


def _identity_tag(identity: str, prefix: str = TAG_IDENTITY) -> str:
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"identity must be a non-empty string, got {identity!r}")
    if len(identity) <= 80 and re.fullmatch(r"[A-Za-z0-9_.:=,@+\-/]+", identity):
        return prefix + identity
    return prefix + "sha1-" + hashlib.sha1(identity.encode()).hexdigest()


def _state_type(run) -> str:
    return run.state.type.value if run is not None and run.state is not None else "PENDING"


def _duration(run) -> Optional[float]:
    if run is None or run.start_time is None:
        return None
    end = run.end_time
    if end is None:
        if _state_type(run) in _FINAL:
            return None
        end = datetime.datetime.now(datetime.timezone.utc)
    return max(0.0, (end - run.start_time).total_seconds())


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _args_text(args: Any) -> str:
    if isinstance(args, Mapping):
        return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in args.items())
    return json.dumps(args)


async def _client():
    return await Runtime.get().client()


async def _read_runs(client, *, tags: Sequence[str], ids: Optional[Sequence[UUID]] = None, limit: Optional[int] = None,
                     sort=None):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags

    f = FlowRunFilter(tags=FlowRunFilterTags(all_=list(tags)) if tags else None,
                      id=FlowRunFilterId(any_=list(ids)) if ids is not None else None)
    out = []
    offset = 0
    page = 200
    while True:
        batch = await client.read_flow_runs(flow_run_filter=f, limit=page if limit is None else min(page, limit - len(out)),
                                            offset=offset, sort=sort)
        out.extend(batch)
        if len(batch) < page or (limit is not None and len(out) >= limit):
            return out
        offset += len(batch)


async def _link_task_run(client, parent_flow_run_id: UUID, name: str, key: str, dynamic_key: str):
    """A task run in the parent flow run standing for a child run (as run_deployment does),
    so the UI shows the child as a subflow of the parent."""
    from prefect import Task
    from prefect.states import Running

    task = Task(name=name, fn=lambda: None)
    task.task_key = key
    return await client.create_task_run(task=task, flow_run_id=parent_flow_run_id, dynamic_key=dynamic_key,
                                        state=Running())


async def _finish_task_run(client, task_run_id: Optional[UUID], state_type: str, message: str = "") -> None:
    from prefect.states import Cancelled, Completed, Failed

    if task_run_id is None:
        return
    state = {"COMPLETED": Completed, "CANCELLED": Cancelled}.get(state_type, Failed)(message=message or None)
    try:
        await client.set_task_run_state(task_run_id, state, force=True)
    except Exception as e:  # cosmetic link only
        log.debug("could not finish link task run %s: %s", task_run_id, e)


# ----------------------------------------------------------------------- deployments

_deployment_ids: dict[str, UUID] = {}
_deployment_locks: dict[str, asyncio.Lock] = {}
#: Pool types whose jobs run in a container image (the stock workers prefect-xm maps onto).
CONTAINER_POOL_TYPES = frozenset({"docker", "kubernetes", "vertex-ai", "cloud-run", "cloud-run-v2", "ecs"})
_pool_schemas: dict[str, dict[str, Any]] = {}


async def pool_variables_schema(pool_name: str) -> dict[str, Any]:
    """The pool's whole job-variable schema (properties and definitions), read from the
    Prefect API (cached)."""
    if pool_name in _pool_schemas:
        return _pool_schemas[pool_name]
    from prefect.exceptions import ObjectNotFound

    client = await _client()
    try:
        pool = await client.read_work_pool(pool_name)
    except ObjectNotFound:
        raise ValueError(f"work pool {pool_name!r} does not exist in the Prefect API ({client.api_url})") from None
    schema = (pool.base_job_template or {}).get("variables") or {}
    _pool_schemas[pool_name] = schema
    return schema


def job_runner_source_dir() -> str:
    """The directory holding the installed prefect_xm package (the deployment's source)."""
    import prefect_xm

    return str(Path(prefect_xm.__file__).resolve().parent.parent)


async def ensure_job_runner_deployment(pool_name: str) -> UUID:
    """Makes sure deployment ``xm-job-runner/<pool>`` exists on the pool; returns its id.

    The deployment loads ``prefect_xm/flows/job_runner.py:run_job`` from the directory of
    the installed prefect_xm package, which must be visible to the pool's workers (a
    filesystem shared with the cluster, or the same installation path on the nodes).
    """
    if pool_name in _deployment_ids:
        return _deployment_ids[pool_name]
    # Work units are created side by side: one creation per pool, the others wait for it
    # (concurrent creations of one deployment make the server answer 500).
    lock = _deployment_locks.setdefault(pool_name, asyncio.Lock())
    async with lock:
        if pool_name not in _deployment_ids:
            _deployment_ids[pool_name] = await _create_job_runner_deployment(pool_name)
    return _deployment_ids[pool_name]


async def _create_job_runner_deployment(pool_name: str) -> UUID:
    from prefect.client.schemas.actions import DeploymentCreate  # noqa: F401  (import check)
    from prefect.utilities.callables import parameter_schema

    from prefect_xm.flows.job_runner import run_job

    client = await _client()
    source = job_runner_source_dir()
    flow_id = await client.create_flow(run_job)
    pool = await client.read_work_pool(pool_name)
    if pool.type in CONTAINER_POOL_TYPES:
        # The job runs in an image with prefect-xm installed: load the flow by module
        # name there; this machine's source directory does not exist in the container.
        where: dict[str, Any] = dict(entrypoint="prefect_xm.flows.job_runner:run_job", path=None, pull_steps=[])
    else:
        where = dict(entrypoint="prefect_xm/flows/job_runner.py:run_job", path=source,
                     pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": source}}])
    if "execution" in ((pool.base_job_template or {}).get("variables") or {}).get("properties", {}):
        # Batch pools run the job's program itself on the node: no Prefect, no API route
        # there (a run's own job variables may still choose the engine).
        where["job_variables"] = {"execution": "direct"}
    deployment_id = await client.create_deployment(
        flow_id=flow_id,
        name=pool_name,
        work_pool_name=pool_name,
        **where,
        parameter_openapi_schema=parameter_schema(run_job.fn).model_dump_for_openapi(),
        description="prefect-xm job runner (created automatically by prefect_xm experiments)",
        tags=[TAG_XM],
    )
    return deployment_id


# ------------------------------------------------------------------------ work units


class WorkUnit:
    """One trial of an experiment (a Job or a gang-scheduled JobGroup)."""

    def __init__(self, experiment: "Experiment", work_unit_id: int, args: Any, flow_run_id: Optional[UUID],
                 identity: Optional[str] = None) -> None:
        self.experiment = experiment
        self.work_unit_id = work_unit_id
        self.args = args
        #: None while its run is being created in the background (see Experiment._add)
        self.flow_run_id = flow_run_id
        self.identity = identity
        self._task: Optional[asyncio.Task] = None  # the orchestration, when launched here
        self._link_task_run_id: Optional[UUID] = None
        #: as read when the experiment was reopened: its state type, and its job count tag
        self._loaded_state: Optional[str] = None
        self._job_count: Optional[str] = None
        #: set once its flow run exists (or its creation failed: the error)
        self._created: Optional[asyncio.Future] = None
        self.creation_error: Optional[BaseException] = None
        #: how a stop() asked it to end (XManager's mark_as_failed/completed): state type, message
        self._stop_mark: Optional[tuple[str, str]] = None
        #: seconds its gang may stay half started (a JobGroup's StartDeadline, or the default)
        self._start_deadline = DEFAULT_START_DEADLINE_SECONDS

    async def _run_id(self) -> UUID:
        """Its flow run's id, once the background creation has made it; the creation's
        error if it failed."""
        if self.flow_run_id is None and self._created is not None:
            await asyncio.shield(self._created)
        if self.creation_error is not None:
            raise RuntimeError(f"work unit {self.work_unit_id} could not be created: {self.creation_error}")
        assert self.flow_run_id is not None
        return self.flow_run_id

    # XManager names
    @property
    def experiment_id(self) -> str:
        return self.experiment.experiment_id

    @property
    def experiment_unit_name(self) -> str:
        return f"{self.experiment_id}_{self.work_unit_id}"

    @property
    def context(self) -> MetadataContext:
        """XManager's metadata context: its title is the unit's flow run name."""
        async def set_title(title: str) -> None:
            client = await _client()
            await client.update_flow_run(await self._run_id(), name=title)
            self._title = title

        return metadata_context(lambda: getattr(self, "_title", None) or
                                f"{self.experiment.experiment_title}-{self._unit_label}", set_title)

    #: what its runs' tags and names call it
    @property
    def _unit_tag(self) -> str:
        return TAG_WORK_UNIT + str(self.work_unit_id)

    @property
    def _unit_label(self) -> str:
        return f"wu{self.work_unit_id}"

    def get_full_job_name(self, job_name: str) -> str:
        """A job's full name, as XManager spells it: `<experiment id>_<work unit id>_<job>`."""
        return f"{self.experiment_unit_name}_{job_name}"

    def __repr__(self) -> str:
        return f"WorkUnit(experiment_id={self.experiment_id!r}, work_unit_id={self.work_unit_id}, args={self.args!r})"

    def __await__(self):  # `await experiment.add(...)` in async launch scripts
        async def me():
            return self
        return me().__await__()

    async def _read_run(self):
        client = await _client()
        return await client.read_flow_run(await self._run_id())

    async def _status(self) -> ExperimentUnitStatus:
        return ExperimentUnitStatus.from_state((await self._read_run()).state)

    def get_status(self) -> ExperimentUnitStatus:
        """The work unit's status, read from its Prefect flow run."""
        return Runtime.get().run(self._status())

    async def get_status_async(self) -> ExperimentUnitStatus:
        return await Runtime.get().arun(self._status())

    async def _wait(self) -> ExperimentUnitStatus:
        if self._task is not None:
            await asyncio.shield(self._task)
        while True:
            status = await self._status()
            if status.is_final:
                return status
            await asyncio.sleep(POLL_SECONDS)

    async def _wait_completed(self) -> "WorkUnit":
        try:
            status = await self._wait()
        except RuntimeError as e:  # its creation failed
            raise ExperimentUnitError(f"work unit {self.work_unit_id} could not be created: {e}",
                                      work_unit=self) from e
        if status.is_completed:
            return self
        error = ExperimentUnitFailedError if status.is_failed else ExperimentUnitNotCompletedError
        raise error(f"work unit {self.work_unit_id} {status}", work_unit=self)

    def wait_until_complete(self) -> Any:
        """Waits until the work unit is final and returns it, as XManager does (awaitable
        in async code); raises ExperimentUnitFailedError when a job failed and
        ExperimentUnitNotCompletedError when it was stopped. `get_status()` tells more."""
        return dual(self._wait_completed)

    async def _request_stop(self, reason: str = "stopped by the user", mark: Optional[str] = None) -> None:
        from prefect.states import Cancelling

        if mark is not None:
            if self._task is None:
                raise ValueError(
                    f"stop(mark_as_{mark.lower()}=True) on work unit {self.work_unit_id}: only the launch "
                    "script driving it can mark how it ends; stop() without it cancels it from here")
            self._stop_mark = (mark, reason)
        client = await _client()
        run_id = await self._run_id()
        run = await client.read_flow_run(run_id)
        if _state_type(run) not in _FINAL:
            await client.set_flow_run_state(run_id, Cancelling(message=reason), force=True)

    def stop(self, *, mark_as_failed: bool = False, mark_as_completed: bool = False,
             message: Optional[str] = None) -> Any:
        """Cancels the work unit's jobs, as XManager's `stop`: the unit ends Cancelled, or
        Failed / Completed when marked so, with `message` as its state's message. Returns
        once the request is made (awaitable in async code); `wait_until_complete()` waits."""
        if mark_as_failed and mark_as_completed:
            raise ValueError("stop(): mark_as_failed and mark_as_completed are exclusive, both are True")
        mark = "FAILED" if mark_as_failed else "COMPLETED" if mark_as_completed else None
        return dual(lambda: self._request_stop(message or "stopped by the user", mark))

    async def _job_runs(self):
        client = await _client()
        return await _read_runs(client, tags=[TAG_KIND + KIND_JOB, TAG_EXPERIMENT + self.experiment_id,
                                              self._unit_tag])

    def jobs(self) -> dict[str, ExperimentUnitStatus]:
        """{job key: status} of the work unit's job runs."""
        runs = Runtime.get().run(self._job_runs())
        return {(_tag_value(r.tags, TAG_JOB) or r.name): ExperimentUnitStatus.from_state(r.state) for r in runs}


class AuxiliaryUnit(WorkUnit):
    """A unit beside the trials (TensorBoard, a controller): its status is not the
    experiment's; once every work unit has ended it is stopped after its role's
    termination_delay_secs, unless it ended first. Its run is tagged
    `xm-kind:auxiliary-unit`, its jobs `xm-auxiliary-unit:<id>`."""

    def __init__(self, experiment: "Experiment", unit_id: int, args: Any, role: AuxiliaryUnitRole,
                 identity: Optional[str] = None) -> None:
        super().__init__(experiment, unit_id, args, None, identity=identity)
        self.role = role

    @property
    def experiment_unit_name(self) -> str:
        return f"{self.experiment_id}_aux{self.work_unit_id}"

    @property
    def _unit_tag(self) -> str:
        return TAG_AUXILIARY_UNIT + str(self.work_unit_id)

    @property
    def _unit_label(self) -> str:
        return f"aux{self.work_unit_id}"

    def __repr__(self) -> str:
        return f"AuxiliaryUnit(experiment_id={self.experiment_id!r}, id={self.work_unit_id}, role={self.role!r})"

    async def _end_after_delay(self) -> None:
        """Called once the work units have all ended."""
        if self._task is None or self._task.done():
            return
        delay = self.role.termination_delay_secs
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=delay)
            return
        except asyncio.TimeoutError:
            pass
        await self._request_stop(f"the experiment's work units have ended; auxiliary unit stopped after its "
                                 f"termination delay ({delay:g} s)", "CANCELLED")
        await asyncio.gather(asyncio.shield(self._task), return_exceptions=True)


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


class _Member:
    def __init__(self, key: str, job: Optional[Job], params: dict[str, Any]) -> None:
        self.key = key
        self.job = job
        self.params = params
        self.flow_run_id: Optional[UUID] = None
        self.link_id: Optional[UUID] = None
        self.local_task: Optional[asyncio.Task] = None
        self.state_type = "PENDING"
        self.message = ""
        #: for a member re-attached from its run (no Job at hand): whether it ran here
        self._local: Optional[bool] = None

    @classmethod
    def from_run(cls, run) -> "_Member":
        """A job of a work unit whose launcher died, as its run tells it."""
        m = cls(_tag_value(run.tags, TAG_JOB) or str(run.id), None, dict(run.parameters or {}))
        m.flow_run_id, m.link_id, m._local = run.id, run.parent_task_run_id, run.work_pool_name is None
        m.state_type, m.message = _state_type(run), (run.state.message or "") if run.state else ""
        return m

    @property
    def is_local(self) -> bool:
        if self.job is None:
            return bool(self._local)
        return self.job.executor.work_pool_name is None


# ------------------------------------------------------------------------ experiment


class Experiment:
    """An experiment: a Prefect flow run whose work units are subflow runs.

    Use it as a context manager (``with``/``async with``): on exit it waits for every
    work unit launched here and ends the experiment run Completed (or Failed/Cancelled).
    """

    def __init__(self, experiment_id: str, experiment_title: str, flow_run_id: UUID) -> None:
        self.experiment_id = experiment_id
        self.experiment_title = experiment_title
        self.flow_run_id = flow_run_id
        self._work_units: dict[int, WorkUnit] = {}
        self._by_identity: dict[str, WorkUnit] = {}
        self._next_id = 1
        self._auxiliary_units: list[AuxiliaryUnit] = []
        self._package_queue: list[tuple[Packageable, concurrent.futures.Future]] = []
        self._loaded = False
        self._artifact_id: Optional[UUID] = None
        self._summary_lock: Optional[asyncio.Lock] = None
        self._summary_dirty = False
        self._stopped = False
        self._creating: Optional[asyncio.Semaphore] = None
        #: flow runs the work units watched here wait on, and the last read of them
        self._watched: set[UUID] = set()
        self._snapshot: Optional[tuple[float, set[UUID], dict[UUID, Any]]] = None
        self._snapshot_task: Optional[asyncio.Future] = None
        self._heartbeat: Optional[asyncio.Task] = None

    def __repr__(self) -> str:
        return f"Experiment(experiment_id={self.experiment_id!r}, title={self.experiment_title!r})"

    @property
    def context(self) -> MetadataContext:
        """XManager's metadata context: its title is the experiment's title and its flow
        run's name (set_title renames both)."""
        async def set_title(title: str) -> None:
            client = await _client()
            await client.update_flow_run(self.flow_run_id, name=title)
            self.experiment_title = title
            self._mark_summary_dirty()

        return metadata_context(lambda: self.experiment_title, set_title)

    @property
    def summary_artifact_key(self) -> str:
        return f"xm-summary-{self.experiment_id}".lower()

    # ---------------------------------------------------------------- loading

    async def _load(self) -> None:
        """Reads this experiment's work units from Prefect (for reopened experiments)."""
        if self._loaded:
            return
        client = await _client()
        runs = await _read_runs(client, tags=[TAG_KIND + KIND_WORK_UNIT, TAG_EXPERIMENT + self.experiment_id])
        for run in runs:
            wid = _tag_value(run.tags, TAG_WORK_UNIT)
            if wid is None or not wid.isdigit():
                continue
            ident_tag = next((t for t in run.tags if t.startswith(TAG_IDENTITY)), None)
            wu = WorkUnit(self, int(wid), dict(run.parameters or {}), run.id,
                          identity=ident_tag[len(TAG_IDENTITY):] if ident_tag else None)
            wu._link_task_run_id = run.parent_task_run_id
            wu._loaded_state, wu._job_count = _state_type(run), _tag_value(run.tags, TAG_JOB_COUNT)
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

    async def _validate_executors(self, members: Mapping[str, Job]) -> None:
        from prefect_xm.executors import validate_job_variables

        for key, job in members.items():
            pool = job.executor.work_pool_name
            if pool is None:
                continue
            from prefect.settings import get_current_settings

            from prefect_xm.core import embedded_server

            if not get_current_settings().api.url or embedded_server.in_use():
                raise ValueError(
                    f"job {key!r} runs on work pool {pool!r}, whose workers need a Prefect server they "
                    f"can reach: set PREFECT_API_URL (the embedded server only serves the Local executor)"
                )
            schema = await pool_variables_schema(pool)
            try:
                validate_job_variables(pool, job.executor.job_variables_for(job.executable),
                                       schema.get("properties") or {}, schema.get("definitions"))
            except ValueError as e:
                raise ValueError(f"job {key!r}: {e}") from None

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
        if args is not None and not isinstance(args, Mapping):
            raise ValueError(f"experiment.add args must be a dict, got {args!r}")
        job, role = _unit_role(job, role)
        # Resolve the jobs now, so bad input raises before anything is submitted.
        display_args: Any
        if isinstance(job, (Job, JobGroup)):
            resolved = apply_args(job, args)
            display_args = jsonable(args) if args else _default_display_args(resolved)
        elif callable(job):
            if not self._loaded:
                Runtime.get().run(self._load())
            collector = _GeneratorWorkUnit(self, self._next_id)
            result = job(collector, **dict(args or {}))
            if asyncio.iscoroutine(result):
                # The generator only records jobs: run it to completion on the runtime loop.
                async def consume(coro=result):
                    await coro
                Runtime.get().run(consume())
            resolved = collector.group()
            display_args = jsonable(dict(args or {}))
        else:
            raise ValueError(f"experiment.add: expected a Job, a JobGroup or a job generator, got {job!r}")
        members = flatten_jobs(resolved)
        return Runtime.get().run(self._add(members, display_args, identity, start_deadline_of(resolved), role))

    def _add_each(self, job: Any, args_list: Sequence[Any], role: Optional[ExperimentUnitRole],
                  identity: Optional[str]) -> list[WorkUnit]:
        """`add(job, args=[{...}, {...}])`: a work unit per args (as xm-slurm has it; on a
        batch pool the worker submits them as one array). Every args is checked before any
        work unit is added."""
        return [self.add(job, args, role=role) for args in self._checked_args_list(job, args_list, identity)]

    @staticmethod
    def _checked_args_list(job: Any, args_list: Sequence[Any], identity: Optional[str]) -> Sequence[Any]:
        if identity:
            raise ValueError(f"experiment.add: identity={identity!r} names one work unit; with a list of args, "
                             f"add them one by one, each with its own identity")
        for i, args in enumerate(args_list):
            if not isinstance(args, Mapping):
                raise ValueError(f"experiment.add args[{i}] must be a dict, got {args!r}")
            inner = job._job if isinstance(job, AuxiliaryUnitJob) else job
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
        job, role = _unit_role(job, role)
        if callable(job) and not isinstance(job, (Job, JobGroup)):
            await Runtime.get().arun(self._load())
            collector = _GeneratorWorkUnit(self, self._next_id)
            result = job(collector, **dict(args or {}))
            if asyncio.iscoroutine(result):
                await result
            members = flatten_jobs(collector.group())
            return await Runtime.get().arun(self._add(members, jsonable(dict(args or {})), identity,
                                                      start_deadline_of(None), role))
        resolved = apply_args(job, args)
        display_args = jsonable(args) if args else _default_display_args(resolved)
        return await Runtime.get().arun(self._add(flatten_jobs(resolved), display_args, identity,
                                                  start_deadline_of(resolved), role))

    async def _add(self, members: dict[str, Job], display_args: Any, identity: Optional[str],
                   start_deadline: float, role: ExperimentUnitRole) -> WorkUnit:
        from prefect.states import Pending

        from prefect_xm.flows.experiment import xm_work_unit

        await self._load()
        ident_tag = _identity_tag(identity) if identity else None  # '' = none, as in XManager
        if ident_tag is not None:
            if ident_tag in self._by_identity:
                return self._by_identity[ident_tag]
        await self._validate_executors(members)
        params = {key: job.executor.runner_parameters(job.executable.runner_parameters(job.args, job.env_vars))
                  for key, job in members.items()}

        # Everything above checked the input; what follows talks to the server and runs in
        # the background, so a sweep's adds run at Python speed (as in XManager).
        parameters = display_args if isinstance(display_args, dict) else {"args": display_args}
        if isinstance(role, AuxiliaryUnitRole):
            wid, kind = len(self._auxiliary_units) + 1, KIND_AUXILIARY_UNIT
            wu: WorkUnit = AuxiliaryUnit(self, wid, parameters, role, identity=identity)
            self._auxiliary_units.append(wu)
        else:
            wid, kind = self._next_id, KIND_WORK_UNIT
            self._next_id += 1
            wu = WorkUnit(self, wid, parameters, None, identity=identity)
            self._work_units[wid] = wu
        tags = [TAG_XM, TAG_KIND + kind, TAG_EXPERIMENT + self.experiment_id, wu._unit_tag,
                TAG_JOB_COUNT + str(len(members)), TAG_IMPORTANCE + role.importance.value]
        if ident_tag:
            tags.append(ident_tag)
        wu._start_deadline = start_deadline
        wu._created = asyncio.get_running_loop().create_future()
        if ident_tag:
            self._by_identity[ident_tag] = wu
        ms = [_Member(key, job, params[key]) for key, job in members.items()]

        async def create() -> None:
            client = await _client()
            link = await _link_task_run(client, self.flow_run_id, f"{kind}-{wid}", f"xm.{kind.replace('-', '_')}",
                                        str(wid))
            run = await client.create_flow_run(
                xm_work_unit, name=f"{self.experiment_title}-{wu._unit_label}", parameters=parameters, tags=tags,
                parent_task_run_id=link.id, state=Pending(),
            )
            wu.flow_run_id, wu._link_task_run_id = run.id, link.id

        wu._task = asyncio.ensure_future(self._run_work_unit(wu, ms, create))
        return wu

    async def _read_watched(self, ids: Sequence[UUID], fresh_from: float) -> dict[UUID, Any]:
        """The runs of `ids` from one read shared by every work unit this launcher watches
        (one request per poll, not one per work unit), begun no earlier than `fresh_from`
        (loop time)."""
        self._watched.update(ids)
        while (self._snapshot is None or self._snapshot[0] < fresh_from
               or not self._snapshot[1].issuperset(ids)):
            if self._snapshot_task is None or self._snapshot_task.done():
                self._snapshot_task = asyncio.ensure_future(self._take_snapshot())
            await asyncio.shield(self._snapshot_task)
        runs = self._snapshot[2]
        return {i: runs[i] for i in ids if i in runs}

    async def _take_snapshot(self) -> None:
        started = asyncio.get_running_loop().time()
        watched = set(self._watched)
        runs = await _read_runs(await _client(), tags=[], ids=list(watched))
        self._snapshot = (started, watched, {r.id: r for r in runs})

    def _creation_slots(self) -> asyncio.Semaphore:
        """How many work units are being created at once (their runs, links and jobs):
        enough to keep the server busy, few enough not to flood it."""
        if self._creating is None:
            self._creating = asyncio.Semaphore(CREATION_CONCURRENCY)
        return self._creating

    def creation_errors(self) -> dict[int, BaseException]:
        return {wid: wu.creation_error for wid, wu in self._work_units.items() if wu.creation_error is not None}

    # ---------------------------------------------------------------- orchestration

    async def _submit(self, wu: WorkUnit, m: _Member, gang_tags: Sequence[str] = ()) -> None:
        from prefect.states import Pending

        from prefect_xm.flows.job_runner import run_job

        client = await _client()
        tags = [TAG_XM, TAG_KIND + KIND_JOB, TAG_EXPERIMENT + self.experiment_id, wu._unit_tag, *gang_tags,
                TAG_JOB + m.key]
        name = f"{self.experiment_title}-{wu._unit_label}-{m.key}"
        link = await _link_task_run(client, wu.flow_run_id, f"job-{m.key}", "xm.job", m.key)
        m.link_id = link.id
        if m.is_local:
            run = await client.create_flow_run(run_job, name=name, parameters=m.params, tags=tags,
                                               parent_task_run_id=link.id, state=Pending())
        else:
            pool = m.job.executor.work_pool_name
            deployment_id = await ensure_job_runner_deployment(pool)
            run = await client.create_flow_run_from_deployment(
                deployment_id, parameters=m.params, name=name, tags=tags, parent_task_run_id=link.id,
                job_variables=m.job.executor.job_variables_for(m.job.executable),
            )
        m.flow_run_id = run.id

    @staticmethod
    async def _start_local(wu: WorkUnit, m: _Member) -> None:
        """Runs a Local job's program here; this process writes its run's states and logs
        (no flow engine per job: see job_runner.run_direct). With the executor's
        experimental_stream_output (XManager's default), its lines also reach this
        terminal, each prefixed with the job's unit and name."""
        from prefect_xm.flows.job_runner import run_direct

        prefix = f"[{wu._unit_label}/{m.key}] "

        def echo(line: str, is_stderr: bool) -> None:
            print(prefix + line, file=sys.stderr if is_stderr else sys.stdout, flush=True)
        stream = getattr(m.job.executor, "experimental_stream_output", False)
        await run_direct(await _client(), m.flow_run_id, m.params, echo=echo if stream else None)

    async def _cancel_members(self, members: Sequence[_Member], reason: str) -> None:
        """Cancels members that are not final and waits until they are (gang semantics)."""
        from prefect.states import Cancelled, Cancelling

        client = await _client()
        for m in members:
            if m.flow_run_id is None or m.state_type in _FINAL:
                if m.flow_run_id is None and m.local_task is not None:
                    m.local_task.cancel()
                continue
            not_started = m.state_type in _NOT_STARTED if m.is_local else m.state_type == "SCHEDULED"
            state = Cancelled(message=reason) if not_started else Cancelling(message=reason)
            await client.set_flow_run_state(m.flow_run_id, state, force=True)
            if m.local_task is not None:
                m.local_task.cancel()  # kills the program and records Cancelled
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_DEADLINE_SECONDS
        pending = [m for m in members if m.flow_run_id is not None]
        while pending:
            runs = await _read_runs(client, tags=[], ids=[m.flow_run_id for m in pending])
            by_id = {r.id: r for r in runs}
            for m in pending:
                r = by_id.get(m.flow_run_id)
                if r is not None:
                    m.state_type, m.message = _state_type(r), (r.state.message or "") if r.state else ""
            pending = [m for m in pending if m.state_type not in _FINAL]
            if not pending:
                break
            if loop.time() > deadline:
                for m in pending:
                    if m.is_local:
                        if m.local_task is not None:
                            m.local_task.cancel()  # the job runner kills its process group
                        await client.set_flow_run_state(m.flow_run_id, Cancelled(message=reason), force=True)
                        m.state_type = "CANCELLED"
                    else:
                        log.warning("job %r (flow run %s) is still %s after cancellation; its pool's worker "
                                    "must finish cancelling it", m.key, m.flow_run_id, m.state_type)
                break
            await asyncio.sleep(POLL_SECONDS / 2)
        for m in members:
            if m.local_task is not None and not m.local_task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(m.local_task), 15)
                except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    m.local_task.cancel()

    async def _run_work_unit(self, wu: WorkUnit, members: list[_Member],
                             create: Optional[Callable[[], Awaitable[None]]] = None) -> None:
        from prefect.states import Cancelled, Completed, Crashed, Failed, Running

        client = await _client()
        final_type, message = "FAILED", ""
        running_set = False
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
            # Gang: submit every member before starting or watching any of them.
            # Every creation is let finish before a failure is raised: a member created after
            # the cancellation below would be left Pending, never started and never cancelled.
            # A gang all on one pool is told so: a worker whose scheduler starts a gang
            # together (Slurm's heterogeneous jobs) submits its members as one job.
            one_pool = (len(members) > 1 and all(m.job is not None and not m.is_local for m in members)
                        and len({m.job.executor.work_pool_name for m in members}) == 1)
            places = {m.key: gang_tags(str(wu.flow_run_id), i, len(members)) if one_pool else []
                      for i, m in enumerate(members)}
            outcomes = [] if self._stopped else await asyncio.gather(
                *(self._submit(wu, m, places[m.key]) for m in members if m.flow_run_id is None),
                return_exceptions=True)
        try:
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            for m in members:
                if m.is_local and m.job is not None:
                    m.local_task = asyncio.ensure_future(self._start_local(wu, m))
            ids = [m.flow_run_id for m in members] + [wu.flow_run_id]
            loop = asyncio.get_running_loop()
            first_started: Optional[float] = None  # (loop time) when its first member ran
            # members seen running once: one its scheduler requeued (Pending again) has
            # started with the others, and its requeue is its worker's to follow
            ever_started: set[str] = set()
            while True:
                # Which in-process engines had ended is noted before the read: an engine
                # that ends while the read is in flight has its final state missing from
                # that (older) snapshot, and must not be taken for one that never set it.
                noted = asyncio.get_running_loop().time()
                ended_before_read = {m.key for m in members if m.local_task is not None and m.local_task.done()}
                # A read begun after that note for in-process engines; any read of the last
                # poll otherwise (one read serves every work unit watched here).
                fresh_from = noted if any(m.is_local for m in members) else noted - POLL_SECONDS
                runs = await self._read_watched(ids, fresh_from)
                wu_state = _state_type(runs.get(wu.flow_run_id))
                for m in members:
                    r = runs.get(m.flow_run_id)
                    if r is not None:
                        m.state_type = _state_type(r)
                        m.message = (r.state.message or "") if r.state else ""
                    if m.key in ended_before_read and m.state_type not in _FINAL:
                        # The in-process engine ended without a final state: record a crash.
                        exc = m.local_task.exception() if not m.local_task.cancelled() else None
                        m.state_type, m.message = "CRASHED", f"job runner ended without a final state: {exc!r}"
                        await client.set_flow_run_state(m.flow_run_id, Crashed(message=m.message), force=True)
                for m in members:
                    if m.state_type == "CANCELLING" and m.local_task is not None and not m.local_task.done():
                        m.local_task.cancel()  # cancelled from outside (UI, API): end its program
                if wu_state in ("CANCELLING", "CANCELLED") or self._stopped:
                    reason = f"work unit {wu.work_unit_id} was cancelled"
                    await self._cancel_members(members, reason)
                    final_type, message = wu._stop_mark or ("CANCELLED", reason)
                    break
                bad = [m for m in members if m.state_type in ("FAILED", "CRASHED")]
                if bad:
                    m = bad[0]
                    what = "crashed" if m.state_type == "CRASHED" else "failed"
                    message = f"job {m.key!r} {what}: {m.message}" if m.message else f"job {m.key!r} {what}"
                    others = [o for o in members if o is not m]
                    if others:
                        await self._cancel_members(others, f"gang member {m.key!r} {what}")
                    final_type = "FAILED"
                    break
                cancelled = [m for m in members if m.state_type == "CANCELLED"]
                if cancelled:
                    m = cancelled[0]
                    message = f"job {m.key!r} was cancelled"
                    await self._cancel_members([o for o in members if o is not m], f"gang member {m.key!r} was cancelled")
                    final_type = "CANCELLED"
                    break
                ever_started.update(m.key for m in members if m.state_type in ("RUNNING", "COMPLETED"))
                started = [m for m in members if m.key in ever_started]
                if started and first_started is None:
                    first_started = loop.time()
                # (only while a started member still runs: one that has ended holds nothing)
                if (first_started is not None and len(started) < len(members)
                        and any(m.state_type == "RUNNING" for m in started)
                        and loop.time() - first_started > wu._start_deadline):
                    waiting = [m.key for m in members if m not in started]
                    message = (f"job(s) {', '.join(map(repr, waiting))} never started within the gang's start "
                               f"deadline ({wu._start_deadline:g} s after {started[0].key!r} started)")
                    await self._cancel_members(members, "the gang did not start together: " + message)
                    final_type = "FAILED"
                    break
                if not running_set and all(m.state_type in ("RUNNING", "COMPLETED") for m in members):
                    await client.set_flow_run_state(wu.flow_run_id, Running(message="every job is running"), force=True)
                    running_set = True
                if all(m.state_type == "COMPLETED" for m in members):
                    final_type, message = "COMPLETED", f"{len(members)} job(s) completed"
                    break
                await asyncio.sleep(POLL_SECONDS)
        except asyncio.CancelledError:
            final_type, message = "CANCELLED", "the launching process stopped the work unit"
            await asyncio.shield(self._cancel_members(members, message))
        except Exception as e:  # submission or API failure: the work unit crashes, members are stopped
            log.exception("work unit %s failed to run", wu.work_unit_id)
            final_type, message = "CRASHED", f"{type(e).__name__}: {e}"
            try:
                await self._cancel_members(members, f"work unit {wu.work_unit_id} crashed")
            except Exception:
                pass
        self._watched.difference_update([m.flow_run_id for m in members] + [wu.flow_run_id])
        # Final states, mirrored on the link task runs.
        for m in members:
            await _finish_task_run(client, m.link_id, m.state_type, m.message)
        if final_type == "COMPLETED" and not running_set:
            await client.set_flow_run_state(wu.flow_run_id, Running(), force=True)
        state = {"COMPLETED": Completed, "CANCELLED": Cancelled, "CRASHED": Crashed}.get(final_type, Failed)(message=message)
        await client.set_flow_run_state(wu.flow_run_id, state, force=True)
        await _finish_task_run(client, wu._link_task_run_id, final_type, message)
        self._mark_summary_dirty()
        await self._update_summary()

    # ---------------------------------------------------------------- summary

    def _mark_summary_dirty(self) -> None:
        self._summary_dirty = True
        asyncio.ensure_future(self._update_summary())

    async def summary_rows(self) -> list[dict[str, Any]]:
        client = await _client()
        runs = await _read_runs(client, tags=[TAG_KIND + KIND_WORK_UNIT, TAG_EXPERIMENT + self.experiment_id])
        jobs = await _read_runs(client, tags=[TAG_KIND + KIND_JOB, TAG_EXPERIMENT + self.experiment_id])
        spans: dict[str, list] = {}
        now = datetime.datetime.now(datetime.timezone.utc)
        for j in jobs:
            if j.start_time is None:
                continue
            wid = _tag_value(j.tags, TAG_WORK_UNIT)
            end = j.end_time or (now if _state_type(j) not in _FINAL else j.start_time)
            span = spans.setdefault(wid, [j.start_time, end])
            span[0], span[1] = min(span[0], j.start_time), max(span[1], end)
        rows = []
        for r in runs:
            wid = _tag_value(r.tags, TAG_WORK_UNIT)
            span = spans.get(wid)
            # Duration: from the first job's start to the last job's end (the gang's span).
            seconds = (span[1] - span[0]).total_seconds() if span else _duration(r)
            rows.append({
                "work_unit": int(wid) if wid and wid.isdigit() else wid,
                "args": _args_text(r.parameters or {}),
                "state": r.state.name if r.state else "Pending",
                "duration": format_duration(seconds),
                "message": (r.state.message or "") if r.state and r.state.type.value != "COMPLETED" else "",
            })
        rows.sort(key=lambda row: (not isinstance(row["work_unit"], int), row["work_unit"]))
        return rows

    async def _update_summary(self) -> None:
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        if self._summary_lock is None:
            self._summary_lock = asyncio.Lock()
        async with self._summary_lock:
            if not self._summary_dirty:
                return
            self._summary_dirty = False
            try:
                client = await _client()
                rows = await self.summary_rows()
                data = json.dumps(rows)
                description = f"Work units of experiment {self.experiment_id} ({self.experiment_title})"
                if self._artifact_id is None:
                    art = await client.create_artifact(ArtifactCreate(
                        key=self.summary_artifact_key, type="table", data=data, description=description,
                        flow_run_id=self.flow_run_id))
                    self._artifact_id = art.id
                else:
                    await client.update_artifact(self._artifact_id, ArtifactUpdate(data=data))
            except Exception as e:
                log.warning("could not update the summary artifact of experiment %s: %s", self.experiment_id, e)

    # ---------------------------------------------------------------- wait / stop / close

    async def _wait_all(self) -> dict[int, ExperimentUnitStatus]:
        await self._load()
        tasks = [wu._task for wu in self._work_units.values() if wu._task is not None]
        if tasks:
            gathered = asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
            if PROGRESS_HOOK is None:
                await gathered
            else:
                last = None
                while True:
                    done, _ = await asyncio.wait({gathered}, timeout=POLL_SECONDS)
                    try:
                        counts = await self._counts()
                        if counts != last:
                            last = counts
                            PROGRESS_HOOK(self, counts)
                    except Exception as e:  # progress is cosmetic
                        log.debug("progress: %s", e)
                    if done:
                        break
        failed = self.creation_errors()
        if failed:
            raise RuntimeError(f"{len(failed)} work unit(s) could not be created: " + "; ".join(
                f"work unit {wid}: {type(e).__name__}: {e}" for wid, e in sorted(failed.items())))
        statuses = {}
        for wid, wu in sorted(self._work_units.items()):
            statuses[wid] = await wu._wait()
        return statuses

    def wait_until_complete(self) -> Any:
        """Waits until every work unit is final; returns {work_unit_id: status}."""
        return dual(self._wait_all)

    async def _stop(self, reason: str = "experiment stopped by the user") -> None:
        from prefect.states import Cancelled, Cancelling

        await self._load()
        self._stopped = True
        client = await _client()
        units = [*self._work_units.values(), *self._auxiliary_units]
        local_ids = {wu.flow_run_id for wu in units if wu._task is not None}
        wus = await _read_runs(client, tags=[TAG_KIND + KIND_WORK_UNIT, TAG_EXPERIMENT + self.experiment_id])
        wus += await _read_runs(client, tags=[TAG_KIND + KIND_AUXILIARY_UNIT, TAG_EXPERIMENT + self.experiment_id])
        for r in wus:
            if _state_type(r) not in _FINAL:
                await client.set_flow_run_state(r.id, Cancelling(message=reason), force=True)
        # Work units driven by another (or no) process: cancel their jobs directly.
        jobs = await _read_runs(client, tags=[TAG_KIND + KIND_JOB, TAG_EXPERIMENT + self.experiment_id])
        for r in jobs:
            wid = _tag_value(r.tags, TAG_WORK_UNIT)
            wu = self._work_units.get(int(wid)) if wid and wid.isdigit() else None
            aid = _tag_value(r.tags, TAG_AUXILIARY_UNIT)
            if aid and aid.isdigit() and 0 < int(aid) <= len(self._auxiliary_units):
                wu = self._auxiliary_units[int(aid) - 1]
            if wu is not None and wu.flow_run_id in local_ids:
                continue
            st = _state_type(r)
            if st in _FINAL:
                continue
            state = Cancelled(message=reason) if st == "SCHEDULED" else Cancelling(message=reason)
            await client.set_flow_run_state(r.id, state, force=True)
        tasks = [wu._task for wu in units if wu._task is not None]
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
        # Work units nobody drives (their launcher is gone): record them as Cancelled.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * CANCEL_DEADLINE_SECONDS / 3
        while True:
            wus = await _read_runs(client, tags=[TAG_KIND + KIND_WORK_UNIT, TAG_EXPERIMENT + self.experiment_id])
            left = [r for r in wus if _state_type(r) not in _FINAL]
            if not left or loop.time() > deadline:
                break
            jobs = await _read_runs(client, tags=[TAG_KIND + KIND_JOB, TAG_EXPERIMENT + self.experiment_id])
            for r in left:
                wid = _tag_value(r.tags, TAG_WORK_UNIT)
                mine = [j for j in jobs if _tag_value(j.tags, TAG_WORK_UNIT) == wid]
                if all(_state_type(j) in _FINAL for j in mine):
                    await client.set_flow_run_state(r.id, Cancelled(message=reason), force=True)
            await asyncio.sleep(POLL_SECONDS)
        self._mark_summary_dirty()
        await self._finish_run(reason)

    def stop(self) -> Any:
        """Cancels every work unit of the experiment and ends its run Cancelled."""
        return dual(self._stop)

    async def _counts(self) -> dict[str, int]:
        client = await _client()
        wus = await _read_runs(client, tags=[TAG_KIND + KIND_WORK_UNIT, TAG_EXPERIMENT + self.experiment_id])
        counts: dict[str, int] = {}
        for r in wus:
            name = r.state.name if r.state else "Pending"
            counts[name] = counts.get(name, 0) + 1
        return counts

    async def _finish_run(self, stop_reason: Optional[str] = None) -> str:
        state = await self._final_state(stop_reason)
        client = await _client()
        if self._heartbeat is not None:
            # (before the final state: a beat after it would start a wait for the next one)
            self._heartbeat.cancel()
            self._heartbeat = None
        await client.set_flow_run_state(self.flow_run_id, state, force=True)
        self._summary_dirty = True
        await self._update_summary()
        return state.type.value

    async def _final_state(self, stop_reason: Optional[str] = None):
        """The experiment run's final state, from its work units' states."""
        from prefect.states import Cancelled, Completed, Failed

        client = await _client()
        wus = await _read_runs(client, tags=[TAG_KIND + KIND_WORK_UNIT, TAG_EXPERIMENT + self.experiment_id])
        counts: dict[str, int] = {}
        for r in wus:
            counts[_state_type(r)] = counts.get(_state_type(r), 0) + 1
        summary = ", ".join(f"{n} {t.lower()}" for t, n in sorted(counts.items())) or "no work units"
        failed = self.creation_errors()
        if failed:
            summary += f"; {len(failed)} could not be created (work unit {min(failed)}: {failed[min(failed)]})"
        if counts.get("FAILED", 0) + counts.get("CRASHED", 0) or failed:
            state = Failed(message=f"work units: {summary}")
        elif self._stopped or counts.get("CANCELLED", 0):
            state = Cancelled(message=f"{stop_reason or 'work units were cancelled'}: {summary}")
        else:
            state = Completed(message=f"work units: {summary}")
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

        client = await _client()
        run = await client.read_flow_run(self.flow_run_id)
        await self._load()
        window = launcher.gone_after_seconds()
        orphans = [wu for wu in self._work_units.values()
                   if wu._task is None and wu._loaded_state is not None and wu._loaded_state not in _FINAL]
        if orphans and _state_type(run) not in _FINAL:
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
        elif _state_type(run) != "RUNNING":
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

        client = await _client()
        runs = await _read_runs(client, tags=[TAG_KIND + KIND_JOB, TAG_EXPERIMENT + self.experiment_id,
                                              TAG_WORK_UNIT + str(wu.work_unit_id)])
        members = [_Member.from_run(r) for r in runs]
        for m in members:
            if m.is_local and m.state_type not in _FINAL:
                m.state_type = "CRASHED"
                m.message = "its launcher died while it ran in it (a Local job cannot be re-attached)"
                await client.set_flow_run_state(m.flow_run_id, Crashed(message=m.message), force=True)
        expected = int(wu._job_count) if wu._job_count and wu._job_count.isdigit() else len(members)
        if len(members) < expected:
            # The gang is incomplete and its missing jobs are unknown here: stop the rest.
            message = (f"its launcher died after creating {len(members)} of its {expected} jobs; "
                       f"the others were never submitted")
            await self._cancel_members(members, message)
            await client.set_flow_run_state(wu.flow_run_id, Crashed(message=message), force=True)
            await _finish_task_run(client, wu._link_task_run_id, "CRASHED", message)
            self._mark_summary_dirty()
            return
        await self._run_work_unit(wu, members)

    def __enter__(self) -> "Experiment":
        _install_sigterm_handler()
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
            return ExperimentUnitStatus.from_state((await (await _client()).read_flow_run(self.flow_run_id)).state)
        return Runtime.get().run(go())


def _install_sigterm_handler() -> None:
    """SIGTERM on a launch script -> KeyboardInterrupt, so `with` blocks stop their work
    units (and kill Local jobs) instead of dying and leaving runs and processes behind.
    Only when SIGTERM has its default disposition and we are on the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)


class _GeneratorWorkUnit:
    """What a job generator receives as `work_unit`: collects its `add` calls, and knows
    the id the work unit will get (XManager predicts it too) for names built from it."""

    def __init__(self, experiment: "Experiment", work_unit_id: int) -> None:
        self._jobs: dict[str, Union[Job, JobGroup]] = {}
        self.experiment = experiment
        self.work_unit_id = work_unit_id

    @property
    def experiment_id(self) -> str:
        return self.experiment.experiment_id

    @property
    def experiment_unit_name(self) -> str:
        return f"{self.experiment_id}_{self.work_unit_id}"

    def get_full_job_name(self, job_name: str) -> str:
        return f"{self.experiment_unit_name}_{job_name}"

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
        return job._job, job.role
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

    from prefect_xm.flows.experiment import xm_experiment

    client = await _client()
    if identity is not None:
        tag = _identity_tag(identity, TAG_EXPERIMENT_IDENTITY)
        found = await _read_runs(client, tags=[TAG_KIND + KIND_EXPERIMENT, tag], limit=1)
        if found:
            return _experiment_from_run(found[0])
    exp_id = secrets.token_hex(4)
    tags = [TAG_XM, TAG_KIND + KIND_EXPERIMENT, TAG_EXPERIMENT + exp_id]
    if identity is not None:
        tags.append(_identity_tag(identity, TAG_EXPERIMENT_IDENTITY))
    run = await client.create_flow_run(
        xm_experiment, name=experiment_title, tags=tags,
        parameters={}, state=Running(message=f"experiment {exp_id}"),
    )
    exp = Experiment(exp_id, experiment_title, run.id)
    exp._loaded = True
    OPENED.append(exp)
    return exp


async def adopt_flow_run(flow_run_id: UUID, experiment_title: str) -> Experiment:
    """Makes a running xm-experiment flow run (started from a deployment) an experiment:
    tags it, names it after the title, returns its Experiment (the flow drives it)."""
    from prefect.client.schemas.actions import FlowRunUpdate  # noqa: F401  (import check)

    client = await _client()
    run = await client.read_flow_run(flow_run_id)
    exp_id = _tag_value(run.tags or [], TAG_EXPERIMENT) or secrets.token_hex(4)
    tags = list(dict.fromkeys(list(run.tags or []) + [TAG_XM, TAG_KIND + KIND_EXPERIMENT, TAG_EXPERIMENT + exp_id]))
    await client.update_flow_run(flow_run_id, name=experiment_title, tags=tags)
    exp = Experiment(exp_id, experiment_title, flow_run_id)
    exp._loaded = True
    return exp


def _experiment_from_run(run) -> Experiment:
    exp_id = _tag_value(run.tags, TAG_EXPERIMENT)
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
        _identity_tag(identity, TAG_EXPERIMENT_IDENTITY)
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
    client = await _client()
    text = str(experiment_id)
    try:
        run = await client.read_flow_run(UUID(text))
        if TAG_KIND + KIND_EXPERIMENT not in (run.tags or []):
            raise ValueError(f"flow run {text} is not an xm experiment")
    except ValueError as e:
        if "not an xm experiment" in str(e):
            raise
        found = await _read_runs(client, tags=[TAG_KIND + KIND_EXPERIMENT, TAG_EXPERIMENT + text], limit=1)
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

    client = await _client()
    runs = await _read_runs(client, tags=[TAG_KIND + KIND_EXPERIMENT], limit=limit, sort=FlowRunSort.ID_DESC)
    runs.sort(key=lambda r: r.created or datetime.datetime.min.replace(tzinfo=datetime.timezone.utc), reverse=True)
    return [_experiment_from_run(r) for r in runs if _tag_value(r.tags, TAG_EXPERIMENT)]


def list_experiments(limit: Optional[int] = None) -> list[Experiment]:
    """Experiments known to the Prefect API, newest first."""
    return Runtime.get().run(_list(limit))


async def experiment_overview(experiment: Experiment) -> dict[str, Any]:
    """State, work units and timing of an experiment, for the CLI."""
    client = await _client()
    run = await client.read_flow_run(experiment.flow_run_id)
    rows = await experiment.summary_rows()
    return {
        "experiment_id": experiment.experiment_id,
        "title": experiment.experiment_title,
        "flow_run_id": str(experiment.flow_run_id),
        "state": run.state.name if run.state else "Pending",
        "state_type": _state_type(run),
        "message": (run.state.message or "") if run.state else "",
        "created": run.created,
        "duration": format_duration(_duration(run)),
        "work_units": rows,
    }
