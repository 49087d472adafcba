"""HTCondor: everything the batch worker needs to know about condor_submit, condor_q,
condor_history and condor_rm, and the `xm-htcondor` worker type.

HTCondor reads no directives from the script: a job is a *submit description*. The
batch script (templates/htcondor.sh.j2) is the job's executable; the submit description
is generated here from the job variables (SubmitRequest.variables) and given to
`condor_submit -terse` on stdin, so nothing but the script is written to disk.

Choices (documented in the variables' descriptions too):
- Wall-clock limit: `allowed_execute_duration` (seconds of execution, not counting file
  transfer). At the limit HTCondor puts the job on hold ("The job exceeded allowed
  execute duration of 1:00", HoldReasonCode 47) rather than removing it. Not
  `periodic_remove`: its RemoveReason only quotes the expression, and a removed job
  reads like a cancellation.
- Holds: a job the USER held before it ever started (`hold = True` at submit,
  HoldReasonCode 15, or condor_hold of an idle job, code 1) is pending, shown with its
  HoldReason: condor_release lets it run. A job held by the SYSTEM (walltime, memory over
  request, file transfer failures, ...) ends the run Crashed with the HoldReason: nothing
  in the run will release it, and a run waiting forever on a hold nobody sees is the
  failure we must avoid. So does a USER hold of a job that has started (the ad's
  NumJobStarts > 0, or JobStartDate / JobCurrentStartDate set): condor_hold hard-kills a
  running job, so the flow process is gone and a release would start the script again
  from scratch; and the worker, which only moves a run forward, would otherwise keep
  following a run it already saw running. Either way the job itself stays held in the
  queue for the user to inspect (`condor_q -hold`) and `condor_rm`.
- Completed jobs stay in condor_q for `keep_completed` seconds (`leave_in_queue`), like
  Slurm's MinJobAge: the status query gets the exit code without a history scan, and a
  retried submit finds a job that already finished by its batch name. After that they
  are read from `condor_history` (bounded batches).
- The environment: `getenv = True` copies condor_submit's environment, which is the
  worker's without its credentials (transport.command_environment), into the job ad,
  which anyone can read with condor_q -l. The run's own environment (API URL, flow run
  id, API key) is in the run directory's 0600 job.env, sourced by the script.

Arrays (a sweep's runs, see arrays.py): one cluster of N procs, the same submit
description ending `queue N` instead of `queue 1`. Task k is job `<cluster>.<k>` (proc ids
from 0), tracked, looked up and removed (`condor_rm <cluster>.<k>`) like a single job;
`condor_rm <cluster>` removes the whole array. HTCondor gives a job no index variable:
the description adds XM_ARRAY_INDEX=$(Process) to the job's `environment` (new syntax,
merged into an `environment` line of extra_directives), and writes the array's own
output to task-$(Process).out/.err in the array directory (each task's program writes
to its run's job.out/job.err).
- Throttle (array_throttle): `max_materialize = M`, late materialization: the schedd keeps
  at most M jobs of the cluster in the queue and materializes the next when one leaves.
  Not `max_idle`: it bounds the idle jobs only, so nothing bounds the running ones. A
  job still in the queue counts, so a throttled array gets no `leave_in_queue` (its
  completed tasks leave at once and are read from condor_history), and a task held by
  the system (which ends its run Crashed and stays held for the user to inspect, see
  above) keeps its place until someone condor_rm's it. Tasks not yet materialized are
  in no query: the status query asks for the cluster ad's JobMaterializeNextProcId
  (chained into every job ad) and a proc at or above it is pending. Removing one of them
  alone is not possible (condor_rm knows no such job yet); removing the array is.
- Size: a submission of more procs than MAX_JOBS_PER_SUBMISSION (default 20000),
  MAX_JOBS_SUBMITTED, MAX_JOBS_PER_OWNER or SUBMIT_MAX_PROCS_IN_CLUSTER allow is refused
  as a whole ("Number of submitted jobs would exceed MAX_JOBS_PER_SUBMISSION"); the worker
  splits the array and submits the halves.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence

from pydantic import Field, field_validator

from prefect_xm.workers.base import BatchWorker
from prefect_xm.workers.configuration import (
    AtLeastOne, BatchJobConfiguration, ZeroOrMore, check_format, in_syntax,
)
from prefect_xm.workers.scheduler import (
    CommandResult,
    JobState,
    JobStatus,
    Scheduler,
    SubmitRequest,
    TransientSchedulerError,
    chunked,
)

# -- state model ----------------------------------------------------------------

JOB_STATUS = {1: "IDLE", 2: "RUNNING", 3: "REMOVED", 4: "COMPLETED", 5: "HELD", 6: "TRANSFERRING_OUTPUT", 7: "SUSPENDED"}
STATE_MAP = {1: JobState.PENDING, 2: JobState.RUNNING, 3: JobState.CANCELLED, 4: JobState.COMPLETED,
             5: JobState.PENDING, 6: JobState.RUNNING, 7: JobState.RUNNING}
#: HoldReasonCodes of holds a user asked for: UserRequest, SubmittedOnHold, SpoolingInput
USER_HOLD_CODES = (1, 15, 16)
#: JobExecuteExceeded: allowed_execute_duration reached
EXECUTE_DURATION_HOLD_CODE = 47

#: the job ad attributes that tell whether a job has ever started (see _has_started)
START_ATTRIBUTES = ("NumJobStarts", "JobStartDate", "JobCurrentStartDate")

#: the cluster ad's next proc to materialize (late materialization), seen in job ads
NEXT_PROC_ATTRIBUTE = "JobMaterializeNextProcId"

STATUS_ATTRIBUTES = (
    "ClusterId", "ProcId", "JobStatus", "ExitCode", "ExitBySignal", "ExitSignal",
    "HoldReason", "HoldReasonCode", "RemoveReason", "JobBatchName", *START_ATTRIBUTES,
    NEXT_PROC_ATTRIBUTE,
)

#: the environment variable an array task reads its proc id from (HTCondor sets none)
ARRAY_INDEX_VARIABLE = "XM_ARRAY_INDEX"
#: condor_submit's refusals of a submission for its number of jobs (submit.cpp)
_TOO_MANY_JOBS = re.compile(
    r"Number of submitted jobs would exceed (?:MAX_JOBS_PER_SUBMISSION|MAX_JOBS_SUBMITTED|MAX_JOBS_PER_OWNER)"
    r"|number of procs exceeds SUBMIT_MAX_PROCS_IN_CLUSTER"
)

_JOB_ID_RE = re.compile(r"^\d+\.\d+$")
_CLUSTER_RE = re.compile(r"^\d+$")


def ad_to_status(ad: Mapping[str, Any]) -> Optional[JobStatus]:
    """A job ad (condor_q/condor_history -json, or -af:j columns) in the common model."""
    try:
        job_id = f"{int(ad['ClusterId'])}.{int(ad['ProcId'])}"
        code = int(ad["JobStatus"])
    except (KeyError, TypeError, ValueError):
        return None
    native = JOB_STATUS.get(code, str(code))
    state = STATE_MAP.get(code, JobState.UNKNOWN)
    reason = ""
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    if code == 4:
        if _true(ad.get("ExitBySignal")):
            signal = _int(ad.get("ExitSignal"))
            state = JobState.FAILED
        else:
            exit_code = _int(ad.get("ExitCode"))
            if exit_code:
                state = JobState.FAILED
    elif code == 5:
        reason = _text(ad.get("HoldReason"))
        hold_code = _int(ad.get("HoldReasonCode"))
        if not _user_hold(hold_code, reason) or _has_started(ad):
            # held by the system, or by the user after it started: see the module docstring
            state = JobState.FAILED
    elif code == 3:
        reason = _text(ad.get("RemoveReason"))
    return JobStatus(job_id, state, native, reason, exit_code, signal)


def _user_hold(code: Optional[int], reason: str) -> bool:
    if code is not None:
        return code in USER_HOLD_CODES
    return reason.startswith(("submitted on hold", "via condor_hold"))


def _has_started(ad: Mapping[str, Any]) -> bool:
    """Whether the job ever began running: NumJobStarts counts executions; JobStartDate
    (first start) and JobCurrentStartDate (latest start) are set once it has run (they
    are undefined until then, and an ad may lack NumJobStarts)."""
    starts = _int(ad.get("NumJobStarts"))
    if starts is not None and starts > 0:
        return True
    return any(_int(ad.get(attr)) for attr in ("JobStartDate", "JobCurrentStartDate"))


def _true(v: Any) -> bool:
    return v is True or str(v).lower() == "true"


def _int(v: Any) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _text(v: Any) -> str:
    return "" if v is None or v == "undefined" else str(v)


# -- parsers --------------------------------------------------------------------


def parse_condor_submit(stdout: str) -> str:
    """The first job id: '-terse' prints '15.0 - 15.0'; the plain form
    '1 job(s) submitted to cluster 6.' (after any warnings) gives '6.0'."""
    m = re.search(r"^\s*(\d+\.\d+) - \d+\.\d+\s*$", stdout, re.M)
    if m:
        return m.group(1)
    m = re.search(r"job\(s\) submitted to cluster (\d+)\.", stdout)
    if m:
        return f"{m.group(1)}.0"
    raise ValueError(f"no job id in condor_submit output: {stdout.strip()[-500:]!r}")


def parse_condor_submit_cluster(stdout: str) -> str:
    """The cluster of a submission: '-terse' prints '123.0 - 123.4' for a cluster of 5,
    the plain form '5 job(s) submitted to cluster 123.'."""
    m = re.search(r"^\s*(\d+)\.\d+ - (\d+)\.\d+\s*$", stdout, re.M)
    if m and m.group(1) == m.group(2):
        return m.group(1)
    m = re.search(r"job\(s\) submitted to cluster (\d+)\.", stdout)
    if m:
        return m.group(1)
    raise ValueError(f"no cluster id in condor_submit output: {stdout.strip()[-500:]!r}")


class LiveStatuses(dict):
    """condor_q's statuses, and per cluster submitted with max_materialize the next proc
    it will materialize: procs at or above it are not in the queue yet."""

    def __init__(self, *args, next_proc: Optional[dict[str, int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.next_proc: dict[str, int] = next_proc or {}


def parse_live_ads(output: str) -> LiveStatuses:
    """parse_json_ads, keeping the clusters' JobMaterializeNextProcId."""
    text = output.strip()
    if not text:
        return LiveStatuses()
    ads = json.loads(text)
    ads = ads if isinstance(ads, list) else [ads]
    next_proc: dict[str, int] = {}
    for ad in ads:
        nxt = _int(ad.get(NEXT_PROC_ATTRIBUTE))
        cluster = _int(ad.get("ClusterId"))
        if nxt is not None and cluster is not None:
            next_proc[str(cluster)] = max(nxt, next_proc.get(str(cluster), 0))
    return LiveStatuses(_statuses(ads), next_proc=next_proc)


def _statuses(ads: Sequence[Mapping[str, Any]]) -> dict[str, JobStatus]:
    statuses: dict[str, JobStatus] = {}
    for ad in ads:
        status = ad_to_status(ad)
        if status:
            statuses[status.job_id] = status
    return statuses


def parse_json_ads(output: str) -> dict[str, JobStatus]:
    """condor_q / condor_history -json: a JSON array of job ads (nothing at all when no
    job matched)."""
    text = output.strip()
    if not text:
        return {}
    ads = json.loads(text)
    return _statuses(ads if isinstance(ads, list) else [ads])


def parse_condor_rm(stdout: str, stderr: str) -> dict[str, str]:
    """Per job id: 'removed' ('Job 1.0 marked for removal' / 'removed.'), 'not_found',
    'already_removed'."""
    outcome: dict[str, str] = {}
    for m in re.finditer(r"Job (\d+\.\d+) (?:marked for removal|removed)", stdout or ""):
        outcome[m.group(1)] = "removed"
    text = (stdout or "") + "\n" + (stderr or "")
    for m in re.finditer(r"Job (\d+\.\d+) not found", text):
        outcome[m.group(1)] = "not_found"
    for m in re.finditer(r"Job (\d+\.\d+) already marked for removal", text):
        outcome[m.group(1)] = "already_removed"
    # a whole cluster: 'All jobs in cluster 12 have been marked for removal' (older
    # releases: 'Cluster 12 has been marked for removal.'), or on stderr
    # "Couldn't find/remove all jobs in cluster 12."
    for m in re.finditer(r"(?:All jobs in cluster (\d+) have been|Cluster (\d+) has been) marked for removal", text):
        outcome[m.group(1) or m.group(2)] = "removed"
    for m in re.finditer(r"Couldn't find/remove all jobs in cluster (\d+)", text):
        outcome.setdefault(m.group(1), "not_found")
    return outcome


# -- the submit description -----------------------------------------------------


def duration_seconds(value: str) -> int:
    """'90' (minutes) or 'H:MM:SS' -> seconds."""
    if ":" in value:
        h, m, s = (int(x) for x in value.split(":"))
        return h * 3600 + m * 60 + s
    return int(value) * 60


@dataclass(frozen=True)
class ArrayShape:
    """An array submission: `size` procs, at most `throttle` of them in the queue."""

    size: int
    throttle: Optional[int] = None


def submit_description(request: SubmitRequest, keep_completed: int, array: Optional[ArrayShape] = None) -> str:
    """The submit description for one job, or for an array of `array.size` (which differs
    only in its queue count, its index variable, output paths and throttle), from the
    request and its job variables. Every value was validated single-line by
    HTCondorJobConfiguration."""
    v = request.variables
    outputs = f"{request.run_dir}/task-$(Process)" if array else f"{request.run_dir}/job"
    lines = [
        f"universe = {v.get('universe') or 'vanilla'}",
        f"executable = {request.script_path}",
        f"output = {outputs}.out",
        f"error = {outputs}.err",
        f"log = {request.run_dir}/job.log",
        f"batch_name = {request.job_name}",
        "getenv = True",
        f"initialdir = {v.get('working_dir') or request.run_dir}",
    ]
    for key in ("request_cpus", "request_memory", "request_disk", "request_gpus", "requirements", "accounting_group"):
        if v.get(key) not in (None, ""):
            lines.append(f"{key} = {v[key]}")
    if v.get("time_limit"):
        lines.append(f"allowed_execute_duration = {duration_seconds(str(v['time_limit']))}")
    if v.get("hold"):
        lines.append("hold = True")
    throttle = array.throttle if array else None
    if keep_completed > 0 and not throttle:
        # (a throttled array's completed tasks must leave: max_materialize counts them)
        lines.append(
            f"leave_in_queue = JobStatus == 4 && (time() - EnteredCurrentStatus) < {keep_completed}"
        )
    if throttle:
        lines.append(f"max_materialize = {throttle}")
    extra = list(v.get("extra_directives") or [])
    if array:
        extra = with_environment(extra, ARRAY_INDEX_VARIABLE, "$(Process)")
    lines += extra
    lines.append(f"queue {array.size if array else 1}")
    return "\n".join(lines) + "\n"


_ENVIRONMENT_RE = re.compile(r"^\s*environment\s*=\s*(.*?)\s*$", re.IGNORECASE)


def with_environment(lines: list[str], name: str, value: str) -> list[str]:
    """Submit commands with `name=value` in the job's environment: added to the last
    `environment` command (the one HTCondor uses) in its syntax, the new one ("..."
    around space-separated pairs) or the old one (pairs separated by ';'), or as a new
    `environment = "name=value"` after them. The value must need no quoting."""
    pair = f"{name}={value}"
    for i in range(len(lines) - 1, -1, -1):
        m = _ENVIRONMENT_RE.match(lines[i])
        if not m:
            continue
        current = m.group(1)
        if len(current) >= 2 and current[0] == current[-1] == '"':
            inner = current[1:-1].strip()
            merged = f'"{inner} {pair}"' if inner else f'"{pair}"'
        elif current:
            merged = f"{current.rstrip(';')};{pair}"
        else:
            merged = f'"{pair}"'
        return [*lines[:i], f"environment = {merged}", *lines[i + 1:]]
    return [*lines, f'environment = "{pair}"']


# -- the Scheduler --------------------------------------------------------------


class HTCondorScheduler(Scheduler):
    name: ClassVar[str] = "htcondor"
    template_name: ClassVar[str] = "htcondor.sh.j2"
    #: HTCondor reads no directives from the script (the submit description carries them)
    directive_prefix: ClassVar[str] = "#"
    transient_errors: ClassVar[Optional["re.Pattern[str]"]] = re.compile(
        r"Failed to connect|Can't find address|Unable to contact|timed out|Connection refused|"
        r"SECMAN|communicate with|temporarily unavailable|Failed to fetch ads|Failed to end classad message",
        re.IGNORECASE,
    )
    terminal_batch_size: ClassVar[int] = 50
    #: completed jobs stay in condor_q this long (leave_in_queue), see the module docstring
    keep_completed: ClassVar[int] = 300

    def submit_argv(self, request: SubmitRequest) -> list[str]:
        # no file argument: condor_submit reads the submit description from stdin; the
        # unique batch name (find-by-name relies on it) is on the command line as well
        return ["condor_submit", "-terse", "-batch-name", request.job_name]

    def submit_stdin(self, request: SubmitRequest) -> Optional[str]:
        return submit_description(request, self.keep_completed, self.array_shape(request))

    def array_shape(self, request: SubmitRequest) -> Optional[ArrayShape]:
        """The array a request submits (its description ends `queue N`), None for a single job."""
        return ArrayShape(request.array_size, request.array_throttle) if request.array_size else None

    def parse_submit(self, stdout: str) -> str:
        return parse_condor_submit(stdout)

    def find_by_name_argv(self, job_name: str) -> list[str]:
        # the name is [A-Za-z0-9_.+-] and a uuid: safe inside a ClassAd string
        return ["condor_q", "-constraint", f'JobBatchName == "{job_name}"', "-af:j", "JobStatus"]

    def parse_find_by_name(self, stdout: str) -> list[str]:
        ids = []
        for line in stdout.splitlines():
            parts = line.split()
            if parts and _JOB_ID_RE.match(parts[0]):
                ids.append(parts[0])
        return ids

    def status_argv(self, job_ids: Sequence[str]) -> list[str]:
        return ["condor_q", *job_ids, "-json", "-attributes", ",".join(STATUS_ATTRIBUTES)]

    def parse_status(self, result: CommandResult) -> dict[str, JobStatus]:
        if not result.ok:
            raise self.classify_error(result)
        try:
            return parse_live_ads(result.stdout)
        except json.JSONDecodeError as exc:
            raise TransientSchedulerError(f"condor_q printed no JSON: {exc}", result) from None

    def lookup(self, job_id: str, statuses: dict[str, JobStatus]) -> Optional[JobStatus]:
        """A job's status; a task of a throttled array (max_materialize) that the schedd
        has not materialized yet is in no query, and pending."""
        found = statuses.get(job_id)
        if found is not None:
            return found
        cluster, _, proc = job_id.partition(".")
        nxt = getattr(statuses, "next_proc", {}).get(cluster)
        if nxt is not None and proc.isdigit() and int(proc) >= nxt:
            return JobStatus(job_id, JobState.PENDING, "IDLE", "not materialized yet (max_materialize)")
        return None

    def terminal_argvs(self, job_ids: Sequence[str]) -> list[list[str]]:
        return [
            ["condor_history", *batch, "-json", "-attributes", ",".join(STATUS_ATTRIBUTES)]
            for batch in chunked(job_ids, self.terminal_batch_size)
        ]

    def parse_terminal(self, result: CommandResult) -> dict[str, JobStatus]:
        if not result.ok:
            raise self.classify_error(result)
        return parse_json_ads(result.stdout)

    def cancel_argvs(self, job_id: str, grace_seconds: int) -> list[list[str]]:
        # condor_rm is graceful by itself: the job's kill_sig (SIGTERM), SIGKILL later;
        # a job id '12.3' is one job (an array's task), a cluster id '12' the whole array
        return [["condor_rm", job_id]]

    def parse_cancel(self, result: CommandResult) -> bool:
        target = result.argv[-1]
        outcome = parse_condor_rm(result.stdout, result.stderr).get(target)
        if outcome == "not_found" and _CLUSTER_RE.match(target):
            # "Couldn't find/remove all jobs in cluster N." follows any other error of the
            # schedd's (permission...): only on its own does it mean the cluster is gone
            others = [line for line in f"{result.stdout}\n{result.stderr}".splitlines()
                      if line.strip() and "Couldn't find/remove all jobs in cluster" not in line]
            if others:
                raise self.classify_error(result)
        if outcome in ("not_found", "already_removed"):
            return False
        if outcome == "removed" or result.ok:
            return True
        raise self.classify_error(result)

    # -- arrays: a cluster of procs `queue N`, task k is `<cluster>.<k>` ----------------
    array_index_variable: ClassVar[Optional[str]] = ARRAY_INDEX_VARIABLE
    array_first_index: ClassVar[int] = 0
    array_output_index: ClassVar[str] = "$(Process)"
    array_throttles: ClassVar[bool] = True

    def array_submit_argv(self, request: SubmitRequest, size: int, throttle: Optional[int]) -> list[str]:
        """The same command as a single job's: the array is in the description on stdin
        (`queue N`, see array_shape)."""
        return self.submit_argv(request)

    def parse_array_submit(self, stdout: str) -> str:
        return parse_condor_submit_cluster(stdout)

    def array_task_id(self, array_id: str, index: int) -> str:
        return f"{array_id}.{index}"

    def array_of(self, job_id: str) -> Optional[str]:
        """The cluster of a job id ('12.3' -> '12'); a single job is a cluster of one."""
        return job_id.split(".", 1)[0] if _JOB_ID_RE.match(job_id) else None

    array_refusal = _TOO_MANY_JOBS


# -- job variables and the worker ------------------------------------------------

_DURATION_RE = re.compile(r"^(?:\d+|\d+:[0-5]\d:[0-5]\d)$")
_MEMORY_RE = re.compile(r"^\d+(?:\s?[KMGT]B?)?$", re.IGNORECASE)
_UNIVERSE_RE = re.compile(r"^[A-Za-z]+$")
_Duration = in_syntax(_DURATION_RE, "'90' (minutes) or '2:30:00'")
_Size = in_syntax(_MEMORY_RE, "'4GB', '512MB' or '4096' (MB; disk: KB)")
_SizeNotInForm = in_syntax(_MEMORY_RE, "'4GB', '512MB' or '4096' (MB; disk: KB)", in_form=False)
_Word = in_syntax(re.compile(r"^[A-Za-z0-9_.@+-]+$"), "'group_physics.alice'", in_form=False)
_Line = in_syntax(re.compile(r"^[^\n\r]*$"), "a single-line ClassAd expression", in_form=False)


class HTCondorJobConfiguration(BatchJobConfiguration):
    universe: str = Field(
        default="vanilla",
        title="Universe",
        description="The HTCondor universe (vanilla, container, docker, ...).",
    )
    request_cpus: AtLeastOne = Field(
        default=None,
        title="CPUs",
        description="CPU cores the job's slot must have (request_cpus).",
    )
    request_memory: _Size = Field(
        default=None,
        title="Memory",
        description="request_memory, e.g. '4GB' (a bare number is MB).",
    )
    request_disk: _SizeNotInForm = Field(
        default=None,
        title="Disk",
        description="request_disk, e.g. '10GB' (a bare number is KB).",
    )
    request_gpus: ZeroOrMore = Field(
        default=None,
        title="GPUs",
        description="GPUs the job's slot must have (request_gpus).",
    )
    requirements: _Line = Field(
        default=None,
        title="Requirements",
        description="A ClassAd expression the execution slot must match.",
    )
    accounting_group: _Word = Field(
        default=None,
        title="Accounting group",
        description="The accounting group the job's usage is charged to (accounting_group), e.g. 'group_physics.alice'.",
    )
    time_limit: _Duration = Field(
        default=None,
        title="Time limit",
        description=(
            "Execution time limit: minutes or 'H:MM:SS', as allowed_execute_duration. At the limit "
            "HTCondor holds the job and the run ends Crashed with the hold reason."
        ),
    )
    hold: bool = Field(
        default=False,
        title="Hold",
        description="Submit the job held (hold = True) until released with condor_release.",
    )
    extra_directives: list[str] = Field(
        default_factory=list,
        title="Extra submit commands",
        description=(
            "More submit-description lines, before the worker's 'queue 1' ('queue N' for an array) "
            "(e.g. 'rank = Memory', '+ProjectName = \"x\"'). An 'environment' line here gets the "
            "array index variable XM_ARRAY_INDEX added."
        ),
    )

    @field_validator("universe")
    @classmethod
    def _universe(cls, v):
        # not checked against a list: condor_submit's refusal is shown verbatim
        return check_format(_UNIVERSE_RE, "universe", v, "'vanilla', 'container'") or "vanilla"

    @field_validator("extra_directives")
    @classmethod
    def _submit_commands(cls, v):
        for line in v:
            if re.match(r"^\s*queue\b", line, re.IGNORECASE):
                raise ValueError(f"extra_directives: {line!r}: the worker writes the one 'queue' line itself")
        return v


class HTCondorWorker(BatchWorker):
    type: ClassVar[str] = "xm-htcondor"
    job_configuration = HTCondorJobConfiguration
    scheduler: ClassVar[Scheduler] = HTCondorScheduler()
    _description = (
        "Runs each flow run as an HTCondor job (condor_submit with a generated submit "
        "description), tracks it with one condor_q per poll for all jobs (condor_history "
        "once they leave the queue), and cancels it with condor_rm. A sweep's runs go as one "
        "cluster of procs (queue N, max_materialize as throttle)."
    )
    _display_name = "HTCondor (prefect-xm)"
