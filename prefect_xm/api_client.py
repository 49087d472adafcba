"""How prefect-xm talks to Prefect's API, for the launcher and the worker alike: writes
that survive a busy server, and the bulk routes Prefect's client does not wrap.

A busy server. A SQLite-backed server (Prefect's default: the embedded one, and `prefect
server start`) answers ``503 database is locked`` when a write meets another's snapshot
(SQLITE_BUSY_SNAPSHOT, which busy_timeout does not wait out). Prefect's client retries a
503 five times over about a minute, then raises; its worker then crashes the flow run it
was submitting (``_submit_run_and_capture_errors``): a 200-trial sweep lost 78 trials that
way. `absorb_busy_answers` makes a Prefect client wait such answers out, quickly at first
(the conflict is usually gone in milliseconds; Prefect waits 2 s before its first retry)
and then for as long as ``PREFECT_XM_BUSY_SERVER_PATIENCE`` (600 s) allows; once a server
has answered a 503, the client sends it one write at a time (reads stay concurrent):
SQLite takes one write at a time anyway, and concurrent ones only collide.

Bulk routes. ``POST /deployments/{id}/create_flow_run/bulk`` creates up to 100 flow runs in
one request and one transaction; ``POST /flow_runs/bulk_set_state`` sets one state on up to
50 runs, each still orchestrated. Both answer per run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence
from uuid import UUID

#: Quick retries of a 503 first (Prefect's client waits 2 s, then 4 s...)...
QUICK_RETRY_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
#: ...then one every this many seconds, until the patience runs out.
SLOW_RETRY_DELAY = 1.0

#: the bulk routes' limits (Prefect's server: BULK_CREATE_LIMIT, BULK_OPERATION_LIMIT)
CREATE_BULK_LIMIT = 100
SET_STATE_BULK_LIMIT = 50
#: runs a filter read answers at most (PREFECT_API_DEFAULT_LIMIT)
READ_LIMIT = 200


def busy_server_patience() -> float:
    """Seconds a request keeps retrying a server that answers 503, before Prefect's own
    retries (and errors) take over."""
    return float(os.environ.get("PREFECT_XM_BUSY_SERVER_PATIENCE", "600"))


#: POST routes of Prefect's API that only read (filters, counts, pages).
_READING_POSTS = frozenset({"filter", "count", "paginate", "history"})


def writes(request) -> bool:
    """Whether a request to Prefect's API writes (reads go on concurrently)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return False
    return not (request.method == "POST" and request.url.path.rstrip("/").rsplit("/", 1)[-1] in _READING_POSTS)


def _retry_delays() -> Iterator[float]:
    yield from QUICK_RETRY_DELAYS
    while True:
        yield SLOW_RETRY_DELAY


class BusyServerTransport:
    """An httpx transport around Prefect's own that waits out 503 answers (see the module
    docstring), sending a server's writes one at a time once it has answered one."""

    def __init__(self, inner, patience: Optional[float] = None) -> None:
        self.inner = inner
        self.patience = busy_server_patience() if patience is None else patience
        self._one_write_at_a_time: Optional[asyncio.Lock] = None

    async def handle_async_request(self, request):
        if self._one_write_at_a_time is not None and writes(request):
            async with self._one_write_at_a_time:
                return await self._send(request)
        return await self._send(request)

    def _delays(self) -> Iterable[float]:
        return _retry_delays()

    async def _send(self, request):
        give_up = time.monotonic() + self.patience
        for delay in self._delays():
            response = await self.inner.handle_async_request(request)
            if response.status_code != 503 or time.monotonic() + delay > give_up:
                return response
            await response.aread()
            await response.aclose()
            if self._one_write_at_a_time is None:
                self._one_write_at_a_time = asyncio.Lock()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self):
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.inner.__aexit__(*exc)


def absorb_busy_answers(prefect_client):
    """Wraps a Prefect client's transports (the server's and any proxy mount: Prefect's
    TLS and proxy settings stay as Prefect made them) so its requests wait out a busy
    server. Returns the client. Idempotent."""
    http = getattr(prefect_client, "_client", None)
    if http is None:
        return prefect_client
    transport = getattr(http, "_transport", None)
    if transport is not None and not isinstance(transport, BusyServerTransport):
        http._transport = BusyServerTransport(transport)
    mounts = getattr(http, "_mounts", None)
    if isinstance(mounts, dict):
        for pattern, mounted in list(mounts.items()):
            if mounted is not None and not isinstance(mounted, BusyServerTransport):
                mounts[pattern] = BusyServerTransport(mounted)
    return prefect_client


# ------------------------------------------------------------------ bulk routes


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass
class Created:
    """One run of a bulk creation: its id, or why the server refused it."""

    flow_run_id: Optional[UUID]
    error: Optional[str] = None


async def create_flow_runs_from_deployment(client, deployment_id: UUID, runs: Sequence[Any]) -> list[Created]:
    """Creates flow runs of one deployment, 100 to a request; `runs` are Prefect's
    DeploymentFlowRunCreate (or dicts of its fields). Answers per run, in order.

    A database busy with other writers (SQLite's "database is locked", PostgreSQL's
    serialization failures) is answered inside the route's results, not as a 503: the
    runs not created are sent again, as a busy server's requests are.

    The route makes its runs in one transaction. A run refused by the database (a
    parent task run that does not exist) breaks that transaction: the runs answered
    CREATED before it were rolled back, and those after it fail with "closed
    transaction". So when a request answers any failure, the runs it called created
    are read back, and every run but the first failure is sent again."""
    from prefect.client.schemas.actions import DeploymentFlowRunCreate

    bodies = [(r if isinstance(r, DeploymentFlowRunCreate) else DeploymentFlowRunCreate(**r)).model_dump(
        mode="json", exclude_unset=True) for r in runs]
    out: list[Optional[Created]] = [None] * len(bodies)
    give_up = time.monotonic() + busy_server_patience()
    delays = _retry_delays()
    for chunk in _chunks(list(range(len(bodies))), CREATE_BULK_LIMIT):
        waiting = list(chunk)
        while waiting:
            response = await client._client.post(f"/deployments/{deployment_id}/create_flow_run/bulk",
                                                 json=[bodies[i] for i in waiting])
            results = response.json().get("results", [])
            if len(results) != len(waiting):
                raise RuntimeError(f"bulk creation from deployment {deployment_id} answered {len(results)} results "
                                   f"for {len(waiting)} runs")
            created = {i: UUID(r["flow_run_id"]) for i, r in zip(waiting, results) if r.get("flow_run_id")}
            failed = [(i, database_error(r.get("error") or "refused")) for i, r in zip(waiting, results)
                      if not r.get("flow_run_id")]
            if not failed:
                for i, run_id in created.items():
                    out[i] = Created(run_id)
                break
            existing = set(await _existing_flow_runs(client, list(created.values()))) if created else set()
            for i, run_id in created.items():
                if run_id in existing:
                    out[i] = Created(run_id)
            busy = [error for _, error in failed if _server_was_busy(error)]
            if busy and time.monotonic() < give_up:
                # (the route answers 200 with the database's refusal inside: no 503 to wait out)
                await asyncio.sleep(next(delays) * random.uniform(0.5, 1.5))
            else:
                cause, error = failed[0]
                out[cause] = Created(None, error)
            waiting = [i for i in waiting if out[i] is None]
    return [c if c is not None else Created(None, "not answered") for c in out]


def database_error(error: str) -> str:
    """A bulk route's per-run error without the statement and parameters SQLAlchemy
    appends: those hold the run's parameters (a job's env among them), which must not
    reach a state message or a log."""
    return error.split("\n[SQL:", 1)[0].split("\n[parameters:", 1)[0].strip()


#: the database's words for "busy with other writers: try again"
_BUSY_DATABASE = ("database is locked", "could not serialize access", "deadlock detected")


def _server_was_busy(error: str) -> bool:
    return any(words in error for words in _BUSY_DATABASE)


async def _existing_flow_runs(client, ids: Sequence[UUID]) -> list[UUID]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ids))),
                                       limit=len(ids))
    return [r.id for r in runs]


@dataclass
class StateSet:
    """One run's answer to a bulk state change: ACCEPT, REJECT, ABORT or WAIT, and the
    state it is in now."""

    flow_run_id: UUID
    status: str
    state_type: Optional[str]
    state_name: Optional[str]
    reason: Optional[str] = None

    @property
    def accepted(self) -> bool:
        return self.status == "ACCEPT"


async def set_flow_run_states(client, flow_run_ids: Sequence[UUID], state, force: bool = False) -> list[StateSet]:
    """Proposes one state for many flow runs, 50 to a request (each run still
    orchestrated: Prefect's rules apply unless `force`). Answers per run; a run the
    server did not find has no answer."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import to_state_create

    state_create = to_state_create(state).model_dump(mode="json", exclude_unset=True)
    give_up = time.monotonic() + busy_server_patience()
    delays = _retry_delays()
    out: dict[UUID, StateSet] = {}
    for chunk in _chunks(list(dict.fromkeys(flow_run_ids)), SET_STATE_BULK_LIMIT):
        waiting = list(chunk)
        while waiting:
            body = {"flow_runs": FlowRunFilter(id=FlowRunFilterId(any_=waiting)).model_dump(mode="json", exclude_unset=True),
                    "state": state_create, "force": force, "limit": len(waiting)}
            response = await client._client.post("/flow_runs/bulk_set_state", json=body)
            for r in response.json().get("results", []):
                s = r.get("state") or {}
                reason = (r.get("details") or {}).get("reason")
                answer = StateSet(UUID(r["flow_run_id"]), r.get("status", ""), s.get("type"), s.get("name"),
                                  database_error(reason) if reason else reason)
                out[answer.flow_run_id] = answer
            # A run whose transaction met a busy database is answered ABORT with the
            # database's words (its state unchanged): it goes again, as a 503 would.
            busy = [i for i in waiting if i in out and out[i].status == "ABORT"
                    and _server_was_busy(out[i].reason or "")]
            if not busy or time.monotonic() >= give_up:
                break
            await asyncio.sleep(next(delays) * random.uniform(0.5, 1.5))
            waiting = busy
    return [out[i] for i in dict.fromkeys(flow_run_ids) if i in out]


class CoalescedCreations:
    """Flow-run creations from deployments asked for one at a time (a launcher creating a
    sweep's work units concurrently) and sent together: what is asked within `linger`
    seconds of the last request (one second at most), up to 100 per deployment, goes in
    one bulk request. (A launcher on a SQLite server sends its other writes one at a
    time, about one trial's every 150 ms here: a shorter wait made batches of one.)

    `create` answers the new run's id, or raises the server's reason for refusing it.
    """

    def __init__(self, client, linger: float = 0.2, most_wait: float = 1.0) -> None:
        self.client = client
        self.linger = linger
        self.most_wait = most_wait
        self._waiting: dict[UUID, list[tuple[Any, asyncio.Future]]] = {}
        self._flusher: Optional[asyncio.Task] = None
        self._asked = asyncio.Event()

    async def create(self, deployment_id: UUID, run) -> UUID:
        future = asyncio.get_running_loop().create_future()
        batch = self._waiting.setdefault(deployment_id, [])
        batch.append((run, future))
        if len(batch) >= CREATE_BULK_LIMIT:
            self._send(deployment_id)
        else:
            self._asked.set()
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.ensure_future(self._flush_when_quiet())
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Its request may be on its way all the same: a run created for a caller that
            # is gone must not wait in its pool's queue for a worker to start it.
            asyncio.ensure_future(self._cancel_when_created(future))
            raise

    async def _cancel_when_created(self, future: asyncio.Future) -> None:
        from prefect.states import Cancelled

        try:
            flow_run_id = await future
        except BaseException:
            return
        await self.client.set_flow_run_state(
            flow_run_id, Cancelled(message="its launcher stopped before the run was submitted"), force=True)

    async def _flush_when_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        first = loop.time()
        while self._waiting:
            self._asked.clear()
            remaining = self.most_wait - (loop.time() - first)
            try:
                await asyncio.wait_for(self._asked.wait(), timeout=max(0.0, min(self.linger, remaining)))
            except asyncio.TimeoutError:
                pass
            if not self._asked.is_set() or loop.time() - first >= self.most_wait:
                for deployment_id in list(self._waiting):
                    self._send(deployment_id)
                first = loop.time()

    def _send(self, deployment_id: UUID) -> None:
        batch = self._waiting.pop(deployment_id, [])
        if batch:
            asyncio.ensure_future(self._create(deployment_id, batch))

    async def _create(self, deployment_id: UUID, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            created = await create_flow_runs_from_deployment(self.client, deployment_id, [r for r, _ in batch])
        except BaseException as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for (_, future), c in zip(batch, created):
            if future.done():
                continue
            if c.flow_run_id is not None:
                future.set_result(c.flow_run_id)
            else:
                future.set_exception(RuntimeError(f"Prefect refused to create the flow run: {c.error}"))


def read_once_per_batch(prefect_client, seconds: float = 10.0):
    """Makes a Prefect client read each deployment and flow at most once per `seconds`
    (concurrent reads of one share a request). Prefect's worker reads a run's deployment
    twice and its flow once for every run it submits; a sweep's runs share both, and
    this turns three reads a run into three a batch. A deployment changed meanwhile is
    seen at most `seconds` late. Returns the client. Idempotent."""
    if getattr(prefect_client, "_xm_reads_once", False):
        return prefect_client
    for method in ("read_deployment", "read_flow"):
        setattr(prefect_client, method, _ReadOnce(getattr(prefect_client, method), seconds))
    prefect_client._xm_reads_once = True
    return prefect_client


class _ReadOnce:
    def __init__(self, read, seconds: float) -> None:
        self.read = read
        self.seconds = seconds
        self._answers: dict[Any, tuple[float, asyncio.Future]] = {}

    async def __call__(self, object_id, *args, **kwargs):
        if args or kwargs:
            return await self.read(object_id, *args, **kwargs)
        now = time.monotonic()
        # forget answers past their time (a long-lived worker reads many deployments)
        for key in [k for k, (t, _) in self._answers.items() if now - t > self.seconds]:
            del self._answers[key]
        held = self._answers.get(object_id)
        if held is None:
            held = (now, asyncio.ensure_future(self.read(object_id)))
            self._answers[object_id] = held
        try:
            answer = await asyncio.shield(held[1])
        except Exception:
            if self._answers.get(object_id) is held:
                del self._answers[object_id]  # an error is not kept: the next caller asks again
            raise
        # each caller its own copy: Prefect's worker merges a run's env into the
        # deployment's job variables in place
        return answer.model_copy(deep=True) if hasattr(answer, "model_copy") else answer


class CoalescedStates:
    """State proposals asked for one run at a time (a worker submitting a batch of runs
    it picked up together) and sent together: the same state proposed within `linger`
    seconds goes in one bulk request, 50 runs to a request, each run still orchestrated.

    `propose` answers the run's StateSet, or None when the server did not answer for it
    (the caller then proposes it alone)."""

    def __init__(self, client, linger: float = 0.05) -> None:
        self.client = client
        self.linger = linger
        self._waiting: dict[tuple, list[tuple[UUID, asyncio.Future]]] = {}
        self._states: dict[tuple, Any] = {}

    async def propose(self, flow_run_id: UUID, state, force: bool = False) -> Optional[StateSet]:
        key = (state.type, state.name, state.message, force)
        batch = self._waiting.get(key)
        if batch is None:
            batch = self._waiting[key] = []
            self._states[key] = state
            asyncio.get_running_loop().call_later(self.linger, self._send, key)
        future = asyncio.get_running_loop().create_future()
        batch.append((flow_run_id, future))
        if len(batch) >= SET_STATE_BULK_LIMIT:
            self._send(key)
        return await asyncio.shield(future)

    async def set(self, flow_run_id: UUID, state, force: bool = False) -> StateSet:
        """Proposes (or with `force`, sets) a run's state in the batch of its matching
        states, or alone when the bulk answer is missing for it; answers Prefect's verdict."""
        answer = await self.propose(flow_run_id, state, force=force)
        if answer is not None and not (answer.status == "ABORT" and answer.state_type is None):
            return answer
        result = await self.client.set_flow_run_state(flow_run_id, state, force=force)
        return StateSet(flow_run_id, result.status.value, result.state.type.value if result.state else None,
                        result.state.name if result.state else None)

    def _send(self, key: tuple) -> None:
        batch = self._waiting.pop(key, None)
        state = self._states.pop(key, None)
        if batch:
            asyncio.ensure_future(self._set(batch, state, key[3]))

    async def _set(self, batch: list[tuple[UUID, asyncio.Future]], state, force: bool) -> None:
        try:
            answers = {a.flow_run_id: a for a in await set_flow_run_states(
                self.client, [i for i, _ in batch], state, force=force)}
        except Exception as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for flow_run_id, future in batch:
            if not future.done():
                future.set_result(answers.get(flow_run_id))


class CoalescedRunReads:
    """Reads of single flow runs asked at the same time (an array's tasks ending in one
    poll) sent as one filter request, 200 runs to a request. A run the answer lacks is
    read alone (so a run that is gone raises as Prefect's read does)."""

    def __init__(self, client, linger: float = 0.2) -> None:
        self.client = client
        self.linger = linger
        self._waiting: dict[UUID, list[asyncio.Future]] = {}

    async def read(self, flow_run_id: UUID):
        if not self._waiting:
            asyncio.get_running_loop().call_later(self.linger, self._send)
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(flow_run_id, []).append(future)
        if len(self._waiting) >= READ_LIMIT:
            self._send()
        run = await asyncio.shield(future)
        return run if run is not None else await self.client.read_flow_run(flow_run_id)

    def _send(self) -> None:
        batch, self._waiting = self._waiting, {}
        if batch:
            asyncio.ensure_future(self._read(batch))

    async def _read(self, batch: dict[UUID, list[asyncio.Future]]) -> None:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        try:
            runs = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(batch))), limit=len(batch))
            found = {r.id: r for r in runs}
        except Exception:
            found = {}  # (each caller reads alone, and meets the error itself)
        for flow_run_id, futures in batch.items():
            for future in futures:
                if not future.done():
                    future.set_result(found.get(flow_run_id))

