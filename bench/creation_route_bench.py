"""What creating a sweep's job runs costs the Prefect server, by route, in one run: the
deployment's bulk route (100 runs a request; the server checks every run's job variables
against the pool's schema) against `POST /flow_runs/` (one run a request, the deployment,
pool and job variables named in it; no check), on an xm-slurm pool and its job-runner
deployment, as prefect-xm creates them. Prints figures; asserts nothing.

    .venv/bin/python bench/creation_route_bench.py [--runs 200] [--rounds 2] [--concurrency 8]

The server's CPU seconds per run are the figure to read (wall time follows them on a
server that does nothing else); rounds alternate the routes so that a machine busy with
other work weighs on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from sweep_bench import cpu_seconds, start_server  # noqa: E402  (sets the PostgreSQL URL)


TOMORROW = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)


def job_run(i: int, deployment, pool_name: str):
    from prefect.client.schemas.actions import DeploymentFlowRunCreate
    from prefect.states import Scheduled, to_state_create

    params = {"executable": {"kind": "command", "command": ["true"]}, "args": [f"--i={i}"], "env": {}}
    return DeploymentFlowRunCreate(name=f"bench-{i}", parameters=params, tags=["xm", "bench"],
                                   # (due tomorrow: a run Scheduled in the past turns Late 15 s on, and
                                   # Prefect's late-runs service marking a round's runs weighed on the next)
                                   state=to_state_create(Scheduled(scheduled_time=TOMORROW)),
                                   job_variables={"execution": "direct"},
                                   idempotency_key=f"bench:{os.getpid()}:{time.monotonic_ns()}:{i}")


async def bulk(client, deployment, runs) -> None:
    from prefect_xm.api_client import create_flow_runs_from_deployment

    created = await create_flow_runs_from_deployment(client, deployment.id, runs)
    assert all(c.flow_run_id for c in created), created[:3]


async def single(client, deployment, runs, concurrency: int) -> None:
    """Each run on its own `POST /flow_runs/`, as a client that checked the job variables
    itself would send it: the deployment's flow, the deployment, its pool and queue."""
    slots = asyncio.Semaphore(concurrency)

    async def one(run) -> None:
        body = run.model_dump(mode="json", exclude_unset=True)
        body.update(flow_id=str(deployment.flow_id), deployment_id=str(deployment.id),
                    work_pool_name=deployment.work_pool_name, work_queue_name=deployment.work_queue_name)
        async with slots:
            response = await client._client.post("/flow_runs/", json=body)
            response.raise_for_status()

    await asyncio.gather(*(one(r) for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    from e2e import create_pool

    root = Path(tempfile.mkdtemp(prefix="xm-creation-bench-"))
    server, stop_server, backend = start_server(root)
    try:
        os.environ.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(server.home))
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
        create_pool(server, "bench-slurm", "xm-slurm")
        from prefect.client.orchestration import get_client

        from prefect_xm.core.deployments import ensure_job_runner_deployment
        from prefect_xm.core.runtime import Runtime

        deployment_id = Runtime.get().run(ensure_job_runner_deployment("bench-slurm"))

        async def go() -> list[tuple[str, float, float]]:
            figures = []
            async with get_client() as client:
                deployment = await client.read_deployment(deployment_id)
                for round_ in range(args.rounds):
                    for route in ("bulk", "single"):
                        runs = [job_run(i, deployment, "bench-slurm") for i in range(args.runs)]
                        cpu, wall = cpu_seconds(server.proc.pid), time.monotonic()
                        if route == "bulk":
                            await bulk(client, deployment, runs)
                        else:
                            await single(client, deployment, runs, args.concurrency)
                        figures.append((route, time.monotonic() - wall, cpu_seconds(server.proc.pid) - cpu))
            return figures

        figures = asyncio.run(go())
        print(f"Prefect server on {backend}, {os.cpu_count()} cores; {args.runs} job runs a round on an xm-slurm pool")
        print(f"{'route':8} {'wall s':>7} {'server CPU s':>12} {'ms CPU/run':>10} {'requests':>8}")
        for route, wall, cpu in figures:
            requests = -(-args.runs // 100) if route == "bulk" else args.runs
            print(f"{route:8} {wall:7.1f} {cpu:12.1f} {1000 * cpu / args.runs:10.1f} {requests:8d}")
    finally:
        stop_server()


if __name__ == "__main__":
    main()
