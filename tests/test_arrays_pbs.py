"""xm-pbs array commands on their own (no scheduler): PBS Pro's `qsub -J`, subjob ids,
the one status query per poll, terminal lookups, cancels and the size refusal; and
why the Torque dialect submits every run on its own. Against the fake PBS Pro CLI:
tests/test_pbs_fake_cli.py (array cases); end to end: tests/test_pbs_worker_e2e.py."""

from __future__ import annotations

import pytest

from prefect_xm.workers.pbs import DIALECTS, PbsJobConfiguration, PbsWorker
from prefect_xm.workers.scheduler import CommandResult, JobState, SchedulerError, SubmitRequest

PRO, TORQUE = DIALECTS["pbspro"], DIALECTS["torque"]
REQUEST = SubmitRequest(script_path="/r/arr/job.sh", script="", job_name="xm-array-1", run_dir="/r/arr")


def test_submit_an_array_with_qsub_J():
    assert PRO.array_index_variable == "PBS_ARRAY_INDEX" and PRO.array_first_index == 1
    assert PRO.array_output_index == "^array_index^"
    assert PRO.array_submit_argv(REQUEST, 4, None) == ["qsub", "-J", "1-4", "/r/arr/job.sh"]
    # max_run_subjobs, as `-J X-Y%M`
    assert PRO.array_throttles
    assert PRO.array_submit_argv(REQUEST, 200, 8) == ["qsub", "-J", "1-200%8", "/r/arr/job.sh"]
    # PBS Pro refuses `-J 1-1`: one run is never an array
    with pytest.raises(ValueError, match="at least two"):
        PRO.array_submit_argv(REQUEST, 1, None)


@pytest.mark.parametrize("stdout,array", [
    ("123[].pbs01\n", "123[].pbs01"),
    ("Site banner: maintenance on Friday\n4567[].srv.example.org\n", "4567[].srv.example.org"),
    ("88[]\n", "88[]"),
])
def test_array_id_from_qsub(stdout, array):
    assert PRO.parse_array_submit(stdout) == array


def test_array_id_refused_when_unreadable():
    with pytest.raises(ValueError):
        PRO.parse_array_submit("qsub: submitted\n")


def test_subjob_ids_and_their_array():
    assert PRO.array_task_id("123[].pbs01", 4) == "123[4].pbs01"
    assert PRO.array_task_id("88[]", 12) == "88[12]"
    assert PRO.array_of("123[4].pbs01") == "123[].pbs01"
    assert PRO.array_of("88[12]") == "88[]"
    # the array itself, a plain job: not subjobs
    assert PRO.array_of("123[].pbs01") is None and PRO.array_of("123.pbs01") is None
    for index in (1, 9, 10000):
        assert PRO.array_of(PRO.array_task_id("7[].s", index)) == "7[].s"
    assert PRO.infrastructure_pid("hpc", "123[4].pbs01") == "pbs:hpc:123[4].pbs01"
    assert PRO.parse_infrastructure_pid("pbs:hpc:123[4].pbs01") == ("pbs", "hpc", "123[4].pbs01")


def test_one_status_query_names_each_array_once_with_t():
    tracked = ["5[1].s", "5[2].s", "9.s", "6[3].s", "5[4].s"]
    assert PRO.status_argv(tracked) == ["qstat", "-x", "-f", "-F", "json", "-t", "5[].s", "9.s", "6[].s"]
    assert PRO.status_argv(["9.s", "10.s"]) == ["qstat", "-x", "-f", "-F", "json", "9.s", "10.s"]


def test_terminal_lookups_batch_an_arrays_subjobs():
    tracked = [f"5[{i}].s" for i in range(1, 301)] + ["9.s"]
    argvs = PRO.terminal_argvs(tracked)
    # first the batch (every array once, with -t), then one job or one array per call,
    # then tracejob (per job or subjob, bounded)
    assert argvs[0] == ["qstat", "-x", "-f", "-F", "json", "-t", "5[].s", "9.s"]
    assert argvs[1] == ["qstat", "-x", "-f", "-F", "json", "-t", "5[].s"]
    assert argvs[2] == ["qstat", "-x", "-f", "-F", "json", "9.s"]
    tracejobs = [a for a in argvs if a[0] == "tracejob"]
    assert tracejobs[0] == ["tracejob", "-n", "3", "5[1].s"] and len(tracejobs) == PRO.per_id_lookups
    assert len(argvs) == 3 + PRO.per_id_lookups
    # a lone array: no per-array repeat of the same query
    assert PRO.terminal_argvs(["5[1].s", "5[2].s"])[:2] == [
        ["qstat", "-x", "-f", "-F", "json", "-t", "5[].s"], ["tracejob", "-n", "3", "5[1].s"]]


def test_cancel_one_subjob_or_the_whole_array():
    assert PRO.cancel_argvs("123[4].pbs01", 30) == [["qdel", "123[4].pbs01"]]
    assert PRO.cancel_argvs("123[].pbs01", 30) == [["qdel", "123[].pbs01"]]
    ended = CommandResult(["qdel", "1[3].s"], 55, "", "qdel: Request invalid for finished array subjob 1[3].s\n")
    assert PRO.parse_cancel(ended) is False  # nothing left to remove: not an error
    finished = CommandResult(["qdel", "1[].s"], 35, "", "qdel: Job has finished 1[].s\n")
    assert PRO.parse_cancel(finished) is False
    unknown = CommandResult(["qdel", "1[9].s"], 153, "", "qdel: Unknown Job Id 1[9].s\n")
    assert PRO.parse_cancel(unknown) is False
    with pytest.raises(SchedulerError, match="Unauthorized"):
        PRO.parse_cancel(CommandResult(["qdel", "1[].s"], 159, "", "qdel: Unauthorized Request  1[].s\n"))


def test_max_array_size_refusal_splits_other_refusals_do_not():
    too_large = PRO.submit_error(CommandResult(["qsub", "-J", "1-20000", "x"], 3, "",
                                               "qsub: Array job exceeds server or queue size limit\n"))
    assert not too_large.__class__.__name__.startswith("Transient") and PRO.array_too_large(too_large)
    for other in ("qsub: Unknown queue\n", "qsub: illegal -J value\n", "qsub: Job exceeds queue resource limits\n"):
        assert not PRO.array_too_large(PRO.submit_error(CommandResult(["qsub"], 2, "", other)))


def test_a_subjob_described_from_its_array_record():
    from prefect_xm.workers.pbs import job_status

    assert job_status("1[2].s", {"job_state": "X", "comment": "Subjob terminated"}).state == JobState.CANCELLED
    assert job_status("1[2].s", {"job_state": "X", "comment": "Subjob finished"}).state == JobState.COMPLETED
    assert job_status("1[2].s", {"job_state": "X", "comment": "Subjob failed"}).state == JobState.FAILED
    assert job_status("1[2].s", {"job_state": "X", "Exit_status": 3}).exit_code == 3
    # a plain job deleted before it ran is still cancelled
    assert job_status("2.s", {"job_state": "F"}).state == JobState.CANCELLED


def test_pbspro_runs_may_join_arrays_torque_runs_may_not():
    worker = PbsWorker.__new__(PbsWorker)  # may_join_array needs no pool or client
    assert worker.may_join_array(PbsJobConfiguration(dialect="pbspro"))
    assert not worker.may_join_array(PbsJobConfiguration(dialect="pbspro", array_size_limit=1))
    assert not worker.may_join_array(PbsJobConfiguration(dialect="torque"))
    assert TORQUE.array_index_variable is None


# What Slurm's Torque wrappers (slurm-wlm-torque 22.05, the only Torque here) make of an
# array, recorded on this machine with the real Slurm: `qsub -t 1-3%2 script` printed
# the bare Slurm id, and qstat lists the tasks under their own raw ids (1881, 1882 and,
# for the last task, the array's 1880), nothing naming an index; `qstat -f 1880_1` is
# unknown (rc 153, silent). The tasks saw SLURM_ARRAY_TASK_ID but no PBS_ARRAYID.
WRAPPER_QSUB_T = "1880\n"
WRAPPER_QSTAT_F = (
    "Job Id:\t1881\n\tJob_Name = xmarr\n\tJob_Owner = root@localhost\n\tjob_state = C\n\tqueue = debug\n"
    "\tqtime = Thu Dec  3 02:12:11 2026\n\tmtime = Thu Dec  3 02:12:11 2026\n\tctime = Thu Dec  3 02:12:32 2026\n"
    "\texec_host = vm/1\n\tPriority = 4294901681\n\teuser = root(0)\n\tegroup = root(0)\n"
    "\tResource_List.walltime = 71582788:15:00\n\tResource_List.nodect = 1\n\tResource_List.ncpus = 1\n\n"
    "Job Id:\t1882\n\tJob_Name = xmarr\n\tJob_Owner = root@localhost\n\tjob_state = C\n\tqueue = debug\n"
    "\tqtime = Thu Dec  3 02:12:11 2026\n\tmtime = Thu Dec  3 02:12:11 2026\n\tctime = Thu Dec  3 02:12:32 2026\n"
    "\texec_host = vm/1\n\tPriority = 4294901681\n\teuser = root(0)\n\tegroup = root(0)\n"
    "\tResource_List.walltime = 71582788:15:00\n\tResource_List.nodect = 1\n\tResource_List.ncpus = 1\n\n"
    "Job Id:\t1880\n\tJob_Name = xmarr\n\tJob_Owner = root@localhost\n\tjob_state = C\n\tqueue = debug\n"
    "\tqtime = Thu Dec  3 02:12:11 2026\n\tmtime = Thu Dec  3 02:12:32 2026\n\tctime = Thu Dec  3 02:12:52 2026\n"
    "\texec_host = vm/1\n\tPriority = 4294901681\n\teuser = root(0)\n\tegroup = root(0)\n"
    "\tResource_List.walltime = 71582788:15:00\n\tResource_List.nodect = 1\n\tResource_List.ncpus = 1\n\n"
)


def test_slurm_torque_wrappers_cannot_tell_one_task_from_another():
    """Why TorqueScheduler keeps every run its own job: nothing in the wrappers' answers
    says which task is which, so neither a task's status nor its own cancel exists."""
    assert TORQUE.parse_submit(WRAPPER_QSUB_T) == "1880"  # no `[]`: not an array id
    statuses = TORQUE.parse_status(CommandResult(["qstat", "-f"], 0, WRAPPER_QSTAT_F, ""))
    assert sorted(statuses) == ["1880", "1881", "1882"]
    records = WRAPPER_QSTAT_F.split("\n\n")
    assert not any("array" in r.lower() or "[" in r for r in records)
    assert {line for r in records for line in r.splitlines() if "Job_Name" in line} == {"\tJob_Name = xmarr"}
