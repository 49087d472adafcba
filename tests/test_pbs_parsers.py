"""PBS Pro and Torque parsers on verbatim outputs (tests/data/vectors/pbspro.json and
torque.json), plus hand-written cases (marked) for what no vector shows: PBS Pro's
finished-job JSON record, an array and its subjobs (the vectors hold no array output),
Slurm's Torque wrappers' qstat -f, the template."""

from __future__ import annotations

import json

import pytest

from conftest import VECTORS
from other_formats import parse_pbs_qstat_table, parse_pbs_qstat_xml
from prefect_xm.workers.pbs import (
    DIALECTS,
    PbsJobConfiguration,
    exit_status_meaning,
    parse_qstat_full,
    parse_qstat_full_records,
    parse_qstat_json,
    parse_qsub,
    parse_tracejob,
    unknown_ids,
)
from prefect_xm.workers.scheduler import CommandResult, JobState, SchedulerError, TransientSchedulerError

PBS = {v["id"]: v for v in json.loads((VECTORS / "pbspro.json").read_text())["vectors"]}
TQ = {v["id"]: v for v in json.loads((VECTORS / "torque.json").read_text())["vectors"]}
PRO, TORQUE = DIALECTS["pbspro"], DIALECTS["torque"]


def result(v, argv) -> CommandResult:
    return CommandResult(list(argv), v["returncode"] or 0, v["output"], v["stderr"] or "")


# -- submit ----------------------------------------------------------------------


@pytest.mark.parametrize("vid", ["pbspro-001", "pbspro-017", "pbspro-018"])
def test_qsub_job_id_kept_whole_pbspro(vid):
    assert parse_qsub(PBS[vid]["output"]) == PBS[vid]["facts"]["job_id"]


@pytest.mark.parametrize("vid", ["torque-001", "torque-011"])
def test_qsub_job_id_kept_whole_torque(vid):
    assert parse_qsub(TQ[vid]["output"]) == TQ[vid]["facts"]["job_id"]


def test_qsub_with_site_banners():  # hand-written
    assert parse_qsub("Welcome to the cluster\nQuota: 80% used\n4242.pbs01\n") == "4242.pbs01"
    with pytest.raises(ValueError, match="no job id"):
        parse_qsub("Welcome!\n")


@pytest.mark.parametrize("vid", ["pbspro-007", "pbspro-008", "pbspro-009"])
def test_qsub_errors_ert_retries_are_transient(vid):
    assert isinstance(PRO.submit_error(result(PBS[vid], ["qsub"])), TransientSchedulerError)


@pytest.mark.parametrize("vid", ["torque-002", "torque-003"])
def test_qsub_refusals_are_verbatim_and_final(vid):
    error = TORQUE.submit_error(result(TQ[vid], ["qsub"]))
    assert not isinstance(error, TransientSchedulerError)
    assert str(error) == TQ[vid]["stderr"].strip()


def test_qsub_missing_resource_is_final():
    error = PRO.submit_error(CommandResult(["qsub"], 1, PBS["pbspro-016"]["output"], ""))
    assert "filesystems is required" in str(error) and not isinstance(error, TransientSchedulerError)


# -- status ----------------------------------------------------------------------


@pytest.mark.parametrize("vid", ["pbspro-002", "pbspro-003", "pbspro-004"])
def test_qstat_full_text_pbspro(vid):
    v = PBS[vid]
    statuses = parse_qstat_full(v["output"], "pbspro")
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]
    expected = {"Q": JobState.PENDING, "H": JobState.PENDING, "R": JobState.RUNNING, "E": JobState.RUNNING,
                "S": JobState.RUNNING}
    for job_id, native in v["facts"]["states"].items():
        if native in expected:
            assert statuses[job_id].state == expected[native]
    for job_id, comment in v["facts"].get("comments", {}).items():
        assert statuses[job_id].reason == comment
    for job_id, hold in v["facts"].get("hold_types", {}).items():
        assert f"Hold_Types={hold}" in statuses[job_id].reason


def test_qstat_full_text_folded_values_are_joined():
    records = parse_qstat_full_records(PBS["pbspro-002"]["output"])
    assert records["80005196.gadi-pbs"]["Error_Path"].endswith("/test1/test1.e80005196")
    records = parse_qstat_full_records(PBS["pbspro-003"]["output"])
    assert records["68350.mycluster"]["Error_Path"].endswith("/PTOscaletest/testjob.err")


def test_pbspro_finished_without_exit_status_in_grep_output():
    # pbspro-004 is grep'd: F shows without its Exit_status -> ended, nothing to report
    s = parse_qstat_full(PBS["pbspro-004"]["output"], "pbspro")["12.localhost"]
    assert s.state.is_final and s.exit_code is None


@pytest.mark.parametrize("vid", ["pbspro-005", "pbspro-013", "pbspro-015"])
def test_qstat_tables_pbspro(vid):
    v = PBS[vid]
    statuses = parse_pbs_qstat_table(v["output"], "pbspro")
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]


def test_partial_answer_with_unknown_id_rc153():
    v = PBS["pbspro-005"]
    assert unknown_ids(v["stderr"]) == v["facts"]["unknown_jobs"]
    assert parse_pbs_qstat_table(v["output"])["1"].state == JobState.RUNNING


@pytest.mark.parametrize("vid", ["pbspro-006", "torque-006"])
def test_unknown_job_id_means_absent_not_an_error(vid):
    v = PBS.get(vid) or TQ[vid]
    scheduler = PRO if vid.startswith("pbspro") else TORQUE
    assert unknown_ids(v["stderr"]) == [v["facts"]["job_id"]]
    assert scheduler.parse_status(result(v, scheduler.status_argv([v["facts"]["job_id"]]))) == {}


@pytest.mark.parametrize("vid", ["pbspro-010", "pbspro-011"])
def test_qstat_connection_errors_are_transient(vid):
    with pytest.raises(TransientSchedulerError):
        PRO.parse_status(result(PBS[vid], ["qstat"]))


def test_qstat_json_ert_fake_exit_status_as_string():
    v = PBS["pbspro-012"]
    statuses = parse_qstat_json(v["output"])
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]
    assert {k: s.exit_code for k, s in statuses.items()} == v["facts"]["exit_codes"]


def test_held_comment_pbspro_019():
    v = PBS["pbspro-019"]
    record = "Job Id: 1.x\n    job_state = H\n    " + v["output"].strip() + "\n"
    s = parse_qstat_full(record)["1.x"]
    assert s.state == JobState.PENDING and s.reason == v["facts"]["comment"]


@pytest.mark.parametrize("vid", ["torque-012", "torque-013", "torque-014"])
def test_qstat_full_text_torque(vid):
    v = TQ[vid]
    statuses = parse_qstat_full(v["output"], "torque")
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]
    for job_id, code in v["facts"].get("exit_status", {}).items():
        assert statuses[job_id].exit_code == code
        assert statuses[job_id].state == (JobState.COMPLETED if code == 0 else JobState.FAILED)
    for job_id, native in v["facts"]["states"].items():
        if native in "QH":
            assert statuses[job_id].state == JobState.PENDING
        if native in "RS":
            assert statuses[job_id].state == JobState.RUNNING


def test_torque_271_is_sigterm():
    s = parse_qstat_full(TQ["torque-013"]["output"], "torque")["546437"]
    assert s.state == JobState.FAILED and s.signal == 15


@pytest.mark.parametrize("vid", ["torque-004", "torque-005"])
def test_qstat_brief_lines_torque(vid):
    v = TQ[vid]
    assert {k: s.native_state for k, s in parse_pbs_qstat_table(v["output"], "torque").items()} == v["facts"]["states"]


def test_qstat_xml_torque_finished():
    v = TQ["torque-015"]
    s = parse_pbs_qstat_xml(v["output"])[v["facts"]["job_id"]]
    assert s.native_state == v["facts"]["state"] and s.exit_code == v["facts"]["exit_status"]
    assert s.state == JobState.COMPLETED


def test_qstat_xml_torque_held():
    v = TQ["torque-016"]
    s = parse_pbs_qstat_xml(v["output"])[v["facts"]["job_id"]]
    assert s.native_state == "H" and s.state == JobState.PENDING
    assert f"Hold_Types={v['facts']['hold_types']}" in s.reason


def test_tracejob_exit_status():
    v = TQ["torque-007"]
    s = parse_tracejob(v["output"])[v["facts"]["job_id"]]
    assert s.exit_code == v["facts"]["exit_status"] and s.state == JobState.COMPLETED
    assert TORQUE.parse_terminal(result(v, ["tracejob", "-n", "3", "123"]))["123"].state == JobState.COMPLETED


# -- cancel ------------------------------------------------------------------------


def test_qdel_outputs():
    assert PRO.parse_cancel(result(PBS["pbspro-014"], ["qdel", "69580.hpcnode0"])) is True
    assert TORQUE.parse_cancel(result(TQ["torque-008"], ["qdel", "123"])) is True
    assert TORQUE.parse_cancel(result(TQ["torque-009"], ["qdel", "123"])) is False
    with pytest.raises(SchedulerError, match="Unauthorized"):
        TORQUE.parse_cancel(result(TQ["torque-010"], ["qdel", "123"]))


def test_qdel_of_finished_job_rc35_is_fine():  # hand-written (no verbatim vector exists)
    finished = CommandResult(["qdel", "7.srv"], 35, "", "qdel: Job has finished 7.srv\n")
    assert PRO.parse_cancel(finished) is False
    assert TORQUE.parse_cancel(CommandResult(["qdel", "7"], 1, "", "")) is False  # Slurm's wrapper


# -- hand-written: PBS Pro JSON with history, Slurm's Torque wrappers ---------------

PBSPRO_HISTORY_JSON = """{
    "timestamp":1700000000,
    "pbs_version":"22.05.11",
    "pbs_server":"srv",
    "Jobs":{
        "10.srv":{"Job_Name":"a","job_state":"F","Exit_status":0,"comment":"Job run at Tue at 10:00 on (n1:ncpus=1) and finished"},
        "11.srv":{"Job_Name":"b","job_state":"F","Exit_status":-29,"comment":"job killed: walltime 65 exceeded limit 60"},
        "12.srv":{"Job_Name":"c","job_state":"F","Exit_status":265},
        "13.srv":{"Job_Name":"d","job_state":"F","Exit_status":271},
        "14.srv":{"Job_Name":"e","job_state":"F"},
        "15.srv":{"Job_Name":"f","job_state":"H","Hold_Types":"u"},
        "16.srv":{"Job_Name":"g","job_state":"Q","comment":"Not Running: Insufficient amount of resource: ncpus (R: 1 A: 0 T: 2)"},
        "17.srv":{"Job_Name":"h","job_state":"F","Exit_status":3}
    }
}
"""


def test_pbspro_history_json():  # hand-written: no verbatim finished-job record exists
    s = parse_qstat_json(PBSPRO_HISTORY_JSON)
    assert s["10.srv"].state == JobState.COMPLETED
    assert s["11.srv"].state == JobState.FAILED and "walltime" in s["11.srv"].describe()
    assert s["12.srv"].state == JobState.CANCELLED and s["12.srv"].signal == 9
    assert s["13.srv"].state == JobState.FAILED and s["13.srv"].signal == 15
    assert s["14.srv"].state == JobState.CANCELLED  # deleted before it ran
    assert s["15.srv"].state == JobState.PENDING and "Hold_Types=u (user hold)" in s["15.srv"].reason
    assert s["16.srv"].reason.startswith("Not Running: Insufficient")
    assert "exit code 3" in s["17.srv"].describe()


def test_pbspro_partial_json_rc153_and_whole_failure():  # hand-written
    partial = CommandResult(["qstat"], 153, PBSPRO_HISTORY_JSON, "qstat: Unknown Job Id 9.srv\n")
    assert set(PRO.parse_status(partial)) >= {"10.srv", "17.srv"}
    whole = CommandResult(["qstat"], 153, "", "qstat: Unknown Job Id 9.srv\n")
    assert PRO.parse_status(whole) == {}
    finished = CommandResult(["qstat"], 35, "", "qstat: 10.srv Job has finished, use -x or -H to obtain historical job information\n")
    assert PRO.parse_status(finished) == {} and unknown_ids(finished.stderr) == ["10.srv"]


# PBS Pro arrays: no verbatim vector holds an array's subjobs; the shapes below follow
# OpenPBS (stat_job.c status_subjob, array_func.c) and its job-array tests: the array
# `40[].srv` (B while subjobs run, "array":"True" as a string, array_state_count with
# its trailing space), subjobs `40[N].srv` with array_id/array_index; a queued subjob
# is shown from the array's record; an ended subjob whose record is gone says only
# "Subjob finished/failed/terminated", with no Exit_status.
PBSPRO_ARRAY_JSON = """{
    "timestamp":1700000000,
    "pbs_version":"22.05.11",
    "pbs_server":"srv",
    "Jobs":{
        "40[].srv":{"Job_Name":"sweep","job_state":"B","comment":"Job Array Began at Tue Nov 14 10:00:00 2023",
            "array":"True","array_state_count":"Queued:1 Running:1 Exiting:0 Expired:5 ",
            "array_indices_submitted":"1-7","array_indices_remaining":"7"},
        "40[1].srv":{"Job_Name":"sweep","job_state":"X","Exit_status":0,"array_id":"40[].srv","array_index":"1",
            "comment":"Job run at Tue Nov 14 at 10:00 on (n1:ncpus=1) and finished"},
        "40[2].srv":{"Job_Name":"sweep","job_state":"X","Exit_status":5,"array_id":"40[].srv","array_index":"2",
            "comment":"Job run at Tue Nov 14 at 10:00 on (n1:ncpus=1) and failed"},
        "40[3].srv":{"Job_Name":"sweep","job_state":"X","comment":"Subjob terminated","substate":91},
        "40[4].srv":{"Job_Name":"sweep","job_state":"X","comment":"Subjob finished","substate":92},
        "40[5].srv":{"Job_Name":"sweep","job_state":"X","comment":"Subjob failed","substate":93},
        "40[6].srv":{"Job_Name":"sweep","job_state":"R","array_id":"40[].srv","array_index":"6"},
        "40[7].srv":{"Job_Name":"sweep","job_state":"Q","comment":"Job Array Began at Tue Nov 14 10:00:00 2023"}
    }
}
"""


def test_pbspro_array_json_each_subjob_its_own_status():  # hand-written (see above)
    statuses = PRO.parse_status(CommandResult(["qstat", "-x", "-f", "-F", "json", "-t", "40[].srv"], 0,
                                              PBSPRO_ARRAY_JSON, ""))
    assert statuses["40[].srv"].state == JobState.RUNNING  # B: begun
    found = {i: PRO.lookup(f"40[{i}].srv", statuses) for i in range(1, 8)}
    assert (found[1].state, found[1].exit_code) == (JobState.COMPLETED, 0)
    assert (found[2].state, found[2].exit_code) == (JobState.FAILED, 5)
    assert PRO.ended_by_program(found[2])
    assert (found[3].state, found[3].reason) == (JobState.CANCELLED, "Subjob terminated")
    assert found[4].state == JobState.COMPLETED and found[4].exit_code is None
    assert (found[5].state, found[5].reason) == (JobState.FAILED, "Subjob failed")
    assert found[6].state == JobState.RUNNING and found[7].state == JobState.PENDING
    assert PRO.lookup("40[8].srv", statuses) is None


def test_exit_status_meanings():
    assert exit_status_meaning(-11, "torque")[1].startswith("JOB_EXEC_OVERLIMIT_WT")
    assert exit_status_meaning(-29, "pbspro")[1].startswith("JOB_EXEC_KILL_WALLTIME")
    assert exit_status_meaning(265, "torque")[0] == JobState.FAILED


# Recorded from Slurm 22.05's Torque qstat -f (Debian slurm-wlm-torque) on this machine.
SLURM_WRAPPER_QSTAT_F = (
    "Job Id:\t233\n\tJob_Name = probe-abc-123\n\tJob_Owner = root@localhost\n\tjob_state = C\n"
    "\tqueue = debug\n\tqtime = Sun Nov 22 03:08:47 2026\n\tmtime = Sun Nov 22 03:08:48 2026\n"
    "\tctime = Sun Nov 22 03:08:48 2026\n\texec_host = vm/1\n\tPriority = 4294901682\n\teuser = root(0)\n"
    "\tegroup = root(0)\n\tResource_List.walltime = 00:01:00\n\tResource_List.nodect = 1\n"
    "\tResource_List.ncpus = 1\n\n"
    "Job Id:\t234\n\tJob_Name = probe-abc-123\n\tJob_Owner = root@localhost\n\tjob_state = Q\n"
    "\tqueue = debug\n\tqtime = Sun Nov 22 03:08:47 2026\n\tPriority = 0\n\teuser = root(0)\n"
    "\tegroup = root(0)\n\tResource_List.walltime = 00:01:00\n\tResource_List.nodect = 1\n"
    "\tResource_List.ncpus = 1\n\n"
)


def test_slurm_torque_wrapper_qstat_f():
    s = TORQUE.parse_status(CommandResult(["qstat", "-f"], 0, SLURM_WRAPPER_QSTAT_F, ""))
    assert s["234"].state == JobState.PENDING  # held jobs too: the wrapper prints Q
    assert s["233"].state == JobState.FAILED and s["233"].reason == "no exit_status reported"
    assert TORQUE.jobs_named("probe-abc-123", SLURM_WRAPPER_QSTAT_F) == ["233", "234"]
    assert TORQUE.jobs_named("other", SLURM_WRAPPER_QSTAT_F) == []
    # nothing known: the wrapper exits 153 silently
    assert TORQUE.parse_status(CommandResult(["qstat", "-f", "9"], 153, "", "")) == {}
    assert TORQUE.find_by_name_answered(CommandResult(["qstat", "-f"], 153, "", ""))


def test_submit_argvs():
    from prefect_xm.workers.scheduler import SubmitRequest

    req = SubmitRequest(script_path="/r/x/job.sh", script="", job_name="n", run_dir="/r/x")
    assert PRO.submit_argv(req) == ["qsub", "/r/x/job.sh"]
    assert TORQUE.submit_argv(req) == ["qsub", "-o", "/r/x/job.out", "-e", "/r/x/job.err", "/r/x/job.sh"]
    assert PRO.status_argv(["1.s", "2.s"]) == ["qstat", "-x", "-f", "-F", "json", "1.s", "2.s"]
    # subjobs by their array, once, with -t
    assert PRO.status_argv(["3[1].s", "1.s", "3[2].s"]) == ["qstat", "-x", "-f", "-F", "json", "-t", "3[].s", "1.s"]
    assert TORQUE.status_argv(["1", "2"]) == ["qstat", "-f", "1", "2"]
    assert len(PRO.terminal_argvs([f"{i}.s" for i in range(500)])) <= 5 + 2 * PRO.per_id_lookups


@pytest.mark.parametrize(
    "field,value",
    [("time_limit", "ten minutes"), ("memory", "16 gigs"), ("queue", "a b"), ("account", "x\n#PBS -h")],
)
def test_malformed_variables_name_field_and_value(field, value):
    with pytest.raises(ValueError) as exc:
        PbsJobConfiguration(**{field: value})
    assert field in str(exc.value) and repr(value)[1:-1][:6] in str(exc.value)
