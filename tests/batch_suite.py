"""The xm-slurm worker end to end: a real Prefect server, `prefect worker start`, the
real single-node Slurm (scripts/slurm-cluster.sh). Waits are on conditions with
generous deadlines; nothing here asserts how fast anything is."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelling

from conftest import REPO, require_service, wait_for
from e2e import (
    CountingWrappers,
    WorkerProcess,
    create_pool,
    deploy,
    jobs_named,
    read_run,
    run,
    slurm_job_id,
    squeue_state,
    start_run,
    wait_final,
)

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]


def slurm_is_up() -> bool:
    return subprocess.run(["bash", str(REPO / "scripts" / "slurm-cluster.sh"), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm():
    require_service("Slurm", slurm_is_up(), "start it with `bash scripts/slurm-cluster.sh start`")


@pytest.fixture(scope="module")
def env(slurm, prefect_server, tmp_path_factory):
    """One xm-slurm pool, its worker (behind command-counting wrappers) and deployments."""
    root = tmp_path_factory.mktemp("xm-slurm")
    pool = f"slurm-{uuid.uuid4().hex[:6]}"
    create_pool(prefect_server, pool, "xm-slurm")
    wrappers = CountingWrappers(root, ["squeue", "sbatch", "scancel"])
    worker = WorkerProcess(prefect_server, pool, "xm-slurm", root, path_prefix=wrappers.dir).start()
    run_dir = str(root / "runs")
    deployments = {
        name: run(deploy(f"slurm_flows.py:{name}", pool, f"e2e-{name}", {"run_dir": run_dir}))
        for name in ("double", "boom", "sleeper")
    }

    class Env:
        pass

    e = Env()
    e.pool, e.worker, e.wrappers, e.deployments, e.server, e.run_dir = pool, worker, wrappers, deployments, prefect_server, run_dir
    # Slow scenarios start first and are checked later, so their waits overlap.
    e.timeout_run = run(start_run(deployments["sleeper"], {"seconds": 600}, {"time_limit": "1"}))
    yield e
    worker.stop()


def logs_of(run_id) -> str:
    async def read():
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        return "\n".join(log.message for log in logs)

    return run(read())


def request_cancel(run_id) -> None:
    async def cancel():
        async with get_client() as client:
            await client.set_flow_run_state(run_id, Cancelling(message="cancelled by the test"))

    run(cancel())


def wait_state(run_id, *types: StateType, timeout: float = 180, name: str | None = None):
    def reached():
        fr = run(read_run(run_id))
        ok = fr.state and fr.state.type in types and (name is None or fr.state.name == name)
        return fr if ok else None

    return wait_for(reached, timeout, interval=1, what=f"run {run_id} to reach {types} {name or ''}")


def test_flow_completes_with_result_and_logs(env):
    fr = run(start_run(env.deployments["double"], {"x": 21}))
    fr = wait_final(fr.id)
    assert fr.state.type == StateType.COMPLETED, fr.state
    assert run(fr.state.aresult()) == 42
    assert fr.infrastructure_pid.startswith("slurm:local:")
    logs = wait_for(lambda: (lambda t: t if "doubling 21" in t else None)(logs_of(fr.id)), 60, what="flow logs")
    assert f"Submitted slurm job {slurm_job_id(fr)}" in logs
    assert f"slurm job {slurm_job_id(fr)}" in logs
    assert "Rendered batch script" in logs


def test_flow_that_raises_ends_failed(env):
    fr = wait_final(run(start_run(env.deployments["boom"])).id)
    assert fr.state.type == StateType.FAILED, fr.state
    assert "raised on purpose" in (fr.state.message or "")


def test_script_failing_before_python_crashes_with_its_stderr(env):
    fr = run(start_run(env.deployments["double"], {"x": 1}, {
        "setup_commands": ["echo 'module: cuda/12.2 not found' >&2", "exit 3"],
    }))
    fr = wait_final(fr.id)
    assert fr.state.type == StateType.CRASHED, fr.state
    assert "FAILED" in fr.state.message and "exit code 3" in fr.state.message
    assert "module: cuda/12.2 not found" in fr.state.message


def test_missing_python_on_the_node_crashes_with_its_stderr(env):
    fr = run(start_run(env.deployments["double"], {"x": 1}, {"command": "/opt/no-such-python -m prefect flow-run execute"}))
    fr = wait_final(fr.id)
    assert fr.state.type == StateType.CRASHED, fr.state
    assert "exit code 127" in fr.state.message
    assert "/opt/no-such-python" in fr.state.message


def test_cancel_while_pending(env):
    # --hold keeps the job queued (reason JobHeldUser) however idle the node is
    fr = run(start_run(env.deployments["sleeper"], {"seconds": 1}, {"extra_directives": ["--hold"]}))
    fr = wait_state(fr.id, StateType.PENDING, name="InfrastructurePending")
    wait_for(lambda: "JobHeldUser" in (run(read_run(fr.id)).state.message or "") or "JobHeldUser" in logs_of(fr.id),
             60, what="the hold reason in the run")
    job_id = slurm_job_id(fr)
    assert squeue_state(job_id) == "PENDING"
    request_cancel(fr.id)
    fr = wait_state(fr.id, StateType.CANCELLED)
    assert squeue_state(job_id) in ("CANCELLED", "")


def test_cancel_while_running(env):
    fr = run(start_run(env.deployments["sleeper"], {"seconds": 600}))
    fr = wait_state(fr.id, StateType.RUNNING, timeout=240)
    job_id = slurm_job_id(fr)
    assert squeue_state(job_id) == "RUNNING"
    request_cancel(fr.id)
    wait_state(fr.id, StateType.CANCELLED, timeout=120)
    # scancel's TERM ends the flow process: the job ends CANCELLED, or FAILED/COMPLETED
    # if the engine exits on its own first; it must not be left queued or running.
    wait_for(lambda: squeue_state(job_id) not in ("RUNNING", "PENDING", "COMPLETING"), 60, what=f"job {job_id} to end")
    assert any(f"scancel" in c and job_id in c for c in env.wrappers.calls("scancel"))


def test_time_limit_crashes_with_timeout(env):
    fr = wait_final(env.timeout_run.id, timeout=400)
    assert fr.state.type == StateType.CRASHED, fr.state
    assert "TIMEOUT" in fr.state.message


def test_bad_partition_is_refused_verbatim_and_nothing_is_submitted(env):
    fr = run(start_run(env.deployments["double"], {"x": 1}, {"partition": "nosuchpartition"}))
    fr = wait_final(fr.id)
    assert fr.state.type == StateType.CRASHED
    assert "invalid partition specified: nosuchpartition" in fr.state.message
    assert not fr.infrastructure_pid
    assert jobs_named(f"{fr.name}-{fr.id}") == []


def test_undefined_template_variable_names_it(env):
    fr = run(start_run(env.deployments["double"], {"x": 1}, {
        "script_template": "#!/bin/bash\n#SBATCH --partition={{ partiton }}\nexec {{ command_argv | join(' ') }}\n",
    }))
    fr = wait_final(fr.id)
    assert fr.state.type == StateType.CRASHED
    assert "partiton" in fr.state.message and "undefined" in fr.state.message
    assert not any(str(fr.id) in c for c in env.wrappers.calls("sbatch"))


def test_malformed_time_limit_and_memory_name_the_field(env):
    for variables, field in (({"time_limit": "ten minutes"}, "time_limit"), ({"memory": "16 gigs"}, "memory")):
        try:
            fr = run(start_run(env.deployments["double"], {"x": 1}, variables))
        except Exception as exc:  # refused by the server's check of the pool's schema
            assert field in str(exc) and list(variables.values())[0] in str(exc)
            continue
        fr = wait_final(fr.id)
        assert fr.state.type == StateType.CRASHED
        assert field in fr.state.message and list(variables.values())[0] in fr.state.message
        assert not any(str(fr.id) in c for c in env.wrappers.calls("sbatch"))


def test_fifty_runs_in_flight_one_squeue_per_poll(env):
    runs = [run(start_run(env.deployments["sleeper"], {"seconds": 1}, {"extra_directives": ["--hold"]})) for _ in range(50)]

    def all_queued():
        async def read():
            async with get_client() as client:
                return await client.read_flow_runs(flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in runs]}))
        frs = run(read())
        return frs if sum(1 for f in frs if f.state.name == "InfrastructurePending") == 50 else None

    wait_for(all_queued, 300, interval=2, what="50 runs queued in Slurm")
    before = len(env.wrappers.calls("squeue"))
    started = time.monotonic()
    wait_for(lambda: len(env.wrappers.calls("squeue")) >= before + 10, 120, what="10 more polls")
    elapsed = time.monotonic() - started
    window_calls = env.wrappers.calls("squeue")[before:]
    # Poll interval is 1 s: per-job polling would make ~50 calls a second.
    assert len(window_calls) <= elapsed / 1.0 + 3, (len(window_calls), elapsed)
    assert all("--me" in c and " -j " not in c for c in window_calls), window_calls[:3]
    for r in runs:
        request_cancel(r.id)
    for r in runs:
        wait_state(r.id, StateType.CANCELLED, timeout=300)


def test_worker_sigkilled_with_five_jobs_in_flight(env):
    runs = [run(start_run(env.deployments["double"], {"x": i}, {})) for i in range(5)]
    wait_for(lambda: all(run(read_run(r.id)).infrastructure_pid for r in runs), 120, what="5 jobs submitted")
    env.worker.kill()
    replacement = WorkerProcess(env.server, env.pool, "xm-slurm", env.worker.workdir, name=env.worker.name,
                                path_prefix=env.wrappers.dir).start()
    env.worker = replacement
    for r in runs:
        fr = wait_final(r.id, timeout=300)
        assert fr.state.type == StateType.COMPLETED, fr.state
        assert run(fr.state.aresult()) == 2 * r.parameters["x"]
        assert len(jobs_named(f"{fr.name}-{fr.id}")) == 1
        assert len([c for c in env.wrappers.calls("sbatch") if str(fr.id) in c]) == 1
