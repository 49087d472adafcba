"""A sweep at the scale of a real cluster on the real local Slurm: N trivial direct jobs
through `experiment.add`, held in the queue until all are tracked, then released. Prints
figures against the goals of issue 15; asserts nothing.

    .venv/bin/python bench/scale_bench.py [--trials 1000] [--interval 5] [--sqlite] [--idle 30]
                                          [--login-install] [--topology N]

Needs `bash scripts/slurm-cluster.sh start` and (unless --sqlite) `bash
scripts/postgres-cluster.sh start`. The Prefect server is Prefect's own app behind a
request-counting middleware (bench/counting_server.py); the worker and the launcher name
themselves in a header, so requests are counted per client. `--topology N` runs the
server as Prefect's multi-process topology instead (`scripts/prefect-server.sh start
--workers N`: N API processes, the services apart, Redis; needs redis-server and
prefect-redis), whose API requests are not counted (printed as nan): the middleware wraps
one process.

Figures: raw sbatch of the same jobs (the scheduler's limit, for scale); seconds from the
first add() to every job run created and to every job queued; with all N held: the
worker's RSS, its API requests and squeue calls per poll; after release, seconds to all
final; Prefect API requests per trial (launcher, worker); runs not Completed; then the
idle worker's CPU share and RSS.

`prefect worker start` imports every Prefect collection installed beside it (the
`prefect.collections` entry point): in this repository's .venv, with the extras for the
Docker, Kubernetes and Vertex AI executors, that is about 250 MB of prefect-gcp and
prefect-kubernetes in every worker. `--login-install` runs both workers from a virtualenv
holding prefect-xm alone (.venv-login, made once), as docs/production.md tells a login node to
install it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PREFECT_CLIENT_CUSTOM_HEADERS"] = json.dumps({"X-XM-Bench": "launcher"})

from counting_server import by_route, per_trial  # noqa: E402
from sweep_bench import MEMORY, cpu_seconds, raw_sbatch  # noqa: E402


LOGIN_VENV = REPO / ".venv-login"


def login_install() -> str:
    """The Python of a virtualenv with prefect-xm and no extras (the verified versions)."""
    python = LOGIN_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LOGIN_VENV)], check=True)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "-c", str(REPO / "constraints.txt"), "-e", str(REPO)], capture_output=True, text=True)
    if pip.returncode != 0:  # (its warnings about this machine's package mirrors are noise)
        sys.exit(f"making {LOGIN_VENV} failed:\n{pip.stdout}{pip.stderr}")
    return str(python)


def collections_of(python: str) -> list[str]:
    """The Prefect collections a worker started with ``python`` imports."""
    code = ("from importlib.metadata import entry_points; "
            "print(' '.join(sorted(e.name for e in entry_points(group='prefect.collections'))))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_server(root: Path, sqlite: bool, topology: int = 0):
    """(server, stop, the request counts file or None, what it runs on)"""
    import conftest

    if topology:
        import topology as topologies

        server, stop, backend = topologies.start_for_bench(root, topology)
        return server, stop, None, backend
    database = None if sqlite else conftest._create_postgres_database()
    port = conftest.free_port()
    env = dict(os.environ, PREFECT_HOME=str(root / "server"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    if database:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database[1]
        env["PREFECT_API_BLOCKS_REGISTER_ON_START"] = "false"
    (root / "server").mkdir()
    counts = root / "requests.json"
    log = root / "server.log"
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "counting_server.py"), str(port), str(counts)],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    server = conftest.PrefectServer(root / "server", port, proc)
    conftest._wait_healthy(proc, server.api_url, log)

    def stop() -> None:
        proc.terminate()
        proc.wait(30)
        if database:
            conftest._drop_postgres_database(database[0])

    return server, stop, counts, "SQLite" if sqlite else "PostgreSQL"


def requests(counts: Path | None, role: str) -> float:
    if counts is None:
        return float("nan")  # not counted (--topology)
    time.sleep(1.2)  # the server writes its counts every second
    data = json.loads(counts.read_text()) if counts.exists() else {}
    return sum(n for key, n in data.items() if key.startswith(role + " "))


def job_runs(client, tags) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    runs, offset = [], 0
    while True:
        page = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)),
                                     limit=200, offset=offset)
        runs += page
        if len(page) < 200:
            return runs
        offset += 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--sqlite", action="store_true", help="a SQLite-backed server (Prefect's default)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds the idle worker is watched")
    parser.add_argument("--login-install", action="store_true",
                        help="run the workers from a virtualenv with prefect-xm alone, as on a login node")
    parser.add_argument("--topology", type=int, default=0, metavar="N",
                        help="the server as N API processes, services apart and Redis (prefect-server.sh --workers N)")
    args = parser.parse_args()
    worker_python = login_install() if args.login_install else sys.executable
    n = args.trials
    if not args.sqlite and "PREFECT_XM_TEST_POSTGRES" not in os.environ:
        url = subprocess.run(["bash", str(REPO / "scripts" / "postgres-cluster.sh"), "url"],
                             capture_output=True, text=True)
        os.environ["PREFECT_XM_TEST_POSTGRES"] = url.stdout.strip() if url.returncode == 0 else ""

    from e2e import CountingWrappers, WorkerProcess, create_pool

    root = Path(tempfile.mkdtemp(prefix="xm-scale-bench-"))
    server, stop_server, counts, backend = start_server(root, args.sqlite, args.topology)
    os.environ.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(server.home))
    from prefect.client.orchestration import get_client
    from prefect.context import refresh_global_settings_context

    from prefect_xm import xm, xm_local
    from prefect_xm.workers.scheduler import Scheduler
    from prefect_xm.workers.slurm import SlurmScheduler

    refresh_global_settings_context()
    pool = "scale-slurm"
    wrappers = CountingWrappers(root, ["sbatch", "squeue"])
    try:
        create_pool(server, pool, "xm-slurm")
        worker = WorkerProcess(server, pool, "xm-slurm", root, path_prefix=wrappers.dir, python=worker_python,
                               PREFECT_XM_POLL_INTERVAL=str(args.interval),
                               PREFECT_WORKER_QUERY_SECONDS=str(args.interval),
                               PREFECT_CLIENT_CUSTOM_HEADERS=json.dumps({"X-XM-Bench": "worker"})).start()
    except BaseException:
        stop_server()  # (the topology's processes must not outlive the bench)
        raise
    print(f"{n} trials; Prefect server on {backend}; Slurm poll and worker query every {args.interval:g} s; "
          f"{os.cpu_count()} cores", flush=True)
    print(f"workers run from {worker_python}, importing the Prefect collections "
          f"{', '.join(collections_of(worker_python))}", flush=True)
    peak_rss = [0.0]
    sampling = [True]
    own_reads = [0]  # this bench's reads, sent as "launcher" too (one process, one header)
    own_counts = [0]  # and its counts of the runs created so far
    arrays: list[str] = []

    def sample() -> None:
        while sampling[0] and worker.proc.poll() is None:
            peak_rss[0] = max(peak_rss[0], rss_mb(worker.proc.pid))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    try:
        raw = raw_sbatch(min(n, 200), root)
        print(f"raw sbatch of {min(n, 200)} jobs: all queued {raw['queued']:.1f} s, all final {raw['final']:.1f} s",
              flush=True)
        time.sleep(2 * args.interval)
        idle_before = requests(counts, "worker")
        idle_counts = json.loads(counts.read_text()) if counts.exists() else {}

        executor = xm_local.Slurm(work_pool=pool, job_variables={
            "execution": "direct", "memory": MEMORY, "extra_directives": ["--hold"]})
        crashed = None
        try:
            with xm_local.create_experiment(experiment_title=f"scale-{n}") as experiment:
                [true] = experiment.package([xm.Packageable(xm.Command(["true"]), xm_local.Slurm.Spec())])
                started = time.monotonic()
                for i in range(n):
                    experiment.add(xm.Job(true, executor, args={"trial": i}))
                added = time.monotonic() - started
                tags = ["xm-kind:job", f"xm-experiment:{experiment.experiment_id}"]
                created = None
                with get_client(sync_client=True) as client:
                    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

                    # (a count until all exist, then whole runs: the bench's own reads must not
                    # load the server it measures; every run read every 2 s did, on SQLite)
                    while True:
                        count = client.count_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)))
                        own_counts[0] += 1
                        if count < n:
                            time.sleep(2)
                            continue
                        if created is None:
                            created = time.monotonic() - started
                        runs = job_runs(client, tags)
                        own_reads[0] += len(runs) // 200 + 1
                        # (a run crashed before it was submitted never gets a job: it is counted at the end)
                        if all(r.infrastructure_pid or (r.state and r.state.is_final()) for r in runs):
                            break
                        time.sleep(2)
                queued = time.monotonic() - started
                print(f"add() loop {added:.2f} s; all {n} runs created {created:.1f} s; all queued {queued:.1f} s; "
                      f"sbatch calls {len(wrappers.calls('sbatch'))}", flush=True)

                # all N held and tracked: what one poll costs
                polls = 3
                req0, sq0, cpu0 = requests(counts, "worker"), len(wrappers.calls("squeue")), cpu_seconds(worker.proc.pid)
                time.sleep(polls * args.interval)
                req1, sq1, cpu1 = requests(counts, "worker"), len(wrappers.calls("squeue")), cpu_seconds(worker.proc.pid)
                window = polls * args.interval + 1.2
                print(f"{n} jobs tracked: worker RSS {rss_mb(worker.proc.pid):.0f} MB, "
                      f"API requests per poll {(req1 - req0) * args.interval / window:.1f}, "
                      f"squeue per poll {(sq1 - sq0) * args.interval / window:.2f}, "
                      f"CPU {(cpu1 - cpu0) / window * 100:.1f}% of a core", flush=True)

                lost = [r for r in runs if not r.infrastructure_pid]
                if lost:
                    print(f"{len(lost)} of {n} job runs never reached Slurm: {lost[0].state.name}: "
                          f"{(lost[0].state.message or '')[:200]}", flush=True)
                arrays[:] = sorted({SlurmScheduler().array_of(j) or j for j in
                                 (Scheduler.parse_infrastructure_pid(r.infrastructure_pid)[2] for r in runs
                                  if r.infrastructure_pid)})
                released = time.monotonic()
                subprocess.run(["scontrol", "release", ",".join(arrays)], check=True, capture_output=True)
                statuses = experiment.wait_until_complete()
                final = time.monotonic() - started
                print(f"released {len(arrays)} array(s)/job(s): all final {time.monotonic() - released:.1f} s later "
                      f"({final:.1f} s after the first add)", flush=True)
        except Exception as e:  # e.g. a 503 that killed the launch script: the figure to report
            crashed = f"{type(e).__name__}: {e}"
        launcher = requests(counts, "launcher") - own_reads[0] - own_counts[0]
        worker_requests = requests(counts, "worker") - idle_before
        print(f"Prefect API requests per trial: launcher {launcher / n:.1f}, worker {worker_requests / n:.1f}; "
              f"worker peak RSS {peak_rss[0]:.0f} MB", flush=True)
        now_counts = json.loads(counts.read_text())
        # (this bench's own reads are sent as the launcher's: taken off its reads)
        print("  by kind, per trial: " + per_trial(now_counts, "launcher", n,
                                                   minus={"launcher GET /bench-own-reads": own_reads[0] + own_counts[0]}),
              flush=True)
        print("  by kind, per trial: " + per_trial(now_counts, "worker", n, minus=idle_counts), flush=True)
        own = {"launcher POST /api/flow_runs/filter": own_reads[0],  # (the bench's own reads and counts)
               "launcher POST /api/flow_runs/count": own_counts[0]}
        print("  by route, per trial: launcher: " + by_route(now_counts, "launcher", n, minus=own), flush=True)
        print("  by route, per trial: worker: " + by_route(now_counts, "worker", n, minus=idle_counts), flush=True)
        if crashed:
            print(f"the launch script died: {crashed}")
        else:
            bad = [s for s in statuses.values() if not s.is_completed]
            print(f"work units not Completed: {len(bad)}" + (f" (first: {bad[0]})" if bad else ""))

        time.sleep(2 * args.interval)
        stock = WorkerProcess(server, "scale-process", "process", root, python=worker_python,
                              PREFECT_WORKER_QUERY_SECONDS=str(args.interval)).start()
        cpu0, stock_cpu0 = cpu_seconds(worker.proc.pid), cpu_seconds(stock.proc.pid)
        time.sleep(args.idle)
        print(f"idle worker: CPU {(cpu_seconds(worker.proc.pid) - cpu0) / args.idle * 100:.1f}% of a core, "
              f"RSS {rss_mb(worker.proc.pid):.0f} MB; Prefect's own process worker beside it, idle: CPU "
              f"{(cpu_seconds(stock.proc.pid) - stock_cpu0) / args.idle * 100:.1f}%, "
              f"RSS {rss_mb(stock.proc.pid):.0f} MB", flush=True)
        stock.stop()
    finally:
        sampling[0] = False
        worker.stop()
        if arrays:  # (a failed run must not leave held jobs behind)
            subprocess.run(["scancel", *arrays], capture_output=True)
        stop_server()


if __name__ == "__main__":
    main()
