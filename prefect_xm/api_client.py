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
from typing import Any, Iterable, Optional, Sequence
from uuid import UUID

#: Quick retries of a 503 first (Prefect's client waits 2 s, then 4 s...)...
QUICK_RETRY_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
#: ...then one every this many seconds, until the patience runs out.
SLOW_RETRY_DELAY = 1.0

#: the bulk routes' limits (Prefect's server: BULK_CREATE_LIMIT, BULK_OPERATION_LIMIT)
CREATE_BULK_LIMIT = 100
SET_STATE_BULK_LIMIT = 50


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
        yield from QUICK_RETRY_DELAYS
        while True:
            yield SLOW_RETRY_DELAY

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
    DeploymentFlowRunCreate (or dicts of its fields). Answers per run, in order."""
    from prefect.client.schemas.actions import DeploymentFlowRunCreate

    out: list[Created] = []
    for chunk in _chunks(list(runs), CREATE_BULK_LIMIT):
        body = [(r if isinstance(r, DeploymentFlowRunCreate) else DeploymentFlowRunCreate(**r)).model_dump(
            mode="json", exclude_unset=True) for r in chunk]
        response = await client._client.post(f"/deployments/{deployment_id}/create_flow_run/bulk", json=body)
        results = response.json().get("results", [])
        if len(results) != len(chunk):
            raise RuntimeError(f"bulk creation from deployment {deployment_id} answered {len(results)} results "
                               f"for {len(chunk)} runs")
        out.extend(Created(UUID(r["flow_run_id"]) if r.get("flow_run_id") else None, r.get("error"))
                   for r in results)
    return out


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

    state_create = state.to_state_create().model_dump(mode="json", exclude_unset=True) \
        if hasattr(state, "to_state_create") else state
    out: list[StateSet] = []
    for chunk in _chunks(list(dict.fromkeys(flow_run_ids)), SET_STATE_BULK_LIMIT):
        body = {"flow_runs": FlowRunFilter(id=FlowRunFilterId(any_=list(chunk))).model_dump(mode="json", exclude_unset=True),
                "state": state_create, "force": force, "limit": len(chunk)}
        response = await client._client.post("/flow_runs/bulk_set_state", json=body)
        for r in response.json().get("results", []):
            s = r.get("state") or {}
            out.append(StateSet(UUID(r["flow_run_id"]), r.get("status", ""), s.get("type"), s.get("name"),
                                (r.get("details") or {}).get("reason")))
    return out
