"""HTCondor arrays, command by command: an array is one cluster of N procs (`queue N`),
task k is `<cluster>.<k>`; its description differs from a single job's only in the queue
count, the index variable in `environment`, the array's own output paths and the
throttle (max_materialize). Through the fake CLI in test_htcondor_fake_cli.py, end to end
in test_htcondor_worker_e2e.py (batch_suite's array scenarios)."""

from __future__ import annotations

import subprocess
import uuid
from types import SimpleNamespace

import pytest

from prefect_xm.workers.arrays import TASK_EXEC, argv_file, task_env
from prefect_xm.workers.run_directory import environment_file
from prefect_xm.workers.htcondor import (
    HTCondorJobConfiguration,
    HTCondorScheduler,
    HTCondorWorker,
    LiveStatuses,
    parse_condor_submit_cluster,
    parse_live_ads,
    with_environment,
)
from prefect_xm.workers.scheduler import CommandResult, JobState, JobStatus, SchedulerError, SubmitRequest

REFUSED = "\nERROR: Failed to create proc\nNumber of submitted jobs would exceed MAX_JOBS_PER_SUBMISSION\n"


def request(name: str = "xm-array-1", run_dir: str = "/r/a", size: int = 0, throttle=None, **variables) -> SubmitRequest:
    """As the worker builds it: an array's request carries its size and throttle."""
    config = HTCondorJobConfiguration(**variables)
    return SubmitRequest(f"{run_dir}/job.sh", "#!/bin/bash\n", name, run_dir, config.model_dump(exclude={"env"}),
                         array_size=size, array_throttle=throttle)


def test_the_array_is_the_single_jobs_submission_but_for_queue_index_and_outputs():
    s = HTCondorScheduler()
    single = s.submit_stdin(request("xm-single"))
    req = request(name="xm-array-2", size=5)
    argv = s.array_submit_argv(req, 5, None)
    assert argv == s.submit_argv(req) == ["condor_submit", "-terse", "-batch-name", "xm-array-2"]
    array = s.submit_stdin(req)
    only_single = set(single.splitlines()) - set(array.splitlines())
    only_array = set(array.splitlines()) - set(single.splitlines())
    assert only_single == {"output = /r/a/job.out", "error = /r/a/job.err", "queue 1", "batch_name = xm-single"}
    assert only_array == {"output = /r/a/task-$(Process).out", "error = /r/a/task-$(Process).err", "queue 5",
                          'environment = "XM_ARRAY_INDEX=$(Process)"', "batch_name = xm-array-2"}
    lines = array.splitlines()
    assert lines[-1] == "queue 5" and any(line.startswith("leave_in_queue = ") for line in lines)
    # the single job's description is what it was
    assert s.submit_stdin(request("xm-single")) == single


def test_throttle_is_max_materialize_and_such_an_array_keeps_no_completed_jobs():
    s = HTCondorScheduler()
    req = request(name="xm-array-3", size=40, throttle=4, hold=True, request_memory="2GB")
    s.array_submit_argv(req, 40, 4)
    lines = s.submit_stdin(req).splitlines()
    assert "max_materialize = 4" in lines and "queue 40" in lines
    assert not any(line.startswith(("leave_in_queue", "max_idle")) for line in lines)
    assert "hold = True" in lines and "request_memory = 2GB" in lines
    assert s.array_throttles


@pytest.mark.parametrize("extra,expected", [
    ([], 'environment = "XM_ARRAY_INDEX=$(Process)"'),
    (['environment = "A=1 B=\'x y\'"'], 'environment = "A=1 B=\'x y\' XM_ARRAY_INDEX=$(Process)"'),
    (['Environment="A=1"'], 'environment = "A=1 XM_ARRAY_INDEX=$(Process)"'),
    (["environment = A=1;B=2"], "environment = A=1;B=2;XM_ARRAY_INDEX=$(Process)"),
    (['environment = ""'], 'environment = "XM_ARRAY_INDEX=$(Process)"'),
])
def test_the_index_variable_joins_the_environment_in_its_syntax(extra, expected):
    lines = with_environment(["rank = Memory", *extra], "XM_ARRAY_INDEX", "$(Process)")
    assert lines[0] == "rank = Memory"
    assert [line for line in lines if line.lower().lstrip().startswith("environment")] == [expected]


def test_only_the_last_environment_line_counts_and_gets_the_index():
    lines = with_environment(['environment = "A=1"', "rank = Memory", 'environment = "B=2"'], "XM_ARRAY_INDEX", "$(Process)")
    assert lines == ['environment = "A=1"', "rank = Memory", 'environment = "B=2 XM_ARRAY_INDEX=$(Process)"']
    s = HTCondorScheduler()
    req = request(name="xm-array-4", size=2, extra_directives=['environment = "SEED=1"'])
    s.array_submit_argv(req, 2, None)
    assert 'environment = "SEED=1 XM_ARRAY_INDEX=$(Process)"' in s.submit_stdin(req).splitlines()


def test_ids_of_an_array():
    s = HTCondorScheduler()
    assert s.array_index_variable == "XM_ARRAY_INDEX" and s.array_first_index == 0
    assert s.array_output_index == "$(Process)"
    assert parse_condor_submit_cluster("123.0 - 123.4\n") == "123" == s.parse_array_submit("123.0 - 123.4")
    assert s.parse_array_submit("Submitting job(s).....\n5 job(s) submitted to cluster 123.\n") == "123"
    with pytest.raises(ValueError):
        s.parse_array_submit("WARNING: something\n")
    assert s.array_task_id("123", 0) == "123.0" and s.array_task_id("123", 4) == "123.4"
    assert s.array_of("123.4") == "123" and s.array_of("123") is None and s.array_of("x.1") is None
    assert s.cancel_argvs("123.4", 30) == [["condor_rm", "123.4"]]
    assert s.cancel_argvs("123", 30) == [["condor_rm", "123"]]


def test_removing_a_whole_cluster():
    s = HTCondorScheduler()

    def rm(rc, out, err=""):
        return s.parse_cancel(CommandResult(["condor_rm", "123"], rc, out, err))

    assert rm(0, "All jobs in cluster 123 have been marked for removal\n") is True
    assert rm(0, "Cluster 123 has been marked for removal.\n") is True  # older releases
    assert rm(1, "", "Couldn't find/remove all jobs in cluster 123.\n") is False
    with pytest.raises(SchedulerError, match="Permission denied"):
        rm(1, "", "AUTHENTICATE:1004:Permission denied\nCouldn't find/remove all jobs in cluster 123.\n")


def test_a_refusal_for_the_number_of_jobs_is_too_large_others_are_not():
    s = HTCondorScheduler()
    error = s.submit_error(CommandResult(["condor_submit"], 1, "", REFUSED))
    assert s.array_too_large(error) and "MAX_JOBS_PER_SUBMISSION" in str(error)
    for text in ("Number of submitted jobs would exceed MAX_JOBS_SUBMITTED",
                 "Number of submitted jobs would exceed MAX_JOBS_PER_OWNER",
                 "ERROR: number of procs exceeds SUBMIT_MAX_PROCS_IN_CLUSTER"):
        assert s.array_too_large(SchedulerError(text)), text
    assert not s.array_too_large(SchedulerError("ERROR: I don't know about the 'x' universe."))
    assert not s.array_too_large(s.submit_error(CommandResult(["condor_submit"], 1, "", "ERROR: Executable file /x does not exist")))


def test_a_task_not_materialized_yet_is_pending_one_that_left_is_looked_up():
    s = HTCondorScheduler()
    text = ('[{"ClusterId": 7, "ProcId": 2, "JobStatus": 2, "JobMaterializeNextProcId": 4},'
            ' {"ClusterId": 7, "ProcId": 3, "JobStatus": 1, "JobMaterializeNextProcId": 4},'
            ' {"ClusterId": 8, "ProcId": 0, "JobStatus": 1}]')
    statuses = s.parse_status(CommandResult(s.status_argv(["7.1"]), 0, text, ""))
    assert isinstance(statuses, LiveStatuses) and statuses.next_proc == {"7": 4}
    assert s.lookup("7.2", statuses).state == JobState.RUNNING
    waiting = s.lookup("7.5", statuses)
    assert waiting.state == JobState.PENDING and "materialized" in waiting.describe()
    assert s.lookup("7.1", statuses) is None  # materialized, left the queue: its record
    assert s.lookup("8.1", statuses) is None and s.lookup("9.0", statuses) is None
    # condor_history's records never say 'pending'
    assert s.lookup("7.5", {"7.2": JobStatus("7.2", JobState.COMPLETED)}) is None
    assert "JobMaterializeNextProcId" in s.status_argv(["7.1"])[-1]
    assert parse_live_ads("") == {} and parse_live_ads("").next_proc == {}


def test_terminal_lookups_of_many_tasks_are_batched():
    s = HTCondorScheduler()
    argvs = s.terminal_argvs([f"41.{i}" for i in range(120)])
    assert [a[0] for a in argvs] == ["condor_history"] * 3 and "41.119" in argvs[-1]


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_a_task_finds_its_run_by_its_proc_id(tmp_path, shell):
    dirs = []
    for i in range(2):
        d = tmp_path / f"run-{i}"
        d.mkdir()
        (d / "job.argv").write_text(argv_file(["sh", "-c", 'echo "seed=$SEED"', "x"]))
        (d / "job.env").write_text(environment_file({"SEED": str(10 + i)}, str(d)))
        dirs.append(str(d))
    (tmp_path / "tasks").write_text("".join(f"{d}\n" for d in dirs))
    s = HTCondorScheduler()
    (tmp_path / "task.env").write_text(task_env(str(tmp_path), s.array_index_variable, s.array_first_index))
    (tmp_path / "task-exec").write_text(TASK_EXEC)
    (tmp_path / "task-exec").chmod(0o700)
    for proc in (0, 1):
        script = f'. "{tmp_path}/task.env"\nexec "{tmp_path}/task-exec"\n'
        out = subprocess.run([shell, "-c", script], env={"PATH": "/usr/bin:/bin", "XM_ARRAY_INDEX": str(proc)},
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / f"run-{proc}" / "job.out").read_text() == f"seed={10 + proc}\n"


def test_runs_whose_descriptions_differ_go_in_different_arrays():
    """Resources are in the description, not in the batch script: runs asking for other
    memory or a hold must not share an array."""
    worker = HTCondorWorker(work_pool_name="render-only")
    flow_run = SimpleNamespace(id=uuid.UUID(int=7), name="brave-fox")

    def key(**variables):
        return worker.array_key(HTCondorJobConfiguration(command="python -m x", **variables), flow_run)

    assert key(request_memory="2GB") == key(request_memory="2GB")
    assert key(request_memory="2GB") != key(request_memory="4GB")
    assert key() != key(hold=True)
    assert key() != key(array_throttle=3)
