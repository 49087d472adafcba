"""The xm-slurm worker end to end on the real single-node Slurm (scripts/slurm-cluster.sh)."""

from __future__ import annotations


import pytest

from batch_suite import BatchWorkerSuite, RequeueScenario, SchedulerHarness
from conftest import cluster_is_up
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

