"""Gang orchestration: a work unit's jobs are submitted, started and ended together.

Every member is submitted before any is watched; the work unit is Running once every
member runs; when a member fails or crashes the others are cancelled and the work unit
fails naming it; cancelling the work unit cancels every member.

The functions here are handed the work unit, its members and a Prefect client; the
experiment decides when they run (its creation slots, its summary).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence
from uuid import UUID

from prefect.client.schemas.objects import StateType

from prefect_xm import api_client
from prefect_xm.core import store
from prefect_xm.core.deployments import ensure_in_launcher_deployment, ensure_job_runner_deployment
from prefect_xm.core.job_blocks import Job
from prefect_xm.gang import gang_tags
from prefect_xm.task_run_links import TaskRunLinks

log = logging.getLogger("prefect_xm")

POLL_SECONDS = float(os.environ.get("PREFECT_XM_POLL_SECONDS", "1.0"))
CANCEL_DEADLINE_SECONDS = float(os.environ.get("PREFECT_XM_CANCEL_DEADLINE_SECONDS", "60"))


class Member:
    """One job of a work unit's gang, and what its run was last read to be."""

    def __init__(self, key: str, job: Optional[Job], params: dict[str, Any]) -> None:
        self.key = key
        self.job = job
        self.params = params
        self.flow_run_id: Optional[UUID] = None
        self.link_id: Optional[UUID] = None
        self.local_task: Optional[asyncio.Task] = None
        self.state_type = StateType.PENDING
        self.message = ""
        #: for a member re-attached from its run (no Job at hand): whether it ran here, its pool
        self._local: Optional[bool] = None
        self._pool: Optional[str] = None

    @classmethod
    def from_run(cls, run) -> "Member":
        """A job of a work unit whose launcher died, as its run tells it."""
        m = cls(store.job_key_of(run) or str(run.id), None, dict(run.parameters or {}))
        m.flow_run_id, m.link_id, m._local = run.id, run.parent_task_run_id, run.work_pool_name is None
        m._pool = run.work_pool_name
        m.state_type, m.message = store.state_type(run), store.state_message(run)
        return m

    @property
    def is_local(self) -> bool:
        if self.job is None:
            return bool(self._local)
        return self.job.executor.work_pool_name is None

    @property
    def pool_name(self) -> Optional[str]:
        """The work pool its run waits on (None for a Local job)."""
        return self._pool if self.job is None else self.job.executor.work_pool_name


@dataclass
class Writes:
    """An experiment's writes that go to the server together, whichever work unit asks:
    job runs on pools 100 to a request, matching work-unit states 50 to a request, and
    the links (task runs) as events, a batch to a request."""

    creations: api_client.CoalescedCreations
    states: api_client.CoalescedStates
    links: TaskRunLinks

    @classmethod
    def to(cls, client) -> "Writes":
        # (a state lingers a little longer than the worker's: units end a poll apart)
        return cls(api_client.CoalescedCreations(client), api_client.CoalescedStates(client, linger=0.2),
                   TaskRunLinks(client))


#: watched runs read every poll; more are read as often in all (a poll apart per this many)
RUNS_PER_POLL = 200
#: the state types whose message a work unit's end repeats (read with the run, whole)
MESSAGE_READ = frozenset({StateType.FAILED, StateType.CRASHED})


@dataclass(frozen=True)
class Seen:
    """What the watchers know of a run: its state type, and the message of a state in
    MESSAGE_READ."""

    type: StateType
    message: str = ""

    @classmethod
    def of(cls, run) -> "Seen":
        return cls(store.state_type(run), store.state_message(run))


class SharedReads:
    """The runs the work units watched by this launcher wait on, read by one request per
    poll for all of them (not one per work unit): their state types, and the runs whose
    type changed."""

    def __init__(self) -> None:
        self._watched: set[UUID] = set()
        self._snapshot: Optional[tuple[float, set[UUID], dict[UUID, Seen]]] = None
        self._snapshot_task: Optional[asyncio.Future] = None
        self._next_read = 0.0  # (loop time) the earliest the next read is sent
        self._wake: Optional[asyncio.Event] = None

    async def read(self, ids: Sequence[UUID], after: float) -> tuple[float, dict[UUID, Seen]]:
        """The runs of `ids`, from a read begun after `after` (loop time), and when that
        read began. Reads are a poll apart: a watcher that asks for the read after the one
        it last acted on sees a change within a poll (one that took any read younger than a
        poll, as before, saw it up to two polls late)."""
        self._watched.update(ids)
        while (self._snapshot is None or self._snapshot[0] <= after
               or not self._snapshot[1].issuperset(ids)):
            if self._snapshot_task is None or self._snapshot_task.done():
                self._snapshot_task = asyncio.ensure_future(self._take_snapshot())
            await asyncio.shield(self._snapshot_task)
        started, _, runs = self._snapshot
        return started, {i: runs[i] for i in ids if i in runs}

    def forget(self, ids: Sequence[UUID]) -> None:
        self._watched.difference_update(ids)

    def read_now(self) -> None:
        """The next read without waiting out its spacing (a stop: a large sweep's reads are
        seconds apart, and its watchers act on the stop at their next read)."""
        if self._wake is not None:
            self._wake.set()

    async def _take_snapshot(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = self._wake or asyncio.Event()
        try:
            await asyncio.wait_for(self._wake.wait(), max(0.0, self._next_read - loop.time()))
        except asyncio.TimeoutError:
            pass
        self._wake.clear()
        started = loop.time()
        watched = set(self._watched)
        client = await store.client()
        before = self._snapshot[2] if self._snapshot is not None else {}
        # The watched runs' state types first (cheap); the whole run only for those that
        # turned Failed or Crashed, whose message the work unit's end repeats (a message is
        # read with the state it belongs to). A sweep's runs change type every poll: read
        # whole, they were a second request per poll.
        types = await store.read_state_types(client, list(watched))
        if types is None:
            runs = {r.id: Seen.of(r) for r in await store.read_runs(client, tags=[], ids=list(watched))}
        else:
            runs = {i: before[i] if i in before and before[i].type == t else Seen(t) for i, t in types.items()}
            failed = [i for i, t in types.items() if t in MESSAGE_READ and (i not in before or before[i].type != t)]
            if failed:
                runs.update((r.id, Seen.of(r)) for r in await store.read_runs(client, tags=[], ids=failed))
        self._snapshot = (started, watched, runs)
        # A poll apart, and further for a large sweep: a read costs the server in proportion
        # to the runs it names, and the writes a sweep waits on share that server (read every
        # poll, the 400 runs of a 200-trial sweep slowed the writes it waited on).
        self._next_read = started + POLL_SECONDS * max(1.0, len(watched) / RUNS_PER_POLL)


async def link(writes: Writes, unit, m: Member) -> None:
    """The task run in the work unit's run that the member's run hangs from (the UI's
    subflow link); made before the run, which points at it."""
    if m.link_id is None:
        m.link_id = await writes.links.create(unit.flow_run_id, f"job-{m.key}", "xm.job", m.key)


async def submit(client, unit, m: Member, writes: Writes, gang_place: Sequence[str] = ()) -> None:
    """Creates a member's flow run: here for a Local job, from its pool's job-runner
    deployment otherwise, where a sweep's runs on one pool go to the server 100 to a
    request (`writes.creations`)."""
    from prefect.client.schemas.actions import DeploymentFlowRunCreate
    from prefect.states import Pending, Scheduled, to_state_create

    from prefect_xm.job_runner import run_job

    tags = store.job_run_tags(unit.experiment_id, unit.unit_tag, m.key, gang_place)
    name = f"{unit.experiment.experiment_title}-{unit.unit_label}-{m.key}"
    await link(writes, unit, m)
    # one run per member however often the request is sent (a retried bulk request)
    once = f"prefect-xm:{unit.flow_run_id}:{m.key}"
    if m.is_local:  # (run here: Pending, on no pool)
        deployment_id = await ensure_in_launcher_deployment(client, run_job)
        create = DeploymentFlowRunCreate(name=name, parameters=m.params, tags=tags, parent_task_run_id=m.link_id,
                                         state=to_state_create(Pending()), idempotency_key=once)
    else:
        deployment_id = await ensure_job_runner_deployment(m.job.executor.work_pool_name)
        create = DeploymentFlowRunCreate(
            name=name, parameters=m.params, tags=tags, parent_task_run_id=m.link_id,
            state=to_state_create(Scheduled()), job_variables=m.job.executor.job_variables_for(m.job.executable),
            idempotency_key=once)
    m.flow_run_id = await writes.creations.create(deployment_id, create)


async def start_local(client, unit, m: Member) -> None:
    """Runs a Local job's program here; this process writes its run's states and logs
    (no flow engine per job: see job_runner.run_direct). With the executor's
    experimental_stream_output (XManager's default), its lines also reach this
    terminal, each prefixed with the job's unit and name."""
    from prefect_xm.job_runner import run_direct

    prefix = f"[{unit.unit_label}/{m.key}] "

    def echo(line: str, is_stderr: bool) -> None:
        print(prefix + line, file=sys.stderr if is_stderr else sys.stdout, flush=True)
    stream = getattr(m.job.executor, "experimental_stream_output", False)
    await run_direct(client, m.flow_run_id, m.params, echo=echo if stream else None)


async def cancel_members(client, members: Sequence[Member], reason: str) -> None:
    """Cancels members that are not final and waits until they are (gang semantics)."""
    from prefect.states import Cancelled, Cancelling

    for m in members:
        if m.flow_run_id is None or m.state_type in store.FINAL:
            if m.flow_run_id is None and m.local_task is not None:
                m.local_task.cancel()
            continue
        if m.is_local:  # (run by this process: nothing else picks it up)
            state = Cancelled(message=reason) if m.state_type in store.NOT_STARTED else Cancelling(message=reason)
            await client.set_flow_run_state(m.flow_run_id, state, force=True)
        else:
            await store.cancel_pool_run(client, m.flow_run_id, reason)
        if m.local_task is not None:
            m.local_task.cancel()  # kills the program and records Cancelled
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_DEADLINE_SECONDS
    pending = [m for m in members if m.flow_run_id is not None]
    while pending:
        runs = await store.read_runs(client, tags=[], ids=[m.flow_run_id for m in pending])
        by_id = {r.id: r for r in runs}
        for m in pending:
            r = by_id.get(m.flow_run_id)
            if r is not None:
                m.state_type, m.message = store.state_type(r), store.state_message(r)
        pending = [m for m in pending if m.state_type not in store.FINAL]
        if not pending:
            break
        if loop.time() > deadline:
            for m in pending:
                if m.is_local:
                    if m.local_task is not None:
                        m.local_task.cancel()  # the job runner kills its process group
                    await client.set_flow_run_state(m.flow_run_id, Cancelled(message=reason), force=True)
                    m.state_type = StateType.CANCELLED
                else:
                    log.warning("job %r (flow run %s) is still %s after cancellation; its pool's worker "
                                "must finish cancelling it", m.key, m.flow_run_id, m.state_type.value)
            break
        await asyncio.sleep(POLL_SECONDS / 2)
    for m in members:
        if m.local_task is not None and not m.local_task.done():
            try:
                await asyncio.wait_for(asyncio.shield(m.local_task), 15)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                m.local_task.cancel()


async def submit_gang(client, unit, members: Sequence[Member], writes: Writes) -> list[Any]:
    """Submits every member not submitted yet, before any is started or watched; returns
    each submission's outcome (None, or the exception it raised).

    Every creation is let finish before a failure is raised: a member created after the
    gang's cancellation would be left Pending, never started and never cancelled. A gang
    all on one pool is told so: a worker whose scheduler starts a gang together (Slurm's
    heterogeneous jobs) submits its members as one job."""
    one_pool = (len(members) > 1 and all(m.job is not None and not m.is_local for m in members)
                and len({m.job.executor.work_pool_name for m in members}) == 1)
    places = {m.key: gang_tags(str(unit.flow_run_id), i, len(members)) if one_pool else []
              for i, m in enumerate(members)}
    return await asyncio.gather(*(submit(client, unit, m, writes, places[m.key])
                                  for m in members if m.flow_run_id is None),
                                return_exceptions=True)


async def watch_gang(client, unit, members: list[Member], outcomes: Sequence[Any], *, reads: SharedReads,
                     writes: Writes, stopped: Callable[[], bool]) -> None:
    """Starts the Local members, follows the gang until it ends, and writes the final
    states of the members' links and of the work unit. `outcomes` are submit_gang's;
    `stopped()` tells whether the experiment is being stopped."""
    from prefect.states import Cancelled, Completed, Crashed, Failed, Running

    final_type, message = StateType.FAILED, ""
    running_set = False
    try:
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        for m in members:
            if m.is_local and m.job is not None:
                m.local_task = asyncio.ensure_future(start_local(client, unit, m))
        ids = [m.flow_run_id for m in members] + [unit.flow_run_id]
        loop = asyncio.get_running_loop()
        first_started: Optional[float] = None  # (loop time) when its first member ran
        seen = -math.inf  # (loop time) when the read last acted on began
        # members seen running once: one its scheduler requeued (Pending again) has
        # started with the others, and its requeue is its worker's to follow
        ever_started: set[str] = set()
        while True:
            # Which in-process engines had ended is noted before the read: an engine
            # that ends while the read is in flight has its final state missing from
            # that (older) snapshot, and must not be taken for one that never set it.
            noted = asyncio.get_running_loop().time()
            ended_before_read = {m.key for m in members if m.local_task is not None and m.local_task.done()}
            # A read begun after that note for in-process engines; otherwise the read after
            # the one acted on last (one read serves every work unit watched here).
            seen, runs = await reads.read(ids, noted if any(m.is_local for m in members) else seen)
            unit_state = runs[unit.flow_run_id].type if unit.flow_run_id in runs else StateType.PENDING
            for m in members:
                seen_run = runs.get(m.flow_run_id)
                if seen_run is not None:
                    m.state_type, m.message = seen_run.type, seen_run.message
                if m.key in ended_before_read and m.state_type not in store.FINAL:
                    # The in-process engine ended without a final state: record a crash.
                    exc = m.local_task.exception() if not m.local_task.cancelled() else None
                    m.state_type, m.message = StateType.CRASHED, f"job runner ended without a final state: {exc!r}"
                    await client.set_flow_run_state(m.flow_run_id, Crashed(message=m.message), force=True)
            for m in members:
                if m.state_type == StateType.CANCELLING and m.local_task is not None and not m.local_task.done():
                    m.local_task.cancel()  # cancelled from outside (UI, API): end its program
            if unit_state in (StateType.CANCELLING, StateType.CANCELLED) or stopped():
                reason = f"work unit {unit.work_unit_id} was cancelled"
                await cancel_members(client, members, reason)
                final_type, message = unit.stop_mark or (StateType.CANCELLED, reason)
                break
            bad = [m for m in members if m.state_type in (StateType.FAILED, StateType.CRASHED)]
            if bad:
                m = bad[0]
                what = "crashed" if m.state_type == StateType.CRASHED else "failed"
                message = f"job {m.key!r} {what}: {m.message}" if m.message else f"job {m.key!r} {what}"
                others = [o for o in members if o is not m]
                if others:
                    await cancel_members(client, others, f"gang member {m.key!r} {what}")
                final_type = StateType.FAILED
                break
            cancelled = [m for m in members if m.state_type == StateType.CANCELLED]
            if cancelled:
                m = cancelled[0]
                message = f"job {m.key!r} was cancelled"
                await cancel_members(client, [o for o in members if o is not m],
                                     f"gang member {m.key!r} was cancelled")
                final_type = StateType.CANCELLED
                break
            ever_started.update(m.key for m in members if m.state_type in (StateType.RUNNING, StateType.COMPLETED))
            started = [m for m in members if m.key in ever_started]
            if started and first_started is None:
                first_started = loop.time()
            # (only while a started member still runs: one that has ended holds nothing)
            if (first_started is not None and len(started) < len(members)
                    and any(m.state_type == StateType.RUNNING for m in started)
                    and loop.time() - first_started > unit.start_deadline):
                waiting = [m.key for m in members if m not in started]
                message = (f"job(s) {', '.join(map(repr, waiting))} never started within the gang's start "
                           f"deadline ({unit.start_deadline:g} s after {started[0].key!r} started)")
                await cancel_members(client, members, "the gang did not start together: " + message)
                final_type = StateType.FAILED
                break
            if not running_set and all(m.state_type in (StateType.RUNNING, StateType.COMPLETED) for m in members):
                # Proposed, not forced: a stop() that turned the unit Cancelling after this
                # poll's read must not be overwritten (Prefect refuses Cancelling -> Running),
                # or the gang would run on to its end.
                await writes.states.set(unit.flow_run_id, Running(message="every job is running"))
                running_set = True
            if all(m.state_type == StateType.COMPLETED for m in members):
                final_type, message = StateType.COMPLETED, f"{len(members)} job(s) completed"
                break
    except asyncio.CancelledError:
        final_type, message = StateType.CANCELLED, "the launching process stopped the work unit"
        await asyncio.shield(cancel_members(client, members, message))
    except Exception as e:  # submission or API failure: the work unit crashes, members are stopped
        log.exception("work unit %s failed to run", unit.work_unit_id)
        final_type, message = StateType.CRASHED, f"{type(e).__name__}: {e}"
        try:
            await cancel_members(client, members, f"work unit {unit.work_unit_id} crashed")
        except Exception:
            pass
    reads.forget([m.flow_run_id for m in members] + [unit.flow_run_id])
    # A link takes its run's states from the server (Prefect's UpdateSubflowParentTask
    # sets a subflow's parent task run to each state the subflow takes); a link whose run
    # was never created is ended here.
    for m in members:
        if m.flow_run_id is not None:
            writes.links.forget(m.link_id)
        elif not writes.links.finish(m.link_id, final_type, message):
            await store.finish_task_run(client, m.link_id, final_type, message)
    writes.links.forget(unit.link_task_run_id)
    if final_type == StateType.COMPLETED and not running_set:
        await writes.states.set(unit.flow_run_id, Running(), force=True)
    state = {StateType.COMPLETED: Completed, StateType.CANCELLED: Cancelled,
             StateType.CRASHED: Crashed}.get(final_type, Failed)(message=message)
    await writes.states.set(unit.flow_run_id, state, force=True)
