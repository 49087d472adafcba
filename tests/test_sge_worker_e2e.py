"""The xm-sge worker end to end on the real single-node Son of Grid Engine
(scripts/sge-cluster.sh)."""

from __future__ import annotations


import pytest

from batch_suite import BatchWorkerSuite, RequeueScenario, SchedulerHarness
from conftest import cluster_is_up, wait_for
from prefect_xm.workers.sge import SgeScheduler

pytestmark = [pytest.mark.sge, pytest.mark.e2e]


def sge_is_up() -> bool:
    return cluster_is_up("sge-cluster.sh")


SGE = SchedulerHarness(
    scheduler=SgeScheduler(),
    worker_type="xm-sge",
    available=sge_is_up,
    how_to="start it with `bash scripts/sge-cluster.sh start`",
    submit_command="qsub",
    status_command="qstat",
    cancel_command="qdel",
    # a user hold: the job waits as hqw however idle the queue is
    hold_variables={"extra_directives": ["-h"]},
    hold_reason="hqw",
    time_limit_variables={"time_limit": "0:3:0"},
    time_limit_word="h_rt",
    bad_queue_variables={"queue": "nosuchqueue"},
    bad_queue_error='job requests unknown queue "nosuchqueue"',
    malformed_variables=[({"time_limit": "ten minutes"}, "time_limit"), ({"memory": "16 gigs"}, "memory")],
    # one `qstat -xml` for all jobs; `qstat -j ID` per job would be per-job polling
    # (the worker asks `qstat -j` only for jobs in an error state, none here)
    status_call_is_batched=lambda call: call.split() == ["qstat", "-xml"],
    # any user may run qstat -j; with qsub -V its env_list is the worker's environment
    job_record_argv=lambda job_id: ["qstat", "-j", job_id],
    requeue_argv=lambda job_id: ["qmod", "-rj", job_id],
    job_record_shows_environment=True,
)


class TestSgeWorker(BatchWorkerSuite, RequeueScenario):
    harness = SGE

    def test_job_in_error_state_crashes_with_sge_reason_and_is_deleted(self, env):
        """SGE-only: a job that cannot start (its working directory does not exist) goes
        to Eqw and would wait forever; the run ends Crashed with SGE's error reason and
        the worker deletes the job."""
        from batch_suite import job_id_of
        from e2e import run, start_run, wait_final
        from prefect.client.schemas.objects import StateType

        fr = run(start_run(env.deployments["double"], {"x": 1}, {"working_dir": "/nonexistent/xm-sge-dir"}))
        fr = wait_final(fr.id)
        assert fr.state.type == StateType.CRASHED, fr.state
        assert "Eqw" in fr.state.message and "/nonexistent/xm-sge-dir" in fr.state.message
        job_id = job_id_of(fr)
        wait_for(lambda: env.h.job_state(job_id) is None, 60, what=f"Eqw job {job_id} deleted")
        assert any(job_id in c for c in env.wrappers.calls("qdel"))
