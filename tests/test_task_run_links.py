"""The link task runs a sweep's runs hang from, written as events a batch to a request
(prefect_xm.task_run_links), against the real Prefect server and its task run recorder;
and written through the API when the server does not record an event."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest

from conftest import RequestLog
from prefect_xm.task_run_links import TaskRunLinks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(prefect_server):
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    return prefect_server


def _routes(log: RequestLog) -> list[str]:
    return [r.replace(" /api/", " /").rstrip("/") for r in log.seen]


def _dropping_events(request):
    """A POST /events the server answers (204) and loses."""
    import httpx

    if request.method == "POST" and request.url.path.rstrip("/").endswith("/api/events"):
        return httpx.Response(204, request=request)
    return None


async def _parent(client):
    from prefect import flow
    from prefect.states import Running

    @flow(name="links-parent")
    def parent():
        pass

    return (await client.create_flow_run(parent, name=f"parent-{uuid.uuid4().hex[:6]}", state=Running())).id


async def _task_runs(client, ids):
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    runs = await client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=list(ids))),
                                       limit=len(ids))
    return {r.id: r for r in runs}


def test_a_sweeps_links_are_recorded_from_a_request_of_events_and_children_can_point_at_them(api):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Pending

    @flow(name="links-child")
    def child():
        pass

    async def go():
        async with get_client() as client:
            parent = await _parent(client)
            log = RequestLog(client)
            links = TaskRunLinks(client)
            creating = time.monotonic()
            ids = await asyncio.gather(*(links.create(parent, f"work-unit-{i}", "xm.work_unit", str(i))
                                         for i in range(120)))
            created_requests, created_in = _routes(log), time.monotonic() - creating
            # (a foreign key: the child is refused unless its link is in the database)
            child_run = await client.create_flow_run(child, name="child", parent_task_run_id=ids[7], state=Pending())
            ends = [StateType.COMPLETED] * 100 + [StateType.FAILED] * 10 + [StateType.CANCELLED] * 10
            assert all(links.finish(i, end, f"unit {n} ended") for n, (i, end) in enumerate(zip(ids, ends)))
            assert not links.finish(uuid.uuid4(), StateType.COMPLETED)  # not made here: the caller's
            await links.drain()
            return (parent, ids, ends, created_requests, created_in, _routes(log), child_run,
                    await _task_runs(client, ids))

    started = time.monotonic()
    parent, ids, ends, created_requests, created_in, requests, child_run, runs = asyncio.run(go())
    polled = time.monotonic() - started
    assert len(set(ids)) == 120
    # 120 creations: one request of events and the reads that saw them recorded
    assert created_requests.count("POST /events") == 1, created_requests
    assert set(created_requests) == {"POST /events", "POST /task_runs/filter"}, created_requests
    assert len(created_requests) <= 6 + created_in, (created_in, created_requests)
    # 120 finishes: one more request of events (and reads); no task run state set one by one
    assert requests.count("POST /events") == 2, requests
    assert not [r for r in requests if r.endswith("/set_state")], requests
    # the rest are reads of what the recorder shows, paced by a backoff (to 1 s) that
    # restarts at each request of events: about five in a first second, then one a second
    # (how many depends on how fast a loaded server records, not on the 120 links)
    reads = [r for r in requests if r not in ("POST /events", "POST /flows", "POST /flow_runs")]  # (the child)
    assert requests.count("POST /flow_runs") == 1 and set(reads) == {"POST /task_runs/filter"}, requests
    assert len(reads) <= 10 + polled, (polled, requests)
    assert child_run.parent_task_run_id == ids[7]
    assert set(runs) == set(ids)
    for n, (i, end) in enumerate(zip(ids, ends)):
        run = runs[i]
        assert (run.flow_run_id, run.name, run.task_key, run.dynamic_key) == (parent, f"work-unit-{n}",
                                                                             "xm.work_unit", str(n))
        assert run.state_type == end and run.state.message == f"unit {n} ended", run.state
        assert run.end_time is not None and run.start_time is not None and run.end_time >= run.start_time


def test_links_the_server_did_not_record_are_written_through_the_api(api, monkeypatch, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    monkeypatch.setenv("PREFECT_XM_LINK_RECORD_SECONDS", "1")

    async def go():
        async with get_client() as client:
            parent = await _parent(client)
            log = RequestLog(client, answer=_dropping_events)
            links = TaskRunLinks(client)
            creating = time.monotonic()
            ids = await asyncio.gather(*(links.create(parent, f"job-{k}", "xm.job", k) for k in "abc"))
            links.finish(ids[0], StateType.COMPLETED, "done")
            links.finish(ids[1], StateType.CRASHED, "its launcher died")
            await links.drain()
            return parent, ids, _routes(log), await _task_runs(client, ids)

    with caplog.at_level(logging.WARNING, logger="prefect_xm"):
        parent, ids, requests, runs = asyncio.run(go())
    assert requests.count("POST /task_runs") == 3 and requests.count(f"POST /task_runs/{ids[0]}/set_state") == 1
    assert "did not record" in caplog.text
    assert [runs[i].state_type for i in ids] == [StateType.COMPLETED, StateType.FAILED, StateType.RUNNING]
    assert runs[ids[1]].state.message == "its launcher died"
    assert all(runs[i].flow_run_id == parent for i in ids)
