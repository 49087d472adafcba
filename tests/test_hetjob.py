"""Gangs as one heterogeneous job: the tags that make a gang, the member files the
job's script leaves, the directives taken from each member's script, and the script's
own body run by bash (its job steps started by a stand-in for srun: the real Slurm runs
it in tests/test_experiment_slurm.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from prefect_xm.gang import GangPlace, gang_place, gang_tags
from prefect_xm.workers.hetjob import GANG_STOP_FILE, MEMBER_EXIT_FILE, directives, het_script, member_end
from prefect_xm.workers.slurm import SlurmScheduler


def test_a_gang_members_tags_say_its_gang_and_place():
    tags = ["xm", "xm-kind:job", *gang_tags("wu-run-1", 1, 3)]
    assert gang_place(tags) == GangPlace("wu-run-1", 1, 3)
    assert gang_place(["xm", "xm-kind:job"]) is None


@pytest.mark.parametrize("member", ["3/3", "-1/2", "a/2", "0/1", "0/", "1"])
def test_a_place_that_makes_no_sense_is_no_gang(member):
    assert gang_place(["xm-gang:g", f"xm-gang-member:{member}"]) is None


def test_member_end_from_its_files():
    assert member_end("0\n", None) == member_end("0", "") and member_end("0", None).exit_code == 0
    assert member_end("3\n", None).exit_code == 3 and member_end("3", None).stopped_by is None
    stopped = member_end("143\n", "f2a1-run 7\n")
    assert (stopped.stopped_by, stopped.stopper_exit_code, stopped.exit_code) == ("f2a1-run", 7, 143)
    assert not member_end(None, None).known and not member_end("garbage", None).known
    assert member_end(None, "f2a1-run 7").known  # stopped before its step wrote a code


def test_directives_are_the_scheduler_lines_before_the_first_command():
    script = ("#!/bin/bash\n#SBATCH --job-name=x\n#SBATCH --mem=1G\n\n# a comment\n. /run/job.env\n"
              "#SBATCH --not-read=after-a-command\nexec prog\n")
    assert directives(script, "#SBATCH") == ["#SBATCH --job-name=x", "#SBATCH --mem=1G"]


def test_the_slurm_het_script_separates_components_and_ids_name_them():
    s = SlurmScheduler()
    script = het_script([["#SBATCH --mem=1G"], ["#SBATCH --mem=2G"]], s.het_separator, ["/r/a", "/r/b"],
                        s.het_launch)
    head = script.split("\n\n")[0].splitlines()
    assert head == ["#!/bin/bash", "#SBATCH --mem=1G", "#SBATCH hetjob", "#SBATCH --mem=2G"]
    assert '--het-group="$k"' in script and "xm_members=(/r/a /r/b)" in script
    assert s.het_component_id("123", 1) == "123+1" and s.is_het_component("123+1")
    assert not s.is_het_component("123") and not s.is_het_component("123_1") and s.het_job_of("123+1") == "123"


def _members(tmp_path: Path, programs: dict[str, str]) -> list[str]:
    dirs = []
    for name, body in programs.items():
        d = tmp_path / name
        d.mkdir()
        (d / "job.sh").write_text(f"#!/bin/bash\n{body}\n")
        dirs.append(str(d))
    return dirs


def _run(tmp_path: Path, dirs: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    # the stand-in for srun: the member's script as a plain child, output to its files
    launch = 'env XM_MEMBER="$k" >"$d/job.out" 2>"$d/job.err"'
    script = tmp_path / "het.sh"
    script.write_text(het_script([[], []], "#SBATCH hetjob", dirs, launch))
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=timeout)


def test_every_member_runs_and_leaves_its_own_exit_code(tmp_path):
    dirs = _members(tmp_path, {"a": "echo a-out; exit 0", "b": "echo b-out; sleep 1; exit 0"})
    result = _run(tmp_path, dirs)
    assert result.returncode == 0, result.stderr
    for d, name in zip(dirs, "ab"):
        assert Path(d, MEMBER_EXIT_FILE).read_text().strip() == "0"
        assert Path(d, "job.out").read_text() == f"{name}-out\n"
        assert not Path(d, GANG_STOP_FILE).exists()


def test_the_first_member_to_fail_stops_the_others_and_is_the_jobs_exit_code(tmp_path):
    started = tmp_path / "sleeper-started"
    dirs = _members(tmp_path, {
        "sleeper": f"touch {started}; exec sleep 300",
        "failer": f"while [ ! -e {started} ]; do sleep 0.1; done; exit 7",
    })
    result = _run(tmp_path, dirs)  # within its 60 s timeout: the sleeper did not run its 300 s
    assert result.returncode == 7, result.stderr
    sleeper, failer = dirs
    assert Path(failer, MEMBER_EXIT_FILE).read_text().strip() == "7"
    assert not Path(failer, GANG_STOP_FILE).exists()
    end = member_end(Path(sleeper, MEMBER_EXIT_FILE).read_text(), Path(sleeper, GANG_STOP_FILE).read_text())
    assert (end.stopped_by, end.stopper_exit_code) == (os.path.basename(failer), 7)


class _Worker:
    """Records what the gatherer asks of a worker (the submits themselves are tested on
    the real Slurm)."""

    def __init__(self):
        self.calls = []

    def spawn(self, coro):
        return asyncio.ensure_future(coro)

    async def submit_single(self, flow_run, *args):
        self.calls.append(("single", flow_run))
        return f"job-{flow_run}"

    async def submit_het_job(self, members):
        self.calls.append(("het", [m.flow_run for m in members]))
        return [f"7+{k}" for k in range(len(members))]


class _Log:
    def __init__(self):
        self.warnings = []

    def warning(self, message):
        self.warnings.append(message)


def _member(name, index, size, cluster="c"):
    from types import SimpleNamespace

    from prefect_xm.workers.hetjob import HetMember

    return HetMember(name, SimpleNamespace(cluster=cluster, ssh_block=None), f"/r/{name}", [], {}, _Log(),
                     place=GangPlace("g", index, size))


async def test_a_gang_is_submitted_once_whole_in_its_members_order():
    from prefect_xm.workers.hetjob import HetJobGatherer

    worker = _Worker()
    gatherer = HetJobGatherer(worker, max_wait=30)
    ids = await asyncio.gather(gatherer.submit(_member("b", 1, 2)), gatherer.submit(_member("a", 0, 2)))
    assert ids == ["7+1", "7+0"] and worker.calls == [("het", ["a", "b"])]


async def test_a_gang_not_complete_in_time_goes_as_separate_jobs_saying_so():
    from prefect_xm.workers.hetjob import HetJobGatherer

    worker = _Worker()
    gatherer = HetJobGatherer(worker, max_wait=0.2)
    members = [_member("a", 0, 3), _member("b", 1, 3)]
    ids = await asyncio.gather(*(gatherer.submit(m) for m in members))
    assert ids == ["job-a", "job-b"] and sorted(worker.calls) == [("single", "a"), ("single", "b")]
    assert all("only 2 of the gang's 3 members" in m.log.warnings[0] for m in members)


async def test_members_on_different_clusters_go_as_separate_jobs():
    from prefect_xm.workers.hetjob import HetJobGatherer

    worker = _Worker()
    gatherer = HetJobGatherer(worker, max_wait=30)
    await asyncio.gather(gatherer.submit(_member("a", 0, 2, "c1")), gatherer.submit(_member("b", 1, 2, "c2")))
    assert sorted(worker.calls) == [("single", "a"), ("single", "b")]


async def test_a_gang_one_member_of_which_goes_its_own_way_does_not_wait_for_it():
    """One member's job variables turn heterogeneous jobs off: the others, here already
    or still to come, go as separate jobs at once, not after the gather time."""
    from prefect_xm.workers.hetjob import HetJobGatherer

    worker = _Worker()
    gatherer = HetJobGatherer(worker, max_wait=3600)
    first = _member("a", 0, 3)
    waiting = asyncio.ensure_future(gatherer.submit(first))
    await asyncio.sleep(0)
    assert worker.calls == []  # held for its gang
    gatherer.not_coming(GangPlace("g", 1, 3))
    assert await asyncio.wait_for(waiting, 60) == "job-a"
    assert await asyncio.wait_for(gatherer.submit(_member("c", 2, 3)), 60) == "job-c"
    assert worker.calls == [("single", "a"), ("single", "c")]
    assert "member 1 of the gang goes as a job of its own" in first.log.warnings[0]
