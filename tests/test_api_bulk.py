"""The bulk routes Prefect's client does not wrap, as prefect_xm.api_client calls them,
against the real Prefect server: runs created 100 to a request and answered per run,
states set 50 to a request and orchestrated per run, and a worker's reads of a
deployment shared by a batch."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from conftest import RequestLog
from prefect_xm import api_client

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(prefect_server):
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    return prefect_server


async def _deployment(client, pool_type: str = "process") -> uuid.UUID:
    from prefect import flow
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = f"bulk-{uuid.uuid4().hex[:8]}"
    await client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type))

    @flow(name=f"bulk-{pool}")
    def noop():
        pass

    flow_id = await client.create_flow(noop)
    return await client.create_deployment(flow_id=flow_id, name="d", work_pool_name=pool, entrypoint="x.py:noop")


async def _runs(client, prefix: str, n: int) -> list[uuid.UUID]:
    """n Scheduled runs named <prefix>-<i> of a deployment on a pool of their own."""
    created = await api_client.create_flow_runs_from_deployment(
        client, await _deployment(client), [{"name": f"{prefix}-{i}"} for i in range(n)])
    return [c.flow_run_id for c in created]


def test_a_sweep_of_250_runs_is_three_requests_and_each_run_is_answered(api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentFlowRunCreate
    from prefect.states import Scheduled, to_state_create

    async def go():
        async with get_client() as client:
            deployment_id = await _deployment(client)
            counting = RequestLog(client)
            runs = [DeploymentFlowRunCreate(name=f"trial-{i}", parameters={}, tags=["xm", f"t{i}"],
                                            state=to_state_create(Scheduled()), idempotency_key=f"k-{i}")
                    for i in range(250)]
            created = await api_client.create_flow_runs_from_deployment(client, deployment_id, runs)
            requests = list(counting.seen)
            again = await api_client.create_flow_runs_from_deployment(client, deployment_id, runs[:3])
            read = await client.read_flow_run(created[7].flow_run_id)
            return created, requests, again, read

    created, requests, again, read = asyncio.run(go())
    assert len(created) == 250 and all(c.flow_run_id and not c.error for c in created)
    assert len({c.flow_run_id for c in created}) == 250
    assert len(requests) == 3 and all(r.startswith("POST /api/deployments/") and r.endswith("/create_flow_run/bulk")
                                      for r in requests), requests
    assert read.name == "trial-7" and "t7" in read.tags and read.state.is_scheduled()
    # sent again (a retried request): the same runs, not new ones
    assert [a.flow_run_id for a in again] == [c.flow_run_id for c in created[:3]]


def test_a_refused_run_is_answered_with_its_reason_and_the_others_are_created(api):
    """A run the database refuses (its parent task run does not exist) rolls back the
    runs of its request that came before it and fails those after it: each of those is
    sent again, and every id answered is a run that exists."""
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            deployment_id = await _deployment(client)
            created = await api_client.create_flow_runs_from_deployment(client, deployment_id, [
                {"name": "before"},
                {"name": "dangling", "parent_task_run_id": str(uuid.uuid4())},  # no such task run
                {"name": "after"},
                {"name": "dangling-too", "parent_task_run_id": str(uuid.uuid4())},
                {"name": "last"},
            ])
            names = {c.flow_run_id: (await client.read_flow_run(c.flow_run_id)).name for c in created if c.flow_run_id}
            return created, names

    (before, dangling, after, bad, last), names = asyncio.run(go())
    assert dangling.flow_run_id is None and dangling.error
    assert bad.flow_run_id is None and bad.error
    assert [names.get(c.flow_run_id) for c in (before, after, last)] == ["before", "after", "last"]


def test_coalesced_creations_go_in_bulk_and_each_caller_gets_its_run(api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentFlowRunCreate

    async def go():
        async with get_client() as client:
            deployment_id = await _deployment(client)
            counting = RequestLog(client)
            creations = api_client.CoalescedCreations(client)
            ids = await asyncio.gather(*(creations.create(deployment_id, DeploymentFlowRunCreate(name=f"c-{i}"))
                                         for i in range(130)))
            runs = {i: await client.read_flow_run(i) for i in ids[:5]}
            return ids, counting.seen, runs

    ids, seen, runs = asyncio.run(go())
    assert len(set(ids)) == 130
    assert sum("create_flow_run/bulk" in s for s in seen) == 2, seen  # 100 + 30
    assert [runs[i].name for i in ids[:5]] == [f"c-{i}" for i in range(5)]


def test_bulk_states_are_orchestrated_per_run(api):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Pending, Running

    async def go():
        async with get_client() as client:
            ids = await _runs(client, "s", 60)
            # one of them is cancelled already: Prefect refuses Pending for it
            await client.set_flow_run_state(ids[0], Cancelled(), force=True)
            counting = RequestLog(client)
            answers = await api_client.set_flow_run_states(client, ids, Pending())
            requests = list(counting.seen)
            running = await api_client.set_flow_run_states(client, ids[1:3], Running(message="started"))
            states = [(await client.read_flow_run(i)).state for i in ids[:3]]
            return ids, answers, requests, running, states

    ids, answers, requests, running, states = asyncio.run(go())
    by_id = {a.flow_run_id: a for a in answers}
    assert len(requests) == 2, requests  # 50 + 10
    assert set(by_id) == set(ids)
    assert not by_id[ids[0]].accepted and by_id[ids[0]].state_type == "CANCELLED"
    assert all(by_id[i].accepted and by_id[i].state_type == "PENDING" for i in ids[1:])
    assert all(r.accepted for r in running)
    assert states[0].is_cancelled() and states[1].is_running() and states[1].message == "started"


def test_a_batch_reads_its_deployment_and_flow_once_and_each_caller_gets_its_own_copy(api):
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            deployment_id = await _deployment(client)
            api_client.read_once_per_batch(client, seconds=60)
            counting = RequestLog(client)
            deployments = await asyncio.gather(*(client.read_deployment(deployment_id) for _ in range(20)))
            deployments[0].job_variables["env"] = {"MINE": "1"}  # as Prefect's worker merges a run's env
            later = await client.read_deployment(deployment_id)
            await client.read_flow(later.flow_id)
            await client.read_flow(later.flow_id)
            return counting.seen, later

    seen, later = asyncio.run(go())
    assert len(seen) == 2 and seen[0].startswith("GET /api/deployments/") and seen[1].startswith("GET /api/flows/"), seen
    assert "env" not in (later.job_variables or {})


def test_coalesced_states_go_in_bulk_and_each_run_gets_its_own_answer(api):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Pending

    async def go():
        async with get_client() as client:
            ids = await _runs(client, "p", 70)
            await client.set_flow_run_state(ids[3], Cancelled(), force=True)
            counting = RequestLog(client)
            states = api_client.CoalescedStates(client)
            answers = await asyncio.gather(*(states.propose(i, Pending()) for i in ids))
            return ids, answers, counting.seen

    ids, answers, seen = asyncio.run(go())
    assert sum("bulk_set_state" in s for s in seen) == 2 and len(seen) == 2, seen  # 50 + 20
    assert [a.flow_run_id for a in answers] == ids
    assert not answers[3].accepted and answers[3].state_type == "CANCELLED"
    assert all(a.accepted and a.state_type == "PENDING" for k, a in enumerate(answers) if k != 3)


def test_coalesced_run_reads_go_200_to_a_request_and_a_run_that_is_gone_raises_as_prefects_read(api):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async def go():
        async with get_client() as client:
            ids = await _runs(client, "r", 250)
            counting = RequestLog(client)
            reads = api_client.CoalescedRunReads(client)
            runs = await asyncio.gather(*(reads.read(i) for i in ids), reads.read(ids[5]))
            with pytest.raises(ObjectNotFound):
                await reads.read(uuid.uuid4())
            return ids, runs, counting.seen

    ids, runs, seen = asyncio.run(go())
    assert [r.id for r in runs] == ids + [ids[5]] and runs[0].name == "r-0"
    # 200 + 50 in two filter requests; the unknown run: its own filter, then Prefect's read
    assert seen.count("POST /api/flow_runs/filter") == 3 and len(seen) == 4, seen
