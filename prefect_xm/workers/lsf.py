"""IBM Spectrum LSF: everything the batch worker needs to know about bsub, bjobs, bhist
and bkill, and the `xm-lsf` worker type.

- Submit: `bsub -J <name>` with the script on stdin (LSF reads `#BSUB` directives only
  from a script given on stdin; `bsub file` would run the file as a command and ignore
  them). The unique job name is on the command line too, so a custom template cannot
  lose what find-by-name relies on.
- Track: ONE `bjobs -a -noheader -o "... delimiter='^'" ids` per poll. The delimited
  `-o` form rather than `-json`: it exists since LSF 9.1 (`-json` only in 10.1 fix
  packs), it is line-oriented so banner lines ("LSF is processing your request") and
  unknown ids ("Job <1> is not found", on stderr, while the other jobs are still listed
  on stdout) cost nothing, and the recorded outputs of other projects cover it.
- Finished jobs stay in `bjobs -a` for CLEAN_PERIOD (1 h by default), then only
  `bhist -l` knows them ("Done successfully" / "Exited with exit code N").
- Cancel: `bkill ID` (SIGINT, SIGTERM, then SIGKILL, JOB_TERMINATE_INTERVAL apart);
  "Job has already finished" and "No matching job found" mean there is nothing to kill.
- Arrays (a sweep's runs): `bsub -J "name[1-N]%M"` (script on stdin as for one job; at
  most M elements running), one job id for the array; an element is `ID[i]` to bjobs,
  bhist and bkill (`bkill ID` removes the whole array), LSB_JOBINDEX in its environment,
  %I in its -o/-e paths. bjobs' JOBID column is the array's id for every element (unless
  LSB_BJOBS_DISPLAY_ENH=Y, then `ID[i]`): the element's index is read from its
  JOB_NAME, `name[i]` (the `jobindex` field would do, but is not in every -o version).
  A size above MAX_JOB_ARRAY_SIZE (1000 by default) is refused with
  "Job array index too large. Job not submitted." (exit 255).

Parsers are pure functions over command output (tests/test_lsf_parsers.py).
"""

from __future__ import annotations

import re
from typing import ClassVar, Mapping, Optional, Sequence

from pydantic import Field, field_validator

from prefect_xm.workers.base import BatchWorker
from prefect_xm.workers.configuration import (
    AtLeastOne, BatchJobConfiguration, ZeroOrMore, in_syntax,
)
from prefect_xm.workers.scheduler import (
    CommandResult,
    JobState,
    JobStatus,
    Scheduler,
    SubmitRequest,
    chunked,
)

# -- state model ----------------------------------------------------------------

STATE_MAP: dict[str, JobState] = {
    **dict.fromkeys(["PEND", "PSUSP", "WAIT", "PROV"], JobState.PENDING),
    # USUSP/SSUSP: suspended after it started; UNKWN: mbatchd lost contact with the
    # execution host -- the job started and may still run, so not final.
    **dict.fromkeys(["RUN", "USUSP", "SSUSP", "UNKWN"], JobState.RUNNING),
    **dict.fromkeys(["DONE", "PDONE"], JobState.COMPLETED),
    **dict.fromkeys(["EXIT", "ZOMBI"], JobState.FAILED),
}

#: exit reasons (bjobs exit_reason, bhist/bacct "Completed <exit>; TERM_...") meaning
#: somebody killed the job with bkill
CANCEL_REASONS = ("TERM_OWNER", "TERM_ADMIN", "TERM_FORCE_OWNER", "TERM_FORCE_ADMIN", "TERM_REQUEUE_OWNER")
#: bkill's first signal is SIGINT: 128 + 2, when no exit reason is known
BKILL_EXIT_CODE = 130

#: the columns of the status query, in order; the last may hold the delimiter. job_name
#: carries an array element's index (`name[4]`), which the jobid column does not show.
STATUS_COLUMNS = ("jobid", "stat", "exit_code", "exec_host", "job_name", "exit_reason", "pend_reason")
DELIMITER = "^"

_JOB_ID_RE = re.compile(r"^\d+(?:\[\d+\])?$")
_NOT_FOUND_RE = re.compile(r"Job <([^>]+)> is not found")
#: an array element's id, `123[4]`
_ELEMENT_RE = re.compile(r"^(\d+)\[(\d+)\]$")
#: an element's job name ends with its index: `name[4]`
_ELEMENT_NAME_RE = re.compile(r"\[(\d+)\]$")
#: the names arrays.array_name gives arrays (`<prefix>-array-<uuid4>`)
_ARRAY_NAME_RE = re.compile(r"-array-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: LSF refuses an array larger than MAX_JOB_ARRAY_SIZE (LSBE_BIG_IDX)
ARRAY_TOO_LARGE = "Job array index too large"


def element_id(job_id: str, job_name: str = "", job_index: str = "") -> str:
    """The id a bjobs row stands for: `123[4]` for an array element, whose JOBID column
    shows only `123` (unless LSB_BJOBS_DISPLAY_ENH=Y); the index comes from the jobindex
    column when asked for, else from the element's job name `name[4]`."""
    if "[" in job_id:
        return job_id
    index = job_index.strip() if job_index and job_index.strip().isdigit() else ""
    if not index or index == "0":
        m = _ELEMENT_NAME_RE.search(job_name or "")
        index = m.group(1) if m else ""
    return f"{job_id}[{index}]" if index and index != "0" else job_id


def array_spec_name(job_name: str) -> str:
    """An array's name as LSF accepts it (letters, digits, '.', '-', '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", job_name)


def compact_ids(job_ids: Sequence[str]) -> list[str]:
    """Ids for one query: an array of which two or more elements are asked for is named
    once by its id (bjobs/bhist then list each of its elements); others as they are."""
    per_array: dict[str, int] = {}
    for job_id in job_ids:
        m = _ELEMENT_RE.match(job_id)
        if m:
            per_array[m.group(1)] = per_array.get(m.group(1), 0) + 1
    out: list[str] = []
    for job_id in job_ids:
        m = _ELEMENT_RE.match(job_id)
        name = m.group(1) if m and per_array[m.group(1)] > 1 else job_id
        if name not in out:
            out.append(name)
    return out


def to_status(
    job_id: str, stat: str, exit_code: str = "", exit_reason: str = "", pend_reason: str = ""
) -> JobStatus:
    """One job's status from the words bjobs prints ('-' and '' mean nothing)."""
    stat = stat.strip().upper()
    clean = lambda v: "" if v is None or v.strip() in ("-", "") else v.strip()  # noqa: E731
    exit_code, exit_reason, pend_reason = clean(exit_code), clean(exit_reason), clean(pend_reason)
    state = STATE_MAP.get(stat, JobState.UNKNOWN)
    code = int(exit_code) if re.fullmatch(r"-?\d+", exit_code) else None
    if stat == "DONE" and code is None:
        code = 0  # DONE jobs print an empty exit code
    if stat == "EXIT" and (
        exit_reason.startswith(CANCEL_REASONS) or (not exit_reason and code == BKILL_EXIT_CODE)
    ):
        state = JobState.CANCELLED
    reason = exit_reason or pend_reason.rstrip(";")
    if stat == "UNKWN" and not reason:
        reason = "the execution host is unreachable"
    return JobStatus(job_id=job_id, state=state, native_state=stat, reason=reason, exit_code=code)


# -- parsers --------------------------------------------------------------------


def parse_bsub(stdout: str) -> str:
    """'Job <123> is submitted to [default ]queue <q>.' (possibly after banner lines)."""
    m = re.search(r"Job <(\d+)> is submitted to (?:default )?queue <[^>]*>", stdout)
    if not m:
        raise ValueError(f"no job id in bsub output: {stdout.strip()[-500:]!r}")
    return m.group(1)


def not_found_ids(stderr: str) -> list[str]:
    """Ids in bjobs' 'Job <2> is not found' lines."""
    return _NOT_FOUND_RE.findall(stderr or "")


def parse_bjobs_delimited(
    output: str, *, columns: Sequence[str] = STATUS_COLUMNS, delimiter: str = DELIMITER
) -> dict[str, JobStatus]:
    """Statuses from `bjobs -noheader -o "<columns> delimiter='<d>'"`. Lines that are not
    job lines (banners, a header) are skipped; leading blanks are tolerated; the last
    column may itself contain the delimiter."""
    cols = [c.lower() for c in columns]
    cols = ["jobid" if c == "id" else c for c in cols]
    statuses: dict[str, JobStatus] = {}
    for line in output.splitlines():
        fields = line.strip().split(delimiter, len(cols) - 1)
        if len(fields) < len(cols):
            continue
        row = dict(zip(cols, (f.strip() for f in fields)))
        job_id = row.get("jobid", "")
        if not _JOB_ID_RE.match(job_id):
            continue
        status = record_status(job_id, row)
        statuses[status.job_id] = status
    return statuses


def record_status(job_id: str, record: Mapping[str, str]) -> JobStatus:
    """A bjobs record (by its -o field names, lower case) in the common model, under the
    id it stands for (an array element's, see element_id)."""
    job_id = element_id(job_id, record.get("job_name", record.get("name", "")), record.get("jobindex", ""))
    return to_status(job_id, record.get("stat", ""), record.get("exit_code", ""),
                     record.get("exit_reason", ""), record.get("pend_reason", ""))


def unwrap_long(text: str) -> str:
    """`bjobs -l`, `bhist -l` and `bacct -l` wrap long lines at a fixed width, splitting
    words, and indent the continuation by 21 blanks (26 when the timestamps carry a
    year): join them back, keeping a blank that starts the continuation's text."""
    indent = 26 if re.search(r"^\w{3} \w{3} [ \d]\d [\d:]{8} \d{4}: ", text, re.M) else 21
    return re.sub(rf"\n {{{indent}}}", "", text)


def parse_long_records(output: str) -> dict[str, JobStatus]:
    """Job records of `bjobs -l`, `bhist -l` or `bacct -l` (one block per 'Job <id>')."""
    text = unwrap_long(output)
    statuses: dict[str, JobStatus] = {}
    for block in re.split(r"(?m)^(?=Job <\d+(?:\[\d+\])?>)", text):
        m = re.match(r"Job <(\d+(?:\[\d+\])?)>", block)
        if not m:
            continue
        job_id = m.group(1)
        stat_m = re.search(r"Status <(\w+)>", block)
        stat = stat_m.group(1) if stat_m else ""
        code: Optional[str] = None
        exited = re.search(r"Exited with exit code (\d+)", block)
        if exited:
            code, stat = exited.group(1), stat or "EXIT"
        elif re.search(r"Exited by (?:LSF )?signal", block):
            stat = stat or "EXIT"
        if re.search(r"Done successfully", block):
            code, stat = "0", stat or "DONE"
        if not stat:
            stat = "EXIT" if "Completed <exit>" in block else ("DONE" if "Completed <done>" in block else "")
        if not stat:
            stat = _last_event_state(block)
        term = re.search(r"Completed <exit>; (TERM_\w+:[^\n]*?)\.?$", block, re.M)
        if not term:
            term = re.search(r"\b(TERM_\w+: [^;\n]*)", block)
        reason = term.group(1).rstrip(".") if term else ""
        pend = ""
        if stat in ("PEND", "PSUSP"):
            p = re.search(r"PENDING REASONS:\n\s*(.+)", block)
            pend = p.group(1) if p else ""
        statuses[job_id] = to_status(job_id, stat, code or "", reason, pend)
    return statuses


def _last_event_state(block: str) -> str:
    """bhist -l of an unfinished job has no 'Status <...>': read its last event."""
    if re.search(r"Starting \(Pid|Running with execution home|Dispatched", block):
        return "RUN"
    if re.search(r"Submitted from host", block):
        return "PEND"
    return ""


def parse_bkill(stdout: str, stderr: str) -> dict[str, str]:
    """Per job id: 'terminated', 'signaled', 'in_progress' (a large array's bkill goes on
    in mbatchd), 'already_finished' or 'not_found'."""
    outcome: dict[str, str] = {}
    for m in re.finditer(r"Job <([^>]+)> is being (terminated|signaled)", stdout or ""):
        outcome[m.group(1)] = m.group(2)
    for m in re.finditer(r"Job <([^>]+)>: Operation is in progress", f"{stdout or ''}\n{stderr or ''}"):
        outcome[m.group(1)] = "in_progress"
    for m in re.finditer(r"Job <([^>]+)>: (Job has already finished|No matching job found)", stderr or ""):
        outcome[m.group(1)] = "already_finished" if "finished" in m.group(2) else "not_found"
    return outcome


# -- the Scheduler --------------------------------------------------------------


class LsfScheduler(Scheduler):
    name: ClassVar[str] = "lsf"
    template_name: ClassVar[str] = "lsf.sh.j2"
    directive_prefix: ClassVar[str] = "#BSUB"
    transient_errors: ClassVar[Optional["re.Pattern[str]"]] = re.compile(
        r"LSF is down|not responding|Failed in an LSF library call|Unable to contact|"
        r"Communication time out|timed out|Connection refused|temporarily unavailable|"
        r"Please wait|LIM is down|Master LIM is down|cannot connect",
        re.IGNORECASE,
    )
    #: bhist reads lsb.events: keep each call small
    terminal_batch_size: ClassVar[int] = 50

    def status_format(self) -> str:
        return " ".join(STATUS_COLUMNS) + f" delimiter='{DELIMITER}'"

    def submit_argv(self, request: SubmitRequest) -> list[str]:
        # The script (directives included) goes on stdin. The job name is also given on
        # the command line (which wins over #BSUB lines): finding a job after a submit
        # that timed out relies on it, so a custom template cannot lose it.
        return ["bsub", "-J", request.job_name]

    def submit_stdin(self, request: SubmitRequest) -> Optional[str]:
        return request.script

    def parse_submit(self, stdout: str) -> str:
        return parse_bsub(stdout)

    def find_by_name_argv(self, job_name: str) -> list[str]:
        # an array's name, as array_submit_argv gave it to bsub (`-J name` lists its elements)
        if _ARRAY_NAME_RE.search(job_name):
            job_name = array_spec_name(job_name)
        return ["bjobs", "-a", "-noheader", "-o", f"jobid delimiter='{DELIMITER}'", "-J", job_name]

    def find_by_name_answered(self, result: CommandResult) -> bool:
        # no job of that name: "Job <name> is not found" and exit 255
        return result.ok or bool(not_found_ids(result.stderr))

    def parse_find_by_name(self, stdout: str) -> list[str]:
        return [ln.strip() for ln in stdout.splitlines() if _JOB_ID_RE.match(ln.strip())]

    def status_argv(self, job_ids: Sequence[str]) -> list[str]:
        # an array's tracked elements by the array's id: one argument, every element listed
        return ["bjobs", "-a", "-noheader", "-o", self.status_format(), *compact_ids(job_ids)]

    def parse_status(self, result: CommandResult) -> dict[str, JobStatus]:
        statuses = parse_bjobs_delimited(result.stdout)
        if result.ok:
            return statuses
        # Unknown ids are reported on stderr (exit 255) while the others are listed:
        # an answer, not a failure. Anything else on stderr is a failed query.
        other = [ln for ln in result.stderr.splitlines() if ln.strip() and not _NOT_FOUND_RE.search(ln)]
        if not other and (statuses or not_found_ids(result.stderr)):
            return statuses
        raise self.classify_error(result)

    def terminal_argvs(self, job_ids: Sequence[str]) -> list[list[str]]:
        # While in CLEAN_PERIOD the status query itself carries the exit code and exit
        # reason; after that only the event log knows the job.
        # An array's elements in one `bhist -l ARRAY` (a record per element).
        return [["bhist", "-l", *batch] for batch in chunked(compact_ids(job_ids), self.terminal_batch_size)]

    def parse_terminal(self, result: CommandResult) -> dict[str, JobStatus]:
        found = parse_long_records(result.stdout)
        # bhist: "No matching job found"; bjobs -l: "Job <N> is not found"
        if result.ok or found or "No matching job found" in result.stderr or not_found_ids(result.stderr):
            return found
        raise self.classify_error(result)

    def cancel_argvs(self, job_id: str, grace_seconds: int) -> list[list[str]]:
        # bkill is graceful by itself: SIGINT, SIGTERM, SIGKILL, JOB_TERMINATE_INTERVAL apart
        return [["bkill", job_id]]

    def parse_cancel(self, result: CommandResult) -> bool:
        job_id = result.argv[-1]
        outcomes = parse_bkill(result.stdout, result.stderr)
        outcome = outcomes.get(job_id)
        if outcome is None:
            # a whole array (`bkill ARRAY`) may answer element by element
            of_array = {o for k, o in outcomes.items() if k.startswith(f"{job_id}[")}
            if of_array & {"terminated", "signaled", "in_progress"}:
                outcome = "terminated"
            elif of_array:
                outcome = "already_finished"
        if outcome in ("already_finished", "not_found"):
            return False
        if outcome in ("terminated", "signaled", "in_progress") or result.ok:
            return True
        raise self.classify_error(result)

    # -- arrays: one element is `<array>[<index>]` in bjobs, bhist and bkill
    array_index_variable: ClassVar[Optional[str]] = "LSB_JOBINDEX"
    array_output_index: ClassVar[str] = "%I"

    def array_submit_argv(self, request: SubmitRequest, size: int, throttle: Optional[int]) -> list[str]:
        # the script on stdin as for one job; the index range (and the limit of running
        # elements) goes with the name, which wins over the script's own #BSUB -J
        spec = f"{array_spec_name(request.job_name)}[{self.array_first_index}-{self.array_first_index + size - 1}]"
        if throttle:
            spec += f"%{throttle}"
        return ["bsub", "-J", spec]

    def array_task_id(self, array_id: str, index: int) -> str:
        return f"{array_id}[{index}]"

    def array_of(self, job_id: str) -> Optional[str]:
        m = _ELEMENT_RE.match(job_id)
        return m.group(1) if m else None

    # MAX_JOB_ARRAY_SIZE (lsb.params): "Job array index too large. Job not submitted."
    array_refusal = re.compile(re.escape(ARRAY_TOO_LARGE), re.IGNORECASE)


# -- job variables and the worker ------------------------------------------------

#: -W [HH:]MM
_RUN_LIMIT_RE = re.compile(r"^(?:\d+|\d+:[0-5]?\d)$")
#: -M: a number in LSF_UNIT_FOR_LIMITS, or with a unit
_MEMORY_RE = re.compile(r"^\d+(?:[KMGT]B?)?$")
_RunLimit = in_syntax(_RUN_LIMIT_RE, "'90' (minutes) or '1:30' (hours:minutes)")
_Memory = in_syntax(_MEMORY_RE, "'16GB', '512MB', '16G' or '4096' (in LSF_UNIT_FOR_LIMITS)")
_Word = in_syntax(re.compile(r"^[A-Za-z0-9_.+:@/-]+$"), "a single word", in_form=False)
_GpuModel = in_syntax(re.compile(r"^[A-Za-z0-9_.+-]+$"), "'TeslaV100_SXM2_32GB'", in_form=False)


class LsfJobConfiguration(BatchJobConfiguration):
    queue: _Word = Field(
        default=None,
        title="Queue",
        description="LSF queue to submit to (-q).",
    )
    project: _Word = Field(
        default=None,
        title="Project",
        description="Project to charge the job to (-P).",
    )
    time_limit: _RunLimit = Field(
        default=None,
        title="Run limit",
        description="Wall-clock limit (-W): minutes, or 'HH:MM'. LSF kills the job at the limit (TERM_RUNLIMIT, exit code 140).",
    )
    slots: AtLeastOne = Field(
        default=None,
        title="Slots",
        description="Number of slots/tasks (-n).",
    )
    memory: _Memory = Field(
        default=None,
        title="Memory limit",
        description=(
            "Per-process memory limit (-M), e.g. '16GB' or '512MB'. A bare number is in the "
            "cluster's LSF_UNIT_FOR_LIMITS: KB by default, MB at many sites."
        ),
    )
    reserve_memory: bool = Field(
        default=False,
        title="Reserve memory",
        description="Also reserve the memory for scheduling (-R \"rusage[mem=...]\").",
    )
    resources: Optional[str] = Field(
        default=None,
        title="Resource requirement",
        description="A resource requirement string (-R), e.g. 'span[hosts=1] select[avx2]'.",
    )
    gpus: ZeroOrMore = Field(
        default=None,
        title="GPUs",
        description='GPUs per host (-gpu "num=N").',
    )
    gpu_model: _GpuModel = Field(
        default=None,
        title="GPU model",
        description="GPU model in the -gpu request (gmodel=...).",
    )
    hold: bool = Field(
        default=False,
        title="Hold",
        description="Submit the job held (-H, state PSUSP) until released with bresume.",
    )
    extra_directives: list[str] = Field(
        default_factory=list,
        title="Extra directives",
        description="More bsub options, one per line, without '#BSUB' (e.g. '-x' or '-R \"select[avx2]\"').",
    )

    @field_validator("resources")
    @classmethod
    def _resources(cls, v):
        if v is not None and ("\n" in v or "\r" in v or '"' in v):
            raise ValueError(f"resources: {v!r} must be a single line without double quotes")
        return v or None


class LsfWorker(BatchWorker):
    type: ClassVar[str] = "xm-lsf"
    job_configuration = LsfJobConfiguration
    scheduler: ClassVar[Scheduler] = LsfScheduler()
    _description = (
        "Runs each flow run as an IBM Spectrum LSF batch job (bsub), tracks it with one "
        "bjobs per poll for all jobs (bhist once they are cleaned), and cancels it with bkill. "
        "Runs picked up together whose scripts differ only in their program (a sweep's trials) "
        "go as one job array (bsub -J \"name[1-N]%M\"), each element its own flow run."
    )
    _display_name = "LSF (prefect-xm)"
