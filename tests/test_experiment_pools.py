"""Jobs on work pools: the path Slurm jobs take (deployment of the job-runner flow on the
pool, job variables checked against the pool's schema), exercised against the real
Prefect server. The end-to-end Slurm sweep lives with the xm-slurm worker's tests."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from conftest import wait_for

pytestmark = pytest.mark.e2e

SLURM_VARIABLES = {
    "partition": {"type": "string"}, "account": {"type": "string"}, "qos": {"type": "string"},
    "time_limit": {"type": "string"}, "nodes": {"type": "integer"}, "ntasks": {"type": "integer"},
    "cpus_per_task": {"type": "integer"}, "memory": {"type": "string"}, "gpus": {"type": "integer"},
    "gpu_type": {"type": "string"}, "constraint": {"type": "string"},
    "modules": {"type": "array", "items": {"type": "string"}},
    "setup_commands": {"type": "array", "items": {"type": "string"}},
    "extra_directives": {"type": "array", "items": {"type": "string"}},
    "working_dir": {"type": "string"}, "env": {"type": "object"}, "job_name": {"type": "string"},
    "name": {"type": "string"}, "labels": {"type": "object"}, "command": {"type": "string"},
}


@pytest.fixture(scope="module")
def api(prefect_server):
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    return prefect_server


def _create_pool(name: str, pool_type: str, variables: dict | None = None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = None
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
    if variables is not None:
        template = {"job_configuration": {k: "{{ %s }}" % k for k in variables},
                    "variables": {"type": "object", "properties": variables}}
    with get_client(sync_client=True) as c:
        kwargs = {"name": name, "type": pool_type}
        if template is not None:
            kwargs["base_job_template"] = template
        c.create_work_pool(WorkPoolCreate(**kwargs))


def _runs(*tags):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=list(tags))))


def test_slurm_jobs_are_deployment_runs_with_checked_job_variables(api, tmp_path):
    from prefect.client.orchestration import get_client

    from prefect_xm import xm, xm_local
    from prefect_xm.core.experiment import job_runner_source_dir

    pool = f"slurm-{uuid.uuid4().hex[:6]}"
    _create_pool(pool, "xm-slurm", SLURM_VARIABLES)
    executor = xm_local.Slurm(requirements=xm.JobRequirements(cpu=2, memory=4 * xm.GiB, a100=1),
                              partition="debug", time="30:00", work_pool=pool)
    with xm_local.create_experiment(experiment_title="slurm-mapping") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Binary("/bin/echo"), xm_local.Slurm.Spec())])
        with pytest.raises(ValueError) as typo:
            experiment.add(xm.Job(exe, xm_local.Slurm(job_variables={"partiton": "debug"}, work_pool=pool)))
        assert "'partiton'" in str(typo.value) and pool in str(typo.value)
        wu = experiment.add(xm.JobGroup(a=xm.Job(exe, executor, args={"x": 1}), b=xm.Job(exe, executor)))
        # No worker serves this pool: the jobs wait, Scheduled, on its queue.
        jobs = wait_for(lambda: len(_runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}")) == 2
                        and _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}"),
                        timeout=60, what="two job runs")
        with get_client(sync_client=True) as c:
            for run in jobs:
                assert run.state.type.value == "SCHEDULED"
                assert run.work_pool_name == pool
                assert run.job_variables == {"cpus_per_task": 2, "memory": "4G", "gpus": 1, "gpu_type": "a100",
                                             "partition": "debug", "time_limit": "30:00"}
                deployment = c.read_deployment(run.deployment_id)
                assert deployment.name == pool and deployment.entrypoint == "prefect_xm/flows/job_runner.py:run_job"
                assert deployment.path == job_runner_source_dir()
            assert c.read_flow(jobs[0].flow_id).name == "xm-job-runner"
        a = next(r for r in jobs if "xm-job:a" in r.tags)
        assert a.parameters["args"] == ["--x=1"]
        assert not wu.get_status().is_running  # a gang runs only when every member runs
        experiment.stop()
    assert wu.get_status().is_cancelled
    assert all(r.state.is_cancelled() for r in _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}"))


def test_pool_jobs_run_from_the_job_runner_deployment(api, tmp_path):
    """A stock process worker runs the job runner from the automatic deployment: the same
    route an xm-slurm worker takes, minus sbatch."""
    from prefect_xm import xm, xm_local

    pool = f"proc-{uuid.uuid4().hex[:6]}"
    _create_pool(pool, "process")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
         "--limit", "4"],
        env=api.env(PREFECT_WORKER_QUERY_SECONDS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        out = tmp_path / "out.txt"
        code = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); print('hello from', sys.argv[2])"
        with xm_local.create_experiment(experiment_title="process-pool") as experiment:
            [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", code, str(out)]),
                                                       xm_local.WorkPool.Spec())])
            ex = xm_local.WorkPool(pool, job_variables={"working_dir": str(tmp_path)})
            wu = experiment.add(xm.JobGroup(one=xm.Job(exe, ex, args=["one"]), two=xm.Job(exe, ex, args=["two"])))
        status = wu.get_status()
        assert status.is_completed, status
        assert sorted(out.read_text().split()) == ["one", "two"]
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
