"""SGE parsers on verbatim outputs (tests/data/vectors/sge.json, every vector) and on
outputs recorded from the real SGE 8.1.9 here (tests/data/sge/, see its README)."""

from __future__ import annotations

import json

import pytest

from prefect_xm.workers.scheduler import CommandResult, JobState, SchedulerError, TransientSchedulerError
from prefect_xm.workers.sge import (
    SgeJobConfiguration,
    SgeScheduler,
    combine_tasks,
    expand_tasks,
    in_error_state,
    parse_qacct,
    parse_qacct_records,
    parse_qstat_j_errors,
    parse_qstat_names,
    parse_qstat_xml,
    parse_qsub,
    state_of,
)

from conftest import REPO, VECTORS
from other_formats import parse_sge_qstat_table

VEC = {v["id"]: v for v in json.loads((VECTORS / "sge.json").read_text())["vectors"]}
DATA = REPO / "tests" / "data" / "sge"
S = SgeScheduler()


def result(vector_id: str, argv) -> CommandResult:
    v = VEC[vector_id]
    return CommandResult(list(argv), v["returncode"] or 0, v["output"], v["stderr"] or "")


def test_every_vector_is_covered():
    covered = {f"sge-{i:03d}" for i in range(1, 19)}
    assert set(VEC) == covered


# -- submit ---------------------------------------------------------------------


@pytest.mark.parametrize("vid", ["sge-001", "sge-002", "sge-003"])
def test_qsub_job_id(vid):
    assert parse_qsub(VEC[vid]["output"]) == VEC[vid]["facts"]["job_id"]


def test_qsub_terse_array_and_banners():  # hand-written cases
    assert parse_qsub("1234.1-3:1\n") == "1234"
    assert parse_qsub("Welcome to the cluster\nquota: 12 h left\n77\n") == "77"
    with pytest.raises(ValueError, match="no job id"):
        parse_qsub("Welcome!\n")


def test_array_ids_of_the_vector_expand():
    facts = VEC["sge-002"]["facts"]
    first, last, step = (facts["array_tasks"][k] for k in ("first", "last", "step"))
    tasks = expand_tasks(f"{first}-{last}:{step}")
    assert [f"{facts['job_id']}.{t}" for t in tasks] == facts["source_asserts"]


def test_qsub_rejection_is_verbatim_and_not_retried():
    err = S.submit_error(result("sge-014", ["qsub"]))
    assert not isinstance(err, TransientSchedulerError)
    assert str(err) == VEC["sge-014"]["stderr"].strip()
    # hand-written: qmaster down
    down = CommandResult(["qsub"], 1, "", "error: commlib error: got select error (Connection refused)\n"
                         "Unable to run job: unable to contact qmaster using port 6444 on host \"vm\"\nExiting.\n")
    assert isinstance(S.submit_error(down), TransientSchedulerError)


# -- status -----------------------------------------------------------------------


@pytest.mark.parametrize("vid", ["sge-004", "sge-005"])
def test_qstat_xml_states(vid):
    v = VEC[vid]
    statuses = S.parse_status(result(vid, ["qstat", "-xml"]))
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]


def test_qstat_xml_sections_and_mapping():
    statuses = parse_qstat_xml(VEC["sge-004"]["output"])
    assert statuses["1212299"].state == JobState.RUNNING  # under queue_info
    assert statuses["1212263"].state == JobState.PENDING  # under job_info
    held = statuses["1212322"]
    assert (held.state, held.reason) == (JobState.PENDING, "hold")
    assert "hqw" in held.describe()


def test_qstat_xml_eqw_is_an_error_state():
    v = VEC["sge-005"]
    statuses = parse_qstat_xml(v["output"])
    for job_id in v["facts"]["error_state_jobs"]:
        assert statuses[job_id].state == JobState.FAILED
        assert in_error_state(statuses[job_id].native_state)
    assert statuses["2836046"].state == JobState.PENDING


def test_qstat_xml_array_tasks():
    v = VEC["sge-006"]
    statuses = parse_qstat_xml(v["output"])
    expected = {k: ("r" if s == "running" else "qw") for k, s in v["facts"]["source_asserts"].items()}
    assert {k: s.native_state for k, s in statuses.items()} == expected
    assert S.lookup("9830420", statuses).state == JobState.RUNNING
    assert S.lookup("9830421", statuses).state == JobState.PENDING


def test_qstat_xml_recorded_here():
    text = (DATA / "qstat_xml_running_pending_held_eqw_array.xml").read_text()
    statuses = parse_qstat_xml(text)
    assert {k: s.native_state for k, s in statuses.items()} == {
        "2": "r", "4": "Eqw", "5.1": "qw", "5.2": "qw", "5.3": "qw", "6": "qw", "3": "hqw",
    }
    assert S.lookup("5", statuses).state == JobState.PENDING
    assert S.lookup("4", statuses).state == JobState.FAILED
    assert S.lookup("7", statuses) is None  # left the queue: look up qacct, never "done"
    assert parse_qstat_names(text)["3"] == "held"


@pytest.mark.parametrize("vid", ["sge-007", "sge-008", "sge-009", "sge-010", "sge-011"])
def test_qstat_table_states(vid):
    v = VEC[vid]
    statuses = parse_sge_qstat_table(v["output"])
    assert {k: s.native_state for k, s in statuses.items()} == v["facts"]["states"]


def test_state_codes_in_the_common_model():
    facts = VEC["sge-008"]["facts"]["states"]
    mapped = {code: state_of(code) for code in facts.values()}
    assert mapped["r"] == mapped["t"] == mapped["R"] == mapped["Tr"] == JobState.RUNNING
    assert mapped["s"] == mapped["S"] == mapped["T"] == JobState.RUNNING  # suspended: started
    assert mapped["qw"] == mapped["hqw"] == mapped["h"] == mapped["w"] == JobState.PENDING
    assert mapped["Eqw"] == mapped["E"] == JobState.FAILED
    assert state_of("hr") == JobState.RUNNING  # sge-007
    assert state_of("dr") == state_of("dt") == JobState.CANCELLED  # hand-written: qdel'd
    assert state_of("hRwq") == JobState.PENDING


def test_status_query_is_one_command_whatever_the_number_of_jobs():
    assert S.status_argv([str(i) for i in range(500)]) == S.status_argv(["1"]) == ["qstat", "-xml"]


def test_failing_or_garbled_qstat_is_transient_or_an_error():
    down = CommandResult(["qstat"], 1, "", "error: commlib error: got select error (Connection refused)\n")
    with pytest.raises(TransientSchedulerError):
        S.parse_status(down)
    with pytest.raises(TransientSchedulerError):
        S.parse_status(CommandResult(["qstat"], 0, "<?xml version='1.0'?>\n<job_info><queue", ""))
    with pytest.raises(SchedulerError):
        S.parse_status(CommandResult(["qstat"], 1, "", "error: no permission\n"))


# -- terminal records -----------------------------------------------------------


def test_qacct_success():
    v = VEC["sge-012"]
    st = S.parse_terminal(result("sge-012", ["qacct", "-j", "123"]))[v["facts"]["job_id"]]
    assert (st.state, st.exit_code) == (JobState.COMPLETED, v["facts"]["exit_status"])


def test_qacct_not_yet_written_means_unknown():
    assert S.parse_terminal(result("sge-013", ["qacct", "-j", "123"])) == {}


def test_qacct_several_records_with_task_ids_and_summary_table():
    v = VEC["sge-018"]
    records = parse_qacct_records(v["output"])
    assert [(r["jobnumber"], r["taskid"]) for r in records] == [
        (r["jobnumber"], r["taskid"]) for r in v["facts"]["records"]
    ]
    statuses = parse_qacct(v["output"])
    assert set(statuses) == {"3871", "5338.18"}
    assert all(s.state == JobState.COMPLETED for s in statuses.values())
    assert combine_tasks("5338", statuses).state == JobState.COMPLETED


def test_qacct_h_rt_kill_names_the_wall_clock_limit():
    st = parse_qacct((DATA / "qacct_h_rt_qmaster_enforced.txt").read_text())["8"]
    assert st.state == JobState.FAILED
    assert (st.exit_code, st.signal) == (137, 9)
    assert "h_rt" in st.describe() and "wall-clock limit" in st.describe()
    assert "qmaster enforced" in st.reason


def test_qacct_h_rt_kill_by_execd():  # hand-written from the recorded file: execd's "failed 100"
    text = (DATA / "qacct_h_rt_qmaster_enforced.txt").read_text()
    text = text.replace("failed       37  : qmaster enforced h_rt, h_cpu, or h_vmem limit",
                        "failed       100 : assumedly after job")
    assert "failed       100" in text
    st = parse_qacct(text)["8"]
    assert "wall-clock limit (h_rt=3)" in st.reason


def test_qacct_qdel_of_a_running_job_is_not_a_time_limit():
    st = parse_qacct((DATA / "qacct_qdel_running.txt").read_text())["9"]
    assert (st.state, st.exit_code, st.signal) == (JobState.FAILED, 137, 9)
    assert "failed 100" in st.reason and "h_rt" not in st.reason


def test_qacct_non_zero_exit():
    st = parse_qacct((DATA / "qacct_exit_1.txt").read_text())["10"]
    assert (st.state, st.exit_code, st.reason) == (JobState.FAILED, 1, "")
    assert "exit code 1" in st.describe()


def test_eqw_reason_from_qstat_j_only_for_jobs_in_error():
    live = parse_qstat_xml((DATA / "qstat_xml_running_pending_held_eqw_array.xml").read_text())
    argvs = S.terminal_argvs_for(["4", "7", "8"], live)
    assert argvs == [["qstat", "-j", "4"], ["qacct", "-j", "7"], ["qacct", "-j", "8"]]
    r = CommandResult(["qstat", "-j", "4"], 0, (DATA / "qstat_j_eqw.txt").read_text(), "")
    st = S.parse_terminal(r)["4"]
    assert st.state == JobState.FAILED and st.native_state == "Eqw"
    assert st.reason == "error: can't chdir to /nonexistent/dir: No such file or directory"
    assert S.cleanup_argvs(st) == [["qdel", "4"]]
    # a job that left the queue meanwhile: unknown, not an error
    gone = CommandResult(["qstat", "-j", "4"], 1, "", "Following jobs do not exist: \n4\n")
    assert S.parse_terminal(gone) == {}
    assert parse_qstat_j_errors("job_number: 5\nscheduling info: queue full\n") == {}


def test_only_error_states_are_cleaned_up():
    for st in parse_qacct((DATA / "qacct_exit_1.txt").read_text()).values():
        assert S.cleanup_argvs(st) == []
    for st in parse_qstat_xml(VEC["sge-005"]["output"]).values():
        assert bool(S.cleanup_argvs(st)) == (st.native_state == "Eqw")


# -- find by name, cancel ----------------------------------------------------------


def test_find_by_name_filters_a_listing_by_name():
    text = (DATA / "qstat_xml_running_pending_held_eqw_array.xml").read_text()
    assert S.jobs_named("held", text) == ["3"]
    assert S.jobs_named("s.sh", text) == ["2", "5", "6"]
    assert S.jobs_named("nope", text) == []
    assert "-s" in S.find_by_name_argv("x") and "prsz" in S.find_by_name_argv("x")


def test_qdel_outcomes():
    assert S.parse_cancel(result("sge-015", ["qdel", "123"])) is True
    assert S.parse_cancel(result("sge-016", ["qdel", "123"])) is False
    with pytest.raises(SchedulerError, match="necessary privileges"):
        S.parse_cancel(result("sge-017", ["qdel", "123"]))
    assert S.cancel_argvs("123", 30) == [["qdel", "123"]]


def test_infrastructure_pid_round_trip():
    pid = S.infrastructure_pid("grid", "1234")
    assert pid == "sge:grid:1234"
    assert S.parse_infrastructure_pid(pid) == ("sge", "grid", "1234")


# -- job variables ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("time_limit", "ten minutes"), ("time_limit", "1-00:00:00"), ("memory", "16 gigs"),
     ("queue", "all.q\n#$ -l x=1"), ("parallel_environment", "smp 4"), ("slots", 0)],
)
def test_malformed_variables_name_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SgeJobConfiguration(**{field: value})
    assert field in str(info.value) and repr(value).strip("'") in str(info.value)


def test_well_formed_variables():
    c = SgeJobConfiguration(time_limit="1:00:00", memory="4G", queue="all.q", slots=4, gpus=1)
    assert (c.time_limit, c.memory, c.parallel_environment, c.gpu_resource) == ("1:00:00", "4G", "smp", "gpu")
    assert SgeJobConfiguration(time_limit="600").time_limit == "600"


def test_a_rescheduled_attempts_record_is_not_the_jobs_end():
    # qacct -j after `qmod -rj` (real SGE 8.1.9 on Debian 12): the first attempt's record
    # says "failed 25 : rescheduling"; the job's end is the record of its last attempt
    first = ("==============================================================\n"
             "qname        all.q\nhostname     vm\njobname      job\njobnumber    37\n"
             "taskid       undefined\nfailed       25  : rescheduling\nexit_status  0\n")
    last = ("==============================================================\n"
            "qname        all.q\nhostname     vm\njobname      job\njobnumber    37\n"
            "taskid       undefined\nfailed       0\nexit_status  0\n")
    assert parse_qacct(first) == {}
    assert parse_qacct(first + last)["37"].state == JobState.COMPLETED
