"""LSF parsers on verbatim outputs (tests/data/vectors/lsf.json), plus a few hand-written
cases (marked as such) for what no recorded output shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, VECTORS, wait_for
from prefect_xm.workers.lsf import (
    STATUS_COLUMNS,
    LsfJobConfiguration,
    LsfScheduler,
    parse_bjobs_delimited,
    parse_bkill,
    parse_bsub,
    parse_long_records,
    to_status,
)
from other_formats import parse_bjobs_json, parse_bjobs_table
from prefect_xm.workers.scheduler import CommandResult, JobState, SchedulerError, TransientSchedulerError

VEC = {v["id"]: v for v in json.loads((VECTORS / "lsf.json").read_text())["vectors"]}
S = LsfScheduler()


def result(vector_id: str, argv) -> CommandResult:
    v = VEC[vector_id]
    return CommandResult(list(argv), v["returncode"] or 0, v["output"], v["stderr"] or "")


@pytest.mark.parametrize("vid", ["lsf-001", "lsf-002"])
def test_bsub_job_id(vid):
    assert parse_bsub(VEC[vid]["output"]) == VEC[vid]["facts"]["job_id"]
    assert S.parse_submit(VEC[vid]["output"]) == VEC[vid]["facts"]["job_id"]


@pytest.mark.parametrize("vid", ["lsf-012", "lsf-013"])
def test_bsub_refusals_are_final_and_verbatim(vid):
    error = S.submit_error(result(vid, ["bsub"]))
    assert not isinstance(error, TransientSchedulerError)
    assert str(error) == VEC[vid]["stderr"].strip()


def test_bsub_daemon_down_is_transient():  # hand-written
    r = CommandResult(["bsub"], 255, "", "LSF is down. Please wait ...\n")
    assert isinstance(S.submit_error(r), TransientSchedulerError)


def test_bjobs_delimited_with_exit_reason_and_leading_blank():
    v = VEC["lsf-003"]
    columns = "id stat exit_reason exec_host user slots max_req_proc exec_host queue finish_time start_time %complete submit_time name".split()
    statuses = parse_bjobs_delimited(v["output"], columns=columns, delimiter="|")
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]
    for job_id, reason in v["facts"]["exit_reasons"].items():
        assert statuses[job_id].reason == reason
        assert statuses[job_id].state == JobState.FAILED  # run limit: failed, not cancelled
    assert statuses["764220165"].state == JobState.PENDING
    assert statuses["764254593"].state == JobState.RUNNING
    assert statuses["764399747"].state == JobState.COMPLETED


def test_bjobs_unknown_id_among_known_ones_is_an_answer():
    v = VEC["lsf-007"]
    statuses = parse_bjobs_delimited(v["output"], columns=("jobid", "stat", "exec_host"))
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]
    assert statuses["1"].state == JobState.COMPLETED and statuses["1"].exit_code == 0


def test_status_query_with_an_unknown_id_lists_the_known_job():
    # lsf-007 asks 3 columns, so it cannot stand in for the worker's own 7-column query:
    # every one of its lines would be skipped and an empty answer would pass. No recorded
    # output of this -o form exists; the stdout line is built from the documented form
    # (fields in -o order, '-' for empty, the delimiter between), while stderr and the
    # exit code 255 are lsf-007's verbatim. (job_name tells an array's elements apart:
    # tests/test_arrays_lsf.py.)
    argv = S.status_argv(["1", "2"])
    assert argv == ["bjobs", "-a", "-noheader", "-o",
                    "jobid stat exit_code exec_host job_name exit_reason pend_reason delimiter='^'", "1", "2"]
    v = VEC["lsf-007"]
    r = CommandResult(argv, v["returncode"], "1^DONE^-^hostA^job-1^-^-\n", v["stderr"])
    statuses = S.parse_status(r)
    assert list(statuses) == ["1"]
    assert statuses["1"].native_state == "DONE" and statuses["1"].state == JobState.COMPLETED
    assert statuses["1"].exit_code == 0


def test_fake_bjobs_json_through_the_json_parser(tmp_path):
    """The fake LSF's `bjobs -json` (tests/fakes/lsf) read by parse_bjobs_json: one job
    that exits 0, one that exits 3, and an id it never had."""
    fake = REPO / "tests" / "fakes" / "lsf"
    env = {**os.environ, "FAKE_LSF_HOME": str(tmp_path / "lsf")}

    def run(argv, stdin=None):
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)

    ids = []
    for code in (0, 3):
        out = run([str(fake / "bsub"), "-J", f"exit{code}", "-o", str(tmp_path / f"{code}.out")],
                  f"#!/bin/bash\nexit {code}\n")
        assert out.returncode == 0, out.stderr
        ids.append(parse_bsub(out.stdout))
    query = [str(fake / "bjobs"), "-a", "-json", "-o", " ".join(STATUS_COLUMNS), *ids, "999999"]
    try:
        def finished():
            out = run(query)
            assert out.returncode == 0, out.stderr
            statuses = parse_bjobs_json(out.stdout, [*ids, "999999"])
            return statuses if all(i in statuses and statuses[i].state.is_final for i in ids) else None

        statuses = wait_for(finished, timeout=60, interval=0.2, what="both fake LSF jobs to end")
        assert set(statuses) == set(ids)  # the unknown id is an ERROR record, not a job
        done, failed = statuses[ids[0]], statuses[ids[1]]
        assert (done.native_state, done.state, done.exit_code) == ("DONE", JobState.COMPLETED, 0)
        assert (failed.native_state, failed.state, failed.exit_code) == ("EXIT", JobState.FAILED, 3)
    finally:
        _end_fake_lsf_jobs(env, ids)


def _end_fake_lsf_jobs(env, ids):
    """The fake runs each job as a real process under a detached shepherd: kill what is
    left of them, then wait until all are gone, so no process outlives the test."""
    jobs = Path(env["FAKE_LSF_HOME"]) / "jobs"
    pids = []
    for job_id in ids:
        try:
            job = json.loads((jobs / f"{job_id}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        pids += [p for p in (job.get("pid"), job.get("shepherd_pid")) if p]
    # each was started in its own session, so its pid is its process group's id
    for pid in pids:
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wait_for(lambda: not any(_alive(p) for p in pids), timeout=30, interval=0.1, what="the fake's processes to end")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_bjobs_only_unknown_ids_is_an_empty_answer():
    r = result("lsf-008", ["bjobs", "1"])
    assert S.parse_status(r) == {}
    r255 = CommandResult(r.argv, 255, r.stdout, r.stderr)  # hand-written: the same with exit 255
    assert S.parse_status(r255) == {}


def test_bjobs_failure_is_transient_or_an_error():  # hand-written
    with pytest.raises(TransientSchedulerError):
        S.parse_status(CommandResult(["bjobs"], 255, "", "LSF daemon (LIM) not responding ... still trying\n"))
    with pytest.raises(SchedulerError):
        S.parse_status(CommandResult(["bjobs"], 255, "", "User permission denied.\n"))


@pytest.mark.parametrize("vid", ["lsf-014", "lsf-021"])
def test_bjobs_json(vid):
    v = VEC[vid]
    ids = list(v["facts"]["states"])
    statuses = parse_bjobs_json(v["output"], ids)
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]
    if vid == "lsf-014":
        assert statuses["22005"].state == JobState.COMPLETED
        assert statuses["22005"].exit_code == v["facts"]["source_asserts"]["exitCode"]
    else:
        assert statuses["58652"].state == JobState.PENDING  # held: PSUSP


@pytest.mark.parametrize("vid", ["lsf-004", "lsf-005", "lsf-006"])
def test_bjobs_tables_with_banners_and_wrapped_hosts(vid):
    v = VEC[vid]
    statuses = parse_bjobs_table(v["output"])
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]


def test_state_mapping_from_the_wide_table():
    statuses = parse_bjobs_table(VEC["lsf-004"]["output"])
    assert statuses["5085611"].state == JobState.PENDING  # PSUSP: held while pending
    assert statuses["5085607"].state == JobState.RUNNING  # UNKWN: host lost, not final
    assert "unreachable" in statuses["5085607"].reason
    assert statuses["5085608"].state == JobState.FAILED  # ZOMBI
    assert statuses["5085107"].state == JobState.FAILED  # EXIT
    assert statuses["5085606"].state == JobState.COMPLETED


@pytest.mark.parametrize("vid", ["lsf-015", "lsf-016", "lsf-017"])
def test_long_records_of_finished_jobs(vid):
    v = VEC[vid]
    status = parse_long_records(v["output"])[v["facts"]["job_id"]]
    assert status.native_state == v["facts"]["state"]
    assert status.exit_code == v["facts"]["exit_code"]
    assert status.state == (JobState.COMPLETED if v["facts"]["exit_code"] == 0 else JobState.FAILED)


def test_long_record_of_a_running_job_split_status():
    v = VEC["lsf-020"]
    status = parse_long_records(v["output"])[v["facts"]["job_id"]]
    assert status.native_state == v["facts"]["state"] and status.state == JobState.RUNNING


def test_bacct_record_killed_by_owner_is_cancelled():
    v = VEC["lsf-019"]
    status = parse_long_records(v["output"])[v["facts"]["job_id"]]
    assert status.native_state == v["facts"]["state"]
    assert status.reason == v["facts"]["termination_reason"]
    assert status.state == JobState.CANCELLED


def test_unknown_job_in_long_query_is_no_record():
    v = VEC["lsf-018"]
    assert S.parse_terminal(CommandResult(["bjobs", "-l", "943186"], 255, v["output"], v["stderr"])) == {}


def test_bhist_summary_holds_no_record():
    assert parse_long_records(VEC["lsf-009"]["output"]) == {}  # no state in a summary


def test_bhist_long_hand_written_runlimit_and_done():  # hand-written, in the fake's layout
    text = (
        "Job <7>, Job Name <a>, User <u>, Project <default>, Command </tmp/x/jobs/7.s\n"
        "                     h>\n"
        "Sun Nov 22 03:11:59: Submitted from host <vm>, to Queue <normal>, CWD </tmp>;\n"
        "Sun Nov 22 03:13:00: Exited with exit code 140. The CPU time used is 0.0 second\n"
        "                     s;\n"
        "Sun Nov 22 03:13:00: Completed <exit>; TERM_RUNLIMIT: job killed after reaching\n"
        "                      LSF run time limit.\n"
        "\n------------------------------------------------------------------------------\n\n"
        "Job <8>, Job Name <b>, User <u>, Project <default>, Command <x>\n"
        "Sun Nov 22 03:11:59: Done successfully. The CPU time used is 0.0 seconds;\n"
    )
    statuses = S.parse_terminal(CommandResult(["bhist", "-l", "7", "8"], 0, text, ""))
    assert statuses["7"].state == JobState.FAILED and statuses["7"].exit_code == 140
    assert statuses["7"].reason == "TERM_RUNLIMIT: job killed after reaching LSF run time limit"
    assert "TERM_RUNLIMIT" in statuses["7"].describe()
    assert statuses["8"].state == JobState.COMPLETED and statuses["8"].exit_code == 0


def test_bkill_outcomes():
    v = VEC["lsf-011"]
    outcome = parse_bkill(v["output"], v["stderr"])
    facts = v["facts"]
    for key, word in (("terminated", "terminated"), ("signaled", "signaled"),
                      ("already_finished", "already_finished"), ("not_found", "not_found")):
        assert sorted(k for k, o in outcome.items() if o == word) == sorted(facts[key])


def test_bkill_cancel_results():
    assert S.parse_cancel(result("lsf-022", ["bkill", "764254593"])) is True
    assert S.parse_cancel(result("lsf-010", ["bkill", "22"])) is False
    v = VEC["lsf-011"]
    assert S.parse_cancel(CommandResult(["bkill", "33"], 255, "", "Job <33>: Job has already finished")) is False
    assert parse_bkill(v["output"], v["stderr"])["66"] == "not_found"
    with pytest.raises(SchedulerError):  # hand-written
        S.parse_cancel(CommandResult(["bkill", "5"], 255, "", "Job <5>: User permission denied\n"))


def test_cancelled_by_exit_reason_or_bkill_exit_code():  # hand-written
    assert to_status("1", "EXIT", "130", "TERM_OWNER: job killed by owner").state == JobState.CANCELLED
    assert to_status("1", "EXIT", "130").state == JobState.CANCELLED
    assert to_status("1", "EXIT", "140", "TERM_RUNLIMIT: job killed after reaching LSF run time limit").state == JobState.FAILED
    assert to_status("1", "EXIT", "3").state == JobState.FAILED
    assert to_status("1", "DONE", "-").exit_code == 0
    assert to_status("1", "PDONE").state == JobState.COMPLETED
    for stat in ("PEND", "PSUSP", "WAIT", "PROV"):
        assert to_status("1", stat).state == JobState.PENDING
    for stat in ("RUN", "USUSP", "SSUSP"):
        assert to_status("1", stat).state == JobState.RUNNING


def test_one_status_query_for_all_jobs():
    argv = S.status_argv(["1", "2", "3"])
    assert argv[:4] == ["bjobs", "-a", "-noheader", "-o"] and argv[-3:] == ["1", "2", "3"]
    from prefect_xm.workers.scheduler import SubmitRequest
    request = SubmitRequest("/r/job.sh", "#!/bin/bash\n", "job-1", "/r")
    assert S.submit_argv(request) == ["bsub", "-J", "job-1"]  # the script goes on stdin
    assert S.submit_stdin(request) == "#!/bin/bash\n"


def test_find_by_name_not_found_is_an_answer():  # hand-written
    r = CommandResult(S.find_by_name_argv("x-1"), 255, "", "Job <x-1> is not found\n")
    assert S.find_by_name_answered(r) and S.parse_find_by_name(r.stdout) == []
    assert not S.find_by_name_answered(CommandResult(r.argv, 255, "", "LSF is down\n"))


@pytest.mark.parametrize(
    "field,value",
    [("time_limit", "ten minutes"), ("time_limit", "1:75"), ("memory", "16 gigs"), ("queue", "a b"),
     ("resources", 'x"y'), ("gpu_model", "a;b")],
)
def test_malformed_variables_name_the_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        LsfJobConfiguration(**{field: value})
    assert field in str(info.value) and value in str(info.value)


def test_well_formed_variables():
    c = LsfJobConfiguration(time_limit="1:30", memory="16G", queue="short", gpus=2, gpu_model="a100")
    assert c.time_limit == "1:30" and c.memory == "16G"
