"""Sweeps on the real local Slurm, side by side in one run: raw sbatch of the same trivial
jobs (the scheduler's own limit), prefect-xm with direct execution (arrays), and the
engine path. Prints figures; asserts nothing.

    .venv/bin/python bench/sweep_bench.py [--trials 20 200] [--engine-trials 20] [--interval 5]
                                          [--topology N]

Needs `bash scripts/slurm-cluster.sh start` and `bash scripts/postgres-cluster.sh start`
(the Prefect server runs on a PostgreSQL database of its own, as in production; without
PostgreSQL it runs on SQLite). `--topology N` runs the server as Prefect's multi-process
topology instead (`scripts/prefect-server.sh start --workers N`: N API processes, the
services apart, Redis; needs PostgreSQL, redis-server and prefect-redis).

Before each size, `floor`: the seconds a bare client takes to create the same runs (the
four writes per trial that prefect-xm makes too) on this server, with no worker: the
server's own limit, as raw sbatch is the scheduler's.

For each mode and size: seconds from the first `experiment.add()` to the end of the add
loop, to every job run created, to every job queued (every job run has its scheduler id) and to every run final;
sbatch calls; squeue calls per poll interval; the worker's CPU seconds. The worker polls
Prefect and Slurm every --interval seconds (PREFECT_WORKER_QUERY_SECONDS and
PREFECT_XM_POLL_INTERVAL), as the issue's first measurement did.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if "PREFECT_XM_TEST_POSTGRES" not in os.environ:
    url = subprocess.run(["bash", str(REPO / "scripts" / "postgres-cluster.sh"), "url"],
                         capture_output=True, text=True)
    os.environ["PREFECT_XM_TEST_POSTGRES"] = url.stdout.strip() if url.returncode == 0 else ""

CLK_TCK = os.sysconf("SC_CLK_TCK")
MEMORY = "100M"


def start_server(root: Path, topology: int = 0):
    """(server, stop, what it runs on)"""
    import conftest

    if topology:
        import topology as topologies

        return topologies.start_for_bench(root, topology)
    database = conftest._create_postgres_database()
    port = conftest.free_port()
    env = dict(os.environ, PREFECT_HOME=str(root / "server"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    if database:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database[1]
        env["PREFECT_API_BLOCKS_REGISTER_ON_START"] = "false"
    (root / "server").mkdir()
    log = root / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = conftest.PrefectServer(root / "server", port, proc)
    conftest._wait_healthy(proc, server.api_url, log)

    def stop() -> None:
        proc.terminate()
        proc.wait(30)
        if database:
            conftest._drop_postgres_database(database[0])

    return server, stop, "PostgreSQL" if database else "SQLite"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def my_jobs() -> set[str]:
    out = subprocess.run(["squeue", "--me", "-h", "-o", "%i"], capture_output=True, text=True)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def raw_sbatch(n: int, root: Path) -> dict:
    """The same trivial jobs straight to sbatch, one call each: the scheduler's limit."""
    started = time.monotonic()
    ids = []
    for _ in range(n):
        out = subprocess.run(["sbatch", "--parsable", f"--mem={MEMORY}", "-o", "/dev/null", "--wrap", "true"],
                             capture_output=True, text=True, check=True)
        ids.append(out.stdout.strip().split(";")[0])
    queued = time.monotonic() - started
    while set(ids) & my_jobs():
        time.sleep(0.2)
    return dict(queued=queued, final=time.monotonic() - started, submits=n)


def server_floor(n: int, pool: str) -> dict:
    """The writes that create n trials (per trial: a link task run and the work unit's
    run, a link and the job's run from the job runner's deployment), by a bare client,
    8 trials at a time, on a pool no worker serves: what this Prefect server allows
    before any of prefect-xm's own work."""
    import asyncio

    from prefect import Task, flow
    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    from prefect_xm.core.api import CREATION_CONCURRENCY
    from prefect_xm.core.deployments import ensure_job_runner_deployment
    from prefect_xm.core.runtime import Runtime

    @flow(name="bench-floor")
    def floor_flow():
        pass

    deployment_id = Runtime.get().run(ensure_job_runner_deployment(pool))

    async def main() -> float:
        async with get_client() as client:
            parent = await client.create_flow_run(floor_flow, name="floor")
            slots = asyncio.Semaphore(CREATION_CONCURRENCY)
            link = Task(name="link", fn=lambda: None)

            async def trial(i: int) -> None:
                async with slots:
                    wu_link = await client.create_task_run(task=link, flow_run_id=parent.id, dynamic_key=str(i),
                                                           state=Running())
                    wu = await client.create_flow_run(floor_flow, name=f"floor-wu{i}", parameters={},
                                                      parent_task_run_id=wu_link.id, state=Pending())
                    job_link = await client.create_task_run(task=link, flow_run_id=wu.id, dynamic_key="job",
                                                            state=Running())
                    await client.create_flow_run_from_deployment(
                        deployment_id, parameters={"executable": {"kind": "command", "command": ["true"]},
                                                   "args": [], "env": {}},
                        parent_task_run_id=job_link.id, job_variables={"execution": "direct", "memory": MEMORY})

            started = time.monotonic()
            await asyncio.gather(*(trial(i) for i in range(n)))
            return time.monotonic() - started

    return dict(created=asyncio.run(main()))


def sweep(n: int, pool: str, execution: str, worker, wrappers) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from prefect_xm import xm, xm_local

    sbatch_before = len(wrappers.calls("sbatch"))
    squeue_before = len(wrappers.calls("squeue"))
    cpu_before = cpu_seconds(worker.proc.pid)
    executor = xm_local.Slurm(work_pool=pool, job_variables={"execution": execution, "memory": MEMORY})
    with xm_local.create_experiment(experiment_title=f"bench-{execution}-{n}") as experiment:
        [true] = experiment.package([xm.Packageable(xm.Command(["true"]), xm_local.Slurm.Spec())])
        started = time.monotonic()
        for i in range(n):
            experiment.add(xm.Job(true, executor, args={"trial": i}))
        added = time.monotonic() - started
        tags = ["xm-kind:job", f"xm-experiment:{experiment.experiment_id}"]
        created = None
        with get_client(sync_client=True) as client:
            while True:
                # (one page: the server's default limit is 200 runs)
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)))
                if created is None and len(runs) == n:
                    created = time.monotonic() - started
                if len(runs) == n and all(r.infrastructure_pid for r in runs):
                    break
                time.sleep(0.25)
        queued = time.monotonic() - started
        statuses = experiment.wait_until_complete()
        final = time.monotonic() - started
    bad = [s for s in statuses.values() if not s.is_completed]
    return dict(added=added, created=created, queued=queued, final=final, submits=len(wrappers.calls("sbatch")) - sbatch_before,
                squeues=len(wrappers.calls("squeue")) - squeue_before,
                cpu=cpu_seconds(worker.proc.pid) - cpu_before, not_completed=len(bad))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--engine-trials", type=int, nargs="*", default=[20],
                        help="sizes also run on the engine path (seconds of CPU per job: keep them small)")
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--topology", type=int, default=0, metavar="N",
                        help="the server as N API processes, services apart and Redis (prefect-server.sh --workers N)")
    args = parser.parse_args()

    from e2e import CountingWrappers, WorkerProcess, create_pool

    root = Path(tempfile.mkdtemp(prefix="xm-sweep-bench-"))
    server, stop_server, backend = start_server(root, args.topology)
    worker = None
    try:
        os.environ.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(server.home))
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
        pool = "bench-slurm"
        create_pool(server, pool, "xm-slurm")
        idle_pool = "bench-slurm-no-worker"
        create_pool(server, idle_pool, "xm-slurm")
        wrappers = CountingWrappers(root, ["sbatch", "squeue"])
        worker = WorkerProcess(server, pool, "xm-slurm", root, path_prefix=wrappers.dir,
                               PREFECT_XM_POLL_INTERVAL=str(args.interval),
                               PREFECT_WORKER_QUERY_SECONDS=str(args.interval)).start()
        print(f"Prefect server on {backend}; Slurm poll and worker query every {args.interval:g} s; "
              f"{os.cpu_count()} cores")
        print(f"{'mode':<8} {'trials':>6} {'adds s':>7} {'created s':>9} {'queued s':>9} {'final s':>8} {'x raw':>6} "
              f"{'sbatch':>7} {'squeue/poll':>11} {'worker CPU s':>12}")
        for n in args.trials:
            raw = raw_sbatch(n, root)
            print(f"{'raw':<8} {n:>6} {'':>7} {'':>9} {raw['queued']:>9.1f} {raw['final']:>8.1f} {1.0:>6.2f} "
                  f"{raw['submits']:>7} {'':>11} {'':>12}")
            floor = server_floor(n, idle_pool)
            print(f"{'floor':<8} {n:>6} {'':>7} {floor['created']:>9.1f} {'':>9} {'':>8} {'':>6} "
                  f"{'':>7} {'':>11} {'':>12}", flush=True)
            modes = ["direct"] + (["engine"] if n in args.engine_trials else [])
            for mode in modes:
                r = sweep(n, pool, mode, worker, wrappers)
                polls = max(1.0, r["final"] / args.interval)
                note = f"  ({r['not_completed']} not completed)" if r["not_completed"] else ""
                print(f"{mode:<8} {n:>6} {r['added']:>7.2f} {r['created']:>9.1f} {r['queued']:>9.1f} {r['final']:>8.1f} "
                      f"{r['final'] / raw['final']:>6.2f} {r['submits']:>7} {r['squeues'] / polls:>11.2f} "
                      f"{r['cpu']:>12.1f}{note}", flush=True)
    finally:
        if worker is not None:
            worker.stop()
        stop_server()

if __name__ == "__main__":
    main()
