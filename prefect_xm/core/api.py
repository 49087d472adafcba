"""The public Experiment API, as ``xm`` and ``xm_local`` export it: create_experiment,
get_experiment, list_experiments, and adopt_flow_run / drive_adopted for the deployable
experiment flow. The experiment is core/experiment.py's (its lifecycle in
experiment_lifecycle.py); the handles `add` returns are work_units.py's."""

from __future__ import annotations

import datetime
from typing import Any, Awaitable, Callable, Optional, Union
from uuid import UUID

from prefect_xm.core import store
from prefect_xm.core.experiment import CREATION_CONCURRENCY, OPENED, Experiment, PackagedLater
from prefect_xm.core.runtime import Runtime, in_event_loop
from prefect_xm.core.work_units import AuxiliaryUnit, WorkUnit

__all__ = [
    "CREATION_CONCURRENCY", "OPENED", "AuxiliaryUnit", "Experiment", "PackagedLater", "WorkUnit",
    "adopt_flow_run", "create_experiment", "drive_adopted", "get_experiment", "list_experiments",
]

# ------------------------------------------------------------- create / get / list


async def _create(experiment_title: str, identity: Optional[str]) -> Experiment:
    from prefect.states import Running

    from prefect_xm.core.declarations import launched_experiment

    client = await store.client()
    if identity is not None:
        found = await store.read_runs(client, tags=[store.kind_tag(store.KIND_EXPERIMENT),
                                                    store.experiment_identity_tag(identity)], limit=1)
        if found:
            return _experiment_from_run(found[0])
    exp_id = store.new_experiment_id()
    tags = store.experiment_run_tags(exp_id, identity)
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
    tagged = store.experiment_of(run)
    exp_id = store.experiment_id_of(tagged) if tagged else store.new_experiment_id()
    tags = list(dict.fromkeys(list(run.tags or []) + store.experiment_run_tags(exp_id)))
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
    exp_id = store.experiment_id_of(store.experiment_of(run))
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
        store.experiment_identity_tag(identity)
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
        if not store.is_experiment_run(run):
            raise ValueError(f"flow run {text} is not an xm experiment")
    except ValueError as e:
        if "not an xm experiment" in str(e):
            raise
        found = await store.read_runs(client, tags=[store.kind_tag(store.KIND_EXPERIMENT), store.experiment_tag(text)],
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
    # (newest first before the limit: an experiment's run starts Running when it is made;
    # its id, a random UUID, says nothing of its age)
    runs = await store.read_runs(client, tags=[store.kind_tag(store.KIND_EXPERIMENT)], limit=limit,
                                 sort=FlowRunSort.START_TIME_DESC)
    runs.sort(key=lambda r: r.created or datetime.datetime.min.replace(tzinfo=datetime.timezone.utc), reverse=True)
    return [_experiment_from_run(r) for r in runs if store.experiment_of(r)]


def list_experiments(limit: Optional[int] = None) -> list[Experiment]:
    """Experiments known to the Prefect API, newest first."""
    return Runtime.get().run(_list(limit))
