"""Work units and auxiliary units: the handles a launch script gets from
`experiment.add` (XManager's WorkUnit: status, waiting, stopping, its jobs), read from and
written to their Prefect flow runs through the store."""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
from typing import Any, Awaitable, Callable, Mapping, Optional, Protocol, Union
from uuid import UUID

from prefect.client.schemas.objects import StateType

from prefect_xm.core import store
from prefect_xm.core.job_blocks import DEFAULT_START_DEADLINE_SECONDS, Job, JobGroup, apply_args
from prefect_xm.core.metadata import MetadataContext, metadata_context
from prefect_xm.core.orchestration import POLL_SECONDS
from prefect_xm.core.roles import AuxiliaryUnitRole
from prefect_xm.core.runtime import Runtime, dual, in_event_loop
from prefect_xm.core.status import (
    ExperimentUnitError,
    ExperimentUnitFailedError,
    ExperimentUnitNotCompletedError,
    ExperimentUnitStatus,
)



class OwningExperiment(Protocol):
    """What a unit reads of the experiment it belongs to (core/experiment.py's Experiment)."""

    experiment_id: store.ExperimentId
    experiment_title: str

@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchedJob:
    """XManager's read-only view of a job added to a work unit."""

    name: str
    address: Optional[str] = None
    logs: Optional[str] = None



class AddedWorkUnits(list):
    """The work units of `add(job, args=[...])`: a list, awaitable as one WorkUnit is, so
    `await experiment.add(job, args=[...])` works in async launch scripts."""

    def __await__(self):
        async def me():
            return self
        return me().__await__()

class WorkUnitCompletedAwaitable(collections.abc.Coroutine):
    """XManager's awaitable of a work unit's completion (`wait_until_complete()` in async
    code): a coroutine, so asyncio.create_task and asyncio.wait take it, that gives its
    work unit, or raises ExperimentUnitError."""

    def __init__(self, work_unit: "WorkUnit", awaitable: Callable[[], Awaitable[Any]]) -> None:
        self.work_unit = work_unit
        self._coroutine = self._wait(awaitable)

    async def _wait(self, awaitable: Callable[[], Awaitable[Any]]) -> "WorkUnit":
        await awaitable()
        return self.work_unit

    def __await__(self):
        return self._coroutine.__await__()

    def send(self, value: Any) -> Any:
        return self._coroutine.send(value)

    def throw(self, *args: Any) -> Any:
        return self._coroutine.throw(*args)

    def close(self) -> None:
        self._coroutine.close()

class UnitNames:
    """XManager's names of a work unit, from its experiment and id: the unit itself and
    what a job generator receives as it (before the unit exists) say the same."""

    experiment: OwningExperiment
    work_unit_id: int

    @property
    def experiment_id(self) -> store.ExperimentId:
        return self.experiment.experiment_id

    @property
    def experiment_unit_name(self) -> str:
        return f"{self.experiment_id}_{self.work_unit_id}"

    def get_full_job_name(self, job_name: str) -> str:
        """A job's full name, as XManager spells it: `<experiment id>_<work unit id>_<job>`."""
        return f"{self.experiment_unit_name}_{job_name}"


class GeneratorWorkUnit(UnitNames):
    """What a job generator receives as `work_unit`: collects its `add` calls, and knows
    the id the work unit will get (XManager predicts it too) for names built from it."""

    def __init__(self, experiment: OwningExperiment, work_unit_id: int) -> None:
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


class WorkUnit(UnitNames):
    """One trial of an experiment (a Job or a gang-scheduled JobGroup)."""

    def __init__(self, experiment: OwningExperiment, work_unit_id: int, args: Any, flow_run_id: Optional[UUID],
                 identity: Optional[str] = None) -> None:
        self.experiment = experiment
        self.work_unit_id = work_unit_id
        self.args = args
        #: None while its run is being created in the background (see Experiment._add)
        self.flow_run_id = flow_run_id
        self.identity = identity
        self._task: Optional[asyncio.Task] = None  # the orchestration, when launched here
        #: its gang's members as the orchestration here follows them (orchestration.Member)
        self._members: list = []
        #: the task run in the experiment's run that links its run there
        self.link_task_run_id: Optional[UUID] = None
        #: as read when the experiment was reopened: its state type, and its job count tag
        self._loaded_state: Optional[StateType] = None
        self._job_count: Optional[str] = None
        #: set once its flow run exists (or its creation failed: the error)
        self._created: Optional[asyncio.Future] = None
        self.creation_error: Optional[BaseException] = None
        #: how a stop() asked it to end (XManager's mark_as_failed/completed): state type, message
        self.stop_mark: Optional[tuple[StateType, str]] = None
        #: seconds its gang may stay half started (a JobGroup's StartDeadline, or the default)
        self.start_deadline = DEFAULT_START_DEADLINE_SECONDS

    async def _run_id(self) -> UUID:
        """Its flow run's id, once the background creation has made it; the creation's
        error if it failed."""
        if self.flow_run_id is None and self._created is not None:
            await asyncio.shield(self._created)
        if self.creation_error is not None:
            raise RuntimeError(f"work unit {self.work_unit_id} could not be created: {self.creation_error}")
        assert self.flow_run_id is not None
        return self.flow_run_id


    @property
    def context(self) -> MetadataContext:
        """XManager's metadata context: its title is the unit's flow run name."""
        async def set_title(title: str) -> None:
            client = await store.client()
            await client.update_flow_run(await self._run_id(), name=title)
            self._title = title

        return metadata_context(lambda: getattr(self, "_title", None) or
                                f"{self.experiment.experiment_title}-{self.unit_label}", set_title)

    #: what its runs' tags and names call it
    @property
    def unit_tag(self) -> str:
        return store.unit_tag(store.KIND_WORK_UNIT, self.work_unit_id)

    @property
    def unit_label(self) -> str:
        return f"wu{self.work_unit_id}"

    def __repr__(self) -> str:
        return f"WorkUnit(experiment_id={self.experiment_id!r}, work_unit_id={self.work_unit_id}, args={self.args!r})"

    def __await__(self):  # `await experiment.add(...)` in async launch scripts
        async def me():
            return self
        return me().__await__()

    async def _read_run(self):
        client = await store.client()
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
        """Waits until the work unit is final and returns it, as XManager does; raises
        ExperimentUnitFailedError when a job failed and ExperimentUnitNotCompletedError
        when it was stopped. `get_status()` tells more. In async code, a
        WorkUnitCompletedAwaitable: its `work_unit` says which unit it waits for."""
        if not in_event_loop():
            return Runtime.get().run(self._wait_completed())
        return WorkUnitCompletedAwaitable(self, lambda: Runtime.get().arun(self._wait_completed()))

    @property
    def launched_jobs(self) -> list[LaunchedJob]:
        """XManager's view of the unit's jobs: one per Job added (each member of a group),
        its address where it runs (the worker's infrastructure id: `slurm:<cluster>:<job>`,
        a process id) and its logs (the job's flow run in the Prefect UI)."""
        async def read() -> list[LaunchedJob]:
            from prefect.settings import PREFECT_UI_URL

            ui = PREFECT_UI_URL.value()
            runs = await self._job_runs()
            return [LaunchedJob(name=store.job_key_of(r) or r.name,
                                address=r.infrastructure_pid,
                                logs=f"{ui.rstrip('/')}/runs/flow-run/{r.id}" if ui else None)
                    for r in sorted(runs, key=lambda r: store.job_key_of(r) or r.name)]

        return Runtime.get().run(read())

    async def _request_stop(self, reason: str = "stopped by the user", mark: Optional[StateType] = None) -> None:
        from prefect.states import Cancelling

        if mark is not None:
            if self._task is None:
                raise ValueError(
                    f"stop(mark_as_{mark.value.lower()}=True) on work unit {self.work_unit_id}: only the launch "
                    "script driving it can mark how it ends; stop() without it cancels it from here")
            self.stop_mark = (mark, reason)
        client = await store.client()
        # Proposed, not forced, and no read first: Prefect refuses Cancelling to a run that
        # has ended, so a unit whose own end lands meanwhile keeps it (a read, then a forced
        # Cancelling, overwrote an end that came between the two).
        await client.set_flow_run_state(await self._run_id(), Cancelling(message=reason))

    def stop(self, *, mark_as_failed: bool = False, mark_as_completed: bool = False,
             message: Optional[str] = None) -> Any:
        """Cancels the work unit's jobs, as XManager's `stop`: the unit ends Cancelled, or
        Failed / Completed when marked so, with `message` as its state's message. Returns
        once the request is made (awaitable in async code); `wait_until_complete()` waits."""
        if mark_as_failed and mark_as_completed:
            raise ValueError("stop(): mark_as_failed and mark_as_completed are exclusive, both are True")
        mark = StateType.FAILED if mark_as_failed else StateType.COMPLETED if mark_as_completed else None
        return dual(lambda: self._request_stop(message or "stopped by the user", mark))

    async def _job_runs(self):
        client = await store.client()
        return await store.experiment_runs(client, self.experiment_id, store.KIND_JOB, self.unit_tag)

    def jobs(self) -> dict[str, ExperimentUnitStatus]:
        """{job key: status} of the work unit's job runs."""
        runs = Runtime.get().run(self._job_runs())
        return {(store.job_key_of(r) or r.name): ExperimentUnitStatus.from_state(r.state)
                for r in runs}


class AuxiliaryUnit(WorkUnit):
    """A unit beside the trials (TensorBoard, a controller): its status is not the
    experiment's; once every work unit has ended it is stopped after its role's
    termination_delay_secs, unless it ended first. Its run is tagged
    `xm-kind:auxiliary-unit`, its jobs `xm-auxiliary-unit:<id>`."""

    def __init__(self, experiment: OwningExperiment, unit_id: int, args: Any, role: AuxiliaryUnitRole,
                 identity: Optional[str] = None) -> None:
        super().__init__(experiment, unit_id, args, None, identity=identity)
        self.role = role

    @property
    def experiment_unit_name(self) -> str:
        return f"{self.experiment_id}_aux{self.work_unit_id}"

    @property
    def unit_tag(self) -> str:
        return store.unit_tag(store.KIND_AUXILIARY_UNIT, self.work_unit_id)

    @property
    def unit_label(self) -> str:
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
                                 f"termination delay ({delay:g} s)", StateType.CANCELLED)
        await asyncio.gather(asyncio.shield(self._task), return_exceptions=True)
