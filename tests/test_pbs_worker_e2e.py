"""The xm-pbs worker end to end, through the shared suite, in both dialects:

- TestPbsProWorker: PBS Pro through the fake CLI in tests/fakes/pbspro/ (PBS Pro cannot
  run here; the fake runs jobs as real processes, see its docstring for its limits).
- TestTorqueWorker: the Torque dialect through Slurm's own Torque wrappers (Debian
  slurm-wlm-torque, unpacked by scripts/torque-wrappers.sh) over the real Slurm. The
  Torque dialect has no arrays (the wrappers cannot follow an array's tasks: see
  prefect_xm/workers/pbs.py): the suite's sweep tests check one job per run there.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from batch_suite import BatchWorkerSuite, RequeueScenario, SchedulerHarness
from conftest import REPO, cluster_is_up
from prefect_xm.workers.pbs import DIALECTS

pytestmark = [pytest.mark.e2e]

FAKE_PBSPRO = REPO / "tests" / "fakes" / "pbspro"
TORQUE_WRAPPERS = os.environ.get("TORQUE_WRAPPERS_DIR", "/opt/prefect-xm/slurm-torque") + "/usr/bin"

# One fake PBS server per test session (its job table and history).
os.environ.setdefault("FAKE_PBS_HOME", tempfile.mkdtemp(prefix="fake-pbspro-"))
# the class's 3-minute walltime run holds a cpu from its start: scenarios that run two jobs
# at once (the requeue scenario) must not wait for it
os.environ.setdefault("FAKE_PBS_NCPUS", "4")


class PbsHarness(SchedulerHarness):
    def jobs_named(self, name: str) -> list[str]:
        # the dialect may filter by name itself (Torque: no qselect in Slurm's wrappers)
        return self.scheduler.jobs_named(name, self._run(self.scheduler.find_by_name_argv(name)).stdout)


PBSPRO = PbsHarness(
    scheduler=DIALECTS["pbspro"],
    worker_type="xm-pbs",
    available=lambda: (FAKE_PBSPRO / "qsub").exists(),
    how_to="the fake PBS Pro CLI is in tests/fakes/pbspro",
    submit_command="qsub",
    status_command="qstat",
    cancel_command="qdel",
    hold_variables={"hold": True},
    hold_reason="Hold_Types=u",
    time_limit_variables={"time_limit": "00:03:00"},
    time_limit_word="walltime",
    bad_queue_variables={"queue": "nosuchqueue"},
    bad_queue_error="qsub: Unknown queue",
    malformed_variables=[({"time_limit": "ten minutes"}, "time_limit"), ({"memory": "16 gigs"}, "memory")],
    path_prefix=[str(FAKE_PBSPRO)],
    # the one JSON query with history; terminal lookups use the same form
    status_call_is_batched=lambda call: call.startswith("qstat -x -f -F json "),
    requeue_argv=lambda job_id: [str(FAKE_PBSPRO / "qrerun"), job_id],
    # with #PBS -V, Variable_List is the worker's environment
    job_record_argv=lambda job_id: ["qstat", "-f", job_id],
    job_record_shows_environment=True,
)


class TestPbsProWorker(BatchWorkerSuite, RequeueScenario):
    harness = PBSPRO


def torque_wrappers_work() -> bool:
    wrappers = subprocess.run(["bash", str(REPO / "scripts" / "torque-wrappers.sh"), "status"], capture_output=True)
    return cluster_is_up("slurm-cluster.sh") and wrappers.returncode == 0


TORQUE = PbsHarness(
    scheduler=DIALECTS["torque"],
    worker_type="xm-pbs",
    available=torque_wrappers_work,
    how_to="start Slurm with `bash scripts/slurm-cluster.sh start` and unpack the wrappers with `bash scripts/torque-wrappers.sh`",
    submit_command="qsub",
    status_command="qstat",
    cancel_command="qdel",
    hold_variables={"hold": True},
    # Slurm's qstat prints held jobs as plain Q (no H, no Hold_Types, no comment): the
    # only hold evidence the run can carry is that it is queued.
    hold_reason="is queued: Q",
    time_limit_variables={"time_limit": "00:03:00"},
    # no exit_status through the wrappers: the reason is slurmstepd's line in the stderr tail
    time_limit_word="DUE TO TIME LIMIT",
    bad_queue_variables={"queue": "nosuchqueue"},
    bad_queue_error="invalid partition specified: nosuchqueue",
    malformed_variables=[({"time_limit": "ten minutes"}, "time_limit"), ({"memory": "16 gigs"}, "memory")],
    path_prefix=[TORQUE_WRAPPERS],
    reports_exit_codes=False,  # NO_EXIT_STATUS
    status_call_is_batched=lambda call: call.startswith("qstat -f "),
    # the job is a Slurm job: its record is scontrol's
    job_record_argv=lambda job_id: ["scontrol", "show", "job", "-dd", job_id.split(".")[0]],
)

NO_EXIT_STATUS = (
    "Slurm's Torque qstat (slurm-wlm-torque 22.05) prints job_state C for every ended job and "
    "never prints exit_status (real Torque does, while the job is C), and it has no tracejob: "
    "the job's exit code cannot reach the Crashed message through the wrappers"
)


@pytest.mark.slurm
class TestTorqueWorker(BatchWorkerSuite):
    harness = TORQUE

    @classmethod
    def prepare(cls, root, wrappers):
        return {"dialect": "torque"}, wrappers.dir

    @pytest.mark.xfail(strict=True, reason=NO_EXIT_STATUS)
    def test_script_failing_before_python_crashes_with_its_stderr(self, env):
        super().test_script_failing_before_python_crashes_with_its_stderr(env)

    @pytest.mark.xfail(strict=True, reason=NO_EXIT_STATUS)
    def test_missing_python_on_the_node_crashes_with_its_stderr(self, env):
        super().test_missing_python_on_the_node_crashes_with_its_stderr(env)
