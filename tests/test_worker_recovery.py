"""The worker's recovery pass against a real Prefect server, with a scripted scheduler:
what it takes over, and what it must leave alone (end to end in batch_suite.py)."""

from __future__ import annotations

from uuid import uuid4

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.states import Cancelled, Cancelling, Running

from prefect_xm.workers.slurm import SlurmWorker

from test_poller import ScriptedTransport


@flow
def _job():
    pass


async def test_a_run_that_ended_while_the_recovery_pass_looked_is_not_taken_over(prefect_server):
    """The pass lists the pool's live runs, then asks which workers are online: a
    Cancelling run this worker followed may be removed, Cancelled and let go meanwhile.
    Taken from the stale list, it would get a second removal of its own (seen as an
    extra per-task cancel after its array's)."""
    async with get_client() as client:
        pool = await client.create_work_pool(WorkPoolCreate(
            name=f"recover-{uuid4().hex[:8]}", type="xm-slurm",
            base_job_template=SlurmWorker.get_default_base_job_template()))
        flow_id = await client.create_flow(_job)
        deployment_id = await client.create_deployment(flow_id, "recover", work_pool_name=pool.name)
        run = await client.create_flow_run_from_deployment(deployment_id)
        worker = SlurmWorker(work_pool_name=pool.name)
        await client.set_flow_run_state(run.id, Running(), force=True)
        await client.update_flow_run(run.id, infrastructure_pid="slurm:local:42_1")
        await client.update_flow_run_labels(run.id, {"prefect.worker.name": worker.name})
        await client.set_flow_run_state(run.id, Cancelling(), force=True)

        transport = ScriptedTransport(scancel=[(0, "", "")], squeue=[(0, "", "")])
        worker._client, worker._work_pool = client, pool
        worker._transports = {"local": transport}

        async def the_run_ends_meanwhile() -> set[str]:
            await client.set_flow_run_state(run.id, Cancelled(), force=True)
            return set()

        worker._online_worker_names = the_run_ends_meanwhile
        try:
            assert await worker.recover_runs() == []
            assert not worker._followed and not any(c[0] == "scancel" for c in transport.calls)
        finally:
            for task in worker._background:
                task.cancel()
            for poller in worker._pollers.values():
                await poller.close()


async def test_reads_of_the_pools_runs_go_past_the_apis_page(prefect_server, monkeypatch):
    """The server answers a page of runs per request (200 by default): recovery and the
    cancel watch of a 1,000-task sweep must see them all, not the first page."""
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    from prefect_xm.workers import bulk_calls

    async with get_client() as client:
        pool = await client.create_work_pool(WorkPoolCreate(
            name=f"paging-{uuid4().hex[:8]}", type="xm-slurm",
            base_job_template=SlurmWorker.get_default_base_job_template()))
        flow_id = await client.create_flow(_job)
        deployment_id = await client.create_deployment(flow_id, "paging", work_pool_name=pool.name)
        created = {(await client.create_flow_run_from_deployment(deployment_id)).id for _ in range(5)}
        worker = SlurmWorker(work_pool_name=pool.name)
        worker._client = client
        monkeypatch.setattr(bulk_calls, "API_PAGE", 2)
        runs = await worker._read_all_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool.name])))
        assert {r.id for r in runs} == created and len(runs) == 5
