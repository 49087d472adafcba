"""Jobs on work pools: the path Slurm jobs take (deployment of the job-runner flow on the
pool, job variables checked against the pool's schema), exercised against the real
Prefect server. The end-to-end Slurm sweep lives with the xm-slurm worker's tests."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from conftest import wait_for
from prefect_xm import xm, xm_local

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
    from prefect_xm.core.deployments import job_runner_source_dir

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


def test_stopping_an_experiment_from_elsewhere_cancels_queued_jobs_and_leaves_picked_up_ones_to_their_worker(
        api, tmp_path, monkeypatch):
    """`prefect-xm stop` (another process) ends a job still queued on its pool at once, and
    turns one a worker picked up after the stop read it as queued Cancelling, not
    Cancelled: that worker then removes its job (a Cancelled forced from the stale read
    would leave the job running to its end)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Pending

    from prefect_xm import xm, xm_local
    from prefect_xm.core import store

    read_runs = store.experiment_runs
    stale_reads: list = []

    async def jobs_as_read_before_the_pick_up(client, experiment_id, kind=store.KIND_WORK_UNIT, unit_tag=None):
        # (the stop's own read: the launcher beside it reads jobs too, for its summary)
        if kind == store.KIND_JOB and stale_reads and sys._getframe(1).f_code.co_name == "_stop":
            return stale_reads.pop()
        return await read_runs(client, experiment_id, kind, unit_tag)

    pool = f"slurm-{uuid.uuid4().hex[:6]}"
    _create_pool(pool, "xm-slurm", SLURM_VARIABLES)
    with xm_local.create_experiment(experiment_title="stop-elsewhere") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Binary("/bin/true"), xm_local.Slurm.Spec())])
        for i in range(2):
            experiment.add(xm.Job(exe, xm_local.Slurm(work_pool=pool), args={"i": i}))
        tags = ("xm-kind:job", f"xm-experiment:{experiment.experiment_id}")
        queued, picked = wait_for(lambda: len(_runs(*tags)) == 2 and _runs(*tags), timeout=60, what="two job runs")
        with get_client(sync_client=True) as c:
            # The stop's read of the jobs shows both queued; a worker picks one up (Pending)
            # before the stop writes. (Set up in this order, not raced: the experiment's own
            # launcher also cancels its jobs once it sees its units Cancelling.)
            stale_reads.append([c.read_flow_run(queued.id), c.read_flow_run(picked.id)])
            assert all(r.state.type.value == "SCHEDULED" for r in stale_reads[0]), stale_reads
            assert c.set_flow_run_state(picked.id, Pending()).status.value == "ACCEPT"
            monkeypatch.setattr(store, "experiment_runs", jobs_as_read_before_the_pick_up)
            xm_local.get_experiment(experiment.experiment_id).stop()
            monkeypatch.setattr(store, "experiment_runs", read_runs)
            assert not stale_reads  # the stop read the jobs (and got the stale read)
            queued, picked = c.read_flow_run(queued.id), c.read_flow_run(picked.id)
            # (ended by the stop, or by its own work unit's launcher seeing the unit cancelled)
            assert queued.state.type.value == "CANCELLED"
            assert queued.state.message in ("experiment stopped by the user", "work unit 1 was cancelled",
                                            "work unit 2 was cancelled"), queued.state.message
            assert picked.state.type.value == "CANCELLING"
            # its worker removes the job and says so
            c.set_flow_run_state(picked.id, Cancelled(message="job removed"), force=True)
        experiment.stop()
    assert experiment.get_status().is_cancelled


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


# --------------------------------------------- one gang across Slurm and Kubernetes
#
# The headline case: a work unit whose trainer runs on Slurm and whose evaluator
# runs in a container on Kubernetes. No worker serves either pool here (no cluster, no
# engine): the tests check what the workers would be handed (the flow runs, their
# deployments, parameters and job variables, and what the stock workers would build from
# them), that the gang is not Running while its members only wait, and that stopping the
# experiment leaves nothing Scheduled or Pending.


def _create_pool_with_template(name: str, pool_type: str, template: dict) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as c:
        c.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))


def _kubernetes_gpu_template() -> dict:
    import json

    from conftest import REPO
    from prefect_xm.executors import KUBERNETES_BASE_JOB_TEMPLATE

    return json.loads((REPO / KUBERNETES_BASE_JOB_TEMPLATE).read_text())


def _xm_slurm_default_template() -> dict:
    """The template `prefect work-pool create --type xm-slurm` gives a pool (the function
    the CLI calls, answered by the xm-slurm worker registered through its entry point)."""
    import asyncio

    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    template = asyncio.run(get_default_base_job_template_for_infrastructure_type("xm-slurm"))
    assert template and "cpus_per_task" in template["variables"]["properties"], template
    return template


@pytest.fixture
def k8s_pool(api) -> str:
    name = f"k8s-{uuid.uuid4().hex[:6]}"
    _create_pool_with_template(name, "kubernetes", _kubernetes_gpu_template())
    return name


@pytest.fixture
def xm_slurm_pool(api) -> str:
    name = f"xm-slurm-{uuid.uuid4().hex[:6]}"
    _create_pool_with_template(name, "xm-slurm", _xm_slurm_default_template())
    return name


def _experiment_runs(experiment, kind: str) -> list:
    return _runs(f"xm-kind:{kind}", f"xm-experiment:{experiment.experiment_id}")


def _worker_variables(client, run) -> tuple[dict, dict]:
    """(the pool's base job template, the job variables a worker would apply to `run`:
    the deployment's overlaid by the flow run's)."""
    pool = client.read_work_pool(run.work_pool_name)
    deployment = client.read_deployment(run.deployment_id)
    return pool.base_job_template, {**(deployment.job_variables or {}), **(run.job_variables or {})}


def test_trainer_on_slurm_and_evaluator_on_kubernetes_form_one_gang(api, k8s_pool, xm_slurm_pool, tmp_path):
    import asyncio
    from types import SimpleNamespace

    from prefect.client.orchestration import get_client
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from prefect_xm.core.deployments import job_runner_source_dir
    from prefect_xm.job_spec import build_argv
    from prefect_xm.workers.slurm import SlurmJobConfiguration, SlurmWorker

    slurm = xm_local.Slurm(requirements=xm.JobRequirements(cpu=8, memory=32 * xm.GiB), partition="gpu",
                           time="2:00:00", work_pool=xm_slurm_pool)
    kubernetes = xm_local.Kubernetes(xm.JobRequirements(a100=1, cpu=4, memory=16 * xm.GiB), namespace="ml",
                                     work_pool=k8s_pool)
    with xm_local.create_experiment(experiment_title="slurm-and-k8s") as experiment:
        trainer_exe, evaluator_exe = experiment.package([
            xm.Packageable(xm.Command(["python3", "-m", "train"]), xm_local.Slurm.Spec()),
            xm.Packageable(xm.Container(image_path="docker://ghcr.io/me/eval:1"), xm_local.Kubernetes.Spec()),
        ])
        group = xm.JobGroup(
            trainer=xm.Job(trainer_exe, slurm, args={"epochs": 3}),
            evaluator=xm.Job(evaluator_exe, kubernetes, args=["python", "-m", "evaluate"]),
        )
        wu = experiment.add(group, args={
            "trainer": {"args": {"lr": 0.1}},
            "evaluator": {"args": {"checkpoint": "/ckpt/latest"}, "env_vars": {"WANDB_MODE": "offline"}},
        })
        jobs = wait_for(lambda: len(_experiment_runs(experiment, "job")) == 2 and _experiment_runs(experiment, "job"),
                        timeout=60, what="the trainer's and the evaluator's job runs")
        by_key = {next(t[len("xm-job:"):] for t in r.tags if t.startswith("xm-job:")): r for r in jobs}
        assert set(by_key) == {"trainer", "evaluator"}
        trainer, evaluator = by_key["trainer"], by_key["evaluator"]

        with get_client(sync_client=True) as c:
            for run, pool in ((trainer, xm_slurm_pool), (evaluator, k8s_pool)):
                # No worker serves the pool: the run waits on the pool's queue.
                assert run.state.type.value == "SCHEDULED", (run.name, run.state)
                assert run.work_pool_name == pool
                deployment = c.read_deployment(run.deployment_id)
                assert (c.read_flow(deployment.flow_id).name, deployment.name) == ("xm-job-runner", pool)
                assert deployment.work_pool_name == pool
                assert f"xm-work-unit:{wu.work_unit_id}" in run.tags
                # A subflow of the work unit (linked through a task run of the work unit's run).
                assert c.read_task_run(run.parent_task_run_id).flow_run_id == wu.flow_run_id
            # Slurm nodes load the runner from the shared installation; the container from its image.
            trainer_deployment = c.read_deployment(trainer.deployment_id)
            assert trainer_deployment.entrypoint == "prefect_xm/flows/job_runner.py:run_job"
            assert trainer_deployment.path == job_runner_source_dir()
            evaluator_deployment = c.read_deployment(evaluator.deployment_id)
            assert evaluator_deployment.entrypoint == "prefect_xm.flows.job_runner:run_job"
            assert not evaluator_deployment.pull_steps
            slurm_template, slurm_variables = _worker_variables(c, trainer)
            k8s_template, k8s_variables = _worker_variables(c, evaluator)

        # Parameters: what the job runner runs, with the work unit's args after the job's.
        assert trainer.parameters == {"executable": {"kind": "command", "command": ["python3", "-m", "train"]},
                                      "args": ["--epochs=3", "--lr=0.1"], "env": {}, "working_dir": None}
        assert build_argv(trainer.parameters["executable"], trainer.parameters["args"])[0] == [
            "python3", "-m", "train", "--epochs=3", "--lr=0.1"]
        # In the container the runner is already inside the image: the Container's args are the command.
        assert evaluator.parameters == {"executable": {"kind": "command", "command": ["python"]},
                                        "args": ["-m", "evaluate", "--checkpoint=/ckpt/latest"],
                                        "env": {"WANDB_MODE": "offline"}, "working_dir": None}
        assert build_argv(evaluator.parameters["executable"], evaluator.parameters["args"])[0] == [
            "python", "-m", "evaluate", "--checkpoint=/ckpt/latest"]

        # Job variables, exactly as each pool's schema names them.
        assert trainer.job_variables == {"cpus_per_task": 8, "memory": "32G", "partition": "gpu",
                                         "time_limit": "2:00:00"}
        assert evaluator.job_variables == {
            "namespace": "ml", "cpu_request": "4", "cpu_limit": "4", "memory_request": "16Gi",
            "memory_limit": "16Gi", "gpu_count": 1,
            "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},
            "image": "ghcr.io/me/eval:1",
        }

        # What the stock Kubernetes worker would create from the run as stored on the server.
        async def k8s_manifest():
            config = await KubernetesWorkerJobConfiguration.from_template_and_values(k8s_template, k8s_variables)
            config.prepare_for_flow_run(evaluator)
            return config.job_manifest

        manifest = asyncio.run(k8s_manifest())
        assert manifest["metadata"]["namespace"] == "ml"
        pod = manifest["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["image"] == "ghcr.io/me/eval:1"
        assert container["resources"] == {"limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1},
                                          "requests": {"cpu": "4", "memory": "16Gi"}}
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
        assert {"name": "PREFECT__FLOW_RUN_ID", "value": str(evaluator.id)} in container["env"]

        # What the xm-slurm worker would sbatch for the run.
        config = asyncio.run(SlurmJobConfiguration.from_template_and_values(slurm_template, slurm_variables))
        script = SlurmWorker(work_pool_name=xm_slurm_pool).render_script(
            config, SimpleNamespace(id=trainer.id, name=trainer.name), str(tmp_path / "run"))
        for line in ("#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH --partition=gpu",
                     "#SBATCH --time=2:00:00"):
            assert line in script, (line, script)
        assert "--gres" not in script

        # A gang is Running only once every member runs: here none does.
        status = wu.get_status()
        assert not status.is_running and not status.is_final, status
        assert set(wu.jobs()) == {"trainer", "evaluator"}
        experiment.stop()

    with get_client(sync_client=True) as c:
        def all_final():
            runs = _experiment_runs(experiment, "job") + _experiment_runs(experiment, "work-unit")
            return all(r.state.type.value in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs) and runs

        runs = wait_for(all_final, timeout=120, what="every job and work-unit run final after stop()")
        assert len(runs) == 3
        assert all(r.state.is_cancelled() for r in runs), [(r.name, r.state) for r in runs]
        assert wu.get_status().is_cancelled
        assert c.read_flow_run(experiment.flow_run_id).state.is_cancelled()
        # The work unit never went Running while its members waited on their pools.
        history = [s.type.value for s in c.read_flow_run_states(wu.flow_run_id)]
        assert "RUNNING" not in history, history


# ------------------------------------------------ job variables refused at add time


def _assert_nothing_submitted(experiment) -> None:
    assert _experiment_runs(experiment, "work-unit") == []
    assert _experiment_runs(experiment, "job") == []
    assert experiment.work_units == {}


@pytest.mark.parametrize("make_executor, words", [
    # A variable the kubernetes pool does not declare (Prefect would drop it silently).
    (lambda pool: xm_local.Kubernetes(image="me/eval:1", work_pool=pool,
                                      job_variables={"tolerations": [{"key": "gpu", "operator": "Exists"}]}),
     ["'tolerations'"]),
    # A Docker executor pointed at a kubernetes pool: Docker's variables are not Kubernetes'.
    (lambda pool: xm_local.Docker(xm.JobRequirements(cpu=2, memory=8 * xm.GiB), image="me/eval:1",
                                  work_pool=pool),
     ["'container_create_kwargs'", "'mem_limit'"]),
    # A declared variable of the wrong type: the message names the value too.
    (lambda pool: xm_local.Kubernetes(image="me/eval:1", work_pool=pool, job_variables={"gpu_count": "two"}),
     ["'gpu_count'='two'", "integer"]),
], ids=["undeclared-variable", "docker-executor-on-kubernetes-pool", "wrong-type"])
def test_job_variables_the_kubernetes_pool_refuses_fail_add_and_submit_nothing(
        api, k8s_pool, xm_slurm_pool, make_executor, words):
    with xm_local.create_experiment(experiment_title="bad-k8s-variables") as experiment:
        trainer_exe, evaluator_exe = experiment.package([
            xm.Packageable(xm.Command(["python3", "-m", "train"]), xm_local.Slurm.Spec()),
            xm.Packageable(xm.Command(["python", "-m", "evaluate"]), xm_local.Kubernetes.Spec()),
        ])
        trainer = xm.Job(trainer_exe, xm_local.Slurm(xm.JobRequirements(cpu=2), work_pool=xm_slurm_pool))
        bad = xm.JobGroup(trainer=trainer, evaluator=xm.Job(evaluator_exe, make_executor(k8s_pool)))
        with pytest.raises(ValueError) as e:
            experiment.add(bad, args={"trainer": {"args": {"lr": 0.1}}})
        message = str(e.value)
        for w in ["'evaluator'", repr(k8s_pool), *words]:
            assert w in message, (w, message)
        # The gang is all or nothing: not even the valid trainer was submitted.
        _assert_nothing_submitted(experiment)
        # The refused add used no work-unit id: the next one is still 1.
        ok = experiment.add(xm.JobGroup(trainer=trainer))
        assert ok.work_unit_id == 1
        wait_for(lambda: len(_experiment_runs(experiment, "job")) == 1, timeout=60, what="the valid job's run")
        experiment.stop()
    assert all(r.state.is_cancelled() for r in _experiment_runs(experiment, "job"))


@pytest.mark.parametrize("pool_fixture, make_executor, words", [
    # xm-slurm's memory has a pattern ('16G', '512M'): '32GB' is a string, but not a Slurm size.
    # (xm_local.Slurm refuses it when built; WorkPool hands variables to the pool verbatim.)
    ("xm_slurm_pool", lambda pool: xm_local.WorkPool(pool, job_variables={"memory": "32GB"}),
     ["'memory'='32GB'"]),
    # The GPU template's gpu_count has minimum 1.
    ("k8s_pool", lambda pool: xm_local.Kubernetes(image="me/eval:1", job_variables={"gpu_count": 0},
                                                  work_pool=pool),
     ["'gpu_count'=0"]),
], ids=["slurm-memory-pattern", "kubernetes-gpu-count-minimum"])
def test_job_variables_outside_the_pool_schema_constraints_fail_add(api, request, pool_fixture, make_executor, words):
    pool = request.getfixturevalue(pool_fixture)
    with xm_local.create_experiment(experiment_title="constraint-violations") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command(["python3", "-m", "train"]), xm_local.Slurm.Spec())])
        try:
            with pytest.raises(ValueError) as e:
                experiment.add(xm.JobGroup(member=xm.Job(exe, make_executor(pool))))
            for w in ["'member'", repr(pool), *words]:
                assert w in str(e.value), (w, str(e.value))
            _assert_nothing_submitted(experiment)
        finally:
            experiment.stop()


# --------------------------------------------- a pool no worker serves


def test_jobs_waiting_on_a_pool_no_worker_serves_say_so_once_with_the_command_that_starts_one(api, capfd):
    """A sweep on a pool with no worker used to show "1 pending" forever: within a poll or
    two of its job waiting Scheduled there, the launcher says so, once, naming the pool
    and the command that starts a worker of its type. A pool whose worker beats (as a
    live worker does, every 30 s) is not named."""
    import time

    from prefect.client.orchestration import get_client

    idle, served = f"idle-{uuid.uuid4().hex[:6]}", f"served-{uuid.uuid4().hex[:6]}"
    _create_pool(idle, "process")
    _create_pool(served, "process")
    with get_client(sync_client=True) as c:
        c.send_worker_heartbeat(served, "a-live-worker", heartbeat_interval_seconds=30)
    err: list[str] = []

    def stderr() -> str:
        err.append(capfd.readouterr().err)
        return "".join(err)

    with xm_local.create_experiment(experiment_title="no-worker") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command(["true"]), xm_local.WorkPool.Spec())])
        experiment.add(xm.Job(exe, xm_local.WorkPool(served)))
        experiment.add(xm.Job(exe, xm_local.WorkPool(idle)))
        message = (f"no-worker ({experiment.experiment_id}): no worker is serving work pool '{idle}': "
                   f"start one with: prefect worker start --pool {idle} --type process")
        jobs = wait_for(lambda: [r for r in _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}")
                                 if r.state.is_scheduled()], timeout=60, interval=0.2, what="the jobs queued")
        queued = time.monotonic()
        wait_for(lambda: message in stderr(), timeout=60, interval=0.2, what="the no-worker message")
        # (a poll or two of the launcher's, on a machine the suite keeps busy)
        assert time.monotonic() - queued < 15, stderr()
        assert {r.work_pool_name for r in jobs} <= {idle, served}
        time.sleep(4)  # more polls: said once; the served pool never
        assert stderr().count(message) == 1 and f"'{served}'" not in stderr(), stderr()
        experiment.stop()
    assert all(r.state.is_cancelled() for r in _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}"))
