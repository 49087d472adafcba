"""condor_hold through the fake HTCondor CLI (tests/fakes/htcondor), driven with the
HTCondor Scheduler's own argv builders and parsers, as the worker's poller would see it:

- a job held by the user while it RUNS has been hard-killed by HTCondor (a release would
  start it again from scratch), so the status query says final, with the HoldReason;
- a job held by the user before it ever started stays pending, with the HoldReason.

No Prefect server: each test has its own FAKE_CONDOR_HOME and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, wait_for
from prefect_xm.workers.htcondor import HTCondorJobConfiguration, HTCondorScheduler
from prefect_xm.workers.scheduler import CommandResult, JobState, JobStatus, SubmitRequest

FAKE_CONDOR = REPO / "tests" / "fakes" / "htcondor"
DEADLINE = 120.0  # generous: the machine may be busy


class FakeCondor:
    def __init__(self, home: Path, tmp: Path):
        self.home = home
        self.tmp = tmp
        self.scheduler = HTCondorScheduler()

    def run(self, argv, stdin=None) -> CommandResult:
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
        return CommandResult(argv, out.returncode, out.stdout, out.stderr)

    def submit(self, name: str, body: str) -> str:
        """condor_submit the way the worker does (submit_argv, the description on stdin)."""
        run_dir = self.tmp / name
        run_dir.mkdir()
        script = run_dir / "job.sh"
        script.write_text("#!/bin/bash\n" + body + "\n")
        script.chmod(0o755)
        request = SubmitRequest(str(script), script.read_text(), name, str(run_dir),
                                HTCondorJobConfiguration().model_dump(exclude={"env"}))
        result = self.run(self.scheduler.submit_argv(request), self.scheduler.submit_stdin(request))
        assert result.ok, result
        return self.scheduler.parse_submit(result.stdout)

    def status(self, job_id: str) -> JobStatus | None:
        result = self.run(self.scheduler.status_argv([job_id]))
        return self.scheduler.parse_status(result).get(job_id)

    def ad(self, job_id: str) -> dict:
        result = self.run(["condor_q", job_id, "-json"])
        assert result.ok, result
        [ad] = json.loads(result.stdout)
        return ad

    def processes(self) -> list[int]:
        """Live processes of this fake home: starters, and the job scripts (getenv = True
        gives them the submitter's environment)."""
        marker = f"FAKE_CONDOR_HOME={self.home}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
        return found

    def remove_all(self) -> None:
        for job_id in self.scheduler.parse_find_by_name(self.run(["condor_q", "-af:j", "JobStatus"]).stdout):
            self.run(self.scheduler.cancel_argvs(job_id, 0)[-1])
        wait_for(lambda: not self.run(["condor_q", "-af:j", "JobStatus"]).stdout.strip(), DEADLINE,
                 what="the fake queue to empty")
        wait_for(lambda: not self.processes(), DEADLINE, what="no process of the fake left")


@pytest.fixture
def condor(tmp_path, monkeypatch):
    home = tmp_path / "condor"
    monkeypatch.setenv("FAKE_CONDOR_HOME", str(home))
    monkeypatch.setenv("FAKE_CONDOR_KILL_TIMEOUT", "1")
    monkeypatch.setenv("PATH", f"{FAKE_CONDOR}{os.pathsep}{os.environ['PATH']}")
    fake = FakeCondor(home, tmp_path)
    yield fake
    fake.remove_all()


def test_condor_hold_of_a_running_job_is_final_with_the_hold_reason(condor):
    # the job ignores SIGTERM: only the SIGKILL that follows can end it
    job_id = condor.submit("held-running", "trap '' TERM\necho $$ > \"$(dirname \"$0\")/job.pid\"\n"
                                           "while true; do sleep 0.2; done")
    pid_file = condor.tmp / "held-running" / "job.pid"
    wait_for(lambda: (s := condor.status(job_id)) and s.state == JobState.RUNNING and pid_file.exists(),
             DEADLINE, what="the job to run")
    pgid = int(pid_file.read_text())
    assert pgid in condor.processes()  # the leftover check below does see the job's processes

    held = condor.run(["condor_hold", job_id])
    assert held.ok and held.stdout == f"Job {job_id} held\n", held

    status = condor.status(job_id)
    assert status.state == JobState.FAILED and status.state.is_final
    assert status.native_state == "HELD" and "condor_hold" in status.reason
    assert "condor_hold" in status.describe()

    # the job's processes are killed (SIGTERM, then SIGKILL), and the job stays held
    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, DEADLINE, what="the held job's processes to be killed")
    wait_for(lambda: "Job was held." in (condor.tmp / "held-running" / "job.log").read_text(), DEADLINE,
             what="the hold event in the job's event log")
    ad = condor.ad(job_id)
    assert ad["JobStatus"] == 5 and ad["HoldReasonCode"] == 1 and ad["NumJobStarts"] == 1
    assert ad["HoldReason"].startswith("via condor_hold (by user ")
    again = condor.status(job_id)
    assert again.state == JobState.FAILED and again.reason == ad["HoldReason"]
    log = (condor.tmp / "held-running" / "job.log").read_text()
    assert log.index("Job was evicted.") < log.index("Job was held.") and "Code 1 Subcode 0" in log

    # condor_hold of a held job is refused, as HTCondor does
    twice = condor.run(["condor_hold", job_id])
    assert twice.returncode == 1 and twice.stderr == f"Job {job_id} already held\n"

    # the worker's cancel removes it, and nothing of the fake is left running
    assert condor.scheduler.parse_cancel(condor.run(condor.scheduler.cancel_argvs(job_id, 0)[-1])) is True
    wait_for(lambda: condor.status(job_id) is None, DEADLINE, what="the job to leave condor_q")
    wait_for(lambda: not condor.processes(), DEADLINE, what="no process of the fake left")


def test_condor_hold_of_a_job_that_never_started_stays_pending(condor, monkeypatch):
    monkeypatch.setenv("FAKE_CONDOR_SLOTS", "1")
    busy = condor.submit("busy", "sleep 300")
    wait_for(lambda: (s := condor.status(busy)) and s.state == JobState.RUNNING, DEADLINE,
             what="the first job to take the only slot")
    waiting = condor.submit("waiting", "exit 0")
    assert condor.status(waiting).state == JobState.PENDING

    held = condor.run(["condor_hold", waiting])
    assert held.ok, held
    status = condor.status(waiting)
    assert status.state == JobState.PENDING and not status.state.is_final
    assert status.native_state == "HELD" and "condor_hold" in status.reason
    ad = condor.ad(waiting)
    assert ad["HoldReasonCode"] == 1 and ad["NumJobStarts"] == 0 and "JobStartDate" not in ad


# -- arrays: clusters of many procs (queue N), as the worker submits a sweep ----------------


def submit_array(condor: FakeCondor, name: str, body: str, size: int, throttle=None, **variables):
    """An array the way the worker submits it (array_submit_argv, the description on
    stdin); the condor_submit result and the array's directory."""
    array_dir = condor.tmp / name
    array_dir.mkdir()
    script = array_dir / "job.sh"
    script.write_text("#!/bin/bash\n" + body + "\n")
    script.chmod(0o755)
    request = SubmitRequest(str(script), script.read_text(), name, str(array_dir),
                            HTCondorJobConfiguration(**variables).model_dump(exclude={"env"}),
                            array_size=size, array_throttle=throttle)
    argv = condor.scheduler.array_submit_argv(request, size, throttle)
    return condor.run(argv, condor.scheduler.submit_stdin(request)), array_dir


def statuses(condor: FakeCondor, job_ids):
    return condor.scheduler.parse_status(condor.run(condor.scheduler.status_argv(job_ids)))


def test_an_array_is_one_cluster_each_proc_its_own_job(condor):
    # each task exits with its index: 0 completes, 1 and 2 fail with their own codes
    result, array_dir = submit_array(
        condor, "sweep", 'echo "task $XM_ARRAY_INDEX of $(basename "$PWD")"; exit "$XM_ARRAY_INDEX"', 3,
        extra_directives=['+XmTag = "t-$(Cluster)-$(Process)"', 'environment = "SEED=7"'])
    assert result.ok and result.stderr == "", result
    cluster = condor.scheduler.parse_array_submit(result.stdout)
    assert result.stdout == f"{cluster}.0 - {cluster}.2\n"
    tasks = [condor.scheduler.array_task_id(cluster, condor.scheduler.array_first_index + i) for i in range(3)]
    assert tasks == [f"{cluster}.{i}" for i in range(3)]
    assert {condor.scheduler.array_of(t) for t in tasks} == {cluster}
    ad = condor.ad(tasks[1])
    assert ad["XmTag"] == f"t-{cluster}-1" and ad["JobBatchName"] == "sweep"
    assert "SEED=7" in ad["Environment"] and "XM_ARRAY_INDEX=1" in ad["Environment"]

    def final():
        found = statuses(condor, tasks)
        return found if all(t in found and found[t].state.is_final for t in tasks) else None

    done = wait_for(final, DEADLINE, what="every task to end")
    assert [(done[t].state, done[t].exit_code) for t in tasks] == [
        (JobState.COMPLETED, 0), (JobState.FAILED, 1), (JobState.FAILED, 2)]
    for i in range(3):
        assert (array_dir / f"task-{i}.out").read_text() == f"task {i} of sweep\n"
    log = (array_dir / "job.log").read_text()  # one event log for the cluster
    assert all(f"({int(cluster):03d}.{i:03d}.000)" in log for i in range(3))


def test_removing_one_task_leaves_the_others_and_the_cluster_goes_in_one_command(condor):
    result, _ = submit_array(condor, "held-sweep", "sleep 300", 3, hold=True)
    cluster = condor.scheduler.parse_array_submit(result.stdout)
    tasks = [f"{cluster}.{i}" for i in range(3)]
    assert all(s.state == JobState.PENDING and s.native_state == "HELD" for s in statuses(condor, tasks).values())

    one = condor.run(condor.scheduler.cancel_argvs(tasks[0], 30)[-1])
    assert one.stdout == f"Job {tasks[0]} marked for removal\n" and condor.scheduler.parse_cancel(one) is True
    left = statuses(condor, tasks)
    assert left.get(tasks[0]) is None or left[tasks[0]].state == JobState.CANCELLED
    assert all(left[t].state == JobState.PENDING for t in tasks[1:])

    whole = condor.run(condor.scheduler.cancel_argvs(cluster, 30)[-1])
    assert whole.ok and whole.stdout == f"All jobs in cluster {cluster} have been marked for removal\n", whole
    assert condor.scheduler.parse_cancel(whole) is True
    wait_for(lambda: not statuses(condor, tasks), DEADLINE, what="the cluster to leave the queue")
    again = condor.run(["condor_rm", cluster])
    assert again.returncode == 1 and again.stderr == f"Couldn't find/remove all jobs in cluster {cluster}.\n"
    assert condor.scheduler.parse_cancel(again) is False
    history = condor.scheduler.parse_terminal(condor.run(condor.scheduler.terminal_argvs(tasks)[0]))
    assert {t: s.state for t, s in history.items()} == {t: JobState.CANCELLED for t in tasks}


def test_a_throttled_array_materializes_its_tasks_as_others_leave(condor):
    gate = condor.tmp / "gate"
    body = f'while [ ! -e {gate}-$XM_ARRAY_INDEX ]; do sleep 0.2; done; exit 0'
    result, _ = submit_array(condor, "throttled", body, 3, throttle=1)
    cluster = condor.scheduler.parse_array_submit(result.stdout)
    assert result.stdout == f"{cluster}.0 - {cluster}.2\n"
    tasks = [f"{cluster}.{i}" for i in range(3)]
    found = statuses(condor, tasks)
    assert list(found) == [tasks[0]]  # one job in the queue at a time
    for task in tasks[1:]:
        waiting = condor.scheduler.lookup(task, found)
        assert waiting.state == JobState.PENDING and "not materialized yet" in waiting.reason
    # a task that is not materialized yet cannot be removed alone
    alone = condor.run(["condor_rm", tasks[2]])
    assert alone.returncode == 1 and alone.stderr == f"Job {tasks[2]} not found\n"
    for i, task in enumerate(tasks):
        wait_for(lambda: (s := condor.scheduler.lookup(task, statuses(condor, tasks))) and s.state == JobState.RUNNING,
                 DEADLINE, what=f"task {task} to run")
        assert len(statuses(condor, tasks)) == 1
        (condor.tmp / f"gate-{i}").touch()
    # no leave_in_queue: completed tasks are read from condor_history
    wait_for(lambda: not statuses(condor, tasks), DEADLINE, what="the array to leave the queue")
    history = condor.scheduler.parse_terminal(condor.run(condor.scheduler.terminal_argvs(tasks)[0]))
    assert {t: (s.state, s.exit_code) for t, s in history.items()} == {t: (JobState.COMPLETED, 0) for t in tasks}


def test_removing_a_throttled_array_ends_its_materialization(condor):
    result, _ = submit_array(condor, "stopped", "sleep 300", 4, throttle=2)
    cluster = condor.scheduler.parse_array_submit(result.stdout)
    tasks = [f"{cluster}.{i}" for i in range(4)]
    assert sorted(statuses(condor, tasks)) == tasks[:2]
    whole = condor.run(["condor_rm", cluster])
    assert whole.ok and condor.scheduler.parse_cancel(whole) is True
    wait_for(lambda: not condor.run(["condor_q", cluster, "-af:j", "JobStatus"]).stdout.strip(), DEADLINE,
             what="the cluster to leave the queue")
    found = statuses(condor, tasks)
    assert all(condor.scheduler.lookup(t, found) is None for t in tasks)  # nothing left to materialize
    history = condor.scheduler.parse_terminal(condor.run(condor.scheduler.terminal_argvs(tasks)[0]))
    assert sorted(history) == tasks[:2]


def test_an_array_over_max_jobs_per_submission_is_refused_whole(condor, monkeypatch):
    monkeypatch.setenv("FAKE_CONDOR_MAX_JOBS_PER_SUBMISSION", "2")
    result, _ = submit_array(condor, "too-big", "exit 0", 3)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "\nERROR: Failed to create proc\nNumber of submitted jobs would exceed MAX_JOBS_PER_SUBMISSION\n"
    error = condor.scheduler.submit_error(result)
    assert condor.scheduler.array_too_large(error)
    assert condor.run(["condor_q", "-af:j", "JobStatus"]).stdout == ""  # nothing queued
    fits, _ = submit_array(condor, "fits", "exit 0", 2)
    assert fits.ok, fits
