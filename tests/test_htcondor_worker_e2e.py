"""The xm-htcondor worker end to end through the fake HTCondor CLI (tests/fakes/htcondor:
no HTCondor daemons can run here), on the shared BatchWorkerSuite, plus the history path
(a completed job leaves condor_q; condor_history still has it)."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from batch_suite import BatchWorkerSuite, RequeueScenario, SchedulerHarness
from conftest import REPO, wait_for
from prefect_xm.workers.htcondor import HTCondorJobConfiguration, HTCondorScheduler
from prefect_xm.workers.scheduler import CommandResult, JobState, SubmitRequest

pytestmark = [pytest.mark.e2e]

FAKE_CONDOR = REPO / "tests" / "fakes" / "htcondor"
# The fake keeps its queue and history here; the worker (a subprocess) inherits it.
os.environ.setdefault("FAKE_CONDOR_HOME", tempfile.mkdtemp(prefix="fake-condor-"))
# the class's time-limit run holds a slot from its start: scenarios that run two jobs at
# once (the requeue scenario) must not wait for it
os.environ.setdefault("FAKE_CONDOR_SLOTS", "4")

HTCONDOR = SchedulerHarness(
    scheduler=HTCondorScheduler(),
    worker_type="xm-htcondor",
    available=lambda: os.access(FAKE_CONDOR / "condor_submit", os.X_OK),
    how_to="the fake HTCondor CLI lives in tests/fakes/htcondor",
    submit_command="condor_submit",
    status_command="condor_q",
    cancel_command="condor_rm",
    hold_variables={"hold": True},
    hold_reason="submitted on hold at user's request",
    time_limit_variables={"time_limit": "3"},
    time_limit_word="exceeded allowed execute duration",
    # HTCondor has no queues to name: the closest refusal is condor_submit's own
    bad_queue_variables={"universe": "nosuchuniverse"},
    bad_queue_error="I don't know about the 'nosuchuniverse' universe.",
    malformed_variables=[({"time_limit": "ten minutes"}, "time_limit"), ({"request_memory": "16 gigs"}, "request_memory")],
    path_prefix=[str(FAKE_CONDOR)],
    # one condor_q -json for all tracked ids, never one per job
    status_call_is_batched=lambda call: " -json " in call and "-constraint" not in call,
    # an eviction (a preempting owner, a draining machine) sends the job back to idle
    requeue_argv=lambda job_id: [str(FAKE_CONDOR / "condor_vacate_job"), job_id],
    # with getenv = True, the ad's Environment is the worker's environment
    job_record_argv=lambda job_id: ["condor_q", "-json", job_id],
    job_record_shows_environment=True,
)


class TestHTCondorWorker(BatchWorkerSuite, RequeueScenario):
    harness = HTCONDOR


class NoRetention(HTCondorScheduler):
    keep_completed = 0


def test_completed_job_is_read_from_condor_history(tmp_path):
    """Without leave_in_queue a completed job leaves condor_q within seconds: the status
    query no longer lists it, condor_history has its exit code. Through the fake."""
    env = {**os.environ, "PATH": f"{FAKE_CONDOR}{os.pathsep}{os.environ['PATH']}",
           "FAKE_CONDOR_HOME": str(tmp_path / "condor"), "FAKE_CONDOR_LINGER": "1"}
    s = NoRetention()

    def sh(argv, stdin=None) -> CommandResult:
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env)
        return CommandResult(argv, out.returncode, out.stdout, out.stderr)

    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\necho bye >&2\nexit 7\n")
    script.chmod(0o755)
    request = SubmitRequest(str(script), script.read_text(), "hist-1", str(tmp_path),
                            HTCondorJobConfiguration().model_dump(exclude={"env"}))
    job_id = s.parse_submit(sh(s.submit_argv(request), s.submit_stdin(request)).stdout)
    wait_for(lambda: job_id not in s.parse_status(sh(s.status_argv([job_id]))), 60, what="the job to leave condor_q")
    [argv] = s.terminal_argvs([job_id])
    record = s.parse_terminal(sh(argv))[job_id]
    assert record.state == JobState.FAILED and record.exit_code == 7
    assert (tmp_path / "job.err").read_text() == "bye\n"
    assert "Normal termination (return value 7)" in (tmp_path / "job.log").read_text()
