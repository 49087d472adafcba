"""PBS: everything the batch worker needs to know about qsub, qstat, qselect, tracejob
and qdel, in two dialects, and the `xm-pbs` worker type.

- **PBS Pro / OpenPBS** (`dialect: pbspro`, the default): ONE `qstat -x -f -F json <ids>`
  per poll. `-x` includes finished jobs (history, `job_state` F with `Exit_status`), so the
  same query that follows a job also gives its end. Without `-x` a finished job answers
  rc 35 "Job has finished"; an id the server no longer knows (history disabled or
  expired) answers rc 153 "qstat: Unknown Job Id <id>".
- **Torque** (`dialect: torque`): `qstat -f <ids>` (text; in Torque `-x` means XML, not
  history). A finished job stays listed in state C with `exit_status` for the server's
  keep_completed seconds, then is gone (tracejob reads the server's logs).

Why the ids are listed rather than querying every job and filtering: on a big site
`qstat -x -f -F json` without ids returns every user's jobs and two weeks of history
(hundreds of thousands of records, megabytes of JSON) on every poll; naming the
tracked ids costs the server one lookup each. qstat answers the known ids on stdout
and names each unknown one on stderr (rc 153), so one purged id does not hide the
others: the parser reads stdout whatever the exit code. Should a server fail the
whole call instead, every job looks absent for that poll and is looked up by the
terminal queries: first batched, then one id at a time for a bounded number of ids
per poll (PER_ID_LOOKUPS), never per job for all of them.

Arrays (sweeps, see arrays.py):
- **PBS Pro**: `qsub -J 1-N[%M]` prints the array's id `123[].server`; its subjobs are
  `123[4].server` (PBS_ARRAY_INDEX=4 in the subjob; `^array_index^` in -o/-e is
  replaced by the index). A range needs at least two indices (`-J 1-1` is "qsub:
  illegal -J value"): a lone run is always submitted on its own. `%M` caps the subjobs
  running at once (max_run_subjobs; PBS Pro 2020.1 / OpenPBS 20.0 and later). The
  poll names each tracked array once, `qstat -x -f -F json -t 123[].server`, which
  lists the array (B while subjobs run, F in the history once all have ended) and every
  subjob (X once ended, with its own Exit_status while it is in the history; a subjob
  deleted before it ran says "Subjob terminated" and has none). `qdel 123[4].server`
  removes one subjob ("Request invalid for finished array subjob" once it has ended),
  `qdel 123[].server` the whole array. More indices than the server's or queue's
  max_array_size (default 10000): "qsub: Array job exceeds server or queue size limit"
  (PBSE_MaxArraySize, rc 3), and the worker splits the array.
- **Torque: no arrays; every run is its own job** (array_index_variable None). Real
  Torque has them (`qsub -t 1-N%M`, `123[].server`, PBS_ARRAYID, `qstat -t`), but the
  Torque dialect is only tested through Slurm's Torque wrappers, which cannot follow
  one: their qsub passes -t to `sbatch --array` and prints the bare Slurm id (`1880`,
  not `1880[]`), the task never sees PBS_ARRAYID (only SLURM_ARRAY_TASK_ID), their
  qstat lists each task under its own raw Slurm job id (1881, 1882, and 1880 for the
  last one) with no array index and the same name for all, and does not know `1880_1`
  (rc 153); their qdel takes numeric ids only, so a task that has not started cannot
  be removed alone (qdel 1880 removes every pending task). A task's status, or its
  cancel, cannot be told from its neighbours'.

Parsers are pure functions over command output (tests/test_pbs_parsers.py runs them on
verbatim outputs from other projects' fixtures and documentation).
"""

from __future__ import annotations

import json
import re
from typing import ClassVar, Literal, Optional, Sequence

from pydantic import Field

from prefect_xm.workers.base import BatchWorker
from prefect_xm.workers.configuration import (
    AtLeastOne, BatchJobConfiguration, ZeroOrMore, in_syntax,
)
from prefect_xm.workers.scheduler import (
    CommandResult,
    JobState,
    JobStatus,
    Scheduler,
    SchedulerError,
    SubmitRequest,
    chunked,
)

# -- state model ----------------------------------------------------------------

# PBS Pro: Q queued, H held, W waiting for its start time, T in transit, M moved to
# another server; R running, B array begun, E exiting, S/U suspended; F/X finished.
PBSPRO_STATES: dict[str, JobState] = {
    **dict.fromkeys("QHWTM", JobState.PENDING),
    **dict.fromkeys("RBESU", JobState.RUNNING),
}
PBSPRO_FINAL = {"F", "X"}
# Torque: C completed (kept keep_completed seconds). Slurm's Torque wrappers print
# U for Slurm states they do not map (OUT_OF_MEMORY, DEADLINE...): unknown.
TORQUE_STATES: dict[str, JobState] = {
    **dict.fromkeys("QHWT", JobState.PENDING),
    **dict.fromkeys("RES", JobState.RUNNING),
}
TORQUE_FINAL = {"C"}

# The comment PBS Pro shows for an ended subjob it describes from its array's record
# (stat_job.c status_subjob): no Exit_status then, only how it ended.
SUBJOB_ENDINGS = {
    "Subjob finished": JobState.COMPLETED,
    "Subjob failed": JobState.FAILED,
    "Subjob terminated": JobState.CANCELLED,
}

HOLD_TYPES = {"u": "user hold", "o": "operator hold", "s": "system hold", "p": "password hold", "n": "no hold"}

# Negative exit statuses are the server's or MoM's verdict, not the job's.
PBSPRO_EXEC_CODES = {
    -1: "JOB_EXEC_FAIL1: the job could not start",
    -2: "JOB_EXEC_FAIL2: the job could not start after its files were set up",
    -3: "JOB_EXEC_RETRY: the job could not start, to be retried",
    -4: "JOB_EXEC_INITABT: the job was aborted when its MoM restarted",
    -24: "JOB_EXEC_KILL_NCPUS_BURST: killed for using more CPUs than requested",
    -25: "JOB_EXEC_KILL_NCPUS_SUM: killed for using more CPUs than requested",
    -26: "JOB_EXEC_KILL_VMEM: killed for exceeding its vmem limit",
    -27: "JOB_EXEC_KILL_MEM: killed for exceeding its memory limit",
    -28: "JOB_EXEC_KILL_CPUT: killed for exceeding its cput limit",
    -29: "JOB_EXEC_KILL_WALLTIME: killed for exceeding its walltime limit",
}
TORQUE_EXEC_CODES = {
    -1: "JOB_EXEC_FAIL1: the job could not start",
    -2: "JOB_EXEC_FAIL2: the job could not start after its files were set up",
    -3: "JOB_EXEC_RETRY: the job could not start, to be retried",
    -4: "JOB_EXEC_INITABT: the job was aborted when its MoM restarted",
    -8: "JOB_EXEC_CMDFAIL: the job's command could not be executed",
    -9: "JOB_EXEC_STDOUTFAIL: the job's output files could not be created",
    -10: "JOB_EXEC_OVERLIMIT_MEM: killed for exceeding its memory limit",
    -11: "JOB_EXEC_OVERLIMIT_WT: killed for exceeding its walltime limit",
    -12: "JOB_EXEC_OVERLIMIT_CPUT: killed for exceeding its cput limit",
}

_JOB_ID = r"\d+(?:\[\d*\])?(?:\.[A-Za-z0-9_.-]+)?"
_JOB_ID_RE = re.compile(rf"^{_JOB_ID}$")
# PBS Pro arrays: the array `123[].server`, its subjob `123[4].server`
_SUBJOB_RE = re.compile(r"^(\d+)\[(\d+)\](.*)$")
_ARRAY_RE = re.compile(r"^(\d+)(?:\[\])?(.*)$")
# PBSE_MaxArraySize (the server's or the queue's max_array_size)
_ARRAY_TOO_LARGE = re.compile(r"Array job exceeds server or queue size limit|max_array_size", re.IGNORECASE)
_UNKNOWN_RE = re.compile(r"Unknown Job Id:?\s+(\S+)")
# qstat: "qstat: 12.srv Job has finished, use -x ..."; qdel: "qdel: Job has finished 12.srv"
_FINISHED_RE = re.compile(rf"({_JOB_ID})\s+Job has finished|Job has finished\s+({_JOB_ID})")


def exit_status_meaning(code: int, dialect: str = "pbspro") -> tuple[JobState, str, Optional[int]]:
    """(state, reason, signal) of a finished job's Exit_status / exit_status.
    0 completed; 256+N killed by signal N (265 = SIGKILL: what PBS Pro's qdel ends
    with, so cancelled); negative = the server's or MoM's reason (walltime, memory...)."""
    if code == 0:
        return JobState.COMPLETED, "", None
    if code > 256:
        signal = code - 256
        if dialect == "pbspro" and code == 265:
            return JobState.CANCELLED, "killed by SIGKILL (qdel)", signal
        return JobState.FAILED, f"killed by signal {signal}", signal
    if code < 0:
        table = PBSPRO_EXEC_CODES if dialect == "pbspro" else TORQUE_EXEC_CODES
        return JobState.FAILED, table.get(code, "the server ended the job"), None
    return JobState.FAILED, "", None


def job_status(job_id: str, attrs: dict, dialect: str = "pbspro") -> JobStatus:
    """A job's status from its qstat attributes (JSON, `-f` text or Torque XML)."""
    native = str(attrs.get("job_state", "")).strip()
    states, final = (PBSPRO_STATES, PBSPRO_FINAL) if dialect == "pbspro" else (TORQUE_STATES, TORQUE_FINAL)
    comment = str(attrs.get("comment", "") or "").strip()
    raw_exit = attrs.get("Exit_status", attrs.get("exit_status"))
    if native in final:
        if raw_exit is None or str(raw_exit).strip() == "":
            if dialect == "pbspro" and comment in SUBJOB_ENDINGS:
                # a subjob whose own record is gone, shown from its array's
                return JobStatus(job_id, SUBJOB_ENDINGS[comment], native, comment)
            if dialect == "pbspro":
                # PBS Pro records no exit status for a job deleted before it ran.
                return JobStatus(job_id, JobState.CANCELLED, native, comment or "ended without running")
            # Torque always prints exit_status with C; Slurm's Torque wrappers never do.
            return JobStatus(job_id, JobState.FAILED, native, comment or "no exit_status reported")
        code = int(str(raw_exit).strip())
        state, reason, signal = exit_status_meaning(code, dialect)
        if comment and state != JobState.COMPLETED:
            reason = f"{reason}; {comment}" if reason else comment
        return JobStatus(job_id, state, native, reason, code, signal)
    state = states.get(native, JobState.UNKNOWN)
    reason = comment
    if native == "H" and not reason:
        hold = str(attrs.get("Hold_Types", "")).strip()
        if hold:
            reason = f"Hold_Types={hold} ({', '.join(HOLD_TYPES.get(h, h) for h in hold)})"
    code = int(str(raw_exit).strip()) if re.match(r"^\s*-?\d+\s*$", str(raw_exit or "")) else None
    return JobStatus(job_id, state, native, reason, code)  # E (exiting) may know its exit status


# -- parsers --------------------------------------------------------------------


def parse_qsub(stdout: str) -> str:
    """The job id qsub prints: the whole last id-shaped line, server name included
    (`1234.server`), after any site banners; or the id in interactive qsub's
    'qsub: waiting for job <id> to start'."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if _JOB_ID_RE.match(line):
            return line
        m = re.match(rf"^qsub: (?:waiting for )?job ({_JOB_ID}) ", line)
        if m:
            return m.group(1)
    raise ValueError(f"no job id in qsub output: {stdout.strip()[-500:]!r}")


def parse_qstat_json(text: str, dialect: str = "pbspro") -> dict[str, JobStatus]:
    """Statuses from `qstat -f -F json` (PBS Pro). Text around the JSON document (site
    banners) is ignored; Exit_status may be a number or (ERT's fake) a string."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as exc:
        raise SchedulerError(f"qstat printed invalid JSON: {exc}") from None
    jobs = data.get("Jobs") or {}
    return {job_id: job_status(job_id, attrs, dialect) for job_id, attrs in jobs.items()}


def parse_qstat_full_records(text: str) -> dict[str, dict[str, str]]:
    """Attributes per job from `qstat -f` text: 'Job Id: <id>' then 'name = value' lines
    (PBS indents them with 4 spaces, Slurm's Torque wrappers with a tab). Long values
    wrap mid-word onto continuation lines (a tab or 8 spaces; stray unindented lines
    inside a value, as in Torque's sched_hint): joined without a separator."""
    records: dict[str, dict[str, str]] = {}
    attrs: Optional[dict[str, str]] = None
    indent: Optional[str] = None
    last: Optional[str] = None
    for line in text.splitlines():
        m = re.match(r"^Job Id:\s*(\S+)", line)
        if m:
            attrs = records.setdefault(m.group(1), {})
            indent, last = None, None
            continue
        if attrs is None or not line.strip():
            continue
        a = re.match(r"^(\s+)([A-Za-z_][\w.]*) = ?(.*)$", line)
        if a and (indent is None or a.group(1) == indent):
            indent = indent or a.group(1)
            last = a.group(2)
            attrs[last] = a.group(3).rstrip()
        elif last is not None:
            attrs[last] += line.strip()
    return records


def parse_qstat_full(text: str, dialect: str = "pbspro") -> dict[str, JobStatus]:
    return {job_id: job_status(job_id, attrs, dialect) for job_id, attrs in parse_qstat_full_records(text).items()}


def parse_tracejob(text: str, dialect: str = "torque") -> dict[str, JobStatus]:
    """A finished job's record from `tracejob ID` (the server's logs): 'Job: <id>' and
    the 'Exit_status=N' line."""
    job = re.search(r"^Job:\s*(\S+)", text, re.MULTILINE)
    exit_m = re.search(r"\bExit_status=(-?\d+)", text)
    if not job or not exit_m:
        return {}
    native = "F" if dialect == "pbspro" else "C"
    return {job.group(1): job_status(job.group(1), {"job_state": native, "Exit_status": exit_m.group(1)}, dialect)}


def unknown_ids(stderr: str) -> list[str]:
    """Ids qstat/qdel named as unknown ('qstat: Unknown Job Id 2') or finished
    ('qstat: 12.srv Job has finished, use -x or -H ...')."""
    return _UNKNOWN_RE.findall(stderr) + [a or b for a, b in _FINISHED_RE.findall(stderr)]


def only_unknown_errors(stderr: str) -> bool:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return all(_UNKNOWN_RE.search(ln) or "Job has finished" in ln for ln in lines)


# -- the Scheduler --------------------------------------------------------------


class PbsScheduler(Scheduler):
    """PBS Pro / OpenPBS. TorqueScheduler below holds only what differs."""

    name: ClassVar[str] = "pbs"
    template_name: ClassVar[str] = "pbs.sh.j2"
    directive_prefix: ClassVar[str] = "#PBS"
    #: what says "the server did not answer"; the exit codes are the ones ERT retries
    #: qsub on (pbs_errno & 0xff)
    transient_errors: ClassVar[Optional["re.Pattern[str]"]] = re.compile(
        r"pbs_iff|cannot connect to (?:host|server)|Connection refused|Invalid credential|"
        r"Premature end of message|timed out|Socket timed out|Unable to contact slurm controller|"
        r"temporarily unavailable|Communication failure",
        re.IGNORECASE,
    )
    transient_codes: ClassVar[frozenset[int]] = frozenset({162, 171, 183})
    dialect: ClassVar[str] = "pbspro"
    terminal_batch_size: ClassVar[int] = 100

    def error_text(self, result: CommandResult) -> str:
        # both streams: PBS commands and the wrappers sites put around them differ in
        # which one carries the error, and neither hides the other
        return (result.stderr.strip() + "\n" + result.stdout.strip()).strip()

    def submit_argv(self, request: SubmitRequest) -> list[str]:
        return ["qsub", request.script_path]

    def parse_submit(self, stdout: str) -> str:
        return parse_qsub(stdout)

    def find_by_name_argv(self, job_name: str) -> list[str]:
        return ["qselect", "-x", "-N", job_name]  # -x: finished jobs too

    def parse_find_by_name(self, stdout: str) -> list[str]:
        return [ln.strip() for ln in stdout.splitlines() if _JOB_ID_RE.match(ln.strip())]

    def status_argv(self, job_ids: Sequence[str]) -> list[str]:
        # Subjobs are asked for by their array, once, with -t (every subjob of it)
        names = list(dict.fromkeys(self.array_of(job_id) or job_id for job_id in job_ids))
        subjobs = ["-t"] if any(self.array_of(job_id) for job_id in job_ids) else []
        return ["qstat", "-x", "-f", "-F", "json", *subjobs, *names]

    def parse_status(self, result: CommandResult) -> dict[str, JobStatus]:
        if "{" in result.stdout:
            return parse_qstat_json(result.stdout, self.dialect)  # partial answers too (rc 153)
        if result.ok or only_unknown_errors(result.stderr):
            return {}
        raise self.classify_error(result)

    def terminal_argvs(self, job_ids: Sequence[str]) -> list[list[str]]:
        # Batches of jobs and arrays (an array's subjobs all in one -t); then one job
        # or one array per call, should the server fail a whole batch for one id.
        names = list(dict.fromkeys(self.array_of(job_id) or job_id for job_id in job_ids))
        argvs = []
        for batch in chunked(names, self.terminal_batch_size):
            argvs.append(self.status_argv([j for j in job_ids if (self.array_of(j) or j) in batch]))
        if len(names) > 1:
            argvs += [self.status_argv([j for j in job_ids if (self.array_of(j) or j) == name])
                      for name in names[: self.per_id_lookups]]
        # history disabled or expired: the server's logs, where readable (per job or subjob)
        argvs += [["tracejob", "-n", "3", job_id] for job_id in job_ids[: self.per_id_lookups]]
        return argvs

    def parse_terminal(self, result: CommandResult) -> dict[str, JobStatus]:
        if result.argv[0] == "tracejob":
            return parse_tracejob(result.stdout, self.dialect)
        return self.parse_status(result)

    def cancel_argvs(self, job_id: str, grace_seconds: int) -> list[list[str]]:
        # qdel itself sends SIGTERM, waits the server's kill_delay, then SIGKILL.
        return [["qdel", job_id]]

    def parse_cancel(self, result: CommandResult) -> bool:
        if result.ok:
            return True
        text = result.stderr + result.stdout
        if (
            unknown_ids(text)
            or "Job has finished" in text
            or re.search(r"invalid state for job|Request invalid for state of job|"
                         r"Request invalid for finished array subjob", text, re.IGNORECASE)
        ):
            return False
        if not text.strip():
            return False  # Slurm's Torque qdel: silent rc 1 for finished or unknown ids
        raise self.classify_error(result)

    # -- arrays: `qsub -J`; the array is `123[].server`, a subjob `123[4].server` in
    # qstat (-t), qdel and tracejob
    array_index_variable: ClassVar[Optional[str]] = "PBS_ARRAY_INDEX"
    array_output_index: ClassVar[str] = "^array_index^"
    #: `-J 1-N%M` (max_run_subjobs): PBS Pro 2020.1 / OpenPBS 20.0 and later; an older
    #: server refuses the submission ("qsub: illegal -J value") if a throttle is set
    array_throttles: ClassVar[bool] = True

    def array_submit_argv(self, request: SubmitRequest, size: int, throttle: Optional[int]) -> list[str]:
        if size < 2:
            raise ValueError("a PBS Pro array has at least two subjobs (-J X-Y needs Y > X)")
        spec = f"{self.array_first_index}-{self.array_first_index + size - 1}"
        if throttle:
            spec += f"%{throttle}"
        return ["qsub", "-J", spec, request.script_path]

    def parse_array_submit(self, stdout: str) -> str:
        job_id = parse_qsub(stdout)
        m = _ARRAY_RE.match(job_id)
        if not m:
            raise ValueError(f"no array id in qsub output: {stdout.strip()[-500:]!r}")
        return f"{m.group(1)}[]{m.group(2)}"  # as printed: `123[].server`

    def array_task_id(self, array_id: str, index: int) -> str:
        m = _ARRAY_RE.match(array_id)
        if not m:
            raise ValueError(f"not a PBS array id: {array_id!r}")
        return f"{m.group(1)}[{index}]{m.group(2)}"

    def array_of(self, job_id: str) -> Optional[str]:
        m = _SUBJOB_RE.match(job_id)
        return f"{m.group(1)}[]{m.group(3)}" if m else None

    array_refusal = _ARRAY_TOO_LARGE


class TorqueScheduler(PbsScheduler):
    dialect: ClassVar[str] = "torque"
    # No arrays: see the module docstring (Slurm's Torque wrappers cannot follow a task).
    array_index_variable: ClassVar[Optional[str]] = None

    def submit_argv(self, request: SubmitRequest) -> list[str]:
        # The script's #PBS -o/-e would do for Torque itself, but Slurm's Torque qsub
        # passes its own defaults to sbatch, which override the script: say them here.
        return ["qsub", "-o", f"{request.run_dir}/job.out", "-e", f"{request.run_dir}/job.err", request.script_path]

    def find_by_name_argv(self, job_name: str) -> list[str]:
        # Torque's qselect -N is missing from Slurm's wrappers: list the jobs, filter here
        # (only on a retried submit or a restart, never per poll).
        return ["qstat", "-f"]

    def jobs_named(self, job_name: str, stdout: str) -> list[str]:
        return [
            job_id for job_id, attrs in parse_qstat_full_records(stdout).items()
            if attrs.get("Job_Name") == job_name
        ]

    def find_by_name_answered(self, result: CommandResult) -> bool:
        # Slurm's qstat exits 153, silently, when there is no job at all.
        return result.ok or (result.returncode == 153 and not result.stdout.strip() and not result.stderr.strip())

    def status_argv(self, job_ids: Sequence[str]) -> list[str]:
        return ["qstat", "-f", *job_ids]

    def parse_status(self, result: CommandResult) -> dict[str, JobStatus]:
        if "Job Id:" in result.stdout:
            return parse_qstat_full(result.stdout, self.dialect)  # partial answers too (rc 153)
        if result.ok or only_unknown_errors(result.stderr):
            return {}
        raise self.classify_error(result)

    def terminal_argvs(self, job_ids: Sequence[str]) -> list[list[str]]:
        # C records carry exit_status for keep_completed seconds; after that, tracejob.
        argvs = [self.status_argv(batch) for batch in chunked(job_ids, self.terminal_batch_size)]
        argvs += [["tracejob", "-n", "3", job_id] for job_id in job_ids[: self.per_id_lookups]]
        return argvs


DIALECTS: dict[str, PbsScheduler] = {"pbspro": PbsScheduler(), "torque": TorqueScheduler()}


# -- job variables and the worker ------------------------------------------------

# [[[DD:]HH:]MM:]SS: seconds, MM:SS, HH:MM:SS (Torque also DD:HH:MM:SS)
_WALLTIME_RE = re.compile(r"^\d+(?::\d{1,2}){0,3}$")
# PBS sizes: an integer with an optional b/kb/mb/gb/tb/pb (or w: words) suffix
_SIZE_RE = re.compile(r"^\d+(?:[kKmMgGtTpP]?[bBwW])?$")
_Walltime = in_syntax(_WALLTIME_RE, "'01:30:00' (HH:MM:SS), '90:00', '5400' (seconds)")
_Size = in_syntax(_SIZE_RE, "'16gb', '512mb'")
_Word = in_syntax(re.compile(r"^[A-Za-z0-9_.@+-]+$"), "a single word", in_form=False)


class PbsJobConfiguration(BatchJobConfiguration):
    dialect: Literal["pbspro", "torque"] = Field(
        default="pbspro",
        title="PBS dialect",
        description=(
            "'pbspro' for PBS Professional / OpenPBS (qstat -x -F json, -l select=...), "
            "'torque' for Torque or Slurm's Torque wrappers (qstat -f, -l nodes=N:ppn=C)."
        ),
    )
    queue: _Word = Field(
        default=None,
        title="Queue",
        description="Queue to submit to (-q).",
    )
    account: _Word = Field(
        default=None,
        title="Account",
        description="Account to charge (-A).",
    )
    time_limit: _Walltime = Field(
        default=None,
        title="Walltime",
        description="Wall-clock limit (-l walltime=): 'HH:MM:SS', 'MM:SS' or seconds.",
    )
    nodes: AtLeastOne = Field(
        default=None,
        title="Nodes",
        description="Number of nodes (chunks in PBS Pro's select; nodes= in Torque).",
    )
    cpus: AtLeastOne = Field(
        default=None,
        title="CPUs per node",
        description="CPUs per node (ncpus= in PBS Pro's select; ppn= in Torque).",
    )
    memory: _Size = Field(
        default=None,
        title="Memory",
        description="Memory, e.g. '16gb': per node in PBS Pro (mem= in select), for the job in Torque (-l mem=).",
    )
    gpus: ZeroOrMore = Field(
        default=None,
        title="GPUs per node",
        description="GPUs per node (ngpus= in PBS Pro's select; gpus= in Torque's nodes=).",
    )
    hold: bool = Field(
        default=False,
        title="Submit held",
        description="Submit the job held (-h): it waits until released with qrls.",
    )


class PbsWorker(BatchWorker):
    type: ClassVar[str] = "xm-pbs"
    job_configuration = PbsJobConfiguration
    scheduler: ClassVar[Scheduler] = DIALECTS["pbspro"]
    _description = (
        "Runs each flow run as a PBS Pro/OpenPBS or Torque batch job (qsub), tracks it with "
        "one qstat per poll for all jobs, and cancels it with qdel. Locally or over SSH."
    )
    _display_name = "PBS Pro / Torque (prefect-xm)"

    def scheduler_for(self, configuration: BatchJobConfiguration) -> Scheduler:
        return DIALECTS[getattr(configuration, "dialect", "pbspro")]
