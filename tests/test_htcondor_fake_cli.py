"""condor_hold through the fake HTCondor CLI (tests/fakes/htcondor), driven with the
HTCondor Scheduler's own argv builders and parsers, as the worker's poller would see it:

- a job held by the user while it RUNS has been hard-killed by HTCondor (a release would
  start it again from scratch), so the status query says final, with the HoldReason;
- a job held by the user before it ever started stays pending, with the HoldReason.

No Prefect server: each test has its own FAKE_CONDOR_HOME and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, wait_for
from prefect_xm.workers.htcondor import HTCondorJobConfiguration, HTCondorScheduler
from prefect_xm.workers.scheduler import CommandResult, JobState, JobStatus, SubmitRequest

FAKE_CONDOR = REPO / "tests" / "fakes" / "htcondor"
DEADLINE = 120.0  # generous: the machine may be busy


class FakeCondor:
    def __init__(self, home: Path, tmp: Path):
        self.home = home
        self.tmp = tmp
        self.scheduler = HTCondorScheduler()

    def run(self, argv, stdin=None) -> CommandResult:
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
        return CommandResult(argv, out.returncode, out.stdout, out.stderr)

    def submit(self, name: str, body: str) -> str:
        """condor_submit the way the worker does (submit_argv, the description on stdin)."""
        run_dir = self.tmp / name
        run_dir.mkdir()
        script = run_dir / "job.sh"
        script.write_text("#!/bin/bash\n" + body + "\n")
        script.chmod(0o755)
        request = SubmitRequest(str(script), script.read_text(), name, str(run_dir),
                                HTCondorJobConfiguration().model_dump(exclude={"env"}))
        result = self.run(self.scheduler.submit_argv(request), self.scheduler.submit_stdin(request))
        assert result.ok, result
        return self.scheduler.parse_submit(result.stdout)

    def status(self, job_id: str) -> JobStatus | None:
        result = self.run(self.scheduler.status_argv([job_id]))
        return self.scheduler.parse_status(result).get(job_id)

    def ad(self, job_id: str) -> dict:
        result = self.run(["condor_q", job_id, "-json"])
        assert result.ok, result
        [ad] = json.loads(result.stdout)
        return ad

    def processes(self) -> list[int]:
        """Live processes of this fake home: starters, and the job scripts (getenv = True
        gives them the submitter's environment)."""
        marker = f"FAKE_CONDOR_HOME={self.home}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
        return found

    def remove_all(self) -> None:
        for job_id in self.scheduler.parse_find_by_name(self.run(["condor_q", "-af:j", "JobStatus"]).stdout):
            self.run(self.scheduler.cancel_argvs(job_id, 0)[-1])
        wait_for(lambda: not self.run(["condor_q", "-af:j", "JobStatus"]).stdout.strip(), DEADLINE,
                 what="the fake queue to empty")
        wait_for(lambda: not self.processes(), DEADLINE, what="no process of the fake left")


@pytest.fixture
def condor(tmp_path, monkeypatch):
    home = tmp_path / "condor"
    monkeypatch.setenv("FAKE_CONDOR_HOME", str(home))
    monkeypatch.setenv("FAKE_CONDOR_KILL_TIMEOUT", "1")
    monkeypatch.setenv("PATH", f"{FAKE_CONDOR}{os.pathsep}{os.environ['PATH']}")
    fake = FakeCondor(home, tmp_path)
    yield fake
    fake.remove_all()


def test_condor_hold_of_a_running_job_is_final_with_the_hold_reason(condor):
    # the job ignores SIGTERM: only the SIGKILL that follows can end it
    job_id = condor.submit("held-running", "trap '' TERM\necho $$ > \"$(dirname \"$0\")/job.pid\"\n"
                                           "while true; do sleep 0.2; done")
    pid_file = condor.tmp / "held-running" / "job.pid"
    wait_for(lambda: (s := condor.status(job_id)) and s.state == JobState.RUNNING and pid_file.exists(),
             DEADLINE, what="the job to run")
    pgid = int(pid_file.read_text())
    assert pgid in condor.processes()  # the leftover check below does see the job's processes

    held = condor.run(["condor_hold", job_id])
    assert held.ok and held.stdout == f"Job {job_id} held\n", held

    status = condor.status(job_id)
    assert status.state == JobState.FAILED and status.state.is_final
    assert status.native_state == "HELD" and "condor_hold" in status.reason
    assert "condor_hold" in status.describe()

    # the job's processes are killed (SIGTERM, then SIGKILL), and the job stays held
    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, DEADLINE, what="the held job's processes to be killed")
    wait_for(lambda: "Job was held." in (condor.tmp / "held-running" / "job.log").read_text(), DEADLINE,
             what="the hold event in the job's event log")
    ad = condor.ad(job_id)
    assert ad["JobStatus"] == 5 and ad["HoldReasonCode"] == 1 and ad["NumJobStarts"] == 1
    assert ad["HoldReason"].startswith("via condor_hold (by user ")
    again = condor.status(job_id)
    assert again.state == JobState.FAILED and again.reason == ad["HoldReason"]
    log = (condor.tmp / "held-running" / "job.log").read_text()
    assert log.index("Job was evicted.") < log.index("Job was held.") and "Code 1 Subcode 0" in log

    # condor_hold of a held job is refused, as HTCondor does
    twice = condor.run(["condor_hold", job_id])
    assert twice.returncode == 1 and twice.stderr == f"Job {job_id} already held\n"

    # the worker's cancel removes it, and nothing of the fake is left running
    assert condor.scheduler.parse_cancel(condor.run(condor.scheduler.cancel_argvs(job_id, 0)[-1])) is True
    wait_for(lambda: condor.status(job_id) is None, DEADLINE, what="the job to leave condor_q")
    wait_for(lambda: not condor.processes(), DEADLINE, what="no process of the fake left")


def test_condor_hold_of_a_job_that_never_started_stays_pending(condor, monkeypatch):
    monkeypatch.setenv("FAKE_CONDOR_SLOTS", "1")
    busy = condor.submit("busy", "sleep 300")
    wait_for(lambda: (s := condor.status(busy)) and s.state == JobState.RUNNING, DEADLINE,
             what="the first job to take the only slot")
    waiting = condor.submit("waiting", "exit 0")
    assert condor.status(waiting).state == JobState.PENDING

    held = condor.run(["condor_hold", waiting])
    assert held.ok, held
    status = condor.status(waiting)
    assert status.state == JobState.PENDING and not status.state.is_final
    assert status.native_state == "HELD" and "condor_hold" in status.reason
    ad = condor.ad(waiting)
    assert ad["HoldReasonCode"] == 1 and ad["NumJobStarts"] == 0 and "JobStartDate" not in ad
