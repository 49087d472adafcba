"""Sweeps as scheduler arrays: the per-task files and scripts on their own, the
collecting and splitting of arrays against a stand-in worker, the schedulers' array
commands; end to end on each scheduler in batch_suite.py (TestArrays*)."""

from __future__ import annotations

import asyncio
import time
import os
import subprocess
from types import SimpleNamespace

import pytest

from prefect_xm.workers.arrays import (
    TASK_EXEC,
    ArraySubmitter,
    ArrayTask,
    ArrayTooLarge,
    argv_file,
    task_env,
)
from prefect_xm.workers.run_directory import environment_file
from prefect_xm.workers.scheduler import SchedulerError, SubmitRequest
from prefect_xm.workers.sge import SgeScheduler
from prefect_xm.workers.slurm import SlurmScheduler


def _array_on_disk(tmp_path, argvs: list[list[str]], envs: list[dict]) -> str:
    array_dir = tmp_path / "array"
    array_dir.mkdir()
    dirs = []
    for i, (argv, env) in enumerate(zip(argvs, envs)):
        d = tmp_path / f"run-{i}"
        d.mkdir()
        (d / "job.argv").write_text(argv_file(argv))
        (d / "job.env").write_text(environment_file(env, str(d)))
        dirs.append(str(d))
    (array_dir / "tasks").write_text("".join(f"{d}\n" for d in dirs))
    (array_dir / "task.env").write_text(task_env(str(array_dir), "SLURM_ARRAY_TASK_ID", 1))
    (array_dir / "task-exec").write_text(TASK_EXEC)
    (array_dir / "task-exec").chmod(0o700)
    return str(array_dir)


def _run_task(array_dir: str, index: str, shell: str = "bash") -> subprocess.CompletedProcess:
    # what the rendered template does: source the env file, then exec the command
    script = f'. "{array_dir}/task.env"\nexec "{array_dir}/task-exec"\n'
    env = {"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": index}
    return subprocess.run([shell, "-c", script], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_each_task_runs_its_own_argv_and_env_and_writes_its_own_files(tmp_path, shell):
    hostile = ["$(touch /tmp/xm-pwned)", "a b", "'quoted'", "; rm -rf /", "*", "line\nbreak", ""]
    argvs = [["printf", "[%s]\\n", *hostile], ["sh", "-c", 'echo "seed=$SEED"; echo oops >&2; exit 4']]
    array_dir = _array_on_disk(tmp_path, argvs, [{"SEED": "1"}, {"SEED": "two words"}])
    first = _run_task(array_dir, "1", shell)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "run-0" / "job.out").read_text() == "".join(f"[{a}]\n" for a in hostile)
    assert not os.path.exists("/tmp/xm-pwned")
    second = _run_task(array_dir, "2", shell)
    assert second.returncode == 4
    assert (tmp_path / "run-1" / "job.out").read_text() == "seed=two words\n"
    assert (tmp_path / "run-1" / "job.err").read_text() == "oops\n"


def test_a_task_without_a_line_says_so_and_runs_nothing(tmp_path):
    array_dir = _array_on_disk(tmp_path, [["true"]], [{}])
    out = _run_task(array_dir, "7")
    assert out.returncode == 97
    assert "no task SLURM_ARRAY_TASK_ID=7" in out.stderr


def test_argv_with_nul_is_refused_naming_it():
    with pytest.raises(ValueError, match="argv:"):
        argv_file(["a\0b"])


def test_slurm_array_commands():
    s = SlurmScheduler()
    req = SubmitRequest(script_path="/r/a/job.sh", script="", job_name="x", run_dir="/r/a")
    assert s.array_submit_argv(req, 20, None) == ["sbatch", "--parsable", "--array=1-20", "/r/a/job.sh"]
    assert s.array_submit_argv(req, 20, 4)[2] == "--array=1-20%4"
    assert s.array_task_id("812", 3) == "812_3"
    assert s.array_of("812_3") == "812" and s.array_of("812_[4-9%2]") == "812" and s.array_of("812") is None
    assert s.cancel_argvs("812_3", 30)[-1] == ["scancel", "--verbose", "812_3"]
    refused = SchedulerError("sbatch: error: Batch job submission failed: Invalid job array specification")
    assert s.array_too_large(refused)
    assert not s.array_too_large(SchedulerError("sbatch: error: invalid partition specified: nope"))


def test_sge_array_commands():
    s = SgeScheduler()
    req = SubmitRequest(script_path="/r/a/job.sh", script="", job_name="x", run_dir="/r/a")
    assert s.array_submit_argv(req, 5, 2) == ["qsub", "-terse", "-V", "-t", "1-5", "-tc", "2", "/r/a/job.sh"]
    assert s.parse_array_submit("41.1-5:1\n") == "41"
    assert s.array_task_id("41", 2) == "41.2" and s.array_of("41.2") == "41" and s.array_of("41") is None
    assert s.cancel_argvs("41.2", 30) == [["qdel", "41", "-t", "2"]]
    # one qacct per array, whatever its number of tasks
    assert s.terminal_argvs(["41.1", "41.2", "42"]) == [["qacct", "-j", "41"], ["qacct", "-j", "42"]]


# ------------------------------------------------------------ collecting and splitting


class _StandInWorker:
    """The worker's side of ArraySubmitter: keys, single and array submission."""

    def __init__(self, max_array: int, arriving: int = 0):
        self.max_array = max_array
        self.arriving = arriving
        self.arrays: list[int] = []
        self.singles = 0

    def array_key(self, configuration, flow_run):
        return (configuration.array_size_limit, configuration.partition)

    def runs_on_their_way(self) -> bool:
        return self.arriving > 0

    async def submit_single(self, flow_run, configuration, run_dir, argv, env, log):
        self.singles += 1
        return f"single-{flow_run.id}"

    async def submit_array(self, tasks):
        if len(tasks) > self.max_array:
            raise ArrayTooLarge("slurm", "Invalid job array specification")
        self.arrays.append(len(tasks))
        return [f"{len(self.arrays)}_{i + 1}" for i in range(len(tasks))]


class _Log:
    def __init__(self):
        self.lines: list[str] = []

    def warning(self, message):
        self.lines.append(message)

    info = warning


def _task(i: int, partition: str = "debug", limit: int = 1000) -> ArrayTask:
    configuration = SimpleNamespace(array_size_limit=limit, partition=partition)
    return ArrayTask(SimpleNamespace(id=i), configuration, f"/runs/{i}", ["true"], {}, _Log())


def test_runs_picked_up_together_form_one_array_per_script():
    async def main():
        worker = _StandInWorker(max_array=1000)
        submitter = ArraySubmitter(worker)
        tasks = [_task(i) for i in range(6)] + [_task(10, "gpu")] + [_task(11, "long"), _task(12, "long")]
        ids = await asyncio.gather(*(submitter.submit(t) for t in tasks))
        return worker, submitter, ids

    worker, submitter, ids = asyncio.run(main())
    assert sorted(worker.arrays) == [2, 6] and worker.singles == 1 and submitter.submit_calls == 3
    assert len(set(ids)) == 9 and ids[6] == "single-10"


def test_a_refused_array_is_split_in_halves_and_the_logs_say_so():
    async def main():
        worker = _StandInWorker(max_array=3)
        submitter = ArraySubmitter(worker)
        tasks = [_task(i) for i in range(10)]
        ids = await asyncio.gather(*(submitter.submit(t) for t in tasks))
        return worker, tasks, ids

    worker, tasks, ids = asyncio.run(main())
    assert sorted(worker.arrays) == [2, 2, 3, 3] and worker.singles == 0 and len(set(ids)) == 10
    assert "refused an array of 10 tasks" in tasks[0].log.lines[0] and "at most 5" in tasks[0].log.lines[0]


def test_array_size_limit_splits_before_submitting():
    async def main():
        worker = _StandInWorker(max_array=1000)
        submitter = ArraySubmitter(worker)
        await asyncio.gather(*(submitter.submit(_task(i, limit=4)) for i in range(10)))
        return worker

    assert sorted(asyncio.run(main()).arrays) == [2, 4, 4]


def test_a_batch_waits_for_runs_still_on_their_way():
    async def main():
        worker = _StandInWorker(max_array=1000, arriving=1)
        submitter = ArraySubmitter(worker)
        first = asyncio.ensure_future(submitter.submit(_task(1)))
        await asyncio.sleep(0.3)
        assert not first.done()  # a run is still on its way: the batch stays open
        second = asyncio.ensure_future(submitter.submit(_task(2)))
        await asyncio.sleep(0)  # it has arrived...
        worker.arriving = 0  # ...and nobody else is on the way
        return await asyncio.gather(first, second), worker

    ids, worker = asyncio.run(main())
    assert worker.arrays == [2] and ids == ["1_1", "1_2"]


def test_a_run_that_never_arrives_holds_the_batch_no_longer_than_max_wait():
    async def main():
        worker = _StandInWorker(max_array=1000, arriving=1)  # forever on its way
        submitter = ArraySubmitter(worker, max_wait=0.5)
        started = time.monotonic()
        ids = await asyncio.gather(submitter.submit(_task(1)), submitter.submit(_task(2)))
        return ids, time.monotonic() - started, worker

    ids, waited, worker = asyncio.run(main())
    assert worker.arrays == [2] and ids == ["1_1", "1_2"] and waited >= 0.5


def test_a_failed_array_submission_reaches_every_task():
    class Refusing(_StandInWorker):
        async def submit_array(self, tasks):
            raise SchedulerError("sbatch: error: invalid partition specified: nope")

    async def main():
        submitter = ArraySubmitter(Refusing(1000))
        return await asyncio.gather(*(submitter.submit(_task(i)) for i in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, SchedulerError) and "invalid partition" in str(r) for r in results)
