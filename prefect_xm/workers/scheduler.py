"""The Scheduler interface and the common job-state model.

A Scheduler is data plus small pure functions: how to submit, how to read the job id,
the one batched status query and its parser, the terminal-record lookup, the cancel
argv. The worker (base.py) and the poller (poller.py) only ever talk to this interface.
A new scheduler is this interface, its job configuration and worker class, its template
and its requirements mapping in one module, plus an executor and the tests:
docs/adding-a-scheduler.md lists each place.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence


class JobState(enum.IntEnum):
    """Where a batch job is in its life. Ordered: a job's state only moves forward, but
    for one move: a requeue (started, then back in the queue: preempted, its node failed,
    an admin's requeue), which each scheduler recognizes in `Scheduler.requeued`."""

    UNKNOWN = 0
    PENDING = 10  # queued, held, configuring: not started yet
    RUNNING = 20  # started (including suspended: it has started)
    COMPLETED = 30  # ended with exit code 0
    FAILED = 31  # ended non-zero, timed out, OOM, node failure, preempted...
    CANCELLED = 32  # removed by scancel/qdel/bkill/condor_rm

    @property
    def is_final(self) -> bool:
        return self >= JobState.COMPLETED


@dataclass(frozen=True)
class JobStatus:
    """One job's status as a scheduler reported it, already mapped to the common model."""

    job_id: str
    state: JobState
    native_state: str = ""  # the scheduler's own word: TIMEOUT, Eqw, PSUSP, ...
    reason: str = ""  # why it waits or why it ended: Resources, HoldReason, ...
    exit_code: int | None = None
    signal: int | None = None
    #: when the scheduler expects a queued job to start, in its own words and clock
    #: (Slurm's backfill estimate, '2026-12-07T21:33:22'); empty where it has none
    expected_start: str = ""

    def describe(self) -> str:
        """A one-line human description, for state messages and logs."""
        parts = [self.native_state or self.state.name]
        if self.reason and self.reason not in ("None", "(null)"):
            parts.append(f"({self.reason})")
        if self.expected_start:
            parts.append(f"expected to start at {self.expected_start}")
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        if self.signal:
            parts.append(f"signal {self.signal}")
        return " ".join(parts)


@dataclass
class CommandResult:
    argv: Sequence[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class SchedulerError(RuntimeError):
    """A scheduler command failed in a way the caller must see (its stderr verbatim)."""

    def __init__(self, message: str, result: CommandResult | None = None):
        super().__init__(message)
        self.result = result


class SubmissionError(RuntimeError):
    """The scheduler refused the job; the message is its stderr, verbatim."""


class TransientSchedulerError(SchedulerError):
    """The controller is unreachable or slow; retry later, assume nothing."""


@dataclass(frozen=True)
class SubmitRequest:
    """What the worker hands a scheduler to submit one job."""

    script_path: str  # the rendered script, already in the run directory
    script: str  # its text, for schedulers that read directives from stdin (LSF)
    job_name: str
    run_dir: str
    #: the run's job variables (the configuration, without env), for schedulers whose
    #: submission is more than the script (HTCondor's submit description)
    variables: Mapping[str, Any] = field(default_factory=dict)
    #: for an array: its number of tasks and how many may run at once (0 / None: one job)
    array_size: int = 0
    array_throttle: Optional[int] = None


class Scheduler:
    """Everything scheduler-specific. Subclasses fill in the class attributes and the
    pure functions; none of them runs a command itself (the worker does, through a
    transport), so each is testable on recorded outputs."""

    #: short name used in infrastructure pids: "<name>:<cluster>:<job id>"
    name: ClassVar[str]
    #: the jinja2 template (in prefect_xm/workers/templates/) for the batch script
    template_name: ClassVar[str]
    #: the prefix of directive lines, e.g. "#SBATCH"
    directive_prefix: ClassVar[str]
    #: at most this many one-job terminal lookups per poll (scontrol show job, qacct -j,
    #: tracejob); the poller offers the least recently asked jobs first
    per_id_lookups: ClassVar[int] = 10

    #: what a command prints when the scheduler did not answer (its controller down,
    #: unreachable or slow): retry later, assume nothing
    transient_errors: ClassVar[Optional["re.Pattern[str]"]] = None
    #: exit codes that say the same
    transient_codes: ClassVar[frozenset[int]] = frozenset()

    # -- errors -----------------------------------------------------------------
    def error_text(self, result: CommandResult) -> str:
        """What a failed command said: its stderr, else its stdout."""
        return result.stderr.strip() or result.stdout.strip()

    def classify_error(self, result: CommandResult) -> SchedulerError:
        """A failed command's error, in the scheduler's words: TransientSchedulerError
        when the scheduler did not answer (transient_errors, transient_codes)."""
        text = self.error_text(result)
        if result.returncode in self.transient_codes or (
                self.transient_errors is not None and self.transient_errors.search(text)):
            return TransientSchedulerError(text, result)
        return SchedulerError(text or f"{result.argv[0]} exited {result.returncode}", result)

    # -- submission -------------------------------------------------------------
    def submit_argv(self, request: SubmitRequest) -> list[str]:
        raise NotImplementedError

    def submit_stdin(self, request: SubmitRequest) -> str | None:
        """Text fed to the submit command's stdin (None: nothing)."""
        return None

    def parse_submit(self, stdout: str) -> str:
        """The job id in a successful submission's stdout; ValueError if none."""
        raise NotImplementedError

    def submit_error(self, result: CommandResult) -> SchedulerError:
        """Classify a failed submission: TransientSchedulerError means 'maybe accepted,
        check and retry'; anything else is the scheduler's verdict, shown verbatim."""
        return self.classify_error(result)

    def find_by_name_argv(self, job_name: str) -> list[str]:
        """A query listing the ids of live jobs with this name (before a retried submit)."""
        raise NotImplementedError

    def parse_find_by_name(self, stdout: str) -> list[str]:
        raise NotImplementedError

    def jobs_named(self, job_name: str, stdout: str) -> list[str]:
        """The ids in a find-by-name answer. Schedulers whose query cannot filter by
        name (it lists every job: Slurm's Torque wrappers have no qselect) filter here;
        by default, parse_find_by_name."""
        return self.parse_find_by_name(stdout)

    def find_by_name_answered(self, result: CommandResult) -> bool:
        """Whether the find-by-name query answered (some schedulers exit non-zero to say
        'no job by that name', e.g. LSF's bjobs -J); its stdout then goes to
        parse_find_by_name."""
        return result.ok

    # -- tracking ---------------------------------------------------------------
    def status_argv(self, job_ids: Sequence[str]) -> list[str]:
        """ONE query for all tracked jobs."""
        raise NotImplementedError

    def parse_status(self, result: CommandResult) -> dict[str, JobStatus]:
        """Statuses of the jobs the live queue still knows. Raises
        TransientSchedulerError when the query itself failed."""
        raise NotImplementedError

    def lookup(self, job_id: str, statuses: dict[str, JobStatus]) -> "JobStatus | None":
        """A tracked job's status in a parsed query (schedulers with arrays or
        multi-part jobs override this to combine the parts)."""
        return statuses.get(job_id)

    def terminal_argvs(self, job_ids: Sequence[str]) -> list[list[str]]:
        """Queries for the terminal records of jobs that left the live queue, in the
        order to try them (e.g. scontrol, then sacct). Bounded batches."""
        raise NotImplementedError

    def terminal_argvs_for(
        self, job_ids: Sequence[str], live: Mapping[str, JobStatus]
    ) -> list[list[str]]:
        """terminal_argvs, knowing what the live query said of each job (schedulers whose
        lookup depends on it, e.g. SGE asks `qstat -j` only for jobs in an error state)."""
        return self.terminal_argvs(job_ids)

    def parse_terminal(self, result: CommandResult) -> dict[str, JobStatus]:
        raise NotImplementedError

    #: words in a final status that mean the scheduler (not the program) ended the job
    KILLED_BY_SCHEDULER = ("timeout", "limit", "memory", "oom", "kill", "preempt", "node_fail", "boot_fail",
                           "deadline", "walltime", "evict")

    def requeued(self, previous: JobStatus, status: JobStatus) -> bool:
        """Whether the job went back to the queue to run its script again, as the
        scheduler shows it: a started job that is pending again (Slurm's requeue and
        preemption or node failure with --requeue, LSF's brequeue, PBS's qrerun, HTCondor's
        eviction back to idle). The one backward move a job's state makes."""
        return previous.state == JobState.RUNNING and status.state == JobState.PENDING

    def ended_by_program(self, status: JobStatus) -> bool:
        """A failed job whose program exited non-zero by itself, rather than one the
        scheduler killed (time, memory, node failure, preemption): a signal or a
        scheduler's reason of that kind means the latter. Overridable per scheduler."""
        if status.exit_code in (None, 0) or status.signal:
            return False
        words = f"{status.native_state} {status.reason}".lower()
        return not any(word in words for word in self.KILLED_BY_SCHEDULER)

    def cleanup_argvs(self, status: JobStatus) -> list[list[str]]:
        """Commands to run once a job is final, for jobs the scheduler would keep in its
        queue although they can never run (SGE's Eqw waits forever). Usually none."""
        return []

    # -- cancellation -----------------------------------------------------------
    def cancel_argvs(self, job_id: str, grace_seconds: int) -> list[list[str]]:
        """Commands to run in order: a grace signal first, then the kill."""
        raise NotImplementedError

    def parse_cancel(self, result: CommandResult) -> bool:
        """True if the scheduler accepted the cancel, False if it no longer knows the
        job (already finished or purged); SchedulerError for any other failure."""
        if result.ok:
            return True
        raise SchedulerError(result.stderr.strip() or f"{result.argv[0]} exited {result.returncode}", result)

    # -- heterogeneous jobs (a gang started together by the scheduler) -------------
    #: the directive line between two components' directives; None: no such jobs
    het_separator: ClassVar[Optional[str]] = None
    #: shell command prefix starting member `$k`'s script (in run directory `$d`) as a
    #: job step of component k, its stdout/stderr to the member's job.out/job.err
    het_launch: ClassVar[str] = ""

    def het_component_id(self, job_id: str, offset: int) -> str:
        raise NotImplementedError(f"{self.name} has no heterogeneous jobs")

    def is_het_component(self, job_id: str) -> bool:
        return False

    def het_job_of(self, component_id: str) -> str:
        """The heterogeneous job a component id belongs to."""
        return component_id

    # -- arrays -------------------------------------------------------------------
    #: the environment variable holding a running array task's index; None: this
    #: scheduler's runs are always submitted one by one
    array_index_variable: ClassVar[Optional[str]] = None
    #: the index of an array's first task
    array_first_index: ClassVar[int] = 1
    #: what the scheduler replaces with the task index in the -o/-e paths of an array
    array_output_index: ClassVar[str] = ""
    #: whether the scheduler can limit how many of an array's tasks run at once
    array_throttles: ClassVar[bool] = True

    def array_submit_argv(self, request: SubmitRequest, size: int, throttle: Optional[int]) -> list[str]:
        """Submit the script as an array of `size` tasks (indices from array_first_index),
        at most `throttle` of them running at once."""
        raise NotImplementedError

    def parse_array_submit(self, stdout: str) -> str:
        """The array's id in a successful array submission's stdout."""
        return self.parse_submit(stdout)

    def array_task_id(self, array_id: str, index: int) -> str:
        """The id by which the scheduler's queries and cancel name one task."""
        raise NotImplementedError

    def array_of(self, job_id: str) -> Optional[str]:
        """The array a task id belongs to (None: not an array task)."""
        return None

    #: what the scheduler says when it refuses an array for its number of tasks
    array_refusal: ClassVar[Optional["re.Pattern[str]"]] = None

    def array_too_large(self, error: SchedulerError) -> bool:
        """Whether a refused array submission was refused for its number of tasks."""
        return bool(self.array_refusal and self.array_refusal.search(str(error)))

    # -- pids -------------------------------------------------------------------
    def infrastructure_pid(self, cluster: str, job_id: str) -> str:
        return f"{self.name}:{cluster}:{job_id}"

    @classmethod
    def parse_infrastructure_pid(cls, pid: str) -> tuple[str, str, str]:
        """(scheduler, cluster, job id); the cluster may itself contain no ':'."""
        scheduler, sep, rest = pid.partition(":")
        cluster, sep2, job_id = rest.partition(":")
        if not sep or not sep2 or not job_id:
            raise ValueError(f"not a batch infrastructure pid: {pid!r}")
        return scheduler, cluster, job_id


def combine_parts(job_id: str, parts: Sequence[JobStatus], completed_word: str = "COMPLETED") -> "JobStatus | None":
    """A multi-part job (array tasks, heterogeneous components) as a whole: not started
    until all parts have started; ended only when all have ended; failed if any failed."""
    if not parts:
        return None
    live = [s for s in parts if not s.state.is_final]
    if live:
        worst = min(live, key=lambda s: s.state)
        return JobStatus(job_id, worst.state, worst.native_state, worst.reason)
    for bad in (JobState.FAILED, JobState.CANCELLED):
        hit = next((s for s in parts if s.state == bad), None)
        if hit:
            return JobStatus(job_id, bad, hit.native_state, hit.reason, hit.exit_code, hit.signal)
    return JobStatus(job_id, JobState.COMPLETED, completed_word, "", 0)


def chunked(items: Iterable[str], size: int) -> list[list[str]]:
    items = list(items)
    return [items[i : i + size] for i in range(0, len(items), size)]
