"""deployments/prefect.yaml: `prefect deploy --all` against the real Prefect server, then an
experiment deployment started with `prefect deployment run ... --param` and run by a
process worker: the experiment's work units complete."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import REPO, wait_for

pytestmark = pytest.mark.e2e

DEPLOYMENTS = REPO / "deployments"
POOLS = {  # name: extra `prefect work-pool create` arguments
    "xm-slurm": ["--type", "xm-slurm"],
    "xm-sge": ["--type", "xm-sge"],
    "docker": ["--type", "docker"],
    "kubernetes": ["--type", "kubernetes", "--base-job-template",
                   str(DEPLOYMENTS / "kubernetes-gpu-base-job-template.json")],
    "vertex-ai": ["--type", "vertex-ai"],
    "xm-experiments": ["--type", "process"],
}


def _prefect(server, *args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=server.env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"prefect {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def deployed(prefect_server):
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    for name, args in POOLS.items():
        _prefect(prefect_server, "work-pool", "create", name, *args, "--overwrite")
    started = time.monotonic()
    out = _prefect(prefect_server, "--no-prompt", "deploy", "--all", cwd=DEPLOYMENTS, timeout=600)
    print(f"prefect deploy --all: {time.monotonic() - started:.1f}s")
    return prefect_server, out.stdout


def test_deploy_all_declares_job_runners_and_experiments(deployed):
    from prefect.client.orchestration import get_client

    server, _ = deployed
    with get_client(sync_client=True) as client:
        for pool in ("xm-slurm", "xm-sge", "docker", "kubernetes", "vertex-ai"):
            d = client.read_deployment_by_name(f"xm-job-runner/{pool}")
            assert d.work_pool_name == pool
            assert d.entrypoint == "prefect_xm.flows.job_runner:run_job"
            assert not d.pull_steps
        k8s = client.read_work_pool("kubernetes")
        assert "gpu_count" in k8s.base_job_template["variables"]["properties"]
        sweep = client.read_deployment_by_name("xm-experiment/sweep")
        assert sweep.work_pool_name == "xm-experiments"
        assert sweep.entrypoint == "prefect_xm.flows.experiment:xm_experiment"
        props = sweep.parameter_openapi_schema["properties"]
        assert {"title", "command", "module", "args", "sweep", "hyper", "work_pool", "job_variables"} <= set(props)
        assert client.read_deployment_by_name("xm-experiment/sweep-slurm").parameters["work_pool"] == "xm-slurm"


def test_experiment_deployment_runs_a_sweep_given_as_parameters(deployed, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    server, _ = deployed
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "xm-experiments", "--type", "process"],
        cwd=tmp_path, env=server.env(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="0"),
        stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        out = _prefect(server, "deployment", "run", "xm-experiment/sweep",
                       "--param", "title=from-the-cli",
                       "--param", 'sweep=[{"learning_rate": 0.5, "batch_size": 8}]',
                       "--param", 'hyper={"learning_rate": [0.1, 0.01], "batch_size": [16]}')
        run_id = next(line.split()[-1] for line in out.stdout.splitlines() if "UUID" in line)
        with get_client(sync_client=True) as client:
            def final():
                run = client.read_flow_run(run_id)
                return run if run.state and run.state.is_final() else None

            run = wait_for(final, timeout=240, what="the experiment run to finish")
            elapsed = time.monotonic() - started
            assert run.state.is_completed(), (run.state, (tmp_path / "worker.log").read_text()[-3000:])
            assert run.name == "from-the-cli"
            exp_tag = next(t for t in run.tags if t.startswith("xm-experiment:"))
            wus = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=["xm-kind:work-unit", exp_tag])))
            assert sorted(json.dumps(w.parameters, sort_keys=True) for w in wus) == sorted(json.dumps(p, sort_keys=True) for p in [
                {"learning_rate": 0.5, "batch_size": 8}, {"learning_rate": 0.1, "batch_size": 16},
                {"learning_rate": 0.01, "batch_size": 16}])
            assert all(w.state.is_completed() for w in wus)
            # Work units are subflows of the experiment run (what the UI draws).
            for w in wus:
                assert client.read_task_run(w.parent_task_run_id).flow_run_id == run.id
            jobs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=["xm-kind:job", exp_tag])))
            assert len(jobs) == 3 and all(j.state.is_completed() for j in jobs)
            print(f"experiment deployment: 3 work units completed {elapsed:.1f}s after `prefect deployment run`")
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
