"""Slurm parsers on verbatim outputs (tests/data/vectors/slurm.json) and on outputs
recorded from the real Slurm 22.05 on these machines."""

from __future__ import annotations

import json

import pytest

from prefect_xm.workers.scheduler import CommandResult, JobState, SchedulerError, TransientSchedulerError
from prefect_xm.workers.slurm import (
    SlurmScheduler,
    combine_components,
    expand_array_id,
    parse_exit_code,
    parse_sacct,
    parse_sbatch,
    parse_scontrol_show_job,
    parse_squeue,
)

from conftest import VECTORS

VEC = {v["id"]: v for v in json.loads((VECTORS / "slurm.json").read_text())["vectors"]}
S = SlurmScheduler()


def result(vector_id: str, argv=("squeue",)) -> CommandResult:
    v = VEC[vector_id]
    return CommandResult(list(argv), v["returncode"] or 0, v["output"], v["stderr"] or "")


@pytest.mark.parametrize("vid", ["slurm-001", "slurm-003", "slurm-022", "slurm-023"])
def test_sbatch_job_id(vid):
    assert parse_sbatch(VEC[vid]["output"]) == VEC[vid]["facts"]["job_id"]


def test_sbatch_parsable_with_site_banners_and_cluster():
    assert parse_sbatch("Welcome to the cluster!\nYour project has 12 hours left.\n4242\n") == "4242"
    assert parse_sbatch("NOTICE: maintenance on Friday\n77;mpp2\n") == "77"
    with pytest.raises(ValueError, match="no job id"):
        parse_sbatch("Welcome!\n")


def test_squeue_compact_states_space_delimited():
    v = VEC["slurm-004"]
    statuses = parse_squeue(v["output"], delimiter=" ", columns=("id", "state"))
    assert {k: s.native_state for k, s in statuses.items()} == {
        "5": "PENDING", "6": "PENDING", "13": "RUNNING", "14": "CANCELLED",
        "15": "FAILED", "4": "RUNNING", "22": "SUSPENDED",
    }
    assert statuses["14"].state == JobState.CANCELLED
    assert statuses["22"].state == JobState.RUNNING  # suspended: started, paused


def test_squeue_reasons_custom_delimiter():
    v = VEC["slurm-005"]
    statuses = parse_squeue(v["output"], delimiter="^^^", columns=("id", "state", "reason"))
    assert set(statuses) == set(v["facts"]["states"])
    assert {k: s.reason for k, s in statuses.items()} == v["facts"]["reasons"]
    assert statuses["863313"].state == JobState.PENDING  # held by the user


def test_squeue_banner_lines_and_literal_prefix_are_skipped():
    v = VEC["slurm-007"]
    statuses = parse_squeue(v["output"], delimiter="^", columns=("id", "state", "reason"))
    assert list(statuses) == ["123"]
    assert statuses["123"].state == JobState.PENDING and statuses["123"].reason == "Resources"


def test_squeue_unknown_job_id_is_an_error_not_a_state():
    with pytest.raises(SchedulerError, match="Invalid job id"):
        S.parse_status(result("slurm-008"))


def test_squeue_controller_timeout_is_transient():
    r = CommandResult(["squeue"], 1, "", "squeue: error: Socket timed out on send/recv operation\n")
    with pytest.raises(TransientSchedulerError):
        S.parse_status(r)


@pytest.mark.parametrize("vid", ["slurm-021", "slurm-024", "slurm-025"])
def test_squeue_default_table(vid):
    v = VEC[vid]
    statuses = parse_squeue(v["output"])
    for job_id, code in v["facts"]["states"].items():
        for jid in expand_array_id(job_id):
            assert statuses[jid].native_state == parse_squeue(f"{jid}|{code}|")[jid].native_state
    if vid == "slurm-021":
        assert statuses["1080_1024"].state == JobState.PENDING
        assert statuses["1080_5"].reason == "Resources"
        # the array job as a whole: still pending while tasks wait
        assert combine_components("1080", statuses).state == JobState.PENDING
    if vid == "slurm-024":
        assert combine_components("93", statuses).state == JobState.RUNNING
    if vid == "slurm-025":
        assert statuses["12346"].reason == "Resources"


def test_array_ranges_expand_with_throttle():
    assert expand_array_id("123_[5-9%2]") == ["123_5", "123_6", "123_7", "123_8", "123_9"]
    assert expand_array_id("123_[1,4-5]") == ["123_1", "123_4", "123_5"]
    assert expand_array_id("123_4") == ["123_4"]
    assert expand_array_id("123+0") == ["123+0"]


def test_sacct_steps_ignored_and_arrays_expanded():
    v = VEC["slurm-002"]
    statuses = parse_sacct(v["output"], columns=("JobID", "State"))
    assert set(statuses) == set(v["facts"]["source_asserts"]["keys"])
    assert statuses["20956421_3"].state == JobState.PENDING


@pytest.mark.parametrize("vid", ["slurm-014", "slurm-015"])
def test_sacct_terminal_exit_codes(vid):
    v = VEC[vid]
    statuses = parse_sacct(v["output"], columns=("JobIDRaw", "State", "ExitCode"))
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]
    if vid == "slurm-015":
        assert (statuses["765096"].exit_code, statuses["765096"].signal) == (0, 9)
        assert statuses["785023"].exit_code == 127
    else:
        assert statuses["789456"].exit_code == 1
        assert statuses["754725"].state == JobState.FAILED  # TIMEOUT


def test_sacct_timeout_and_cancelled_by_uid():
    statuses = parse_sacct(
        VEC["slurm-010"]["output"],
        columns=("JobID", "ExitCode", "State", "NCPUS", "Elapsed", "TotalCPU", "Submit", "Start", "End", "MaxRSS", "MaxVMSize"),
    )
    assert list(statuses) == ["123"]
    assert statuses["123"].native_state == "TIMEOUT"
    assert statuses["123"].signal == 1
    statuses = parse_sacct(
        VEC["slurm-011"]["output"],
        columns=("JobID", "ExitCode", "State", "NCPUS", "Elapsed", "TotalCPU", "Submit", "Start", "End", "MaxRSS", "MaxVMSize"),
    )
    assert statuses["123"].native_state == "NODE_FAIL"
    # "CANCELLED by 1000" on a step, and on a job line:
    st = parse_sacct("55|CANCELLED by 0|0:15|None\n")["55"]
    assert (st.state, st.native_state, st.reason, st.signal) == (JobState.CANCELLED, "CANCELLED", "None", 15)
    st = parse_sacct("56|CANCELLED by 0|0:15|\n")["56"]
    assert st.reason == "by 0"


def test_sacct_accounting_disabled_means_no_record():
    r = result("slurm-009", argv=("sacct",))
    assert S.parse_terminal(r) == {}


def test_scontrol_show_job_records():
    v = VEC["slurm-016"]
    statuses = parse_scontrol_show_job(v["output"])
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]
    assert {k: s.exit_code for k, s in statuses.items()} == v["facts"]["exit_codes"]
    assert statuses["789728"].reason == v["facts"]["reasons"]["789728"]


def test_scontrol_one_line_record_timeout():
    line = (
        "JobId=17 JobName=t-1 UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=1 Nice=0 "
        "Account=(null) QOS=(null) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) "
        "Requeue=0 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:15 RunTime=00:01:02\n"
    )
    st = S.parse_terminal(CommandResult(["scontrol", "show", "job", "-o", "17"], 0, line, ""))["17"]
    assert (st.state, st.native_state, st.reason, st.signal) == (JobState.FAILED, "TIMEOUT", "TimeLimit", 15)
    gone = CommandResult(["scontrol"], 1, "", "slurm_load_jobs error: Invalid job id specified\n")
    assert S.parse_terminal(gone) == {}


def test_exit_code_field():
    assert parse_exit_code("0:15") == (0, 15)
    assert parse_exit_code("127:0") == (127, 0)
    assert parse_exit_code("") == (None, None)


def test_scancel_outcomes():
    # silent success: only what a scancel without --verbose says (the worker never runs one)
    assert S.parse_cancel(CommandResult(["scancel"], 0, "", "")) is True
    assert S.parse_cancel(result("slurm-012", ("scancel",))) is False  # unknown id
    assert S.parse_cancel(result("slurm-018", ("scancel",))) is False  # already completed
    assert S.parse_cancel(result("slurm-017", ("scancel",))) is True
    with pytest.raises(SchedulerError, match="permission denied"):
        S.parse_cancel(result("slurm-013", ("scancel",)))


# scancel of Slurm 22.05.8 on these machines, verbatim (stdout empty, exit 0 in every case).
# Without --verbose, a job that ended and one that never existed print nothing and exit 0,
# the same as a cancel that worked: only --verbose tells them apart.
SCANCEL_22_05 = {
    # `scancel 12`, job 12 (`true`) ended and gone from squeue; `scancel 99999999`
    "ended, no --verbose": ("scancel 12", ""),
    "never existed, no --verbose": ("scancel 99999999", ""),
    "ended": ("scancel --verbose 12",
              "scancel: Terminating job 12\n"
              "scancel: error: Kill job error on job id 12: Job/step already completing or completed\n"),
    "never existed": ("scancel --verbose 99999999",
                      "scancel: Terminating job 99999999\n"
                      "scancel: error: Kill job error on job id 99999999: Invalid job id specified\n"),
    "held": ("scancel --verbose 14", "scancel: Terminating job 14\n"),
    "running": ("scancel --verbose 15", "scancel: Terminating job 15\n"),
    "array task": ("scancel --verbose 16_1", "scancel: Terminating job 16_1\n"),
    "array task already removed with its array": (
        "scancel --verbose 16_1",
        "scancel: Terminating job 16_1\nscancel: error: Kill job error on job id 16_1: Invalid job id specified\n"),
}


@pytest.mark.parametrize("case, accepted", [
    ("ended", False), ("never existed", False), ("array task already removed with its array", False),
    ("held", True), ("running", True), ("array task", True),
])
def test_scancel_verbose_on_slurm_22_05_says_whether_there_was_anything_to_cancel(case, accepted):
    command, stderr = SCANCEL_22_05[case]
    assert S.parse_cancel(CommandResult(command.split(), 0, "", stderr)) is accepted


def test_the_kill_is_asked_verbose_because_silence_is_ambiguous():
    assert SCANCEL_22_05["ended, no --verbose"][1] == SCANCEL_22_05["never existed, no --verbose"][1] == ""
    kill = S.cancel_argvs("12", 30)[-1]
    assert kill[0] == "scancel" and "--verbose" in kill and kill[-1] == "12"


def test_sbatch_rejections_are_not_retried():
    for vid in ("slurm-006", "slurm-019"):
        err = S.submit_error(result(vid, ("sbatch",)))
        assert not isinstance(err, TransientSchedulerError)
        assert str(err) == VEC[vid]["stderr"].strip()
    err = S.submit_error(CommandResult(["sbatch"], 1, "", "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"))
    assert isinstance(err, TransientSchedulerError)


def test_status_query_is_one_command_whatever_the_number_of_jobs():
    assert S.status_argv([str(i) for i in range(500)]) == S.status_argv(["1"])
    # terminal lookups are bounded batches
    sacct = [a for a in S.terminal_argvs([str(i) for i in range(250)]) if a[0] == "sacct"]
    assert len(sacct) == 3


def test_infrastructure_pid_round_trip():
    pid = S.infrastructure_pid("hpc1", "123_4")
    assert pid == "slurm:hpc1:123_4"
    assert S.parse_infrastructure_pid(pid) == ("slurm", "hpc1", "123_4")
    with pytest.raises(ValueError):
        S.parse_infrastructure_pid("12345")


#: `squeue --me -h -t all -o '%i|%T|%r|%S'` (the worker's status query), recorded from the
#: real Slurm 22.05 here: a job running, one waiting behind it for its node (the backfill
#: scheduler's estimate is the running job's time limit), one held (no estimate)
SQUEUE_WITH_START = """4302|COMPLETED|None|2026-12-07T21:24:13
4318_9|COMPLETED|None|2026-12-07T21:26:00
4340+0|COMPLETED|None|2026-12-07T21:26:46
4309+0|FAILED|JobLaunchFailure|2026-12-07T21:24:36
4366|PENDING|Resources|2026-12-07T21:33:22
4367|PENDING|JobHeldUser|N/A
4365|RUNNING|None|2026-12-07T21:30:22
"""


def test_a_pending_jobs_expected_start_comes_with_its_status():
    statuses = S.parse_status(CommandResult(S.status_argv([]), 0, SQUEUE_WITH_START, ""))
    assert statuses["4366"].expected_start == "2026-12-07T21:33:22"
    assert statuses["4366"].describe() == "PENDING (Resources) expected to start at 2026-12-07T21:33:22"
    # a held job has no estimate; a running or ended job's %S is when it started
    assert statuses["4367"].expected_start == "" and statuses["4367"].state == JobState.PENDING
    assert statuses["4365"].expected_start == "" and statuses["4302"].expected_start == ""
    assert statuses["4318_9"].state == JobState.COMPLETED and statuses["4340+0"].state == JobState.COMPLETED
    assert "%S" in S.status_argv([])[-1]
