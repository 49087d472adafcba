"""The state a batch run takes when its job leaves the scheduler (workers/run_end.py):
every branch of the decision, on Prefect's own State objects, with no server."""

import logging

import pytest
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Cancelling, Completed, Crashed, Failed, Pending, Running

from prefect_xm.workers.hetjob import MemberEnd
from prefect_xm.workers.run_end import abandoned_before_submit, job_end, member_run_end, never_submitted, requeue_end
from prefect_xm.workers.scheduler import JobState, JobStatus

JOB = "slurm job 12"
DONE = JobStatus("12", JobState.COMPLETED, native_state="COMPLETED", exit_code=0)
FAILED = JobStatus("12", JobState.FAILED, native_state="FAILED", exit_code=3)
TIMEOUT = JobStatus("12", JobState.FAILED, native_state="TIMEOUT", reason="TimeLimit")
REMOVED = JobStatus("12", JobState.CANCELLED, native_state="CANCELLED")


def end(status, current, *, direct=False, cancel_requested=False, ended_by_program=False, label=JOB):
    return job_end(JOB, status, current, direct=direct, cancel_requested=cancel_requested,
                   ended_by_program=ended_by_program, label=label)


@pytest.mark.parametrize("direct", [False, True])
def test_a_run_being_cancelled_ends_cancelled_once(direct):
    for current in (Cancelling(), Running()):
        e = end(TIMEOUT, current, direct=direct, cancel_requested=current.type == StateType.RUNNING)
        state = e.state()
        assert state.type == StateType.CANCELLED and e.force
        assert state.message == "Cancelled: slurm job 12 removed (TIMEOUT (TimeLimit))."
        assert e.log_line == "slurm job 12 ended TIMEOUT (TimeLimit); flow run cancelled"
    assert end(DONE, Cancelled(), direct=direct) is None  # already there: no second write


def test_engine_mode_keeps_what_the_flow_reported():
    assert end(DONE, Completed()) is None
    assert end(FAILED, Failed()) is None
    assert end(DONE, Crashed()) is None  # the job completed: the engine's own word stands


def test_engine_mode_a_job_the_scheduler_killed_says_why_with_its_stderr():
    e = end(TIMEOUT, Running())
    assert e.with_stderr and e.level == logging.ERROR and not e.force  # proposed over Running
    state = e.state("Traceback\nKilled", "/runs/x/job.err")
    assert state.type == StateType.CRASHED
    assert state.message == ("slurm job 12 ended TIMEOUT (TimeLimit) before the flow run reported a final state.\n"
                             "Last lines of the job's stderr (/runs/x/job.err):\nTraceback\nKilled")
    # over the engine's own Crashed (it saw SIGTERM, not why): forced, keeping its words
    e = end(TIMEOUT, Crashed(message="Execution was cancelled by the runtime environment."))
    assert e.force
    assert e.state().message == ("slurm job 12 ended TIMEOUT (TimeLimit) before the flow run reported a final "
                                 "state. The flow run said: Execution was cancelled by the runtime environment.")


@pytest.mark.parametrize("direct", [False, True])
def test_a_job_removed_outside_prefect_is_cancelled(direct):
    e = end(REMOVED, Running(), direct=direct)
    assert e.state().type == StateType.CANCELLED and e.level == logging.WARNING and not e.with_stderr
    assert e.state().message == "slurm job 12 was cancelled outside Prefect (CANCELLED)."


def test_direct_mode_the_jobs_end_is_the_runs_end():
    e = end(DONE, Pending(), direct=True, label="slurm array 7 task")
    assert e.running_first and e.force  # a job too quick to be seen running
    assert (e.state().type, e.state().message) == (StateType.COMPLETED, "slurm array 7 task exited with code 0")
    assert e.log_line == "slurm job 12 exited with code 0"

    e = end(FAILED, Running(), direct=True, ended_by_program=True)
    assert (e.state().type, e.state().message) == (
        StateType.FAILED, "slurm job 12: the program exited with code 3 (FAILED exit code 3).")
    e = end(TIMEOUT, Running(), direct=True)
    assert (e.state().type, e.state().message) == (StateType.CRASHED, "slurm job 12 ended TIMEOUT (TimeLimit).")
    assert e.with_stderr and e.state("", "/x").message == "slurm job 12 ended TIMEOUT (TimeLimit)."  # no empty tail
    assert end(DONE, Failed(), direct=True) is None  # ended already (a gang member, the launcher)


def test_a_gang_members_own_exit_decides_its_end():
    assert member_run_end(JOB, MemberEnd()) is None
    e = member_run_end(JOB, MemberEnd(exit_code=0))
    assert (e.state().type, e.state().message, e.running_first) == (StateType.COMPLETED, "slurm job 12 exited with code 0", True)
    e = member_run_end(JOB, MemberEnd(exit_code=2))
    assert (e.state().type, e.with_stderr) == (StateType.FAILED, True)
    assert e.state().message == "slurm job 12: the program exited with code 2."
    e = member_run_end(JOB, MemberEnd(exit_code=None, stopped_by="run-1", stopper_exit_code=4), stopper="trainer")
    assert e.state().type == StateType.CANCELLED
    assert e.state().message == "slurm job 12: stopped with its gang: gang member 'trainer' exited with code 4"
    e = member_run_end(JOB, MemberEnd(exit_code=None, stopped_by="run-1", stopper_exit_code=4))
    assert "gang member run run-1 exited with code 4" in e.state().message


def test_a_requeued_job_takes_its_run_back_to_pending_until_its_limit():
    requeued = JobStatus("12", JobState.PENDING, native_state="PENDING", reason="BeginTime")
    e = requeue_end(JOB, requeued, Running(), cancel_requested=False, requeues=1, limit=2)
    state = e.state()
    assert (state.type, state.name, e.force, e.gives_up) == (StateType.PENDING, "Requeued", True, False)
    assert state.message == ("slurm job 12 went back to the queue (PENDING (BeginTime)): requeue 1 of 2. The same "
                             "job runs again as attempt 2 (PREFECT_XM_ATTEMPT=2).")
    e = requeue_end(JOB, requeued, Crashed(), cancel_requested=False, requeues=3, limit=2)
    assert e.gives_up and e.state().type == StateType.CRASHED
    assert "requeued 3 times (PENDING (BeginTime)), more than max_requeues=2: the worker removed it." in e.message
    assert requeue_end(JOB, requeued, Cancelling(), cancel_requested=False, requeues=1, limit=None) is None
    assert requeue_end(JOB, requeued, Completed(), cancel_requested=False, requeues=1, limit=None) is None
    assert requeue_end(JOB, requeued, Running(), cancel_requested=True, requeues=1, limit=None) is None
    assert "requeue 5." in requeue_end(JOB, requeued, None, cancel_requested=False, requeues=5, limit=None).message


def test_recovery_ends_are_proposed_not_forced():
    e = never_submitted("slurm")
    assert (e.state().type, e.force) == (StateType.CRASHED, False)
    assert "slurm knows no job of it" in e.message
    e = abandoned_before_submit()
    assert (e.state().type, e.force) == (StateType.SCHEDULED, False)
