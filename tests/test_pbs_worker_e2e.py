"""The xm-pbs worker end to end, through the shared suite, in both dialects:

- TestPbsProWorker: PBS Pro through the fake CLI in tests/fakes/pbspro/ (PBS Pro cannot
  run here; the fake runs jobs as real processes, see its docstring for its limits).
- TestTorqueWorker: the Torque dialect through Slurm's own Torque wrappers (Debian
  slurm-wlm-torque, unpacked by scripts/torque-wrappers.sh) over the real Slurm. The
  Torque dialect has no arrays (the wrappers cannot follow an array's tasks: see
  prefect_xm/workers/pbs.py), so its two sweep tests check that a sweep goes as one job
  per run instead.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from prefect.client.schemas.objects import StateType

from batch_suite import (
    BatchWorkerSuite,
    SchedulerHarness,
    job_id_of,
    logs_of,
    request_cancel,
    trial,
    wait_state,
)
from conftest import REPO, wait_for
from e2e import run, start_runs_together, state_of, wait_final
from prefect_xm.workers.pbs import DIALECTS
from prefect_xm.workers.scheduler import JobState

pytestmark = [pytest.mark.e2e]

FAKE_PBSPRO = REPO / "tests" / "fakes" / "pbspro"
TORQUE_WRAPPERS = os.environ.get("TORQUE_WRAPPERS_DIR", "/opt/prefect-xm/slurm-torque") + "/usr/bin"

# One fake PBS server per test session (its job table and history).
os.environ.setdefault("FAKE_PBS_HOME", tempfile.mkdtemp(prefix="fake-pbspro-"))


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
    # with #PBS -V, Variable_List is the worker's environment
    job_record_argv=lambda job_id: ["qstat", "-f", job_id],
    job_record_shows_environment=True,
)


class TestPbsProWorker(BatchWorkerSuite):
    harness = PBSPRO


def torque_wrappers_work() -> bool:
    slurm = subprocess.run(["bash", str(REPO / "scripts" / "slurm-cluster.sh"), "status"], capture_output=True)
    wrappers = subprocess.run(["bash", str(REPO / "scripts" / "torque-wrappers.sh"), "status"], capture_output=True)
    return slurm.returncode == 0 and wrappers.returncode == 0


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

    # -- sweeps: no arrays in the Torque dialect, one job per run ---------------------
    def test_sweep_goes_as_one_array_each_task_its_own_run(self, env):
        """Torque: the sweep's runs go as one job each (no array), each with its own
        output. No exit code comes back through the wrappers (NO_EXIT_STATUS): a direct
        run that ended is Crashed "no exit_status reported" with its own stderr, whatever
        its program's exit code (real Torque reports it while the job is C)."""
        h = env.h
        before = len(env.wrappers.calls(h.submit_command))
        command = ["sh", "-c", 'echo "trial [$0] seed=$SEED"; echo "trial $0 err" >&2; exit "$1"']
        args = [("a b", 0), ("$(touch /tmp/xm-array-pwned)", 0), ("c", 5), ("d;e", 0)]
        runs = run(start_runs_together(env.deployments["job"], [
            trial([*command, arg, str(code)], {"SEED": str(i)}) for i, (arg, code) in enumerate(args)],
            env.job_variables))
        frs = [wait_final(r.id, timeout=300) for r in runs]
        for fr, (arg, _) in zip(frs, args):
            if fr.state.type != StateType.COMPLETED:
                assert fr.state.type == StateType.CRASHED, fr.state
                assert "no exit_status reported" in fr.state.message, fr.state.message
                assert f"trial {arg} err" in fr.state.message, fr.state.message
        jobs = [job_id_of(fr) for fr in frs]
        assert len(set(jobs)) == 4 and not any(h.scheduler.array_of(j) for j in jobs), jobs
        # one submit per run (its run directory is in the Torque qsub's -o/-e); other
        # scenarios of the session may submit meanwhile
        calls = env.wrappers.calls(h.submit_command)[before:]
        assert all(len([c for c in calls if str(fr.id) in c]) == 1 for fr in frs), calls
        for i, (fr, (arg, _)) in enumerate(zip(frs, args)):
            logs = wait_for(lambda: (lambda t: t if "seed=" in t else None)(logs_of(fr.id)), 60, what="run output")
            assert f"trial [{arg}] seed={i}" in logs and f"trial {arg} err" in logs, logs
        assert not os.path.exists("/tmp/xm-array-pwned")

    def test_cancelling_one_task_leaves_the_others_and_a_stopped_array_goes_in_one_command(self, env):
        """Torque: three held runs are three jobs; cancelling one removes its job only,
        and stopping the other two removes each with its own qdel."""
        h = env.h
        runs = run(start_runs_together(env.deployments["job"], [trial(["sleep", "600"])] * 3,
                                       {**env.job_variables, **h.hold_variables}))
        frs = [wait_state(r.id, StateType.PENDING, name="InfrastructurePending", timeout=240) for r in runs]
        jobs = [job_id_of(fr) for fr in frs]
        assert len(set(jobs)) == 3 and not any(h.scheduler.array_of(j) for j in jobs), jobs
        cancels = len(env.wrappers.calls(h.cancel_command))
        request_cancel(frs[0].id)
        wait_state(frs[0].id, StateType.CANCELLED)
        wait_for(lambda: h.final_or_gone(jobs[0]), 60, what=f"job {jobs[0]} to be removed")
        assert all(h.job_state(j) == JobState.PENDING for j in jobs[1:])
        assert all(state_of(fr.id) == StateType.PENDING for fr in frs[1:])
        assert " ".join(h.scheduler.cancel_argvs(jobs[0], 30)[-1]) in env.wrappers.calls(h.cancel_command)[cancels:]
        request_cancel(*(fr.id for fr in frs[1:]))
        for fr in frs[1:]:
            wait_state(fr.id, StateType.CANCELLED)
        for job in jobs[1:]:
            wait_for(lambda: h.final_or_gone(job), 60, what=f"job {job} to be removed")
        calls = env.wrappers.calls(h.cancel_command)[cancels:]
        for job in jobs[1:]:
            assert " ".join(h.scheduler.cancel_argvs(job, 30)[-1]) in calls, calls
