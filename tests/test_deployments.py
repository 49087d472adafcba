"""deployments/prefect.yaml: `prefect deploy --all` against the real Prefect server, with
none of its work pools there beforehand: deploy creates the pools the file declares (and
leaves a pool it finds, customised or not, unchanged on the next deploy). Then an
experiment deployment started with `prefect deployment run ... --param` and run by a
process worker: the experiment's work units complete."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, wait_for

pytestmark = pytest.mark.e2e

DEPLOYMENTS = REPO / "deployments"
POOLS = {  # name: type, as deployments/prefect.yaml declares them
    "xm-experiments": "process",
    "xm-slurm": "xm-slurm",
    "xm-sge": "xm-sge",
    "docker": "docker",
    "kubernetes": "kubernetes",
    "vertex-ai": "vertex-ai",
}


def _prefect(server, *args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=server.env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"prefect {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _deploy_all(server) -> str:
    started = time.monotonic()
    out = _prefect(server, "--no-prompt", "deploy", "--all", cwd=DEPLOYMENTS, timeout=600)
    print(f"prefect deploy --all: {time.monotonic() - started:.1f}s")
    return out.stdout


def _pool_or_none(client, name):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_work_pool(name)
    except ObjectNotFound:
        return None


def test_prefect_yaml_declares_every_pool_its_deployments_use():
    config = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
    declared = config["definitions"]["work_pools"]
    assert {name: spec["type"] for name, spec in declared.items()} == POOLS
    used = {d["work_pool"]["name"] for d in config["deployments"]}
    used |= {d["parameters"]["work_pool"] for d in config["deployments"] if "work_pool" in d.get("parameters", {})}
    assert used == set(POOLS)
    assert config["deployments"][0]["entrypoint"] == "work_pools.py:ensure_work_pools"  # first: see work_pools.py


@pytest.fixture(scope="module")
def deployed(prefect_server):
    """`prefect deploy --all` on a server where none of the yaml's pools exist."""
    from prefect.client.orchestration import get_client
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    with get_client(sync_client=True) as client:
        for name in POOLS:  # the session's server is shared: start from no pool of ours
            if _pool_or_none(client, name) is not None:
                client.delete_work_pool(name)
        assert all(_pool_or_none(client, name) is None for name in POOLS)
    out = _deploy_all(prefect_server)
    return prefect_server, out


def test_deploy_all_creates_the_declared_work_pools(deployed):
    from prefect.client.orchestration import get_client
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type
    from prefect.utilities.asyncutils import run_coro_as_sync

    _, out = deployed
    for name, pool_type in POOLS.items():
        assert f"work pool {name!r} ({pool_type}): created" in out, out
    with get_client(sync_client=True) as client:
        for name, pool_type in POOLS.items():
            pool = client.read_work_pool(name)
            assert pool.type == pool_type
            if name not in ("kubernetes", "vertex-ai"):  # the worker type's own default template
                assert pool.base_job_template == run_coro_as_sync(
                    get_default_base_job_template_for_infrastructure_type(pool_type)), name
        k8s = client.read_work_pool("kubernetes")
        assert k8s.base_job_template == json.loads(
            (DEPLOYMENTS / "kubernetes-gpu-base-job-template.json").read_text())
        assert {"gpu_count", "node_selector"} <= set(k8s.base_job_template["variables"]["properties"])
        vertex = client.read_work_pool("vertex-ai")
        assert vertex.base_job_template == json.loads(
            (DEPLOYMENTS / "vertex-ai-tensorboard-base-job-template.json").read_text())


def test_deploy_all_again_leaves_existing_pools_as_they_are(deployed):
    """Re-running deploy keeps a pool's customisation (here: template defaults,
    description, concurrency limit): deploy only creates pools that are missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate

    server, _ = deployed
    with get_client(sync_client=True) as client:
        template = client.read_work_pool("kubernetes").base_job_template
        template["variables"]["properties"]["gpu_count"]["default"] = 4
        template["variables"]["properties"]["namespace"]["default"] = "ml-team"
        client.update_work_pool("kubernetes", WorkPoolUpdate(
            base_job_template=template, description="our GKE cluster", concurrency_limit=7))
        client.update_work_pool("xm-slurm", WorkPoolUpdate(description="our cluster", concurrency_limit=3))
        before = {name: client.read_work_pool(name).model_dump(exclude={"status"}) for name in POOLS}
        assert before["kubernetes"]["base_job_template"]["variables"]["properties"]["gpu_count"]["default"] == 4

        out = _deploy_all(server)
        for name, pool_type in POOLS.items():
            assert f"work pool {name!r} ({pool_type}): exists" in out, out
        after = {name: client.read_work_pool(name).model_dump(exclude={"status"}) for name in POOLS}
    assert after == before  # ids, `updated` stamps, templates, settings: nothing rewritten


def test_deploy_all_declares_job_runners_and_experiments(deployed):
    from prefect.client.orchestration import get_client

    server, _ = deployed
    with get_client(sync_client=True) as client:
        for pool in ("xm-slurm", "xm-sge", "docker", "kubernetes", "vertex-ai"):
            d = client.read_deployment_by_name(f"xm-job-runner/{pool}")
            assert d.work_pool_name == pool
            assert d.entrypoint == "prefect_xm.flows.job_runner:run_job"
            assert not d.pull_steps
            # batch pools run the program itself on the node; the stock workers run the engine
            assert d.job_variables.get("execution") == ("direct" if pool.startswith("xm-") else None), d.job_variables
        k8s = client.read_work_pool("kubernetes")
        assert "gpu_count" in k8s.base_job_template["variables"]["properties"]
        sweep = client.read_deployment_by_name("xm-experiment/sweep")
        assert sweep.work_pool_name == "xm-experiments"
        assert sweep.entrypoint == "prefect_xm.flows.experiment:xm_experiment"
        props = sweep.parameter_openapi_schema["properties"]
        assert {"title", "command", "module", "args", "sweep", "hyper", "work_pool", "job_variables"} <= set(props)
        assert client.read_deployment_by_name("xm-experiment/sweep-slurm").parameters["work_pool"] == "xm-slurm"
        ensure = client.read_deployment_by_name("xm-work-pools/ensure")
        assert ensure.work_pool_name == "xm-experiments"
        assert ensure.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": str(DEPLOYMENTS.resolve())}}]


@pytest.fixture(scope="module")
def experiments_worker(deployed, tmp_path_factory):
    """A process worker on the experiments' pool, started outside deployments/."""
    server, _ = deployed
    cwd = tmp_path_factory.mktemp("xm-experiments-worker")
    log = cwd / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "xm-experiments", "--type", "process"],
        cwd=cwd, env=server.env(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="0"),
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield log
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()


def _wait_final(client, run_id, timeout: float = 240):
    def final():
        run = client.read_flow_run(run_id)
        return run if run.state and run.state.is_final() else None

    return wait_for(final, timeout=timeout, what=f"flow run {run_id} to finish")


def test_experiment_deployment_runs_a_sweep_given_as_parameters(deployed, experiments_worker):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    server, _ = deployed
    started = time.monotonic()
    out = _prefect(server, "deployment", "run", "xm-experiment/sweep",
                   "--param", "title=from-the-cli",
                   "--param", 'sweep=[{"learning_rate": 0.5, "batch_size": 8}]',
                   "--param", 'hyper={"learning_rate": [0.1, 0.01], "batch_size": [16]}')
    run_id = next(line.split()[-1] for line in out.stdout.splitlines() if "UUID" in line)
    with get_client(sync_client=True) as client:
        run = _wait_final(client, run_id)
        elapsed = time.monotonic() - started
        assert run.state.is_completed(), (run.state, experiments_worker.read_text()[-3000:])
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


def test_work_pools_deployment_recreates_a_deleted_pool(deployed, experiments_worker):
    """xm-work-pools/ensure runs on a worker started elsewhere (its pull step points at
    deployments/) and creates a declared pool that was deleted, and only that one."""
    from prefect.client.orchestration import get_client

    server, _ = deployed
    with get_client(sync_client=True) as client:
        client.delete_work_pool("vertex-ai")
        kept = client.read_work_pool("kubernetes")
        out = _prefect(server, "deployment", "run", "xm-work-pools/ensure")
        run_id = next(line.split()[-1] for line in out.stdout.splitlines() if "UUID" in line)
        run = _wait_final(client, run_id)
        assert run.state.is_completed(), (run.state, experiments_worker.read_text()[-3000:])
        assert client.read_work_pool("vertex-ai").type == "vertex-ai"
        assert client.read_work_pool("kubernetes").model_dump(exclude={"status"}) == kept.model_dump(exclude={"status"})
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        def logged():  # the run's printed lines (log_prints), shipped to the API in batches
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            return [log.message for log in logs if log.message.startswith("work pool ")]

        lines = wait_for(lambda: len(logged()) >= len(POOLS) and logged(), timeout=60, what="the run's logs")
        assert "work pool 'vertex-ai' (vertex-ai): created" in lines, lines
        assert "work pool 'kubernetes' (kubernetes): exists" in lines, lines
