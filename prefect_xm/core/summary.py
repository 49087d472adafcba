"""What an experiment's runs add up to: the summary table (its artifact, the CLI's
overview) and the progress line printed while a launch script waits."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import sys
from typing import Any, Iterable, Mapping, Optional, Sequence
from uuid import UUID

from prefect.client.schemas.objects import StateType

from prefect_xm.core import store

log = logging.getLogger("prefect_xm")


def work_units_done(counts: Mapping[str, int]) -> int:
    """How many of the work units counted by state name have ended."""
    final_names = {t.value for t in store.FINAL}
    return sum(n for state, n in counts.items() if state.upper() in final_names)


def launch_exit_code(ends: Iterable[Any]) -> int:
    """A launch's exit code from the state types its experiments ended in: 1 when one
    did not complete (a work unit failed, crashed or was cancelled), 0 when all did.
    `prefect-xm launch` and a launch script run as a program decide it here alike."""
    return 0 if all(end == StateType.COMPLETED for end in ends) else 1


def print_progress(experiment, counts: Mapping[str, int]) -> None:
    """One line on stderr: how many work units are in each state."""
    total = sum(counts.values())
    parts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
    print(f"{experiment.experiment_title} ({experiment.experiment_id}): {work_units_done(counts)}/{total} work "
          f"units done: {parts}", file=sys.stderr, flush=True)


#: Called as PROGRESS_HOOK(experiment, counts) while an experiment waits for its work
#: units, whenever the counts of work-unit states change; None prints nothing.
PROGRESS_HOOK = None if os.environ.get("PREFECT_XM_PROGRESS", "1").lower() in ("0", "false", "no") else print_progress


async def work_unit_counts(client, unit_run_ids: Sequence[Optional[UUID]]) -> dict[str, int]:
    """{state type: how many work units are in it}, from their runs' state types (one read
    of the columns per 1,000 units, where whole runs were a read per 200 each poll); a unit
    whose run is not created yet is Pending."""
    ids = [i for i in unit_run_ids if i is not None]
    types = await store.read_state_types(client, ids)
    if types is None:  # (a server without the UI's history route)
        types = {r.id: store.state_type(r) for r in await store.read_runs(client, tags=[], ids=ids)}
    counts: dict[str, int] = {}
    for i in unit_run_ids:
        state = types.get(i, StateType.PENDING).value if i is not None else StateType.PENDING.value
        counts[state] = counts.get(state, 0) + 1
    return counts


def duration(run) -> Optional[float]:
    if run is None or run.start_time is None:
        return None
    end = run.end_time
    if end is None:
        if store.state_type(run) in store.FINAL:
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


def args_text(args: Any) -> str:
    if isinstance(args, Mapping):
        return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in args.items())
    return json.dumps(args)


async def summary_rows(client, experiment_id: store.ExperimentId) -> list[dict[str, Any]]:
    """One row per work unit: its args, state, duration and message."""
    runs = await store.experiment_runs(client, experiment_id)
    jobs = await store.experiment_runs(client, experiment_id, store.KIND_JOB)
    spans: dict[str, list] = {}
    now = datetime.datetime.now(datetime.timezone.utc)
    for j in jobs:
        if j.start_time is None:
            continue
        wid = store.work_unit_of(j)
        end = j.end_time or (now if store.state_type(j) not in store.FINAL else j.start_time)
        span = spans.setdefault(wid, [j.start_time, end])
        span[0], span[1] = min(span[0], j.start_time), max(span[1], end)
    rows = []
    for r in runs:
        wid = store.work_unit_of(r)
        span = spans.get(wid)
        # Duration: from the first job's start to the last job's end (the gang's span).
        seconds = (span[1] - span[0]).total_seconds() if span else duration(r)
        rows.append({
            "work_unit": int(wid) if wid and wid.isdigit() else wid,
            "args": args_text(r.parameters or {}),
            "state": store.state_name(r),
            "duration": format_duration(seconds),
            "message": store.state_message(r) if r.state and r.state.type != StateType.COMPLETED else "",
        })
    rows.sort(key=lambda row: (not isinstance(row["work_unit"], int), row["work_unit"]))
    return rows


#: seconds between two rewrites of the summary while work units end (each rewrite reads
#: every work unit: a 1,000-unit sweep rewrote it after each unit's end)
REWRITE_SECONDS = float(os.environ.get("PREFECT_XM_SUMMARY_SECONDS", "5"))


class SummaryArtifact:
    """The experiment's table artifact (key ``xm-summary-<id>``), rewritten when it is
    marked out of date, at most once per REWRITE_SECONDS (refresh() at once); one
    rewrite at a time, and none while it is current."""

    def __init__(self, experiment) -> None:
        self.experiment = experiment
        self._artifact_id: Optional[UUID] = None
        self._lock: Optional[asyncio.Lock] = None
        self._dirty = False
        self._last_rewrite: Optional[float] = None  # (loop time)
        self._wanted_now: Optional[asyncio.Event] = None
        self._scheduled: Optional[asyncio.Future] = None  # the background rewrite, one at a time

    @property
    def key(self) -> str:
        return f"xm-summary-{self.experiment.experiment_id}".lower()

    def mark_dirty(self) -> None:
        """Marks it out of date and rewrites it in the background (on the running loop)."""
        self._dirty = True
        if self._scheduled is None or self._scheduled.done():
            self._scheduled = asyncio.ensure_future(self._rewrite_while_dirty())

    async def _rewrite_while_dirty(self) -> None:
        while self._dirty:
            await self.update()

    async def refresh(self) -> None:
        """Rewrites it now (a rewrite waiting for its interval goes at once)."""
        self._dirty = True
        if self._wanted_now is not None:
            self._wanted_now.set()
        await self.update(at_once=True)

    async def update(self, at_once: bool = False) -> None:
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            loop = asyncio.get_running_loop()
            if not self._dirty:
                return
            if not at_once and self._last_rewrite is not None:
                # what ends meanwhile is in this rewrite; the callers waiting behind it find it current
                self._wanted_now = asyncio.Event()
                try:
                    await asyncio.wait_for(self._wanted_now.wait(),
                                           max(0.0, self._last_rewrite + REWRITE_SECONDS - loop.time()))
                except asyncio.TimeoutError:
                    pass
            if not self._dirty:
                return
            self._dirty = False
            self._last_rewrite = loop.time()
            experiment = self.experiment
            try:
                client = await store.client()
                rows = await summary_rows(client, experiment.experiment_id)
                data = json.dumps(rows)
                description = f"Work units of experiment {experiment.experiment_id} ({experiment.experiment_title})"
                if self._artifact_id is None:
                    art = await client.create_artifact(ArtifactCreate(
                        key=self.key, type="table", data=data, description=description,
                        flow_run_id=experiment.flow_run_id))
                    self._artifact_id = art.id
                else:
                    await client.update_artifact(self._artifact_id, ArtifactUpdate(data=data))
            except Exception as e:
                log.warning("could not update the summary artifact of experiment %s: %s", experiment.experiment_id, e)


async def experiment_overview(experiment) -> dict[str, Any]:
    """State, work units and timing of an experiment, for the CLI."""
    client = await store.client()
    run = await client.read_flow_run(experiment.flow_run_id)
    rows = await summary_rows(client, experiment.experiment_id)
    return {
        "experiment_id": experiment.experiment_id,
        "title": experiment.experiment_title,
        "flow_run_id": str(experiment.flow_run_id),
        "state": store.state_name(run),
        "state_type": store.state_type(run),
        "message": store.state_message(run),
        "created": run.created,
        "duration": format_duration(duration(run)),
        "work_units": rows,
    }


async def job_states_by_work_unit(client, experiment_id: store.ExperimentId) -> dict[str, list[str]]:
    """{work unit id: ["<job>=<state name>", ...]}, jobs in the order of their runs' names."""
    jobs = await store.experiment_runs(client, experiment_id, store.KIND_JOB)
    per_wu: dict[str, list[str]] = {}
    for j in sorted(jobs, key=lambda r: r.name):
        wid = store.work_unit_of(j)
        per_wu.setdefault(wid, []).append(f"{store.job_key_of(j)}={store.state_name(j)}")
    return per_wu


# -- the documents `prefect-xm list --json` and `show --json` print ------------------------


def _iso(moment: Optional[datetime.datetime]) -> Optional[str]:
    return moment.isoformat() if moment is not None else None


def _state_fields(run) -> dict[str, Any]:
    return {"state": store.state_name(run), "state_type": store.state_type(run).value,
            "message": store.state_message(run)}


def _unit_id(text: Optional[str]) -> Any:
    return int(text) if text and text.isdigit() else text


def _job_document(run) -> dict[str, Any]:
    return {"name": store.job_key_of(run) or run.name, **_state_fields(run), "flow_run_id": str(run.id),
            "work_pool": run.work_pool_name, "start_time": _iso(run.start_time), "end_time": _iso(run.end_time)}


def _unit_document(run, jobs: list) -> dict[str, Any]:
    return {"id": _unit_id(store.work_unit_of(run) or store.auxiliary_unit_of(run)), **_state_fields(run),
            "args": jsonable_parameters(run.parameters), "identity": store.identity_in(store.identity_tag_of(run)),
            "flow_run_id": str(run.id), "start_time": _iso(run.start_time), "end_time": _iso(run.end_time),
            "jobs": [_job_document(j) for j in sorted(jobs, key=lambda j: store.job_key_of(j) or j.name)]}


def jsonable_parameters(parameters: Any) -> Any:
    """A run's parameters (a unit's args) as JSON takes them (what it cannot, as text)."""
    return json.loads(json.dumps(parameters or {}, default=str))


async def experiment_document(experiment, *, with_units: bool) -> dict[str, Any]:
    """An experiment as a stable JSON document: its id, title, state, times and how many
    work units are in each state; `with_units`, each work unit (and auxiliary unit) with
    its args, state and jobs (their states and flow run ids)."""
    client = await store.client()
    run = await client.read_flow_run(experiment.flow_run_id)
    units = await store.experiment_runs(client, experiment.experiment_id)
    counts: dict[str, int] = {}
    for r in units:
        counts[store.state_name(r)] = counts.get(store.state_name(r), 0) + 1
    doc: dict[str, Any] = {
        "id": experiment.experiment_id, "title": experiment.experiment_title, "flow_run_id": str(run.id),
        **_state_fields(run), "created": _iso(run.created), "start_time": _iso(run.start_time),
        "end_time": _iso(run.end_time), "work_unit_count": len(units), "work_unit_states": dict(sorted(counts.items())),
    }
    if with_units:
        jobs = await store.experiment_runs(client, experiment.experiment_id, store.KIND_JOB)
        auxiliary = await store.experiment_runs(client, experiment.experiment_id, store.KIND_AUXILIARY_UNIT)

        def documents(runs: list, unit_of) -> list[dict[str, Any]]:
            by_unit: dict[Optional[str], list] = {}
            for j in jobs:
                by_unit.setdefault(unit_of(j), []).append(j)
            docs = [_unit_document(r, by_unit.get(unit_of(r), [])) for r in runs]
            return sorted(docs, key=lambda d: (not isinstance(d["id"], int), d["id"]))

        doc["work_units"] = documents(units, store.work_unit_of)
        doc["auxiliary_units"] = documents(auxiliary, store.auxiliary_unit_of)
    return doc
