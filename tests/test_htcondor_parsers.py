"""HTCondor parsers on verbatim outputs (tests/data/vectors/htcondor.json), plus
hand-written cases (marked as such) for the -json form no recorded output shows, and the
generated submit description."""

from __future__ import annotations

import json

import pytest

from conftest import VECTORS
from prefect_xm.workers.htcondor import (
    HTCondorJobConfiguration,
    HTCondorScheduler,
    ad_to_status,
    parse_condor_rm,
    parse_condor_submit,
    parse_json_ads,
    submit_description,
)
from other_formats import ST_LETTERS, parse_autoformat, parse_condor_q_table, parse_event_log
from prefect_xm.workers.scheduler import CommandResult, JobState, SchedulerError, SubmitRequest, TransientSchedulerError

VEC = {v["id"]: v for v in json.loads((VECTORS / "htcondor.json").read_text())["vectors"]}
S = HTCondorScheduler()


@pytest.mark.parametrize("vid", ["htcondor-001", "htcondor-002"])
def test_submit_cluster_line(vid):
    assert parse_condor_submit(VEC[vid]["output"]) == f"{VEC[vid]['facts']['cluster_id']}.0"


def test_submit_terse():
    v = VEC["htcondor-004"]
    assert S.parse_submit(v["output"]) == v["facts"]["job_id"]


def test_submit_requirement_refusal_has_no_id_and_is_verbatim():
    v = VEC["htcondor-003"]
    with pytest.raises(ValueError):
        parse_condor_submit(v["output"])
    error = S.submit_error(CommandResult(["condor_submit"], 1, v["output"], ""))
    assert not isinstance(error, TransientSchedulerError)
    assert v["facts"]["reason"] in str(error)


def test_submit_schedd_unreachable_is_transient():  # hand-written
    r = CommandResult(["condor_submit"], 1, "", "\nERROR: Can't find address of local schedd\n")
    assert isinstance(S.submit_error(r), TransientSchedulerError)


@pytest.mark.parametrize("vid", ["htcondor-005", "htcondor-007", "htcondor-009", "htcondor-012", "htcondor-013"])
def test_condor_q_nobatch_rows(vid):
    v = VEC[vid]
    assert parse_condor_q_table(v["output"]) == v["facts"]["states"]


def test_condor_q_letters_map_to_job_status():
    states = parse_condor_q_table(VEC["htcondor-012"]["output"])
    assert ST_LETTERS[states["20.0"]] == 2 and ST_LETTERS[states["21.0"]] == 1
    assert ST_LETTERS[states["22.0"]] == 4 and ST_LETTERS[states["24.0"]] == 5


def test_condor_q_batch_rows_have_no_per_job_states():
    # the default batch layout lists batches, not jobs: nothing a tracker could use
    assert parse_condor_q_table(VEC["htcondor-006"]["output"]) == {}
    assert parse_condor_q_table(VEC["htcondor-008"]["output"]) == {}


def test_autoformat_status_and_holds():
    v = VEC["htcondor-014"]
    attrs = ("JobStatus", "HoldReasonCode", "HoldReasonSubCode", "HoldReason")
    statuses = parse_autoformat(v["output"], attrs)
    assert {k: int({"HELD": 5, "REMOVED": 3}[s.native_state]) for k, s in statuses.items()} == v["facts"]["job_status"]
    # held with code 4 (CorruptedCredential): a system hold ends the run
    assert statuses["123.2"].state == JobState.FAILED
    assert statuses["123.1"].state == JobState.CANCELLED


def test_autoformat_history():
    v = VEC["htcondor-015"]
    statuses = parse_autoformat(v["output"], ("JobStatus", "HoldReasonCode", "HoldReasonSubCode", "HoldReason"))
    assert list(statuses) == list(v["facts"]["job_status"])
    assert statuses["123.0"].native_state == "COMPLETED"
    assert "333.3" not in statuses


def test_event_log_termination():
    v = VEC["htcondor-016"]
    status = parse_event_log(v["output"])[v["facts"]["job_id"]]
    assert status.state == JobState.COMPLETED and status.exit_code == v["facts"]["return_value"]


def test_condor_rm_outcomes():
    v = VEC["htcondor-010"]
    assert parse_condor_rm(v["output"], "") == {v["facts"]["job_id"]: "removed"}
    assert S.parse_cancel(CommandResult(["condor_rm", "132.0"], 0, v["output"], "")) is True
    # hand-written: current releases' wording, and the refusals
    assert S.parse_cancel(CommandResult(["condor_rm", "7.0"], 0, "Job 7.0 marked for removal\n", "")) is True
    assert S.parse_cancel(CommandResult(["condor_rm", "7.0"], 1, "", "Job 7.0 not found\n")) is False
    assert S.parse_cancel(CommandResult(["condor_rm", "7.0"], 1, "", "Job 7.0 already marked for removal\n")) is False
    with pytest.raises(SchedulerError):
        S.parse_cancel(CommandResult(["condor_rm", "7.0"], 1, "", "Couldn't find/remove all jobs: permission denied\n"))


# -- hand-written: the -json form (no verbatim condor_q -json listing was found) ----


def test_json_ads_all_states():
    text = json.dumps([
        {"ClusterId": 1, "ProcId": 0, "JobStatus": 1},
        {"ClusterId": 2, "ProcId": 0, "JobStatus": 2},
        {"ClusterId": 3, "ProcId": 0, "JobStatus": 3, "RemoveReason": "via condor_rm (by user alice)"},
        {"ClusterId": 4, "ProcId": 0, "JobStatus": 4, "ExitCode": 0, "ExitBySignal": False},
        {"ClusterId": 5, "ProcId": 0, "JobStatus": 4, "ExitCode": 3, "ExitBySignal": False},
        {"ClusterId": 6, "ProcId": 0, "JobStatus": 4, "ExitBySignal": True, "ExitSignal": 9},
        {"ClusterId": 7, "ProcId": 0, "JobStatus": 5, "HoldReasonCode": 15, "HoldReason": "submitted on hold at user's request"},
        {"ClusterId": 8, "ProcId": 0, "JobStatus": 5, "HoldReasonCode": 47, "HoldReason": "The job exceeded allowed execute duration of 1:00"},
        {"ClusterId": 9, "ProcId": 0, "JobStatus": 6},
        {"ClusterId": 10, "ProcId": 0, "JobStatus": 7},
        {"ClusterId": 11, "ProcId": 0, "JobStatus": 5, "HoldReasonCode": 1, "HoldReason": "via condor_hold (by user alice)"},
    ], indent=2)
    s = parse_json_ads(text)
    assert s["1.0"].state == JobState.PENDING
    assert s["2.0"].state == JobState.RUNNING
    assert s["3.0"].state == JobState.CANCELLED and "condor_rm" in s["3.0"].reason
    assert s["4.0"].state == JobState.COMPLETED and s["4.0"].exit_code == 0
    assert s["5.0"].state == JobState.FAILED and "exit code 3" in s["5.0"].describe()
    assert s["6.0"].state == JobState.FAILED and s["6.0"].signal == 9
    assert s["7.0"].state == JobState.PENDING and "user's request" in s["7.0"].describe()
    assert s["8.0"].state == JobState.FAILED and "exceeded allowed execute duration" in s["8.0"].describe()
    assert s["9.0"].state == JobState.RUNNING and s["10.0"].state == JobState.RUNNING
    assert s["11.0"].state == JobState.PENDING  # held by the user; no sign it ever started


# -- holds: before or after the job started (hand-written -json ads, shaped as the other
# -json cases here and as `condor_q ID -json -attributes ...` prints them: attributes
# that are undefined, such as JobStartDate before a first start, are left out) -----------

HELD_BY_USER = {"JobStatus": 5, "HoldReasonCode": 1, "HoldReasonSubCode": 0,
                "HoldReason": "via condor_hold (by user alice)"}


def held_ads(**by_id) -> str:
    return json.dumps([{"ClusterId": int(k.split("_")[1]), "ProcId": 0, **ad} for k, ad in by_id.items()], indent=2)


def test_user_hold_before_start_is_pending_with_its_reason():
    s = parse_json_ads(held_ads(
        # submitted with hold = True
        j_1={"JobStatus": 5, "HoldReasonCode": 15, "HoldReasonSubCode": 0,
             "HoldReason": "submitted on hold at user's request", "NumJobStarts": 0},
        # condor_hold while idle: NumJobStarts 0, no JobStartDate
        j_2={**HELD_BY_USER, "NumJobStarts": 0},
        # an ad without the start attributes at all (an older schedd, a narrower query)
        j_3=HELD_BY_USER,
    ))
    for job_id in ("1.0", "2.0", "3.0"):
        assert s[job_id].state == JobState.PENDING and not s[job_id].state.is_final, job_id
        assert s[job_id].native_state == "HELD"
    assert s["1.0"].reason == "submitted on hold at user's request"
    assert s["2.0"].describe() == "HELD (via condor_hold (by user alice))"


def test_user_hold_after_start_is_final_with_its_reason():
    s = parse_json_ads(held_ads(
        # condor_hold of a running job: the ad keeps its start attributes
        j_1={**HELD_BY_USER, "NumJobStarts": 1, "JobStartDate": 1700000000, "JobCurrentStartDate": 1700000000},
        # any one of them is enough
        j_2={**HELD_BY_USER, "NumJobStarts": 2},
        j_3={**HELD_BY_USER, "JobCurrentStartDate": 1700000000},
        j_4={**HELD_BY_USER, "NumJobStarts": 0, "JobStartDate": 1700000000},
        # no HoldReasonCode: the reason's wording says it was condor_hold
        j_5={"JobStatus": 5, "HoldReason": "via condor_hold (by user alice)", "NumJobStarts": 1},
        # submitted on hold, released, ran, then held again by the user
        j_6={**HELD_BY_USER, "NumJobStarts": 1, "JobStartDate": 1700000000},
    ))
    for job_id in ("1.0", "2.0", "3.0", "4.0", "5.0", "6.0"):
        status = s[job_id]
        assert status.state == JobState.FAILED and status.state.is_final, job_id
        assert status.native_state == "HELD" and status.reason == "via condor_hold (by user alice)"
        assert status.exit_code is None and status.signal is None
    assert s["1.0"].describe() == "HELD (via condor_hold (by user alice))"


def test_system_hold_is_final_whether_or_not_the_job_started():
    s = parse_json_ads(held_ads(
        j_1={"JobStatus": 5, "HoldReasonCode": 47, "HoldReasonSubCode": 0, "NumJobStarts": 1,
             "JobStartDate": 1700000000, "HoldReason": "The job exceeded allowed execute duration of 1:00"},
        j_2={"JobStatus": 5, "HoldReasonCode": 13, "HoldReasonSubCode": 2, "NumJobStarts": 0,
             "HoldReason": "Error from slot1@ep: Failed to transfer files"},
    ))
    assert s["1.0"].state == JobState.FAILED and "exceeded allowed execute duration" in s["1.0"].describe()
    assert s["2.0"].state == JobState.FAILED and s["2.0"].reason.startswith("Error from slot1@ep")


def test_autoformat_holds_before_and_after_start():
    # -af:j prints "undefined" for an attribute the ad lacks
    attrs = ("JobStatus", "HoldReasonCode", "NumJobStarts", "JobCurrentStartDate", "HoldReason")
    s = parse_autoformat(
        "7.0 5 1 0 undefined via condor_hold (by user alice)\n"
        "8.0 5 1 1 1700000000 via condor_hold (by user alice)\n", attrs)
    assert s["7.0"].state == JobState.PENDING and s["7.0"].reason == "via condor_hold (by user alice)"
    assert s["8.0"].state == JobState.FAILED and s["8.0"].reason == "via condor_hold (by user alice)"


def test_status_and_history_queries_ask_for_the_start_attributes():
    for argv in [S.status_argv(["1.0"]), *S.terminal_argvs(["1.0"])]:
        asked = argv[argv.index("-attributes") + 1].split(",")
        assert {"NumJobStarts", "JobStartDate", "JobCurrentStartDate", "HoldReason", "HoldReasonCode"} <= set(asked)
    # and parse_status reads them from the -json answer
    text = held_ads(j_5={**HELD_BY_USER, "NumJobStarts": 1})
    assert S.parse_status(CommandResult(S.status_argv(["5.0"]), 0, text, ""))["5.0"].state == JobState.FAILED


def test_empty_condor_q_json_is_no_jobs():  # hand-written
    assert S.parse_status(CommandResult(S.status_argv(["1.0"]), 0, "", "")) == {}
    assert S.parse_status(CommandResult(S.status_argv(["1.0"]), 0, "\n", "")) == {}


def test_status_query_failure_is_transient():  # hand-written
    with pytest.raises(TransientSchedulerError):
        S.parse_status(CommandResult(["condor_q"], 1, "", "-- Failed to fetch ads from: <127.0.0.1:9618> : host\nSECMAN:2007:Failed to end classad message.\n"))


def test_ad_without_ids_is_ignored():  # hand-written
    assert ad_to_status({"JobStatus": 2}) is None


def test_one_status_query_for_all_jobs():
    argv = S.status_argv(["1.0", "2.0"])
    assert argv[:3] == ["condor_q", "1.0", "2.0"] and "-json" in argv
    assert [a[0] for a in S.terminal_argvs([f"{i}.0" for i in range(120)])] == ["condor_history"] * 3


def request(**variables) -> SubmitRequest:
    config = HTCondorJobConfiguration(**variables)
    return SubmitRequest("/runs/r1/job.sh", "#!/bin/bash\n", "job-r1", "/runs/r1",
                         config.model_dump(exclude={"env"}))


def test_submit_description():
    text = S.submit_stdin(request(request_cpus=2, request_memory="4GB", request_gpus=1, time_limit="2",
                                  hold=True, extra_directives=["rank = Memory"]))
    lines = text.splitlines()
    assert "executable = /runs/r1/job.sh" in lines and "output = /runs/r1/job.out" in lines
    assert "error = /runs/r1/job.err" in lines and "log = /runs/r1/job.log" in lines
    assert "batch_name = job-r1" in lines and "getenv = True" in lines
    assert "request_cpus = 2" in lines and "request_memory = 4GB" in lines and "request_gpus = 1" in lines
    assert "allowed_execute_duration = 120" in lines and "hold = True" in lines
    assert lines.index("rank = Memory") < lines.index("queue 1") == len(lines) - 1
    assert S.submit_argv(request()) == ["condor_submit", "-terse", "-batch-name", "job-r1"]
    assert "hold" not in submit_description(request(), 0) and "leave_in_queue" not in submit_description(request(), 0)


@pytest.mark.parametrize(
    "field,value",
    [("time_limit", "ten minutes"), ("request_memory", "16 gigs"), ("universe", "van illa"),
     ("requirements", "a\nqueue 5"), ("extra_directives", ["queue 10"]), ("accounting_group", "a b")],
)
def test_malformed_variables_name_the_field(field, value):
    with pytest.raises(ValueError) as info:
        HTCondorJobConfiguration(**{field: value})
    assert field in str(info.value)


# -- arrays: verbatim listings of clusters with several procs -------------------------------


def test_procs_of_a_cluster_in_a_listing_are_the_tasks_of_one_array():
    v = VEC["htcondor-007"]  # condor_q -nobatch: clusters 592, 593, 595, 596 of two procs
    states = parse_condor_q_table(v["output"])
    clusters = {S.array_of(job_id) for job_id in states}
    assert {"592", "593", "595", "596"} <= clusters
    assert S.array_task_id("592", S.array_first_index + 1) == "592.1" and "592.1" in states
    assert [j for j in states if S.array_of(j) == "596"] == ["596.0", "596.1"]


def test_each_proc_of_a_cluster_has_its_own_status():
    v = VEC["htcondor-014"]  # -af:j of two procs of cluster 123: one held, one removed
    statuses = parse_autoformat(v["output"], ("JobStatus", "HoldReasonCode", "HoldReasonSubCode", "HoldReason"))
    assert S.lookup("123.2", statuses).state == JobState.FAILED
    assert S.lookup("123.1", statuses).state == JobState.CANCELLED
    assert S.lookup("123.0", statuses) is None  # not listed: its terminal record is asked for
    assert {S.array_of(j) for j in statuses} == {"123"}


@pytest.mark.parametrize("vid,cluster", [("htcondor-001", "6"), ("htcondor-002", "452"), ("htcondor-004", "15")])
def test_array_submit_gives_the_cluster(vid, cluster):
    assert S.parse_array_submit(VEC[vid]["output"]) == cluster
