"""The xm-slurm worker end to end on the real single-node Slurm (scripts/slurm-cluster.sh)."""

from __future__ import annotations

import subprocess

import pytest
from prefect.client.schemas.objects import StateType

from batch_suite import BatchWorkerSuite, RequeueScenario, SchedulerHarness, job_id_of, logs_of, state_history, trial, wait_state
from conftest import cluster_is_up, wait_for
from e2e import read_run, run, start_run, start_runs_together, wait_final
from prefect_xm.workers.slurm import SlurmScheduler

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]


def slurm_is_up() -> bool:
    return cluster_is_up("slurm-cluster.sh")


SLURM = SchedulerHarness(
    scheduler=SlurmScheduler(),
    worker_type="xm-slurm",
    available=slurm_is_up,
    how_to="start it with `bash scripts/slurm-cluster.sh start`",
    submit_command="sbatch",
    status_command="squeue",
    cancel_command="scancel",
    hold_variables={"extra_directives": ["--hold"]},
    hold_reason="JobHeldUser",
    time_limit_variables={"time_limit": "3"},
    time_limit_word="TIMEOUT",
    bad_queue_variables={"partition": "nosuchpartition"},
    bad_queue_error="invalid partition specified: nosuchpartition",
    malformed_variables=[({"time_limit": "ten minutes"}, "time_limit"), ({"memory": "16 gigs"}, "memory")],
    # one `squeue --me` for all jobs; `-j ids` would be per-job (and fails on one purged id)
    status_call_is_batched=lambda call: "--me" in call and " -j " not in call,
    job_record_argv=lambda job_id: ["scontrol", "show", "job", "-dd", job_id],
    requeue_argv=lambda job_id: ["scontrol", "requeue", job_id],
    # Slurm holds a requeued job for two minutes (BeginTime); an admin may release it at once
    release_requeued_argv=lambda job_id: ["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
)


class TestSlurmWorker(BatchWorkerSuite, RequeueScenario):
    harness = SLURM

    def test_a_waiting_job_says_when_slurm_expects_it_to_start(self, env):
        """Slurm's estimate of a pending job's start (squeue's %S, in the one query per poll)
        is in the run's logs while its job waits; the job runs once it may start."""
        # (a job that may not begin for an hour: its estimate is that hour, whatever else
        # the cluster runs meanwhile)
        fr = run(start_run(env.deployments["double"], {"x": 2}, {"extra_directives": ["--begin=now+3600"]}))
        said = wait_for(lambda: next((line for line in logs_of(fr.id).splitlines()
                                      if "expected to start at" in line), None),
                        120, what=f"run {fr.id}'s logs to say when its job is expected to start")
        assert "is queued: PENDING (BeginTime) expected to start at 20" in said, said
        subprocess.run(["scontrol", "update", f"JobId={job_id_of(run(read_run(fr.id)))}", "StartTime=now"], check=True)
        fr = wait_final(fr.id)
        assert fr.state.type == StateType.COMPLETED, state_history(fr.id)

    def test_a_run_cancelled_while_its_job_waits_stays_cancelled_when_the_job_runs(self, env):
        """The launcher ends a gang member it still sees Scheduled by setting Cancelled (no
        worker is told). Should its job have been queued meanwhile and start, the worker
        must not bring the run back: Prefect lets a Cancelled run take Running."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        program = ["sh", "-c", "echo started; sleep 12; echo over"]
        [r] = run(start_runs_together(env.deployments["job"], [trial(program)],
                                      {**env.job_variables, **SLURM.hold_variables}))
        fr = wait_state(r.id, StateType.PENDING, name="InfrastructurePending", timeout=240)
        job = job_id_of(fr)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(fr.id, Cancelled(message="cancelled by the launcher"), force=True)
        subprocess.run(["scontrol", "release", job], check=True)
        # its whole output shipped: the worker has followed the job to its end
        wait_for(lambda: "over" in logs_of(fr.id), 180, what=f"job {job}'s output in the run's logs")
        history = state_history(fr.id)
        after = history.split("cancelled by the launcher", 1)[1]
        assert "RUNNING" not in after and "COMPLETED" not in after, history
        assert wait_state(fr.id, StateType.CANCELLED, timeout=5).state.message == "cancelled by the launcher", history

