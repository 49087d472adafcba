"""Documented PBS Pro behaviours, driven through the fake PBS Pro CLI
(tests/fakes/pbspro) with the PBS Scheduler's own argv builders and parsers, run by the
worker's own LocalTransport (so a missing command behaves as it does in the worker):

- `qdel` of a job that has already finished: "qdel: Job has finished <id>", rc 35;
- a finished job that left the history (job_history_enable false, PBS Pro's default, or
  job_history_duration expired): `qstat` answers "qstat: Unknown Job Id <id>", rc 153,
  while the other ids of the same call are still answered on stdout;
- job arrays (`qsub -J`): subjobs with their own index, output, exit status and cancel,
  the array's states, max_run_subjobs, the step form, the max_array_size refusal and
  the -t/-J listings.

No Prefect server: each test has its own FAKE_PBS_HOME (job table, spooled scripts,
pid files) and leaves no job process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from conftest import REPO, wait_for
from prefect_xm.workers.pbs import PbsScheduler, unknown_ids
from prefect_xm.workers.poller import JobPoller
from prefect_xm.workers.scheduler import (
    CommandResult,
    JobState,
    SubmitRequest,
    TransientSchedulerError,
)
from prefect_xm.workers.transport import LocalTransport

FAKE_PBS = REPO / "tests" / "fakes" / "pbspro"
DEADLINE = 120.0  # generous: the machine may be busy; states advance when a command runs


class FakePbs:
    """The fake's private home, and the worker's way of running commands on it."""

    def __init__(self, home: Path, tmp: Path):
        self.home = home
        self.jobs = home / "jobs"
        self.tmp = tmp
        self.scheduler = PbsScheduler()

    def run(self, argv) -> CommandResult:
        """As the worker runs a scheduler command (LocalTransport: argv, no shell; its
        environment is os.environ, which the fixture pointed at the fake)."""
        return asyncio.run(LocalTransport().run(argv, timeout=60))

    def submit(self, name: str, body: str, *, hold: bool = False) -> str:
        """qsub a script carrying the directives pbs.sh.j2 writes (-N, -o, -e, -h for
        hold), through submit_argv/parse_submit."""
        script = self.tmp / f"{name}.sh"
        directives = [f"#PBS -N {name}", f"#PBS -o {self.tmp / (name + '.out')}", f"#PBS -e {self.tmp / (name + '.err')}"]
        if hold:
            directives.append("#PBS -h")
        script.write_text("#!/bin/bash\n" + "\n".join(directives) + "\n\n" + body + "\n")
        request = SubmitRequest(str(script), script.read_text(), name, str(self.tmp))
        result = self.run(self.scheduler.submit_argv(request))
        assert result.ok, result
        return self.scheduler.parse_submit(result.stdout)

    def submit_array(self, name: str, body: str, size: int, *, throttle=None, hold: bool = False):
        """An array of `size` subjobs through array_submit_argv/parse_array_submit, its
        script carrying the directives pbs.sh.j2 writes for an array (-o/-e with
        ^array_index^): (array id, subjob ids)."""
        script = self.tmp / f"{name}.sh"
        directives = [f"#PBS -N {name}", f"#PBS -o {self.tmp / name}.out.^array_index^",
                      f"#PBS -e {self.tmp / name}.err.^array_index^"]
        if hold:
            directives.append("#PBS -h")
        script.write_text("#!/bin/bash\n" + "\n".join(directives) + "\n\n" + body + "\n")
        request = SubmitRequest(str(script), script.read_text(), name, str(self.tmp))
        result = self.run(self.scheduler.array_submit_argv(request, size, throttle))
        assert result.ok, result
        array = self.scheduler.parse_array_submit(result.stdout)
        return array, [self.scheduler.array_task_id(array, i) for i in range(1, size + 1)]

    def qsub(self, *args: str) -> CommandResult:
        return self.run(["qsub", *args])

    def status(self, job_ids):
        result = self.run(self.scheduler.status_argv(list(job_ids)))
        return result, self.scheduler.parse_status(result)

    def seq(self, job_id: str) -> str:
        return job_id.split(".")[0]

    # -- the job processes: how the fake records them ---------------------------------
    # The runner (`_fakepbs.py --run-job <seq>`, started by whichever command starts the
    # job, so it inherits that command's FAKE_PBS_HOME) runs `/bin/bash jobs/<seq>.SC` in
    # its own session, writes that process's pid (= its process group) to jobs/<seq>.pid,
    # and jobs/<seq>.exit once it has ended.
    def processes(self) -> dict[int, str]:
        """Live processes of this fake home: job scripts and their runners."""
        found = {}
        marker = f"FAKE_PBS_HOME={self.home}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                if str(self.jobs).encode() + b"/" in cmdline:
                    found[int(entry.name)] = cmdline.decode(errors="replace")
                elif b"--run-job" in cmdline and marker + b"\0" in (entry / "environ").read_bytes() + b"\0":
                    found[int(entry.name)] = cmdline.decode(errors="replace")
            except OSError:  # gone meanwhile, or not ours to read
                continue
        return found

    def recorded_groups_alive(self) -> list[int]:
        alive = []
        for pid_file in self.jobs.glob("*.pid"):
            pid = int(pid_file.read_text().strip())
            try:
                os.killpg(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
            except PermissionError:  # pid reused by someone else's process
                pass
        return alive

    def assert_no_job_process_left(self) -> None:
        wait_for(lambda: not self.processes() and not self.recorded_groups_alive(), DEADLINE,
                 what="no fake PBS job process left")

    def table(self) -> dict[str, dict]:
        return {
            job["id"]: job
            for job in (json.loads(p.read_text()) for p in self.jobs.glob("*.json"))
        }


@pytest.fixture
def fake_pbs(tmp_path, monkeypatch):
    if not os.access(FAKE_PBS / "qsub", os.X_OK):
        pytest.fail("the fake PBS Pro CLI is missing from tests/fakes/pbspro")
    home = tmp_path / "pbs"
    monkeypatch.setenv("FAKE_PBS_HOME", str(home))
    monkeypatch.setenv("PATH", f"{FAKE_PBS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("FAKE_PBS_HISTORY_SECONDS", raising=False)
    fake = FakePbs(home, tmp_path)
    yield fake
    # Safety net, whatever the test did: qdel what is still live, then no process may be
    # left; as a last resort kill the process groups this fake home started (ours only).
    if fake.jobs.exists():
        live = [jid for jid, job in fake.table().items() if job["state"] not in ("F",)]
        for jid in live:
            fake.run(fake.scheduler.cancel_argvs(jid, 0)[-1])
        try:
            fake.assert_no_job_process_left()
        finally:
            for pid in fake.recorded_groups_alive():
                os.killpg(pid, signal.SIGKILL)


def test_qdel_of_a_finished_job_is_rc35_and_nothing_to_do(fake_pbs):
    """qdel of a job that has already finished: rc 35 "qdel: Job has finished <id>";
    parse_cancel returns False ("the scheduler no longer has it to remove"), does not
    raise, and the job's record (history) is unchanged: still COMPLETED, exit 0."""
    s = fake_pbs.scheduler
    job_id = fake_pbs.submit("done", "echo hello")
    assert job_id == "1.fakepbs"

    def finished():
        _, statuses = fake_pbs.status([job_id])
        return statuses.get(job_id) if job_id in statuses and statuses[job_id].state.is_final else None

    status = wait_for(finished, DEADLINE, what="the fake to report the job finished")
    assert (status.state, status.native_state, status.exit_code) == (JobState.COMPLETED, "F", 0)
    assert (fake_pbs.tmp / "done.out").read_text() == "hello\n"

    [argv] = s.cancel_argvs(job_id, 30)
    assert argv == ["qdel", job_id]
    result = fake_pbs.run(argv)
    assert result.returncode == 35
    assert result.stderr == f"qdel: Job has finished {job_id}\n" and result.stdout == ""
    assert s.parse_cancel(result) is False  # nothing to cancel; not an error

    _, after = fake_pbs.status([job_id])
    assert (after[job_id].state, after[job_id].exit_code) == (JobState.COMPLETED, 0)
    fake_pbs.assert_no_job_process_left()


def test_job_gone_from_history_is_unknown_not_completed(fake_pbs, monkeypatch):
    """FAKE_PBS_HISTORY_SECONDS=1: a job that finished (exit 0) leaves the history. The
    batched status query naming it and a held job answers rc 153 with the unknown-id
    line on stderr and the held job on stdout; parse_status gives the held job, does not
    raise, and does not list the gone one. The terminal lookups (qstat -x for it, then
    tracejob, absent here) find no record: the Scheduler claims nothing. The poller
    keeps it not-final within the grace period, then declares it FAILED "LOST", never
    COMPLETED. qdel of the gone id: rc 153, parse_cancel False. Finally the held job is
    qdel'ed (accepted) and no job process is left."""
    monkeypatch.setenv("FAKE_PBS_HISTORY_SECONDS", "1")
    s = fake_pbs.scheduler
    gone = fake_pbs.submit("gone", "echo bye")
    held = fake_pbs.submit("held", "echo never", hold=True)

    def purged():
        result = fake_pbs.run(s.status_argv([gone, held]))
        return result if f"qstat: Unknown Job Id {gone}" in result.stderr else None

    result = wait_for(purged, DEADLINE, what="the finished job to leave the history")
    # it did run and finish (exit 0) before it was forgotten
    assert (fake_pbs.tmp / "gone.out").read_text() == "bye\n"
    assert (fake_pbs.jobs / f"{fake_pbs.seq(gone)}.exit").read_text() == "0"
    assert fake_pbs.table()[gone]["state"] == "F"

    # the batched status query: rc 153, the gone id named on stderr, the held one answered
    assert result.argv == ["qstat", "-x", "-f", "-F", "json", gone, held]
    assert result.returncode == 153
    assert result.stderr == f"qstat: Unknown Job Id {gone}\n"
    assert list(json.loads(result.stdout)["Jobs"]) == [held]
    assert unknown_ids(result.stderr) == [gone]
    statuses = s.parse_status(result)
    assert list(statuses) == [held]
    assert s.lookup(gone, statuses) is None
    h = statuses[held]
    assert (h.state, h.native_state, h.reason) == (JobState.PENDING, "H", "Hold_Types=u (user hold)")

    # the terminal lookups for the gone job, as the poller runs them
    argvs = s.terminal_argvs_for([gone], statuses)
    assert argvs == s.terminal_argvs([gone]) == [
        ["qstat", "-x", "-f", "-F", "json", gone],
        ["tracejob", "-n", "3", gone],
    ]
    qstat = fake_pbs.run(argvs[0])
    assert qstat.returncode == 153 and qstat.stderr == f"qstat: Unknown Job Id {gone}\n"
    assert s.parse_terminal(qstat) == {}  # an rc-153 answer with no Jobs: no record, no error
    # the fake provides no tracejob (a login node without the server's logs): the
    # worker's transport reports the missing command as transient, the poller logs it
    # and goes on
    with pytest.raises(TransientSchedulerError, match="tracejob: command not found"):
        fake_pbs.run(argvs[1])
    # what tracejob would print had it no record for the id: nothing parsed either
    assert s.parse_terminal(CommandResult(argvs[1], 1, "", "")) == {}

    # the poller on the real transport: unknown is not completed
    async def poll_twice():
        poller = JobPoller(s, LocalTransport(), interval=3600, grace_period=3600)
        try:
            g, k = poller.track(gone), poller.track(held)
            await poller.poll_once()
            first = (g.status, k.status)
            poller.grace_period = 0  # the grace period is over
            await poller.poll_once()
            return first, (g.status, k.status)
        finally:
            await poller.close()

    (g1, k1), (g2, k2) = asyncio.run(poll_twice())
    assert g1.state == JobState.PENDING and not g1.state.is_final  # missing: look again later
    assert (k1.state, k1.native_state) == (JobState.PENDING, "H")
    assert (g2.state, g2.native_state, g2.exit_code) == (JobState.FAILED, "LOST", None)
    assert "no terminal record was found" in g2.reason
    assert (k2.state, k2.native_state) == (JobState.PENDING, "H")

    # qdel of the gone id: the server no longer knows it
    result = fake_pbs.run(s.cancel_argvs(gone, 30)[-1])
    assert result.returncode == 153 and result.stderr == f"qdel: Unknown Job Id {gone}\n"
    assert s.parse_cancel(result) is False

    # clean up: qdel the held job (accepted), it ends without running
    result = fake_pbs.run(s.cancel_argvs(held, 30)[-1])
    assert (result.returncode, result.stderr) == (0, "")
    assert s.parse_cancel(result) is True
    after, statuses = fake_pbs.status([held])
    if held in statuses:  # still in the 1 s history
        assert (statuses[held].state, statuses[held].exit_code) == (JobState.CANCELLED, None)
    else:
        assert after.stderr == f"qstat: Unknown Job Id {held}\n"
    assert fake_pbs.table()[held]["state"] == "F" and "stime" not in fake_pbs.table()[held]
    assert not (fake_pbs.jobs / f"{fake_pbs.seq(held)}.pid").exists()  # never started
    fake_pbs.assert_no_job_process_left()


def test_unknown_ids_names_the_job_in_qdel_job_has_finished(fake_pbs):
    """The id in qdel's rc-35 answer, as unknown_ids documents. Quick to reach: a held job
    deleted once is finished (F, never ran), so a second qdel answers rc 35."""
    s = fake_pbs.scheduler
    job_id = fake_pbs.submit("twice", "echo never", hold=True)
    first = fake_pbs.run(s.cancel_argvs(job_id, 30)[-1])
    assert first.returncode == 0 and s.parse_cancel(first) is True
    second = fake_pbs.run(s.cancel_argvs(job_id, 30)[-1])
    assert (second.returncode, second.stderr) == (35, f"qdel: Job has finished {job_id}\n")
    assert s.parse_cancel(second) is False
    fake_pbs.assert_no_job_process_left()
    assert unknown_ids(second.stderr) == [job_id]


# -- arrays (qsub -J) ---------------------------------------------------------------


def test_array_subjobs_run_with_their_index_and_end_each_with_its_own_exit(fake_pbs):
    """`qsub -J 1-3`: the array `1[].fakepbs`, subjobs `1[i].fakepbs` each running with
    PBS_ARRAY_INDEX / PBS_ARRAY_ID / PBS_JOBID and its own -o/-e (^array_index^). The
    worker's one query (`qstat -x -f -F json -t <array>`) shows the array B while subjobs
    run and F once all have ended (Exit_status 1: one exited > 0); each subjob ends X with
    its own Exit_status, and lookup finds each task. Without -x, a finished array's id
    answers rc 35."""
    s = fake_pbs.scheduler
    body = ('echo "index=$PBS_ARRAY_INDEX array=$PBS_ARRAY_ID job=$PBS_JOBID"; echo "err $PBS_ARRAY_INDEX" >&2\n'
            'sleep 1\nexit $(( PBS_ARRAY_INDEX == 2 ? 5 : 0 ))')
    array, tasks = fake_pbs.submit_array("sweep", body, 3)
    assert array == "1[].fakepbs" and tasks == ["1[1].fakepbs", "1[2].fakepbs", "1[3].fakepbs"]
    assert s.array_of(tasks[1]) == array
    assert s.status_argv(tasks) == ["qstat", "-x", "-f", "-F", "json", "-t", array]
    seen = set()

    def all_ended():
        _, statuses = fake_pbs.status(tasks)
        seen.add(statuses[array].native_state)
        found = [s.lookup(t, statuses) for t in tasks]
        return (statuses, found) if all(f and f.state.is_final for f in found) else None

    statuses, found = wait_for(all_ended, DEADLINE, what="every subjob to end")
    assert "B" in seen  # begun: subjobs running
    assert [(f.state, f.native_state, f.exit_code) for f in found] == [
        (JobState.COMPLETED, "X", 0), (JobState.FAILED, "X", 5), (JobState.COMPLETED, "X", 0)]
    assert s.ended_by_program(found[1])

    def array_finished():
        result, statuses = fake_pbs.status(tasks)
        return result if statuses[array].native_state == "F" else None

    result = wait_for(array_finished, DEADLINE, what="the array to finish")
    records = json.loads(result.stdout)["Jobs"]
    assert list(records) == [array, *tasks]
    whole = records[array]
    assert (whole["array"], whole["array_indices_submitted"], whole["Exit_status"]) == ("True", "1-3", 1)
    assert whole["array_state_count"] == "Queued:0 Running:0 Exiting:0 Expired:3 "
    assert whole["array_indices_remaining"] == "-"
    assert records[tasks[0]]["array_id"] == array and records[tasks[0]]["array_index"] == "1"
    assert records[tasks[0]]["Output_Path"].endswith("/sweep.out.1")
    for i, task in enumerate(tasks, start=1):
        assert (fake_pbs.tmp / f"sweep.out.{i}").read_text() == f"index={i} array={array} job={task}\n"
        assert (fake_pbs.tmp / f"sweep.err.{i}").read_text() == f"err {i}\n"
    gone = fake_pbs.run(["qstat", "-t", array])
    assert gone.returncode == 35
    assert gone.stderr == f"qstat: {array} Job has finished, use -x or -H to obtain historical job information\n"
    assert s.parse_status(gone) == {}
    fake_pbs.assert_no_job_process_left()


def test_array_throttle_and_step(fake_pbs):
    """`-J 1-3%1` (the worker's throttle): never more than one subjob running, the array
    record says max_run_subjobs 1 and array_indices_submitted without the %. The step
    form `-J 1-7:2` makes subjobs 1, 3, 5 and 7."""
    s = fake_pbs.scheduler
    array, tasks = fake_pbs.submit_array("throttled", "sleep 1", 3, throttle=1)
    most = 0

    def all_ended():
        nonlocal most
        result = fake_pbs.run(["qstat", "-x", "-f", "-F", "json", "-t", array])
        records = json.loads(result.stdout)["Jobs"]
        most = max(most, sum(1 for t in tasks if records[t]["job_state"] == "R"))
        return records if records[array]["job_state"] == "F" else None

    records = wait_for(all_ended, DEADLINE, interval=0.2, what="the throttled array to finish")
    assert most == 1
    assert (records[array]["max_run_subjobs"], records[array]["array_indices_submitted"]) == (1, "1-3")
    assert all(records[t]["Exit_status"] == 0 for t in tasks)

    script = fake_pbs.tmp / "stepped.sh"
    script.write_text("#!/bin/bash\n#PBS -N stepped\n#PBS -h\n\ntrue\n")
    stepped = fake_pbs.qsub("-J", "1-7:2", str(script))
    assert (stepped.returncode, stepped.stdout) == (0, "2[].fakepbs\n")
    listed = json.loads(fake_pbs.run(["qstat", "-f", "-F", "json", "-t", "2[].fakepbs"]).stdout)["Jobs"]
    assert list(listed) == ["2[].fakepbs", "2[1].fakepbs", "2[3].fakepbs", "2[5].fakepbs", "2[7].fakepbs"]
    assert listed["2[].fakepbs"]["array_indices_remaining"] == "1-7:2"
    assert fake_pbs.run(["qstat", "2[2].fakepbs"]).returncode == 153  # not one of its indices
    assert fake_pbs.run(["qdel", "2[].fakepbs"]).returncode == 0
    fake_pbs.assert_no_job_process_left()


def test_qdel_of_one_subjob_leaves_the_others_then_the_whole_array(fake_pbs):
    """A held array: qdel of one subjob ends it at once (X, "Subjob terminated", no
    Exit_status: CANCELLED), the others stay queued and the array held; a second qdel of
    it is rc 55 "Request invalid for finished array subjob" (nothing to do). qdel of the
    array ends every subjob and the array (F); again: rc 35. Nothing ever ran."""
    s = fake_pbs.scheduler
    array, tasks = fake_pbs.submit_array("held", "echo never", 3, hold=True)
    _, statuses = fake_pbs.status(tasks)
    assert statuses[array].native_state == "H"
    assert [s.lookup(t, statuses).state for t in tasks] == [JobState.PENDING] * 3

    one = fake_pbs.run(s.cancel_argvs(tasks[0], 30)[-1])
    assert one.argv == ["qdel", tasks[0]] and (one.returncode, one.stderr) == (0, "")
    assert s.parse_cancel(one) is True
    _, statuses = fake_pbs.status(tasks)
    first = s.lookup(tasks[0], statuses)
    assert (first.state, first.native_state, first.reason, first.exit_code) == (
        JobState.CANCELLED, "X", "Subjob terminated", None)
    assert [s.lookup(t, statuses).state for t in tasks[1:]] == [JobState.PENDING] * 2
    assert statuses[array].native_state == "H"

    again = fake_pbs.run(s.cancel_argvs(tasks[0], 30)[-1])
    assert (again.returncode, again.stderr) == (55, f"qdel: Request invalid for finished array subjob {tasks[0]}\n")
    assert s.parse_cancel(again) is False

    whole = fake_pbs.run(s.cancel_argvs(array, 30)[-1])
    assert whole.argv == ["qdel", array] and whole.returncode == 0 and s.parse_cancel(whole) is True
    _, statuses = fake_pbs.status(tasks)
    assert [s.lookup(t, statuses).state for t in tasks] == [JobState.CANCELLED] * 3
    assert statuses[array].native_state == "F"
    done = fake_pbs.run(s.cancel_argvs(array, 30)[-1])
    assert (done.returncode, done.stderr) == (35, f"qdel: Job has finished {array}\n")
    assert s.parse_cancel(done) is False
    assert not list(fake_pbs.jobs.glob("*.pid"))  # never started
    fake_pbs.assert_no_job_process_left()


def test_a_running_subjob_is_killed_alone(fake_pbs, monkeypatch):
    """qdel of a running subjob kills its process group (SIGTERM: Exit_status 271) and
    leaves the other subjob running."""
    monkeypatch.setenv("FAKE_PBS_KILL_DELAY", "1")
    s = fake_pbs.scheduler
    array, tasks = fake_pbs.submit_array("long", "sleep 600", 2)

    def running():
        _, statuses = fake_pbs.status(tasks)
        return all(s.lookup(t, statuses).state == JobState.RUNNING for t in tasks)

    wait_for(running, DEADLINE, what="both subjobs to run")
    assert s.parse_cancel(fake_pbs.run(s.cancel_argvs(tasks[0], 30)[-1])) is True

    def first_ended():
        _, statuses = fake_pbs.status(tasks)
        found = s.lookup(tasks[0], statuses)
        return statuses if found.state.is_final else None

    statuses = wait_for(first_ended, DEADLINE, what="the deleted subjob to end")
    first = s.lookup(tasks[0], statuses)
    assert (first.native_state, first.exit_code) in (("X", 271), ("X", 265))
    assert s.lookup(tasks[1], statuses).state == JobState.RUNNING
    assert statuses[array].native_state == "B"
    assert s.parse_cancel(fake_pbs.run(s.cancel_argvs(array, 30)[-1])) is True
    wait_for(lambda: fake_pbs.status(tasks)[1][array].native_state == "F", DEADLINE, what="the array to end")
    fake_pbs.assert_no_job_process_left()


def test_array_size_and_range_refusals(fake_pbs, monkeypatch):
    """More indices than max_array_size (FAKE_PBS_MAX_ARRAY_SIZE here): PBS's own
    refusal, rc 3, which the Scheduler classifies as too large (the worker splits the
    array); at the limit it is accepted. Ranges PBS Pro refuses: "qsub: illegal -J
    value", rc 2."""
    monkeypatch.setenv("FAKE_PBS_MAX_ARRAY_SIZE", "3")
    s = fake_pbs.scheduler
    script = fake_pbs.tmp / "big.sh"
    script.write_text("#!/bin/bash\n#PBS -N big\n#PBS -h\n\ntrue\n")
    request = SubmitRequest(str(script), script.read_text(), "big", str(fake_pbs.tmp))
    refused = fake_pbs.run(s.array_submit_argv(request, 4, None))
    assert (refused.returncode, refused.stdout) == (3, "")
    assert refused.stderr == "qsub: Array job exceeds server or queue size limit\n"
    error = s.submit_error(refused)
    assert not isinstance(error, TransientSchedulerError) and s.array_too_large(error)
    accepted = fake_pbs.run(s.array_submit_argv(request, 3, None))
    assert accepted.ok and s.parse_array_submit(accepted.stdout) == "1[].fakepbs"
    for spec in ("1-1", "5", "3-2", "1-4%0", "1,2,3", "1-4:0"):
        bad = fake_pbs.qsub("-J", spec, str(script))
        assert (bad.returncode, bad.stdout, bad.stderr) == (2, "", "qsub: illegal -J value\n"), spec
        assert not s.array_too_large(s.submit_error(bad))
    assert fake_pbs.run(s.cancel_argvs("1[].fakepbs", 30)[-1]).returncode == 0


def test_qstat_and_qselect_listings_of_arrays(fake_pbs):
    """Without ids: arrays as one line, their subjobs with -t; -J arrays only, -J -t
    their subjobs only. An array named without [] is unknown. qselect -N gives the
    array's id, as the worker's retried submit looks it up."""
    s = fake_pbs.scheduler
    plain = fake_pbs.submit("plain", "echo never", hold=True)
    array, tasks = fake_pbs.submit_array("pair", "echo never", 2, hold=True)

    def ids(*flags):
        out = fake_pbs.run(["qstat", *flags]).stdout.splitlines()[2:]
        return [line.split()[0] for line in out]

    assert ids() == [plain, array]
    assert ids("-t") == [plain, array, *tasks]
    assert ids("-J") == [array]
    assert ids("-J", "-t") == tasks
    bare = fake_pbs.run(["qstat", "-f", array.replace("[]", "")])
    assert bare.returncode == 153 and bare.stderr.startswith("qstat: Unknown Job Id 2")
    named = fake_pbs.run(s.find_by_name_argv("pair"))
    assert s.jobs_named("pair", named.stdout) == [array]
    for job in (plain, array):
        fake_pbs.run(s.cancel_argvs(job, 30)[-1])
    fake_pbs.assert_no_job_process_left()
