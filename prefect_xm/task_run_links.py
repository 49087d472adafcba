"""The task runs a sweep's flow runs hang from (the UI's subflow links: a work unit in its
experiment, a job in its work unit), written as events, a batch to a request.

Prefect's engine records its tasks this way: the server's task run recorder (a service in
every server: the embedded one, `prefect server start`, the services process of the
production topology) makes and updates a task run from a ``prefect.task-run.<State>``
event. ``POST /events`` takes a list, so a sweep's links cost one request per batch, not
one each. Once a link's run exists the server itself sets the link to each state the run
takes (Prefect's UpdateSubflowParentTask); only a link whose run never came is ended here.

Recording is asynchronous and a child flow run's ``parent_task_run_id`` is a foreign key,
so `create` answers once the server shows the task runs sent with it (a read per batch).
An event is a shortcut, never the only write: a link the server has not recorded within
`record_deadline()` (a recorder turned off, an event it dropped after a busy database) is
written through the task-run routes, and so is an end it has not recorded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional
from uuid import UUID

from prefect.client.schemas.objects import StateType

log = logging.getLogger("prefect_xm")

#: events to a request
EVENTS_PER_REQUEST = 200
#: task runs a read asks for at once (Prefect's filter pages)
READ_PAGE = 200


def record_deadline() -> float:
    """Seconds the server's recorder is given to record a link before it is written
    through the API instead."""
    return float(os.environ.get("PREFECT_XM_LINK_RECORD_SECONDS", "20"))


@dataclass
class Link:
    """What a link's events must repeat: the recorder upserts the whole task run."""

    id: UUID
    flow_run_id: UUID
    name: str
    task_key: str
    dynamic_key: str
    start_time: datetime


#: the state a link ends in, for its run's end
def link_end(state_type: StateType) -> StateType:
    """The state a link takes when its run ends: Completed or Cancelled as the run, Failed
    for any other end (a task run has no Crashed of its own to show)."""
    return state_type if state_type in (StateType.COMPLETED, StateType.CANCELLED) else StateType.FAILED


def _end_state(state_type: StateType) -> tuple[str, str]:
    end = link_end(state_type)
    return end.value, end.value.title()


def task_run_event(link: Link, state_type: str, state_name: str, message: Optional[str] = None,
                   at: Optional[datetime] = None) -> dict[str, Any]:
    """The event Prefect's engine emits when a task run takes a state
    (prefect.utilities.engine.emit_task_run_state_change_event), as the recorder reads it."""
    at = at or datetime.now(timezone.utc)
    task_run: dict[str, Any] = {"name": link.name, "task_key": link.task_key, "dynamic_key": link.dynamic_key,
                                "run_count": 1, "flow_run_run_count": 1, "start_time": link.start_time.isoformat()}
    if state_type != "RUNNING":
        task_run["end_time"] = at.isoformat()
        task_run["total_run_time"] = max(0.0, (at - link.start_time).total_seconds())
    state = {"type": state_type, "name": state_name, "message": message or "", "state_details": {}, "data": None}
    return {
        "id": str(uuid.uuid4()),
        "occurred": at.isoformat(),
        "event": f"prefect.task-run.{state_name}",
        "resource": {
            "prefect.resource.id": f"prefect.task-run.{link.id}",
            "prefect.resource.name": link.name,
            "prefect.run-count": "1",
            "prefect.state-message": message or "",
            "prefect.state-name": state_name,
            "prefect.state-timestamp": at.isoformat(),
            "prefect.state-type": state_type,
            "prefect.orchestration": "client",
        },
        "related": [{"prefect.resource.id": f"prefect.flow-run.{link.flow_run_id}",
                     "prefect.resource.role": "flow-run"}],
        "payload": {"intended": {"from": None, "to": state_type}, "initial_state": None,
                    "validated_state": state, "task_run": task_run},
    }


class TaskRunLinks:
    """Links created (and, where no run came to hang from them, finished) through events
    sent together (see the module docstring).

    `create` answers the new link's id once the server has it and the links sent with it;
    `finish` returns at once (the event goes with the next batch); `drain` waits until
    every finish is recorded."""

    def __init__(self, client, linger: float = 0.2) -> None:
        self.client = client
        self.linger = linger
        self._links: dict[UUID, Link] = {}
        self._outbox: list[dict[str, Any]] = []
        self._sending: Optional[asyncio.Task] = None
        #: creations sent and not yet answered, with who waits for them
        self._unrecorded: dict[UUID, asyncio.Future] = {}
        #: ...of which the server shows these (answered with the rest of their request)
        self._seen: set[UUID] = set()
        #: the creations each request of events carried (and the one being gathered)
        self._batches: list[list[UUID]] = []
        self._gathering: list[UUID] = []
        #: finishes sent and not yet seen recorded: the state type each must show
        self._unfinished: dict[UUID, tuple[str, str, Optional[str]]] = {}
        self._checking: Optional[asyncio.Task] = None
        #: (loop time) when each link's last event was posted
        self._posted: dict[UUID, float] = {}
        self._check_soon = False

    # -- what callers ask ------------------------------------------------------------
    async def create(self, flow_run_id: UUID, name: str, task_key: str, dynamic_key: str) -> UUID:
        link = Link(uuid.uuid4(), flow_run_id, name, task_key, dynamic_key, datetime.now(timezone.utc))
        self._links[link.id] = link
        recorded = asyncio.get_running_loop().create_future()
        self._unrecorded[link.id] = recorded
        self._gathering.append(link.id)
        self._post(link.id, task_run_event(link, "RUNNING", "Running", at=link.start_time))
        await asyncio.shield(recorded)
        return link.id

    def finish(self, link_id: Optional[UUID], state_type: StateType, message: str = "") -> bool:
        """Ends a link made here whose run was never created (a run sets its link's states
        itself, on the server); False for a link this object does not know (one
        re-attached from the server: store.finish_task_run)."""
        link = self._links.get(link_id) if link_id is not None else None
        if link is None:
            return False
        type_, name = _end_state(state_type)
        self._unfinished[link.id] = (type_, name, message or None)
        self._post(link.id, task_run_event(link, type_, name, message or None))
        return True

    def forget(self, link_id: Optional[UUID]) -> None:
        """The link's run exists and sets its states: nothing more to send for it."""
        if link_id is not None and link_id not in self._unfinished:
            self._links.pop(link_id, None)

    async def drain(self) -> None:
        """Waits until every finish sent is recorded (or written through the API)."""
        while self._outbox or self._unfinished or self._unrecorded:
            self._ensure_checking()
            tasks = [t for t in (self._sending, self._checking) if t is not None and not t.done()]
            if tasks:
                await asyncio.wait(tasks)
            else:
                await asyncio.sleep(0.05)

    # -- sending ---------------------------------------------------------------------
    def _post(self, link_id: UUID, event: dict[str, Any]) -> None:
        self._outbox.append(event)
        self._posted[link_id] = asyncio.get_running_loop().time()
        self._check_soon = True
        if self._sending is None or self._sending.done():
            self._sending = asyncio.ensure_future(self._send_soon())

    async def _send_soon(self) -> None:
        await asyncio.sleep(self.linger)
        while self._outbox:
            # The links gathered for a request are answered together, once the server shows
            # all of them, so the runs that hang from them go together too (one bulk request).
            if self._gathering:
                self._batches.append(self._gathering)
                self._gathering = []
            batch, self._outbox = self._outbox[:EVENTS_PER_REQUEST], self._outbox[EVENTS_PER_REQUEST:]
            try:
                response = await self.client._client.post("/events", json=batch)
                response.raise_for_status()
            except Exception as e:  # the check below writes them through the API
                log.debug("could not send %d task run event(s): %s: %s", len(batch), type(e).__name__, e)
        self._ensure_checking()

    # -- checking what the server recorded --------------------------------------------
    def _ensure_checking(self) -> None:
        if (self._unrecorded or self._unfinished) and (self._checking is None or self._checking.done()):
            self._checking = asyncio.ensure_future(self._check())

    async def _check(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while self._unrecorded or self._unfinished:
            if self._check_soon:  # (new events: the recorder takes milliseconds each)
                delay, self._check_soon = 0.05, False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            try:
                await self._read_recorded()
            except Exception as e:
                log.debug("could not read task runs: %s: %s", type(e).__name__, e)
            late = loop.time() - record_deadline()
            overdue = [i for i in (*self._unrecorded, *self._unfinished)
                       if i not in self._seen and self._posted.get(i, 0.0) < late]
            if overdue:
                await self._write_through_api(overdue)

    def _answer_recorded_batches(self) -> None:
        """Answers the creations of every request whose links the server all shows."""
        for batch in [b for b in self._batches if all(i in self._seen or i not in self._unrecorded for i in b)]:
            self._batches.remove(batch)
            for link_id in batch:
                self._seen.discard(link_id)
                self._posted.pop(link_id, None)
                waiting = self._unrecorded.pop(link_id, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(None)

    async def _read_recorded(self) -> None:
        ids = ([i for i in self._unrecorded if i not in self._seen]
               + [i for i in self._unfinished if i not in self._unrecorded])
        for start in range(0, len(ids), READ_PAGE):
            page = ids[start:start + READ_PAGE]
            response = await self.client._client.post(
                "/task_runs/filter", json={"task_runs": {"id": {"any_": [str(i) for i in page]}}, "limit": len(page)})
            response.raise_for_status()
            for run in response.json():
                run_id = UUID(run["id"])
                if run_id in self._unrecorded:
                    self._seen.add(run_id)
                wanted = self._unfinished.get(run_id)
                if wanted is not None and run.get("state_type") == wanted[0]:
                    del self._unfinished[run_id]
                    self._links.pop(run_id, None)
                    self._posted.pop(run_id, None)
        self._answer_recorded_batches()

    async def _write_through_api(self, overdue: list[UUID]) -> None:
        """What the recorder did not record in time, written as Prefect's client writes a
        task run (idempotent with a late recording: the same id, the same natural key)."""
        from prefect import Task
        from prefect.states import Cancelled, Completed, Failed, Running

        log.warning("the server did not record %d task run link event(s) within %g s (is its task run "
                    "recorder service on?); writing them through the API", len(overdue), record_deadline())
        for link_id in dict.fromkeys(overdue):
            if link_id not in self._unrecorded or link_id in self._seen:
                continue
            waiting, link = self._unrecorded[link_id], self._links[link_id]
            task = Task(name=link.name, fn=lambda: None)
            task.task_key = link.task_key
            try:
                await self.client.create_task_run(task=task, flow_run_id=link.flow_run_id, id=link.id,
                                                  dynamic_key=link.dynamic_key, state=Running())
                self._seen.add(link_id)
            except Exception as e:
                self._unrecorded.pop(link_id, None)
                if not waiting.done():
                    waiting.set_exception(e)
        for link_id in dict.fromkeys(overdue):
            if link_id not in self._unfinished or link_id in self._unrecorded:
                continue
            type_, _, message = self._unfinished[link_id]
            state = {"COMPLETED": Completed, "CANCELLED": Cancelled}.get(type_, Failed)(message=message)
            try:
                await self.client.set_task_run_state(link_id, state, force=True)
            except Exception as e:  # the link shows its run's end; the run itself holds the truth
                log.debug("could not finish link task run %s: %s", link_id, e)
            self._unfinished.pop(link_id, None)
            self._links.pop(link_id, None)
            self._posted.pop(link_id, None)
        self._answer_recorded_batches()
