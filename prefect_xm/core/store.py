"""The store: Prefect holds every experiment's state, as flow runs and their tags.

- the experiment is a flow run of ``xm-experiment`` named after its title and tagged
  ``xm``, ``xm-kind:experiment``, ``xm-experiment:<id>``; its id is an int, as XManager's (nine digits);
- each work unit is a flow run of ``xm-work-unit`` (a subflow of the experiment run,
  linked through a task run in it) tagged ``xm-kind:work-unit``, ``xm-work-unit:<n>`` and,
  with an identity, ``xm-identity:<identity>``; its parameters are its args;
- each job is a flow run of ``xm-job-runner`` tagged ``xm-kind:job``, ``xm-job:<key>``,
  a subflow of its work unit; Local jobs run in this process, pool jobs are created
  from the ``xm-job-runner/<pool>`` deployment and run by the pool's workers.

This module holds that schema, the reads of it and the state vocabulary (Prefect's
StateType) the rest of the experiment side speaks.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from typing import Iterable, Optional, Sequence, Union
from uuid import UUID

from prefect.client.schemas.objects import StateType

from prefect_xm.core.runtime import Runtime

log = logging.getLogger("prefect_xm")

TAG_XM = "xm"
TAG_KIND = "xm-kind:"
KIND_EXPERIMENT = "experiment"
KIND_WORK_UNIT = "work-unit"
KIND_JOB = "job"
TAG_EXPERIMENT = "xm-experiment:"
TAG_EXPERIMENT_IDENTITY = "xm-experiment-identity:"

#: what an experiment is known by: an int (experiments made before ids were ints keep
#: their hex string)
ExperimentId = Union[int, str]


def new_experiment_id() -> int:
    """Nine random digits: XManager's ids are ints, and an id must be unique without a
    counter to share between launchers on different machines."""
    return 100_000_000 + secrets.randbelow(900_000_000)


def experiment_id_of(tag_value: str) -> ExperimentId:
    """The id an experiment's tag names: an int where the tag is one, exactly."""
    return int(tag_value) if tag_value.isdigit() and str(int(tag_value)) == tag_value else tag_value


def experiment_tag(experiment_id: ExperimentId) -> str:
    return TAG_EXPERIMENT + str(experiment_id)
TAG_WORK_UNIT = "xm-work-unit:"
TAG_IDENTITY = "xm-identity:"
TAG_JOB = "xm-job:"
#: on a work unit's run: how many jobs it has (a launcher that died may have made fewer)
TAG_JOB_COUNT = "xm-jobs:"
KIND_AUXILIARY_UNIT = "auxiliary-unit"
TAG_AUXILIARY_UNIT = "xm-auxiliary-unit:"
TAG_IMPORTANCE = "xm-importance:"

FINAL = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED})
NOT_STARTED = frozenset({StateType.SCHEDULED, StateType.PENDING, StateType.PAUSED})


# -- the tags: written and read here only -------------------------------------------------


def tag_value(tags: Iterable[str], prefix: str) -> Optional[str]:
    for t in tags:
        if t.startswith(prefix):
            return t[len(prefix):]
    return None


def identity_tag(identity: str, prefix: str = TAG_IDENTITY) -> str:
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"identity must be a non-empty string, got {identity!r}")
    if len(identity) <= 80 and re.fullmatch(r"[A-Za-z0-9_.:=,@+\-/]+", identity):
        return prefix + identity
    return prefix + "sha1-" + hashlib.sha1(identity.encode()).hexdigest()


def experiment_identity_tag(identity: str) -> str:
    return identity_tag(identity, TAG_EXPERIMENT_IDENTITY)


def kind_tag(kind: str) -> str:
    return TAG_KIND + kind


def unit_tag(kind: str, unit_id: int) -> str:
    """A work unit's (or auxiliary unit's) tag, carried by its run and its jobs' runs."""
    return (TAG_AUXILIARY_UNIT if kind == KIND_AUXILIARY_UNIT else TAG_WORK_UNIT) + str(unit_id)


def experiment_run_tags(experiment_id: ExperimentId, identity: Optional[str] = None) -> list[str]:
    tags = [TAG_XM, kind_tag(KIND_EXPERIMENT), experiment_tag(experiment_id)]
    return tags + [experiment_identity_tag(identity)] if identity is not None else tags


def unit_run_tags(experiment_id: ExperimentId, kind: str, unit: str, job_count: int, importance: str,
                  identity: Optional[str] = None) -> list[str]:
    tags = [TAG_XM, kind_tag(kind), experiment_tag(experiment_id), unit, TAG_JOB_COUNT + str(job_count),
            TAG_IMPORTANCE + importance]
    return tags + [identity] if identity else tags


def job_run_tags(experiment_id: ExperimentId, unit: str, job_key: str, gang_place: Sequence[str] = ()) -> list[str]:
    return [TAG_XM, kind_tag(KIND_JOB), experiment_tag(experiment_id), unit, *gang_place, TAG_JOB + job_key]


def is_experiment_run(run) -> bool:
    return kind_tag(KIND_EXPERIMENT) in (run.tags or [])


def experiment_of(run) -> Optional[str]:
    """The experiment id a run's tag names (as text: experiment_id_of makes it an id)."""
    return tag_value(run.tags or [], TAG_EXPERIMENT)


def work_unit_of(run) -> Optional[str]:
    return tag_value(run.tags or [], TAG_WORK_UNIT)


def auxiliary_unit_of(run) -> Optional[str]:
    return tag_value(run.tags or [], TAG_AUXILIARY_UNIT)


def job_key_of(run) -> Optional[str]:
    return tag_value(run.tags or [], TAG_JOB)


def job_count_of(run) -> Optional[str]:
    """How many jobs a work unit's run says it has (a launcher that died may have made fewer)."""
    return tag_value(run.tags or [], TAG_JOB_COUNT)


def identity_tag_of(run) -> Optional[str]:
    """A work unit's identity tag, whole (the identity itself may be hashed into it)."""
    return next((t for t in run.tags or [] if t.startswith(TAG_IDENTITY)), None)


def identity_in(tag: Optional[str]) -> Optional[str]:
    return tag[len(TAG_IDENTITY):] if tag else None


def state_type(run) -> StateType:
    """A run's state type; a run not read yet, or without a state, is Pending."""
    return run.state.type if run is not None and run.state is not None else StateType.PENDING


def state_name(run) -> str:
    return run.state.name if run.state else "Pending"


def state_message(run) -> str:
    return (run.state.message or "") if run.state else ""


async def client():
    return await Runtime.get().client()


#: runs read per request (Prefect's server answers at most 200)
READ_PAGE = 200
#: runs' state types read per request (the UI's history route answers up to 1,000)
STATE_PAGE = 1000


async def read_state_types(client, ids: Sequence[UUID]) -> Optional[dict[UUID, StateType]]:
    """The state type of each run, a page per 1,000 runs, through the route Prefect's UI
    draws its run history with (``POST /ui/flow_runs/history``: the columns it needs,
    not whole runs, which cost the server far more to read and send); None if the
    server does not serve it (then read the runs)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    out: dict[UUID, StateType] = {}
    ids = list(ids)
    for start in range(0, len(ids), STATE_PAGE):
        page = ids[start:start + STATE_PAGE]
        body = {"flow_runs": FlowRunFilter(id=FlowRunFilterId(any_=page)).model_dump(mode="json", exclude_unset=True),
                "limit": len(page), "sort": "ID_DESC"}
        response = await client._client.post("/ui/flow_runs/history", json=body)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        for row in response.json():
            out[UUID(row["id"])] = StateType(row["state_type"]) if row.get("state_type") else StateType.PENDING
    return out


async def cancel_pool_run(client, flow_run_id: UUID, reason: str) -> None:
    """Cancels a job run on a pool, from whatever state it is in when this lands: proposed,
    never forced after a read. A run still queued (Scheduled, no infrastructure) becomes
    Cancelled there (Prefect's BypassCancellingFlowRunsWithNoInfra), with `reason` written
    on it; one a worker picked up meanwhile becomes Cancelling, so that worker removes its
    job (a Cancelled forced from a stale read left the job running to its end); an ended
    one keeps its end."""
    from prefect.states import Cancelled, Cancelling

    result = await client.set_flow_run_state(flow_run_id, Cancelling(message=reason))
    if result.state is not None and result.state.type == StateType.CANCELLED and not result.state.message:
        # (that rule's Cancelled carries no message)
        await client.set_flow_run_state(flow_run_id, Cancelled(message=reason), force=True)


async def read_runs(client, *, tags: Sequence[str], ids: Optional[Sequence[UUID]] = None, limit: Optional[int] = None,
                    sort=None):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags

    f = FlowRunFilter(tags=FlowRunFilterTags(all_=list(tags)) if tags else None,
                      id=FlowRunFilterId(any_=list(ids)) if ids is not None else None)
    out = []
    offset = 0
    page = READ_PAGE
    while True:
        batch = await client.read_flow_runs(flow_run_filter=f, limit=page if limit is None else min(page, limit - len(out)),
                                            offset=offset, sort=sort)
        out.extend(batch)
        if len(batch) < page or (limit is not None and len(out) >= limit):
            return out
        offset += len(batch)


async def experiment_runs(client, experiment_id: ExperimentId, kind: str = KIND_WORK_UNIT, unit_tag: Optional[str] = None):
    """The runs of one kind (work units, auxiliary units, jobs) of an experiment; with
    `unit_tag`, only those of that unit."""
    tags = [kind_tag(kind), experiment_tag(experiment_id)]
    if unit_tag is not None:
        tags.append(unit_tag)
    return await read_runs(client, tags=tags)


async def finish_task_run(client, task_run_id: Optional[UUID], state_type: StateType, message: str = "") -> None:
    """Ends a link task run through the API: one a launcher re-attached (the links it
    made itself end as events: task_run_links)."""
    from prefect.states import Cancelled, Completed, Failed

    from prefect_xm.task_run_links import link_end

    if task_run_id is None:
        return
    state = {StateType.COMPLETED: Completed, StateType.CANCELLED: Cancelled, StateType.FAILED: Failed}[
        link_end(state_type)](message=message or None)
    try:
        await client.set_task_run_state(task_run_id, state, force=True)
    except Exception as e:  # cosmetic link only
        log.debug("could not finish link task run %s: %s", task_run_id, e)
