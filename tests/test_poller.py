"""The poller's rules, on scripted scheduler answers (the real Slurm cannot be made to
time out or forget a job on cue; the e2e tests cover the ordinary path for real)."""

from __future__ import annotations

from prefect_xm.workers.poller import JobPoller
from prefect_xm.workers.scheduler import CommandResult, JobState
from prefect_xm.workers.slurm import SlurmScheduler


class ScriptedTransport:
    """Answers each command from `answers[command name]`, a list consumed in order
    (the last answer repeats)."""

    def __init__(self, **answers):
        self.answers = {k: list(v) for k, v in answers.items()}
        self.calls: list[list[str]] = []

    async def run(self, argv, *, stdin=None, env=None, timeout=60.0):
        self.calls.append(list(argv))
        queue = self.answers.get(argv[0], [(1, "", f"{argv[0]}: no answer scripted")])
        rc, out, err = queue.pop(0) if len(queue) > 1 else queue[0]
        return CommandResult(list(argv), rc, out, err)

    def count(self, name):
        return sum(1 for c in self.calls if c[0] == name)


async def poll(poller, times=1):
    for _ in range(times):
        await poller.poll_once()


def drain(job):
    out = []
    while not job.updates.empty():
        out.append(job.updates.get_nowait())
    return out


async def test_one_status_query_for_many_jobs():
    listing = "".join(f"{i}|PENDING|Priority|N/A\n" for i in range(1, 201))
    t = ScriptedTransport(squeue=[(0, listing, "")])
    p = JobPoller(SlurmScheduler(), t)
    jobs = [p.track(str(i)) for i in range(1, 201)]
    await poll(p, 3)
    assert t.count("squeue") == 3 and len(t.calls) == 3
    assert all(j.status.reason == "Priority" for j in jobs)


async def test_failing_query_keeps_last_state_then_recovers():
    t = ScriptedTransport(squeue=[
        (0, "5|RUNNING|None|N/A\n", ""),
        (1, "", "squeue: error: Socket timed out on send/recv operation"),
        (1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"),
        (0, "5|RUNNING|None|N/A\n", ""),
    ])
    p = JobPoller(SlurmScheduler(), t, grace_period=300)
    job = p.track("5")
    await poll(p, 3)
    assert job.status.state == JobState.RUNNING and p.failing_since is not None
    assert [s.state for s in drain(job)] == [JobState.RUNNING]
    await poll(p)
    assert p.failing_since is None and job.status.state == JobState.RUNNING


async def test_states_only_move_forward():
    # a state the model does not know is no step back from running
    t = ScriptedTransport(squeue=[(0, "7|RUNNING|None|N/A\n", ""), (0, "7|RESV_DEL_HOLDING|x|N/A\n", "")])
    p = JobPoller(SlurmScheduler(), t)
    job = p.track("7")
    await poll(p, 2)
    assert job.status.state == JobState.RUNNING and job.requeues == 0


async def test_a_new_estimate_of_a_queued_jobs_start_is_an_update_and_the_same_one_is_not():
    same, later = "9|PENDING|Resources|2026-12-07T21:33:22\n", "9|PENDING|Resources|2026-12-07T21:40:00\n"
    t = ScriptedTransport(squeue=[(0, "9|PENDING|Resources|N/A\n", ""), (0, same, ""), (0, same, ""), (0, later, "")])
    p = JobPoller(SlurmScheduler(), t)
    job = p.track("9")
    await poll(p, 4)
    assert [s.expected_start for s in drain(job)] == ["", "2026-12-07T21:33:22", "2026-12-07T21:40:00"]


async def test_a_started_job_back_in_the_queue_is_a_requeue_and_is_followed_on():
    # what `scontrol requeue` showed on the real Slurm 22.05: COMPLETING, then PENDING
    # (BeginTime: held for two minutes), then RUNNING again
    t = ScriptedTransport(squeue=[(0, "7|RUNNING|None|N/A\n", ""), (0, "7|COMPLETING|None|N/A\n", ""),
                                  (0, "7|PENDING|BeginTime|N/A\n", ""), (0, "7|RUNNING|None|N/A\n", "")])
    p = JobPoller(SlurmScheduler(), t)
    job = p.track("7")
    await poll(p, 4)
    assert [(s.state, s.native_state) for s in drain(job)] == [
        (JobState.RUNNING, "RUNNING"), (JobState.RUNNING, "COMPLETING"), (JobState.PENDING, "PENDING"),
        (JobState.RUNNING, "RUNNING")]
    assert job.requeues == 1


async def test_preempted_in_the_queue_but_queued_again_in_its_record_is_a_requeue_not_an_end():
    t = ScriptedTransport(
        squeue=[(0, "8|RUNNING|None|N/A\n", ""), (0, "8|PREEMPTED|None|N/A\n", ""), (0, "8|PENDING|BeginTime|N/A\n", "")],
        scontrol=[(0, "JobId=8 JobName=x JobState=PENDING Reason=BeginTime Restarts=1 ExitCode=0:0\n", "")],
    )
    p = JobPoller(SlurmScheduler(), t)
    job = p.track("8")
    await poll(p, 3)
    assert job.status.state == JobState.PENDING and job.requeues == 1
    assert not any(s.state.is_final for s in drain(job))


async def test_a_scheduler_that_does_not_call_it_a_requeue_keeps_the_state_moving_forward():
    class NoRequeues(SlurmScheduler):
        def requeued(self, previous, status):
            return False

    t = ScriptedTransport(squeue=[(0, "7|RUNNING|None|N/A\n", ""), (0, "7|PENDING|Priority|N/A\n", "")])
    p = JobPoller(NoRequeues(), t)
    job = p.track("7")
    await poll(p, 2)
    assert job.status.state == JobState.RUNNING and job.requeues == 0


async def test_absent_job_is_resolved_from_its_terminal_record_not_assumed_completed():
    t = ScriptedTransport(
        squeue=[(0, "", "")],
        scontrol=[(0, "JobId=9 JobName=x JobState=OUT_OF_MEMORY Reason=OutOfMemory ExitCode=0:125\n", "")],
    )
    p = JobPoller(SlurmScheduler(), t)
    job = p.track("9")
    await poll(p)
    assert job.status.state == JobState.FAILED
    assert job.status.native_state == "OUT_OF_MEMORY" and job.status.reason == "OutOfMemory"


async def test_absent_job_without_record_waits_for_the_grace_period_then_is_lost():
    t = ScriptedTransport(
        squeue=[(0, "", "")],
        scontrol=[(1, "", "slurm_load_jobs error: Invalid job id specified")],
        sacct=[(1, "", "Slurm accounting storage is disabled")],
    )
    p = JobPoller(SlurmScheduler(), t, grace_period=300)
    job = p.track("11", initial=JobState.RUNNING)
    await poll(p, 2)
    assert job.status.state == JobState.RUNNING  # unknown is not completed
    job.missing_since -= 301
    await poll(p)
    assert job.status.state == JobState.FAILED and job.status.native_state == "LOST"


async def test_final_state_in_the_queue_gets_its_exit_code_from_scontrol():
    t = ScriptedTransport(
        squeue=[(0, "12|FAILED|NonZeroExitCode|N/A\n", "")],
        scontrol=[(0, "JobId=12 JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0\n", "")],
    )
    p = JobPoller(SlurmScheduler(), t)
    job = p.track("12")
    await poll(p)
    assert (job.status.state, job.status.exit_code) == (JobState.FAILED, 3)
    assert [s.state for s in drain(job)] == [JobState.FAILED]  # announced once, complete
    await poll(p)
    assert t.count("squeue") == 1  # nothing left to poll


async def test_job_removed_by_the_worker_and_gone_without_record_is_cancelled():
    # SGE writes no qacct record for a job deleted while pending.
    from prefect_xm.workers.sge import SgeScheduler

    empty = "<?xml version='1.0'?>\n<job_info>\n  <queue_info>\n  </queue_info>\n  <job_info>\n  </job_info>\n</job_info>\n"
    t = ScriptedTransport(qstat=[(0, empty, "")], qacct=[(1, "", "error: job id 12 not found\n")])
    p = JobPoller(SgeScheduler(), t, grace_period=300)
    job = p.track("12")
    await poll(p)
    assert job.status.state == JobState.PENDING  # gone, no record, not cancelled: unknown yet
    job.cancelled = True
    await poll(p)
    assert job.status.state == JobState.CANCELLED


async def test_final_state_with_exit_code_in_the_live_query_needs_no_record_lookup():
    """Schedulers whose live query carries the exit code (PBS Pro `qstat -x`, LSF
    `bjobs -a`) cost no extra command when a job ends."""
    from prefect_xm.workers.scheduler import JobStatus

    class WithExitCodes(SlurmScheduler):
        def parse_status(self, result):
            return {"21": JobStatus("21", JobState.FAILED, "FAILED", "NonZeroExitCode", exit_code=2)}

    t = ScriptedTransport(squeue=[(0, "", "")])
    p = JobPoller(WithExitCodes(), t)
    job = p.track("21")
    await poll(p)
    assert (job.status.state, job.status.exit_code) == (JobState.FAILED, 2)
    assert [c[0] for c in t.calls] == ["squeue"]


async def test_submissions_asking_for_early_polls_get_one_query_per_interval():
    """Each submit asks for a poll soon; 50 of them inside one interval still make one
    query in it (the first, at once, since the poller was idle) and one per interval after."""
    import asyncio

    listing = "".join(f"{i}|PENDING|Priority|N/A\n" for i in range(1, 51))
    t = ScriptedTransport(squeue=[(0, listing, "")])
    p = JobPoller(SlurmScheduler(), t, interval=0.5)
    started = asyncio.get_running_loop().time()
    try:
        for i in range(1, 51):
            p.track(str(i))
            p.poll_soon()
            await asyncio.sleep(0.005)  # submissions trickle in over ~0.25 s (longer on a busy machine)
        await asyncio.sleep(1.3)
        elapsed = asyncio.get_running_loop().time() - started
        # one poll at once, then one per interval of the time that really passed: never one per submit
        assert 1 <= t.count("squeue") <= elapsed / 0.5 + 1, (t.count("squeue"), elapsed)
    finally:
        await p.close()


async def test_one_job_lookups_are_bounded_per_poll_and_every_job_gets_its_turn():
    """25 jobs gone from the queue with no record yet (accounting lags): each poll asks
    scontrol about at most per_id_lookups of them, the least recently asked first."""
    t = ScriptedTransport(
        squeue=[(0, "", "")],
        scontrol=[(1, "", "slurm_load_jobs error: Invalid job id specified")],
        sacct=[(1, "", "Slurm accounting storage is disabled")],
    )
    s = SlurmScheduler()
    p = JobPoller(s, t)
    for i in range(1, 26):
        p.track(str(i), initial=JobState.RUNNING)
    asked: list[set[str]] = []
    for _ in range(3):
        before = len(t.calls)
        await poll(p)
        asked.append({c[-1] for c in t.calls[before:] if c[0] == "scontrol"})
    assert all(len(a) <= s.per_id_lookups for a in asked)
    assert set().union(*asked) == {str(i) for i in range(1, 26)}


async def test_a_cancel_that_comes_after_the_job_ended_keeps_how_it_ended():
    """scancel says the job is unknown (it finished and left the queue meanwhile): its
    record says how it ended, ahead of the worker's "removed" (which stands only for jobs
    gone without any record, e.g. SGE's deleted while pending)."""
    from unittest.mock import MagicMock

    from prefect_xm.workers.followed import FollowedRun
    from prefect_xm.workers.slurm import SlurmWorker

    t = ScriptedTransport(
        squeue=[(0, "", "")],
        scancel=[(1, "", "scancel: error: Kill job error on job id 7: Invalid job id specified\n")],
        scontrol=[(0, "JobId=7 JobName=x JobState=COMPLETED Reason=None ExitCode=0:0\n", "")],
    )
    p = JobPoller(SlurmScheduler(), t, grace_period=300)
    job = p.track("7")
    worker = SlurmWorker(work_pool_name="late-cancel")
    followed = FollowedRun(flow_run_id=MagicMock(), job_id="7", poller=p, transport=t,
                           configuration=MagicMock(), tracked=job)
    assert await worker.cancel_job(p.scheduler, "7", t, 0, JobState.PENDING, followed) is False
    await poll(p)
    assert job.status.state == JobState.COMPLETED, job.status


def test_each_scheduler_says_what_its_requeue_looks_like():
    from prefect_xm.workers.htcondor import HTCondorScheduler
    from prefect_xm.workers.lsf import LsfScheduler
    from prefect_xm.workers.pbs import PbsScheduler
    from prefect_xm.workers.scheduler import JobStatus
    from prefect_xm.workers.sge import SgeScheduler, state_of

    def sge(code):
        return JobStatus("5", state_of(code), code)

    s = SgeScheduler()
    # qmod -rj: Rq while queued again, Rr once running again (which a poll may see first)
    assert s.requeued(sge("r"), sge("Rq")) and s.requeued(sge("r"), sge("Rr"))
    assert not s.requeued(sge("r"), sge("r")) and not s.requeued(sge("Rr"), sge("Rr"))
    assert not s.requeued(sge("qw"), sge("r"))
    running, queued = JobStatus("5", JobState.RUNNING, "R"), JobStatus("5", JobState.PENDING, "Q")
    for scheduler in (SlurmScheduler(), PbsScheduler(), LsfScheduler(), HTCondorScheduler()):
        assert scheduler.requeued(running, queued) and not scheduler.requeued(queued, running)


def test_a_queued_jobs_line_is_logged_for_news_and_its_revised_estimate_at_most_every_five_minutes():
    from prefect_xm.workers.following import ESTIMATE_LOG_SECONDS, queued_line_due
    from prefect_xm.workers.scheduler import JobStatus

    def queued(reason, start=""):
        return JobStatus("9", JobState.PENDING, "PENDING", reason, expected_start=start)

    none, first, revised = queued("Resources"), queued("Resources", "2026-12-07T21:33:22"), queued(
        "Resources", "2026-12-07T21:40:00")
    assert queued_line_due(none, None, 0.0, 1.0)
    assert not queued_line_due(none, none, 0.0, 1.0)  # the same line never twice
    assert queued_line_due(first, none, 0.0, 1.0)  # a first estimate at once
    assert queued_line_due(queued("Priority", first.expected_start), first, 0.0, 1.0)  # a new reason at once
    assert not queued_line_due(revised, first, 0.0, ESTIMATE_LOG_SECONDS - 1)
    assert queued_line_due(revised, first, 0.0, ESTIMATE_LOG_SECONDS)
