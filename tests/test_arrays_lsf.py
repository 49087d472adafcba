"""LSF arrays (a sweep's runs as one `bsub -J "name[1-N]%M"`): the Scheduler's array
commands and parsers on their own, then driven through the fake LSF CLI
(tests/fakes/lsf) with the worker's own LocalTransport: elements `N[i]` with their own
states, exit codes, LSB_JOBINDEX and %I output files, the %M limit, bkill of one element
and of the whole array, bhist records per element, and MAX_JOB_ARRAY_SIZE's refusal.
End to end on the worker: tests/test_lsf_worker_e2e.py (batch_suite's array tests).

No recorded output of an LSF array exists in tests/data/vectors; the outputs written
here follow the documented forms (marked hand-written)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path

import pytest

from conftest import REPO, wait_for
from prefect_xm.workers.arrays import TASK_EXEC, argv_file, array_name, task_env
from prefect_xm.workers.run_directory import environment_file
from prefect_xm.workers.lsf import LsfScheduler, compact_ids, element_id, parse_bkill
from prefect_xm.workers.scheduler import CommandResult, JobState, SchedulerError, SubmitRequest
from prefect_xm.workers.transport import LocalTransport

S = LsfScheduler()
FAKE_LSF = REPO / "tests" / "fakes" / "lsf"
DEADLINE = 120.0  # generous: the machine may be busy


def _request(name: str = "sweep-array-1", script: str = "#!/bin/bash\ntrue\n") -> SubmitRequest:
    return SubmitRequest(script_path="/r/a/job.sh", script=script, job_name=name, run_dir="/r/a")


# ------------------------------------------------------------------ the commands


def test_array_submission_is_bsub_with_the_index_range_in_the_name_and_the_script_on_stdin():
    req = _request()
    assert S.array_submit_argv(req, 20, None) == ["bsub", "-J", "sweep-array-1[1-20]"]
    assert S.array_submit_argv(req, 20, 4) == ["bsub", "-J", "sweep-array-1[1-20]%4"]
    assert S.submit_stdin(req) == req.script  # as for one job: #BSUB lines only come on stdin
    assert (S.array_index_variable, S.array_first_index, S.array_output_index) == ("LSB_JOBINDEX", 1, "%I")
    assert S.array_throttles
    # same answer as a single job's bsub
    assert S.parse_array_submit("Job <812> is submitted to default queue <normal>.\n") == "812"


def test_an_array_name_keeps_to_the_characters_lsf_allows_and_find_by_name_asks_for_it():
    name = array_name("a+b")  # JOB_NAME_UNSAFE lets '+' through; an array name may not have it
    argv = S.array_submit_argv(_request(name), 2, None)
    assert argv[2] == f"a_b{name[3:]}[1-2]"
    assert S.find_by_name_argv(name)[-2:] == ["-J", f"a_b{name[3:]}"]
    assert S.find_by_name_argv("job+1")[-1] == "job+1"  # one job's name is left alone


def test_element_ids_and_their_array():
    assert S.array_task_id("812", 3) == "812[3]"
    assert S.array_of("812[3]") == "812" and S.array_of("812") is None
    assert S.infrastructure_pid("hpc", "812[3]") == "lsf:hpc:812[3]"
    assert S.parse_infrastructure_pid("lsf:hpc:812[3]") == ("lsf", "hpc", "812[3]")


def test_one_element_is_killed_by_its_id_and_the_array_by_the_array_id():
    assert S.cancel_argvs("812[3]", 30) == [["bkill", "812[3]"]]
    assert S.cancel_argvs("812", 30) == [["bkill", "812"]]


def test_the_size_refusal_is_recognised():
    refused = S.submit_error(CommandResult(["bsub"], 255, "", "Job array index too large. Job not submitted.\n"))
    assert S.array_too_large(refused)
    assert not S.array_too_large(S.submit_error(
        CommandResult(["bsub"], 255, "", "nosuchqueue: No such queue. Job not submitted.\n")))
    assert not S.array_too_large(SchedulerError("Job array index error. Job not submitted."))


def test_one_status_query_names_each_array_once():
    argv = S.status_argv(["812[1]", "812[2]", "9", "813[4]"])
    assert argv[:4] == ["bjobs", "-a", "-noheader", "-o"] and "job_name" in argv[4].split()
    # two elements of 812 tracked: the array's id lists all its elements; a lone element
    # of 813 is asked for by itself
    assert argv[5:] == ["812", "9", "813[4]"]
    assert compact_ids(["1", "1", "2[1]"]) == ["1", "2[1]"]


def test_status_rows_of_elements_are_told_apart_by_their_job_name():  # hand-written
    # JOBID is the array's id on every element's row (LSB_BJOBS_DISPLAY_ENH=N, the
    # default); the element's name is `name[i]`
    out = ("812^DONE^-^hostA^sw[1]^-^-\n"
           "812^EXIT^5^hostA^sw[2]^-^-\n"
           "812^EXIT^130^-^sw[3]^TERM_OWNER: job killed by owner^-\n"
           "812^PEND^-^-^sw[4]^-^Not enough job slot(s)\n"
           "9^RUN^-^hostB^single^-^-\n")
    statuses = S.parse_status(CommandResult(S.status_argv(["812[1]", "812[2]", "9"]), 0, out, ""))
    assert sorted(statuses) == ["812[1]", "812[2]", "812[3]", "812[4]", "9"]
    assert (statuses["812[1]"].state, statuses["812[1]"].exit_code) == (JobState.COMPLETED, 0)
    assert (statuses["812[2]"].state, statuses["812[2]"].exit_code) == (JobState.FAILED, 5)
    assert statuses["812[3]"].state == JobState.CANCELLED
    assert S.lookup("812[4]", statuses).state == JobState.PENDING
    assert S.lookup("812[5]", statuses) is None  # not listed: ask its record
    # LSB_BJOBS_DISPLAY_ENH=Y prints the element's id in JOBID
    enh = S.parse_status(CommandResult(["bjobs"], 0, "812[2]^RUN^-^hostA^sw[2]^-^-\n", ""))
    assert list(enh) == ["812[2]"]
    assert element_id("812", "x", "3") == "812[3]" and element_id("812", "x", "0") == "812"


def test_json_records_of_elements():  # hand-written, in bjobs -json's documented form
    from other_formats import parse_bjobs_json

    out = json.dumps({"COMMAND": "bjobs", "JOBS": 3, "RECORDS": [
        {"JOBID": "812", "JOBINDEX": "1", "STAT": "DONE", "EXIT_CODE": ""},
        {"JOBID": "812", "JOB_NAME": "sw[2]", "STAT": "EXIT", "EXIT_CODE": "4"},
        {"JOBID": "9", "JOBINDEX": "0", "JOB_NAME": "single", "STAT": "RUN"}]})
    statuses = parse_bjobs_json(out)
    assert sorted(statuses) == ["812[1]", "812[2]", "9"] and statuses["812[2]"].exit_code == 4


def test_an_unknown_array_among_known_jobs_is_an_answer():  # hand-written, in lsf-007's form
    r = CommandResult(S.status_argv(["9", "812[1]", "812[2]"]), 255, "9^RUN^-^hostB^single^-^-\n",
                      "Job <812> is not found\n")
    assert list(S.parse_status(r)) == ["9"]


def test_terminal_records_of_an_array_come_in_one_bhist():
    assert S.terminal_argvs(["812[1]", "812[2]", "9", "813[2]"]) == [["bhist", "-l", "812", "9", "813[2]"]]
    text = (  # hand-written, in the fake's layout (bhist -l of two elements)
        "Job <812[1]>, Job Name <sw[1]>, User <u>, Project <default>, Command </tmp/j\n"
        "                     obs/812.sh>\n"
        "Sun Nov 22 03:11:59: Done successfully. The CPU time used is 0.0 seconds;\n"
        "\n------------------------------------------------------------------------------\n\n"
        "Job <812[2]>, Job Name <sw[2]>, User <u>, Project <default>, Command </tmp/j\n"
        "                     obs/812.sh>\n"
        "Sun Nov 22 03:12:00: Exited with exit code 5. The CPU time used is 0.0 seconds;\n"
        "Sun Nov 22 03:12:00: Completed <exit>.\n"
    )
    found = S.parse_terminal(CommandResult(["bhist", "-l", "812"], 0, text, ""))
    assert (S.lookup("812[1]", found).state, S.lookup("812[1]", found).exit_code) == (JobState.COMPLETED, 0)
    assert (S.lookup("812[2]", found).state, S.lookup("812[2]", found).exit_code) == (JobState.FAILED, 5)


def test_bkill_of_an_element_and_of_an_array():  # hand-written, in lsf-022/lsf-011's forms
    assert S.parse_cancel(CommandResult(["bkill", "812[3]"], 0, "Job <812[3]> is being terminated\n", ""))
    assert S.parse_cancel(CommandResult(["bkill", "812[3]"], 255, "", "Job <812[3]>: Job has already finished\n")) is False
    assert S.parse_cancel(CommandResult(["bkill", "812"], 0, "Job <812> is being terminated\n", ""))
    # a large array's bkill goes on in mbatchd
    assert S.parse_cancel(CommandResult(["bkill", "812"], 0, "Job <812>: Operation is in progress\n", ""))
    # answered element by element, some already finished
    mixed = CommandResult(["bkill", "812"], 255, "Job <812[2]> is being terminated\n",
                          "Job <812[1]>: Job has already finished\n")
    assert S.parse_cancel(mixed) is True
    done = CommandResult(["bkill", "812"], 255, "", "Job <812[1]>: Job has already finished\n")
    assert S.parse_cancel(done) is False
    assert parse_bkill("", "Job <812>: No matching job found\n") == {"812": "not_found"}


# ------------------------------------------------------------------ through the fake


class FakeLsf:
    def __init__(self, home: Path, tmp: Path):
        self.home = home
        self.tmp = tmp

    def run(self, argv, stdin: str | None = None) -> CommandResult:
        # as the worker runs a scheduler command; the environment is os.environ, which
        # the fixture pointed at the fake
        return asyncio.run(LocalTransport().run(argv, stdin=stdin, timeout=60))

    def submit_array(self, name: str, body: str, size: int, throttle: int | None = None,
                     hold: bool = False) -> str:
        """An array as the worker submits one: the script (with the directives lsf.sh.j2
        writes, %I in the output paths) on stdin, the index range on the command line."""
        directives = [f"#BSUB -J {name}", f"#BSUB -o {self.tmp}/{name}-%I.out", f"#BSUB -e {self.tmp}/{name}-%I.err"]
        if hold:
            directives.append("#BSUB -H")
        script = "#!/bin/bash\n" + "\n".join(directives) + "\n\n" + body + "\n"
        request = SubmitRequest(str(self.tmp / f"{name}.sh"), script, name, str(self.tmp))
        result = self.run(S.array_submit_argv(request, size, throttle), S.submit_stdin(request))
        assert result.ok, result
        return S.parse_array_submit(result.stdout)

    def statuses(self, job_ids):
        return S.parse_status(self.run(S.status_argv(list(job_ids))))

    def wait_final(self, job_ids):
        def final():
            statuses = self.statuses(job_ids)
            found = {j: S.lookup(j, statuses) for j in job_ids}
            return found if all(s and s.state.is_final for s in found.values()) else None

        return wait_for(final, DEADLINE, interval=0.3, what=f"{job_ids} to end")

    def table(self) -> dict[str, dict]:
        return {j["id"]: j for j in (json.loads(p.read_text()) for p in (self.home / "jobs").glob("*.json"))}


@pytest.fixture
def fake_lsf(tmp_path, monkeypatch):
    if not os.access(FAKE_LSF / "bsub", os.X_OK):
        pytest.fail("the fake LSF CLI is missing from tests/fakes/lsf")
    home = tmp_path / "lsf"
    monkeypatch.setenv("FAKE_LSF_HOME", str(home))
    monkeypatch.setenv("PATH", f"{FAKE_LSF}{os.pathsep}{os.environ['PATH']}")
    for var in ("FAKE_LSF_MAX_JOB_ARRAY_SIZE", "FAKE_LSF_BJOBS_DISPLAY_ENH", "FAKE_LSF_CLEAN_PERIOD", "FAKE_LSF_SLOTS"):
        monkeypatch.delenv(var, raising=False)
    fake = FakeLsf(home, tmp_path)
    yield fake
    # whatever the test did: no job process of this fake home may outlive it
    if (home / "jobs").exists():
        pids = [p for job in fake.table().values() for p in (job.get("pid"), job.get("shepherd_pid")) if p]
        for pid in pids:
            if _alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        wait_for(lambda: not any(_alive(p) for p in pids), 30, interval=0.1, what="the fake's processes to end")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_each_element_runs_with_its_index_and_ends_with_its_own_exit_code(fake_lsf, monkeypatch):
    """Three elements: LSB_JOBINDEX and LSB_JOBID in each one's environment, %I in its
    output paths, its own exit code, all tracked by one status query naming the array."""
    body = 'echo "index=$LSB_JOBINDEX job=$LSB_JOBID"; echo "err $LSB_JOBINDEX" >&2; exit $((LSB_JOBINDEX - 1))'
    array = fake_lsf.submit_array("sw", body, 3)
    ids = [S.array_task_id(array, i) for i in (1, 2, 3)]
    statuses = fake_lsf.wait_final(ids)
    assert [(statuses[j].state, statuses[j].exit_code) for j in ids] == [
        (JobState.COMPLETED, 0), (JobState.FAILED, 1), (JobState.FAILED, 2)]
    for i in (1, 2, 3):
        assert (fake_lsf.tmp / f"sw-{i}.out").read_text() == f"index={i} job={array}\n"
        assert (fake_lsf.tmp / f"sw-{i}.err").read_text() == f"err {i}\n"
    # the fake's bjobs shows the array's id in JOBID, the index in jobindex and job_name
    listing = fake_lsf.run(["bjobs", "-a", "-noheader", "-o", "jobid jobindex job_name stat delimiter='^'", array])
    assert listing.stdout.splitlines() == [f"{array}^1^sw[1]^DONE", f"{array}^2^sw[2]^EXIT", f"{array}^3^sw[3]^EXIT"]
    summary = fake_lsf.run(["bjobs", "-A", "-a", array]).stdout.split("\n")
    assert summary[0].split() == ["JOBID", "ARRAY_SPEC", "OWNER", "NJOBS", "PEND", "DONE", "RUN", "EXIT",
                                  "SSUSP", "USUSP", "PSUSP"]
    assert summary[1].split()[:8] == [array, "sw[1-3]", summary[1].split()[2], "3", "0", "1", "0", "2"]
    # an element by its own id, and with LSB_BJOBS_DISPLAY_ENH=Y
    assert list(fake_lsf.statuses([ids[1]])) == [ids[1]]
    monkeypatch.setenv("FAKE_LSF_BJOBS_DISPLAY_ENH", "Y")
    enh = fake_lsf.run(["bjobs", "-a", "-noheader", "-o", "jobid stat delimiter='^'", array])
    assert enh.stdout.splitlines()[0] == f"{array}[1]^DONE"
    assert sorted(fake_lsf.statuses(ids)) == ids


def test_the_element_limit_keeps_elements_from_running_together(fake_lsf):
    """%1: the elements run one after the other (each writes when it started and ended)."""
    body = f'date +%s.%N > {fake_lsf.tmp}/start-$LSB_JOBINDEX; sleep 1; date +%s.%N > {fake_lsf.tmp}/end-$LSB_JOBINDEX'
    array = fake_lsf.submit_array("one-at-a-time", body, 3, throttle=1)
    fake_lsf.wait_final([S.array_task_id(array, i) for i in (1, 2, 3)])
    spans = sorted((float((fake_lsf.tmp / f"start-{i}").read_text()), float((fake_lsf.tmp / f"end-{i}").read_text()))
                   for i in (1, 2, 3))
    assert all(spans[k][1] <= spans[k + 1][0] for k in range(2)), spans


def test_killing_one_element_leaves_the_others_and_the_array_goes_in_one_bkill(fake_lsf):
    array = fake_lsf.submit_array("held", "sleep 600", 3, hold=True)
    ids = [S.array_task_id(array, i) for i in (1, 2, 3)]
    statuses = fake_lsf.statuses(ids)
    assert all(statuses[j].native_state == "PSUSP" and statuses[j].state == JobState.PENDING for j in ids)

    [argv] = S.cancel_argvs(ids[0], 30)
    result = fake_lsf.run(argv)
    assert (result.returncode, result.stdout) == (0, f"Job <{ids[0]}> is being terminated\n")
    assert S.parse_cancel(result) is True
    statuses = fake_lsf.statuses(ids)
    assert statuses[ids[0]].state == JobState.CANCELLED
    assert [statuses[j].native_state for j in ids[1:]] == ["PSUSP", "PSUSP"]

    [argv] = S.cancel_argvs(array, 30)
    result = fake_lsf.run(argv)
    assert (result.returncode, result.stdout) == (0, f"Job <{array}> is being terminated\n")
    assert S.parse_cancel(result) is True
    statuses = fake_lsf.statuses(ids)
    assert all(statuses[j].state == JobState.CANCELLED for j in ids)
    # nothing left to kill
    again = fake_lsf.run(S.cancel_argvs(array, 30)[-1])
    assert (again.returncode, again.stderr) == (255, f"Job <{array}>: Job has already finished\n")
    assert S.parse_cancel(again) is False


def test_bresume_releases_the_array_and_find_by_name_gives_its_id(fake_lsf):
    name = array_name("sweep")
    array = fake_lsf.submit_array(name, "exit 0", 2, hold=True)
    found = fake_lsf.run(S.find_by_name_argv(name))
    assert S.find_by_name_answered(found)
    named = S.jobs_named(name, found.stdout)
    assert named and {S.array_of(j) or j for j in named} == {array}
    assert fake_lsf.run(["bresume", array]).returncode == 0
    statuses = fake_lsf.wait_final([f"{array}[1]", f"{array}[2]"])
    assert all(s.state == JobState.COMPLETED for s in statuses.values())


def test_a_cleaned_array_is_read_from_bhist_element_by_element(fake_lsf, monkeypatch):
    monkeypatch.setenv("FAKE_LSF_CLEAN_PERIOD", "3")
    array = fake_lsf.submit_array("cleaned", "exit $((LSB_JOBINDEX * 2))", 2)
    ids = [f"{array}[1]", f"{array}[2]"]
    fake_lsf.wait_final(ids)
    wait_for(lambda: not fake_lsf.statuses(ids), DEADLINE, interval=0.5, what="bjobs to forget the array")
    [argv] = S.terminal_argvs(ids)
    assert argv == ["bhist", "-l", array]
    found = S.parse_terminal(fake_lsf.run(argv))
    assert [(S.lookup(j, found).state, S.lookup(j, found).exit_code) for j in ids] == [
        (JobState.FAILED, 2), (JobState.FAILED, 4)]
    # one element by its id
    one = S.parse_terminal(fake_lsf.run(["bhist", "-l", ids[1]]))
    assert list(one) == [ids[1]]


def test_an_array_above_max_job_array_size_is_refused_for_its_size(fake_lsf, monkeypatch):
    monkeypatch.setenv("FAKE_LSF_MAX_JOB_ARRAY_SIZE", "3")
    request = SubmitRequest(str(fake_lsf.tmp / "big.sh"), "#!/bin/bash\ntrue\n", "big", str(fake_lsf.tmp))
    result = fake_lsf.run(S.array_submit_argv(request, 4, None), S.submit_stdin(request))
    assert (result.returncode, result.stdout, result.stderr) == (255, "", "Job array index too large. Job not submitted.\n")
    assert S.array_too_large(S.submit_error(result))
    assert fake_lsf.run(S.array_submit_argv(request, 3, None), S.submit_stdin(request)).ok
    bad = fake_lsf.run(["bsub", "-J", "bad[3-1]"], "#!/bin/bash\ntrue\n")
    assert (bad.returncode, bad.stderr) == (255, "Job array index error. Job not submitted.\n")
    assert not S.array_too_large(S.submit_error(bad))


def test_the_array_script_runs_each_task_as_its_own_run(fake_lsf):
    """The array directory as the worker writes it (tasks, task.env, task-exec; each
    run's job.argv and job.env), and a script as lsf.sh.j2 renders it for an array:
    element i runs line i's program with its own argv and environment, its output in
    its own run's files."""
    array_dir = fake_lsf.tmp / f"a-{uuid.uuid4().hex[:6]}"
    array_dir.mkdir()
    runs = []
    for i, (argv, env) in enumerate([
        (["sh", "-c", 'echo "[$0] $SEED"', "a b"], {"SEED": "1"}),
        (["sh", "-c", 'echo "[$0] $SEED" >&2; exit 3', "$(touch /tmp/xm-lsf-pwned)"], {"SEED": "two"}),
    ]):
        run_dir = fake_lsf.tmp / f"run-{i}"
        run_dir.mkdir()
        (run_dir / "job.argv").write_text(argv_file(argv))
        (run_dir / "job.env").write_text(environment_file(env, str(run_dir)))
        runs.append(run_dir)
    (array_dir / "tasks").write_text("".join(f"{d}\n" for d in runs))
    (array_dir / "task.env").write_text(task_env(str(array_dir), S.array_index_variable, S.array_first_index))
    (array_dir / "task-exec").write_text(TASK_EXEC)
    (array_dir / "task-exec").chmod(0o700)
    script = (f"#!/bin/bash\n#BSUB -J x\n#BSUB -o {array_dir}/task-%I.out\n#BSUB -e {array_dir}/task-%I.err\n\n"
              f". {array_dir}/task.env\nexec {array_dir}/task-exec\n")
    request = SubmitRequest(str(array_dir / "job.sh"), script, "x", str(array_dir))
    result = fake_lsf.run(S.array_submit_argv(request, 2, None), S.submit_stdin(request))
    array = S.parse_array_submit(result.stdout)
    statuses = fake_lsf.wait_final([f"{array}[1]", f"{array}[2]"])
    assert statuses[f"{array}[1]"].exit_code == 0 and statuses[f"{array}[2]"].exit_code == 3
    assert (runs[0] / "job.out").read_text() == "[a b] 1\n"
    assert (runs[1] / "job.err").read_text() == "[$(touch /tmp/xm-lsf-pwned)] two\n"
    assert not os.path.exists("/tmp/xm-lsf-pwned")
