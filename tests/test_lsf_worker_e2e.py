"""The xm-lsf worker end to end through the fake LSF CLI (tests/fakes/lsf: no LSF can run
here), on the shared BatchWorkerSuite, plus the fake's own cleaned-job path (bjobs
forgets a finished job after CLEAN_PERIOD; bhist -l still has it)."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from batch_suite import BatchWorkerSuite, RequeueScenario, SchedulerHarness
from conftest import REPO, wait_for
from prefect_xm.workers.lsf import LsfScheduler
from prefect_xm.workers.scheduler import CommandResult, JobState, SubmitRequest

pytestmark = [pytest.mark.e2e]

FAKE_LSF = REPO / "tests" / "fakes" / "lsf"
# The fake keeps its job table here; the worker (a subprocess) inherits it. Finished jobs
# stay in `bjobs -a` for 120 s (LSF: CLEAN_PERIOD, 1 h): long enough for the suite to find
# them by name, short enough that test_cleaned_job_is_read_from_bhist has a quick variant.
os.environ.setdefault("FAKE_LSF_HOME", tempfile.mkdtemp(prefix="fake-lsf-"))
os.environ.setdefault("FAKE_LSF_CLEAN_PERIOD", "120")
# the class's 3-minute time-limit run holds a slot from its start: scenarios that run two
# jobs at once (the requeue scenario) must not wait for it
os.environ.setdefault("FAKE_LSF_SLOTS", "4")

LSF = SchedulerHarness(
    scheduler=LsfScheduler(),
    worker_type="xm-lsf",
    available=lambda: os.access(FAKE_LSF / "bsub", os.X_OK),
    how_to="the fake LSF CLI lives in tests/fakes/lsf",
    submit_command="bsub",
    status_command="bjobs",
    cancel_command="bkill",
    hold_variables={"hold": True},
    hold_reason="suspended by the user while pending",
    time_limit_variables={"time_limit": "3"},
    time_limit_word="TERM_RUNLIMIT",
    bad_queue_variables={"queue": "nosuchqueue"},
    bad_queue_error="nosuchqueue: No such queue. Job not submitted.",
    malformed_variables=[({"time_limit": "ten minutes"}, "time_limit"), ({"memory": "16 gigs"}, "memory")],
    path_prefix=[str(FAKE_LSF)],
    # one bjobs for all tracked ids, never one per job
    status_call_is_batched=lambda call: call.startswith("bjobs -a -noheader -o "),
    requeue_argv=lambda job_id: [str(FAKE_LSF / "brequeue"), job_id],
)


class TestLsfWorker(BatchWorkerSuite, RequeueScenario):
    harness = LSF


def test_cleaned_job_is_read_from_bhist(tmp_path):
    """A finished job leaves `bjobs -a` after CLEAN_PERIOD: the status query no longer
    lists it ("is not found" on stderr), and the terminal lookup (bhist -l) gives the exit
    code. Through the fake with a 15 s clean period: long enough that a poll slowed by a
    busy machine still sees the ended job listed before it is cleaned."""
    env = {**os.environ, "PATH": f"{FAKE_LSF}{os.pathsep}{os.environ['PATH']}",
           "FAKE_LSF_HOME": str(tmp_path / "lsf"), "FAKE_LSF_CLEAN_PERIOD": "15"}
    s = LsfScheduler()

    def sh(argv, stdin=None) -> CommandResult:
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env)
        return CommandResult(argv, out.returncode, out.stdout, out.stderr)

    script = f"#!/bin/bash\n#BSUB -J cleaned\n#BSUB -o {tmp_path}/out\n#BSUB -e {tmp_path}/err\nexit 7\n"
    request = SubmitRequest(str(tmp_path / "job.sh"), script, "cleaned", str(tmp_path))
    job_id = s.parse_submit(sh(s.submit_argv(request), s.submit_stdin(request)).stdout)
    ended = wait_for(lambda: (lambda st: st if st and st.state.is_final else None)(
        s.parse_status(sh(s.status_argv([job_id]))).get(job_id)), 60, what="the job to end")
    assert ended.state == JobState.FAILED and ended.exit_code == 7
    wait_for(lambda: job_id not in s.parse_status(sh(s.status_argv([job_id]))), 60, what="bjobs to forget it")
    [argv] = s.terminal_argvs([job_id])
    record = s.parse_terminal(sh(argv))[job_id]
    assert record.state == JobState.FAILED and record.exit_code == 7
