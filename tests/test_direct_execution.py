"""Direct execution on batch pools: the batch script runs the job's program itself (no
Prefect, no Python of ours, no API route on the node); the worker writes the run's states
from the scheduler's and ships the program's output as the run's logs.

The pure parts on their own, then end to end on the real single-node Slurm, with the
job's environment pointing PREFECT_API_URL at a closed port and a PATH without the venv."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from types import SimpleNamespace

import pytest

from conftest import cluster_is_up, require_service, wait_for
from prefect_xm.job_spec import build_argv
from prefect_xm.workers.direct import DirectOutput, direct_program
from prefect_xm.workers.scheduler import SubmissionError
from prefect_xm.workers.scheduler import JobState, JobStatus, Scheduler
from prefect_xm.workers.transport import LocalTransport


def _run(parameters: dict):
    return SimpleNamespace(id=uuid.uuid4(), parameters=parameters)


def test_node_argv_names_programs_for_the_node_and_takes_nothing_from_here(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/worker/only")
    argv, env = build_argv({"kind": "module", "module": "train", "path": "/code"}, ["--lr=0.1"], on_node=True)
    assert argv == ["python3", "-m", "train", "--lr=0.1"]
    assert env == {"PYTHONPATH": "/code"}
    argv, _ = build_argv({"kind": "container", "image": "docker://alpine:3"}, ["x"], on_node=True)
    assert argv == ["apptainer", "run", "docker://alpine:3", "x"]


def test_direct_program_keeps_prefect_and_its_key_off_the_node():
    argv, env, working_dir = direct_program(
        _run({"executable": {"kind": "command", "command": ["echo", "a b"]}, "args": ["$HOME"],
              "env": {"SEED": "1"}, "working_dir": "/scratch/w"}),
        {"PREFECT_API_URL": "http://api", "PREFECT_API_KEY": "pnu_secret", "PREFECT__FLOW_RUN_ID": "x",
         "CUDA_CACHE_PATH": "/tmp/c"})
    assert argv == ["echo", "a b", "$HOME"]  # argv, never a shell string: quoted in the script
    assert env == {"CUDA_CACHE_PATH": "/tmp/c", "SEED": "1"}
    assert working_dir == "/scratch/w"


@pytest.mark.parametrize("parameters,field", [
    ({"x": 1}, "execution"),
    ({"executable": {"kind": "command", "command": "echo hi"}}, "executable"),
    ({"executable": {"kind": "command", "command": ["true"]}, "env": {"BAD-NAME": "1"}}, "env"),
    ({"executable": {"kind": "command", "command": ["true"]}, "working_dir": "/a b"}, "working_dir"),
])
def test_direct_program_refuses_what_it_cannot_run_naming_the_field(parameters, field):
    with pytest.raises(SubmissionError) as e:
        direct_program(_run(parameters), {})
    assert str(e.value).startswith(f"{field}:")


@pytest.mark.parametrize("status,by_program", [
    (JobStatus("1", JobState.FAILED, "FAILED", "NonZeroExitCode", 3), True),
    (JobStatus("1", JobState.FAILED, "TIMEOUT", "TimeLimit", 0, 15), False),
    (JobStatus("1", JobState.FAILED, "OUT_OF_MEMORY", "OutOfMemory", 125), False),
    (JobStatus("1", JobState.FAILED, "EXITED", "failed 37: qmaster enforced h_rt limit", 137, 9), False),
    (JobStatus("1", JobState.FAILED, "EXIT", "TERM_RUNLIMIT: job killed after reaching LSF run time limit", 140),
     False),
    (JobStatus("1", JobState.FAILED, "EXIT", "", 2), True),
])
def test_program_exit_or_scheduler_kill(status, by_program):
    assert Scheduler().ended_by_program(status) is by_program


def test_output_is_shipped_in_whole_lines_and_the_rest_at_the_end(tmp_path):
    lines: list[str] = []
    worker = SimpleNamespace(run_directory=lambda configuration, run_id: _value(str(tmp_path)))
    followed = SimpleNamespace(configuration=None, flow_run_id=None, transport=LocalTransport())
    output = DirectOutput(worker, followed, SimpleNamespace(info=lines.append))
    (tmp_path / "job.out").write_bytes(b"one\ntw")
    asyncio.run(output.ship())
    assert lines == ["one"]
    with open(tmp_path / "job.out", "ab") as f:
        f.write(b"o\nthree")
    (tmp_path / "job.err").write_bytes("caf\u00e9\n".encode())
    asyncio.run(output.ship(final=True))
    assert lines == ["one", "two", "three", "[stderr] caf\u00e9"]


@pytest.mark.parametrize("chunk", [4, 7, 1 << 18])
def test_a_successor_skips_the_lines_already_in_the_logs(tmp_path, monkeypatch, chunk):
    """A worker following a job its predecessor was shipping starts after the lines the
    run's logs hold, whatever the read size (a line may straddle reads)."""
    import prefect_xm.workers.direct as direct

    monkeypatch.setattr(direct, "LOG_CHUNK_BYTES", chunk)
    lines: list[str] = []
    worker = SimpleNamespace(run_directory=lambda configuration, run_id: _value(str(tmp_path)))
    followed = SimpleNamespace(configuration=None, flow_run_id=None, transport=LocalTransport())
    output = DirectOutput(worker, followed, SimpleNamespace(info=lines.append))
    (tmp_path / "job.out").write_bytes(b"one\ntwo\nthree is longer\nfour\nfi")
    (tmp_path / "job.err").write_bytes(b"e1\ne2\n")
    asyncio.run(output.skip_shipped({"job.out": 3, "job.err": 1}))
    asyncio.run(output.ship(final=True))
    assert lines == ["four", "fi", "[stderr] e2"]


async def _value(v):
    return v


# ------------------------------------------------------------------ on the real Slurm


def _slurm_is_up() -> bool:
    return cluster_is_up("slurm-cluster.sh")


@pytest.mark.slurm
@pytest.mark.e2e
class TestDirectOnSlurm:
    @pytest.fixture(scope="class")
    @classmethod
    def env(cls, prefect_server, tmp_path_factory):
        from prefect.context import refresh_global_settings_context

        from e2e import WorkerProcess, create_pool, run
        from prefect_xm.core.deployments import ensure_job_runner_deployment

        require_service("slurm", _slurm_is_up(), "start it with `bash scripts/slurm-cluster.sh start`")
        refresh_global_settings_context()
        root = tmp_path_factory.mktemp("xm-slurm-direct")
        pool = f"xm-slurm-{uuid.uuid4().hex[:6]}"
        create_pool(prefect_server, pool, "xm-slurm")
        worker = WorkerProcess(prefect_server, pool, "xm-slurm", root).start()

        async def deployment():
            from prefect_xm.core.runtime import Runtime

            return await Runtime.get().arun(ensure_job_runner_deployment(pool))

        env = SimpleNamespace(deployment=run(deployment()), run_dir=str(root / "runs"), worker=worker, root=root,
                              pool=pool, server=prefect_server)
        try:
            yield env
        finally:
            env.worker.stop()  # (a test may have replaced it)

    def start(self, env, command: list[str], **job_env: str):
        from e2e import run, start_run

        # No route to the API and no venv on PATH: only the job's own program may run.
        job_env = {"PREFECT_API_URL": "http://127.0.0.1:9/api", "PATH": "/usr/bin:/bin", **job_env}
        return run(start_run(env.deployment, {"executable": {"kind": "command", "command": command},
                                              "args": [], "env": job_env},
                             {"run_dir": env.run_dir, "partition": "debug", "memory": "100M"}))

    def test_completed_with_its_output_in_the_logs(self, env):
        from batch_suite import logs_of
        from e2e import wait_final

        probe = ("echo out-line; echo err-line >&2; "
                 "python3 -c 'import prefect' 2>/dev/null && echo prefect-importable || echo no-prefect-here; "
                 "echo api=$PREFECT_API_URL")
        fr = wait_final(self.start(env, ["sh", "-c", probe]).id)
        assert fr.state.type.value == "COMPLETED", fr.state
        logs = wait_for(lambda: (lambda t: t if "api=" in t else None)(logs_of(fr.id)), 60, what="the job's output")
        assert "out-line" in logs and "[stderr] err-line" in logs
        assert "no-prefect-here" in logs and "api=http://127.0.0.1:9/api" in logs
        assert "prefect flow-run execute" not in open(f"{env.run_dir}/{fr.id}/job.sh").read()

    def test_failed_with_the_exit_code_and_stderr(self, env):
        from e2e import wait_final

        fr = wait_final(self.start(env, ["sh", "-c", "echo 'no such dataset' >&2; exit 3"]).id)
        assert fr.state.type.value == "FAILED", fr.state
        assert "exited with code 3" in fr.state.message and "no such dataset" in fr.state.message

    def test_cancelled_from_prefect(self, env):
        from batch_suite import request_cancel, wait_state
        from prefect.client.schemas.objects import StateType

        fr = wait_state(self.start(env, ["sleep", "600"]).id, StateType.RUNNING, timeout=240)
        request_cancel(fr.id)
        fr = wait_state(fr.id, StateType.CANCELLED, timeout=180)
        job_id = fr.infrastructure_pid.rsplit(":", 1)[1]
        squeue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        assert squeue.stdout.strip() in ("", "CANCELLED", "COMPLETING"), squeue.stdout

    def test_a_restarted_worker_ships_each_output_line_once(self, env):
        """The worker dies while a direct job writes; its replacement ships the rest of
        the output, and no line twice."""
        from batch_suite import logs_of
        from e2e import WorkerProcess, wait_final

        gate = env.root / f"gate-{uuid.uuid4().hex[:8]}"
        script = (f"for i in 1 2 3; do echo before-$i; echo err-$i >&2; done; "
                  f"while [ ! -e {gate} ]; do sleep 0.2; done; for i in 4 5 6; do echo after-$i; done")
        fr = self.start(env, ["sh", "-c", script])
        wait_for(lambda: "before-3" in logs_of(fr.id) and "err-3" in logs_of(fr.id), 240,
                 what="the first lines in the logs")
        env.worker.kill()
        env.worker = WorkerProcess(env.server, env.pool, "xm-slurm", env.root, name=env.worker.name).start()
        wait_for(lambda: "resumes following" in logs_of(fr.id), 120, what="the new worker to follow the job")
        gate.touch()
        fr = wait_final(fr.id)
        assert fr.state.type.value == "COMPLETED", fr.state
        logs = wait_for(lambda: (lambda t: t if "after-6" in t else None)(logs_of(fr.id)), 60, what="the last lines")
        for line in [f"before-{i}" for i in (1, 2, 3)] + [f"[stderr] err-{i}" for i in (1, 2, 3)] + [
                f"after-{i}" for i in (4, 5, 6)]:
            assert logs.count(line) == 1, (line, logs)
