"""Prefect's production topology, run for real: `scripts/prefect-server.sh start --workers 2`
(two API processes on one port, the background services in a process of their own, Redis
as broker, cache, event ordering and lease storage, PostgreSQL), an xm-slurm worker and a
launch script talking to it, a 20-trial sweep on the real Slurm. Nothing may be lost
between the processes: every work unit and job Completed, no run Crashed, every job ran."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from conftest import cluster_is_up, require_service

# (beyond the suite's 600 s: four server processes start beside the suite's own, and a
# start took 87 s on this 2-core machine while the suite ran; the deadlines below wait on
# conditions, this one only stops a hang)
pytestmark = [pytest.mark.slurm, pytest.mark.e2e, pytest.mark.timeout(1800)]

TRIALS = 20

LAUNCHER = textwrap.dedent("""
    import json, sys
    from prefect_xm import hyper, xm, xm_local

    pool, run_dir, out, trials = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    code = ("import os, sys; open(os.path.join(sys.argv[1], sys.argv[2].split('=')[1]), 'w')"
            ".write(os.environ['SLURM_JOB_ID'])")
    executor = xm_local.Slurm(requirements=xm.JobRequirements(cpu=1, memory=100 * xm.MiB), time="10:00",
                              work_pool=pool, job_variables={"run_dir": run_dir})
    with xm_local.create_experiment(experiment_title="production-topology") as experiment:
        print("EXPERIMENT", experiment.experiment_id, flush=True)
        [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", code, out]),
                                                   xm_local.Slurm.Spec())])
        for args in hyper.sweep("trial", list(range(trials))):
            experiment.add(xm.Job(exe, executor, args=args))
        statuses = experiment.wait_until_complete()
    print("DONE", json.dumps({str(k): str(v) for k, v in statuses.items()}), flush=True)
""")


def test_a_sweep_through_two_api_processes_redis_and_separate_services_loses_nothing(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import topology
    from e2e import WorkerProcess, create_pool

    require_service("slurm", cluster_is_up("slurm-cluster.sh"), "start it with `bash scripts/slurm-cluster.sh start`")
    lacking = topology.missing()
    require_service("the production topology", lacking is None, lacking or "")

    topo = topology.Topology(tmp_path / "topology", workers=2)
    out = tmp_path / "out"
    out.mkdir()
    try:
        server = topo.start()
        print(f"topology answering after {topo.start_seconds:.0f} s (2 API processes, services, redis)")
        api_processes = topo.api_processes()
        assert len(api_processes) == 2, api_processes
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            pool = f"topology-{uuid.uuid4().hex[:6]}"
            create_pool(server, pool, "xm-slurm")
            worker = WorkerProcess(server, pool, "xm-slurm", tmp_path).start()
            try:
                script = tmp_path / "launch.py"
                script.write_text(LAUNCHER)
                sweep_started = time.monotonic()
                launched = subprocess.run(
                    [sys.executable, str(script), pool, str(tmp_path / "runs"), str(out), str(TRIALS)],
                    env=server.env(), capture_output=True, text=True, timeout=1200)
                assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]
                print(f"the {TRIALS}-trial sweep took {time.monotonic() - sweep_started:.0f} s, launch to all final")
                exp_id = launched.stdout.split("EXPERIMENT", 1)[1].split()[0]
                statuses = json.loads(launched.stdout.split("DONE", 1)[1])
                with get_client(sync_client=True) as client:
                    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                        tags=FlowRunFilterTags(all_=[f"xm-experiment:{exp_id}"])), limit=200)
                    histories = {r.id: [s.type.value for s in client.read_flow_run_states(r.id)] for r in runs}
                # Prefect's events went through Redis, not each process's memory
                assert "events" in topo.redis("--scan").split(), topo.redis("--scan")
                # and neither API process was replaced on the way (uvicorn's supervisor
                # replaces one that misses its health ping: prefect-server.sh allows 120 s)
                assert topo.api_processes() == api_processes, (api_processes, topo.api_processes())
            finally:
                worker.stop()
    finally:
        leftovers = topo.stop()

    def kind(run):
        return next(t.split(":", 1)[1] for t in run.tags if t.startswith("xm-kind:"))

    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(kind(r), []).append(r)
    assert len(statuses) == TRIALS, statuses
    assert sorted(len(by_kind.get(k, [])) for k in ("experiment", "work-unit", "job")) == [1, TRIALS, TRIALS], {
        k: len(v) for k, v in by_kind.items()}
    not_completed = [(kind(r), r.name, r.state.type.value, r.state.message) for r in runs if not r.state.is_completed()]
    assert not not_completed, not_completed
    crashed = [(kind(r), r.name, histories[r.id]) for r in runs if "CRASHED" in histories[r.id]]
    assert not crashed, crashed  # not even on the way
    ran = sorted(int(p.name) for p in out.iterdir())
    assert ran == list(range(TRIALS)), ran  # each trial's job ran, on Slurm
    assert leftovers == [], f"prefect-server.sh stop left these running: {leftovers}"
