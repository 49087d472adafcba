"""How a batch job's end becomes its flow run's state: every decision a batch worker
makes when a job leaves the scheduler, and every message it writes then, in one place.

Pure functions of what the worker knows at that moment (the job's last status, the run's
state read just now, the execution mode, what the scheduler says of the exit); the worker
reads, calls one of them, and writes what it answers (BatchWorker._end_run). Who says
what, by mode:
- engine mode: the flow engine inside the job reports Running and its own end; the worker
  only fills in what the engine could not say (the scheduler killed the job, or it was
  cancelled outside Prefect).
- direct mode: nothing runs Prefect on the node; the job's end is the run's end.
- a member of a heterogeneous job (a gang): its own exit code, from its run directory,
  since the scheduler has one status for the whole job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Completed, Crashed, Failed, Pending, Scheduled

from prefect_xm.workers.run_directory import ATTEMPT_VARIABLE
from prefect_xm.workers.scheduler import JobState, JobStatus

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

    from prefect_xm.workers.hetjob import MemberEnd

@dataclass(frozen=True)
class RunEnd:
    """A state for the run, as the worker sets it."""

    kind: Callable[..., "State"]  # Completed, Failed, Crashed, Cancelled, Pending
    message: str
    level: int = logging.INFO  # of the worker's log line
    log: Optional[str] = None  # the log line, when it differs from the message
    force: bool = True
    #: the last lines of the job's stderr belong at the end of the message
    with_stderr: bool = False
    #: a job too quick to be seen running: the run is marked Running first
    running_first: bool = False
    name: Optional[str] = None  # the state's name, where it is not its type's
    #: the worker removes the job (it was requeued more often than allowed)
    gives_up: bool = False

    def state(self, stderr_tail: str = "", stderr_path: Optional[str] = None) -> "State":
        message = self.message
        if self.with_stderr and stderr_tail:
            message += f"\nLast lines of the job's stderr ({stderr_path}):\n{stderr_tail}"
        if self.name:
            return self.kind(name=self.name, message=message)
        return self.kind(message=message)

    @property
    def log_line(self) -> str:
        return self.log or self.message


def job_end(
    job: str,
    status: JobStatus,
    current: "State",
    *,
    direct: bool,
    cancel_requested: bool,
    ended_by_program: bool,
    label: str,
) -> Optional[RunEnd]:
    """The run's state now that `job` (e.g. "slurm job 12") has left the scheduler with
    `status`; None when the run's state stays as it is. `current` is the run's state read
    after the job ended; `label` names the job in a direct run's states ("array task 3 of
    slurm job 12"); `ended_by_program`: the scheduler says the program exited non-zero by
    itself (rather than being killed)."""
    if current.type in (StateType.CANCELLING, StateType.CANCELLED) or cancel_requested:
        if current.type == StateType.CANCELLED:
            return None
        return RunEnd(Cancelled, f"Cancelled: {job} removed ({status.describe()}).",
                      log=f"{job} ended {status.describe()}; flow run cancelled")
    if direct:
        if current.is_final():
            return None  # (a gang member's end, or a run the launcher ended)
        if status.state == JobState.COMPLETED:
            return RunEnd(Completed, f"{label} exited with code 0", log=f"{job} exited with code 0",
                          running_first=True)
    elif current.is_final() and (status.state == JobState.COMPLETED or current.type != StateType.CRASHED):
        return None  # the flow reported its own end; that is the truth
    if status.state == JobState.CANCELLED:
        return RunEnd(Cancelled, f"{job} was cancelled outside Prefect ({status.describe()}).",
                      level=logging.WARNING)
    if direct:
        if ended_by_program:
            return RunEnd(Failed, f"{job}: the program exited with code {status.exit_code} ({status.describe()}).",
                          level=logging.ERROR, with_stderr=True)
        return RunEnd(Crashed, f"{job} ended {status.describe()}.", level=logging.ERROR, with_stderr=True)
    message = f"{job} ended {status.describe()} before the flow run reported a final state."
    if current.type == StateType.CRASHED and current.message:
        message += f" The flow run said: {current.message}"
    # forced over Crashed only: the engine may have marked itself Crashed on the
    # scheduler's SIGTERM without knowing why; the scheduler's reason (TIMEOUT, OOM, ...)
    # is the useful part
    return RunEnd(Crashed, message, level=logging.ERROR, with_stderr=True,
                  force=current.type == StateType.CRASHED)


def member_run_end(job: str, end: "MemberEnd", stopper: Optional[str] = None) -> Optional[RunEnd]:
    """The state of a heterogeneous job's member from its own exit (None: not known yet).
    `stopper` names the member that ended the gang (its run's name, when readable)."""
    if end.stopped_by is not None:
        # The member that ended the gang says so first: the work unit names it, not this one.
        who = f"gang member {stopper!r}" if stopper is not None else f"gang member run {end.stopped_by}"
        return RunEnd(Cancelled, f"{job}: stopped with its gang: {who} exited with code {end.stopper_exit_code}",
                      level=logging.WARNING, running_first=True)
    if end.exit_code is None:
        return None
    if end.exit_code == 0:
        return RunEnd(Completed, f"{job} exited with code 0", running_first=True)
    return RunEnd(Failed, f"{job}: the program exited with code {end.exit_code}.", level=logging.ERROR,
                  with_stderr=True, running_first=True)


def requeue_end(job: str, status: JobStatus, current: Optional["State"], *, cancel_requested: bool,
                requeues: int, limit: Optional[int]) -> Optional[RunEnd]:
    """The run's state once the scheduler put its job back in the queue (preemption, a
    failed node, an admin's requeue): back to Pending, named Requeued, for the same job's
    next attempt; past `limit` requeues, Crashed (and the worker removes the job). None
    while the run is being cancelled or has ended for good."""
    if cancel_requested or current is not None and (
            current.type == StateType.CANCELLING or (current.is_final() and current.type != StateType.CRASHED)):
        return None
    if limit is not None and requeues > limit:
        return RunEnd(Crashed, f"{job} was requeued {requeues} times ({status.describe()}), more than "
                               f"max_requeues={limit}: the worker removed it.", level=logging.ERROR, gives_up=True)
    of = f" of {limit}" if limit is not None else ""
    # forced: a run goes back from Running only this way (and the engine of a flow the
    # scheduler stopped may have said Crashed; the job is not over)
    return RunEnd(Pending, f"{job} went back to the queue ({status.describe()}): requeue {requeues}{of}. The same "
                           f"job runs again as attempt {requeues + 1} ({ATTEMPT_VARIABLE}={requeues + 1}).",
                  level=logging.WARNING, name="Requeued")


def never_submitted(scheduler: str) -> RunEnd:
    """A run left Submitting by a worker that died, whose job the scheduler does not know:
    left so, nothing would ever end it. Proposed, not forced (a run that moved on stays)."""
    return RunEnd(Crashed, f"The worker stopped while submitting this run, and {scheduler} knows no job of it: it "
                           f"was never submitted, or its job ended long ago. Nothing was resubmitted.",
                  level=logging.ERROR, force=False)


def abandoned_before_submit() -> RunEnd:
    """A run left Pending by a worker that died before Submitting: Prefect's worker submits
    nothing before Submitting, so it goes back to the queue. Proposed, not forced."""
    return RunEnd(Scheduled, "Its worker stopped before submitting it; scheduled again (nothing had been submitted).",
                  level=logging.WARNING, force=False)
