"""Slurm: everything the batch worker needs to know about sbatch, squeue, scontrol,
sacct and scancel, and the `xm-slurm` worker type.

Parsers are pure functions over command output (tested on verbatim outputs in
tests/test_slurm_parsers.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Optional, Sequence

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
    combine_parts,
)

# -- state model ----------------------------------------------------------------

# squeue's compact codes (%t) and the long names (%T) sacct and scontrol print.
COMPACT_STATES = {
    "BF": "BOOT_FAIL", "CA": "CANCELLED", "CD": "COMPLETED", "CF": "CONFIGURING",
    "CG": "COMPLETING", "DL": "DEADLINE", "F": "FAILED", "NF": "NODE_FAIL",
    "OOM": "OUT_OF_MEMORY", "PD": "PENDING", "PR": "PREEMPTED", "R": "RUNNING",
    "RD": "RESV_DEL_HOLD", "RF": "REQUEUE_FED", "RH": "REQUEUE_HOLD", "RQ": "REQUEUED",
    "RS": "RESIZING", "RV": "REVOKED", "SI": "SIGNALING", "SE": "SPECIAL_EXIT",
    "SO": "STAGE_OUT", "ST": "STOPPED", "S": "SUSPENDED", "TO": "TIMEOUT",
}

STATE_MAP: dict[str, JobState] = {
    **dict.fromkeys(
        ["PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"],
        JobState.PENDING,
    ),
    **dict.fromkeys(
        ["RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING", "SUSPENDED", "STOPPED"],
        JobState.RUNNING,
    ),
    "COMPLETED": JobState.COMPLETED,
    **dict.fromkeys(
        ["FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "SPECIAL_EXIT", "PREEMPTED", "REVOKED"],
        JobState.FAILED,
    ),
    "CANCELLED": JobState.CANCELLED,
}

# 123, 123_4, 123_[5-9%2], 123+0; never step ids (123.batch, 123.0, 123.ext+)
_JOB_ID = r"\d+(?:_\d+|_\[[^\]\s]*\]|\+\d+)?"
_JOB_ID_RE = re.compile(rf"^{_JOB_ID}$")


def normalize_state(raw: str) -> tuple[str, str]:
    """('CANCELLED by 0' -> 'CANCELLED', 'by 0'); 'PD' -> 'PENDING'; 'RUNING' stays as is."""
    raw = raw.strip()
    word, _, rest = raw.partition(" ")
    word = word.rstrip("+")  # sacct truncates long names with '+'
    word = COMPACT_STATES.get(word, word)
    return word, rest.strip()


def to_status(job_id: str, raw_state: str, reason: str = "", exit_field: str = "") -> JobStatus:
    native, detail = normalize_state(raw_state)
    state = STATE_MAP.get(native, JobState.UNKNOWN)
    exit_code, signal = parse_exit_code(exit_field)
    if reason.startswith("(") and reason.endswith(")"):
        reason = reason[1:-1]
    return JobStatus(
        job_id=job_id,
        state=state,
        native_state=native,
        reason=reason or detail,
        exit_code=exit_code,
        signal=signal,
    )


def parse_exit_code(field: str) -> tuple[int | None, int | None]:
    """Slurm prints 'code:signal' (e.g. '0:15' = killed by SIGTERM)."""
    m = re.match(r"^\s*(-?\d+)(?::(\d+))?\s*$", field or "")
    if not m:
        return None, None
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None


def expand_array_id(job_id: str) -> list[str]:
    """'123_[5-7%2]' -> ['123_5', '123_6', '123_7']; other ids stay as they are."""
    m = re.match(r"^(\d+)_\[([^\]]+)\]$", job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    ids: list[str] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        step = 1
        if ":" in hi:
            hi, _, s = hi.partition(":")
            step = int(s)
        if hi:
            ids.extend(f"{base}_{i}" for i in range(int(lo), int(hi) + 1, step))
        else:
            ids.append(f"{base}_{lo}")
    return ids


# -- parsers --------------------------------------------------------------------


def parse_sbatch(stdout: str) -> str:
    """The job id from sbatch's stdout, with or without --parsable, with site banners
    printed before it (the id is on the last line that carries one)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        m = re.match(r"^(\d+)(?:;\S+)?$", line)  # --parsable: "123" or "123;cluster"
        if m:
            return m.group(1)
        m = re.search(r"Submitted batch job (\d+)", line)
        if m:
            return m.group(1)
    raise ValueError(f"no job id in sbatch output: {stdout.strip()[-500:]!r}")


#: %S of a pending job: the backfill scheduler's estimate, or N/A / Unknown without one
_START_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")


def parse_squeue(
    output: str, *, delimiter: str = "|", columns: Sequence[str] = ("id", "state", "reason")
) -> dict[str, JobStatus]:
    """Statuses from squeue output in a custom format (`-h -o '%i|%T|%r'`; with a "start"
    column, `%S`, a pending job's expected start), or in squeue's default table (a header
    line starting with JOBID). Lines that are not job lines (site banners, blank lines)
    are skipped; pending array ranges are expanded."""
    lines = output.splitlines()
    header = next((ln for ln in lines if ln.strip()), "")
    if header.split()[:1] == ["JOBID"]:
        return _parse_squeue_table(lines)
    statuses: dict[str, JobStatus] = {}
    for line in lines:
        fields = line.strip().split(delimiter) if delimiter != " " else line.split()
        # A custom -o may carry a literal prefix ("GC3Pie^%i^..."): align on the id column.
        while fields and len(fields) > len(columns) and not _JOB_ID_RE.match(fields[0]):
            fields = fields[1:]
        if len(fields) < len(columns):
            continue
        row = dict(zip(columns, (f.strip() for f in fields)))
        if not _JOB_ID_RE.match(row["id"]):
            continue
        start = row.get("start", "")
        for job_id in expand_array_id(row["id"]):
            status = to_status(job_id, row["state"], row.get("reason", ""))
            if status.state == JobState.PENDING and _START_TIME_RE.match(start):
                status = dataclasses.replace(status, expected_start=start)
            statuses[job_id] = status
    return statuses


def _parse_squeue_table(lines: list[str]) -> dict[str, JobStatus]:
    statuses: dict[str, JobStatus] = {}
    header = None
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        if header is None:
            header = parts
            continue
        row = dict(zip(header, parts))
        job_id = row.get("JOBID", "")
        if not _JOB_ID_RE.match(job_id):
            continue
        last = parts[-1]
        reason = last if last.startswith("(") else ""
        for jid in expand_array_id(job_id):
            statuses[jid] = to_status(jid, row.get("ST", row.get("STATE", "")), reason)
    return statuses


def parse_scontrol_show_job(output: str) -> dict[str, JobStatus]:
    """Records of `scontrol show job [-o] [ID]`: JobId=, JobState=, Reason=, ExitCode=."""
    statuses: dict[str, JobStatus] = {}
    for record in re.split(r"(?=\bJobId=)", output):
        m = re.search(r"\bJobId=(\d+)", record)
        if not m:
            continue
        job_id = m.group(1)
        array = re.search(r"\bArrayJobId=(\d+) ArrayTaskId=(\d+)", record)
        if array:
            job_id = f"{array.group(1)}_{array.group(2)}"
        het = re.search(r"\bHetJobId=(\d+) HetJobOffset=(\d+)", record)
        if het:
            job_id = f"{het.group(1)}+{het.group(2)}"
        state = re.search(r"\bJobState=(\S+)", record)
        if not state:
            continue
        reason = re.search(r"\bReason=(\S+)", record)
        exit_field = re.search(r"\bExitCode=(\S+)", record)
        statuses[job_id] = to_status(
            job_id,
            state.group(1),
            reason.group(1) if reason else "",
            exit_field.group(1) if exit_field else "",
        )
        if array or het:  # also findable under the raw JobId scontrol was asked for
            statuses.setdefault(m.group(1), statuses[job_id])
    return statuses


def parse_sacct(
    output: str,
    *,
    columns: Sequence[str] = ("JobIDRaw", "State", "ExitCode", "Reason"),
    delimiter: str = "|",
) -> dict[str, JobStatus]:
    """Job (not step) records of `sacct -n -P -o <columns>`."""
    cols = [c.lower() for c in columns]
    id_col = next(c for c in cols if c in ("jobidraw", "jobid"))
    statuses: dict[str, JobStatus] = {}
    for line in output.splitlines():
        fields = line.split(delimiter)
        if len(fields) < len(cols):
            continue
        row = dict(zip(cols, fields))
        job_id = row[id_col].strip()
        if not _JOB_ID_RE.match(job_id):
            continue  # header lines, step lines (123.batch, 123.0, 123.ext+)
        for jid in expand_array_id(job_id):
            statuses[jid] = to_status(
                jid, row.get("state", ""), row.get("reason", ""), row.get("exitcode", "")
            )
    return statuses


def combine_components(job_id: str, statuses: dict[str, JobStatus]) -> Optional[JobStatus]:
    """The status of a job as a whole when only its components are listed: array tasks
    (123_4) or het-job components (123+0). Not started until all have started; ended
    only when all have ended, failed if any failed."""
    parts = [s for k, s in statuses.items() if k.startswith((f"{job_id}_", f"{job_id}+"))]
    return combine_parts(job_id, parts, "COMPLETED")


# -- the Scheduler --------------------------------------------------------------


class SlurmScheduler(Scheduler):
    name: ClassVar[str] = "slurm"
    template_name: ClassVar[str] = "slurm.sh.j2"
    directive_prefix: ClassVar[str] = "#SBATCH"
    transient_errors: ClassVar[Optional["re.Pattern[str]"]] = re.compile(
        r"Socket timed out|Unable to contact slurm controller|Connection refused|"
        r"Zero Bytes were transmitted|Communication connection failure|"
        r"slurm_receive_msg|Transport endpoint|temporarily unavailable",
        re.IGNORECASE,
    )
    #: %S: the expected start of a pending job, in the same one squeue per poll
    status_fields: ClassVar[str] = "%i|%T|%r|%S"
    status_columns: ClassVar[tuple[str, ...]] = ("id", "state", "reason", "start")
    # Bounded batches: one sacct over hundreds of ids can hang a slurmdbd.
    terminal_batch_size: ClassVar[int] = 100

    def submit_argv(self, request: SubmitRequest) -> list[str]:
        return ["sbatch", "--parsable", request.script_path]

    def parse_submit(self, stdout: str) -> str:
        return parse_sbatch(stdout)

    def find_by_name_argv(self, job_name: str) -> list[str]:
        return ["squeue", "-h", "-t", "all", "--name", job_name, "-o", "%i"]

    def parse_find_by_name(self, stdout: str) -> list[str]:
        return [ln.strip() for ln in stdout.splitlines() if _JOB_ID_RE.match(ln.strip())]

    def status_argv(self, job_ids: Sequence[str]) -> list[str]:
        # --me rather than -j: one purged id makes `squeue -j` fail for all of them.
        return ["squeue", "--me", "-h", "-t", "all", "-o", self.status_fields]

    def parse_status(self, result: CommandResult) -> dict[str, JobStatus]:
        if not result.ok:
            raise self.classify_error(result)
        return parse_squeue(result.stdout, columns=self.status_columns)

    def lookup(self, job_id: str, statuses: dict[str, JobStatus]) -> Optional[JobStatus]:
        return statuses.get(job_id) or combine_components(job_id, statuses)

    def terminal_argvs(self, job_ids: Sequence[str]) -> list[list[str]]:
        # scontrol knows finished jobs for MinJobAge (300 s by default) and gives the
        # exit code; sacct covers the rest where accounting is enabled.
        argvs = [["scontrol", "show", "job", "-o", job_id] for job_id in job_ids[: self.per_id_lookups]]
        argvs += [
            # JobID, not JobIDRaw: an array task's raw id is a number of its own
            ["sacct", "-X", "-n", "-P", "-j", ",".join(batch), "-o", "JobID,State,ExitCode,Reason"]
            for batch in chunked(job_ids, self.terminal_batch_size)
        ]
        return argvs

    def parse_terminal(self, result: CommandResult) -> dict[str, JobStatus]:
        text = result.stdout
        if not result.ok:
            err = result.stderr
            if "Invalid job id" in err or "accounting storage is disabled" in err.lower():
                return {}
            raise self.classify_error(result)
        if result.argv[0] == "scontrol":
            return parse_scontrol_show_job(text)
        columns = result.argv[result.argv.index("-o") + 1].split(",") if "-o" in result.argv else None
        return parse_sacct(text, columns=columns) if columns else parse_sacct(text)

    # -- arrays: one task is `<array>_<index>` in squeue, sacct, scontrol and scancel
    array_index_variable: ClassVar[Optional[str]] = "SLURM_ARRAY_TASK_ID"
    array_output_index: ClassVar[str] = "%a"

    def array_submit_argv(self, request: SubmitRequest, size: int, throttle: Optional[int]) -> list[str]:
        spec = f"{self.array_first_index}-{self.array_first_index + size - 1}"
        if throttle:
            spec += f"%{throttle}"
        return ["sbatch", "--parsable", f"--array={spec}", request.script_path]

    def array_task_id(self, array_id: str, index: int) -> str:
        return f"{array_id}_{index}"

    def array_of(self, job_id: str) -> Optional[str]:
        m = re.match(r"^(\d+)_(?:\d+|\[[^\]]*\])$", job_id)
        return m.group(1) if m else None

    # -- heterogeneous jobs: component k of job 123 is `123+k` in squeue, scontrol, scancel
    het_separator: ClassVar[Optional[str]] = "#SBATCH hetjob"
    # One task on the component's first node with its CPUs there, as a single job's
    # batch script runs; SLURM_JOB_CPUS_PER_NODE_HET_GROUP_k reads like "4(x2),2".
    het_launch: ClassVar[str] = (
        'xm_cpus=SLURM_JOB_CPUS_PER_NODE_HET_GROUP_$k; xm_cpus=${!xm_cpus:-1}; '
        'srun --het-group="$k" --nodes=1 --ntasks=1 --cpus-per-task="${xm_cpus%%[(,]*}" '
        '--output="$d/job.out" --error="$d/job.err"'
    )

    def het_component_id(self, job_id: str, offset: int) -> str:
        return f"{job_id}+{offset}"

    def is_het_component(self, job_id: str) -> bool:
        return bool(re.match(r"^\d+\+\d+$", job_id))

    def het_job_of(self, component_id: str) -> str:
        return component_id.split("+", 1)[0]

    # MaxArraySize: "Invalid job array specification"; a QOS's MaxSubmitJobs counts tasks
    array_refusal = re.compile(r"Invalid job array specification|MaxArraySize|QOSMaxSubmitJob|job submit limit",
                               re.IGNORECASE)

    def cancel_argvs(self, job_id: str, grace_seconds: int) -> list[list[str]]:
        return [
            ["scancel", "--signal=TERM", "--full", job_id],
            # --verbose: without it, scancel (22.05, measured) of a job that has ended or
            # that it does not know prints nothing and exits 0, exactly as a cancel that
            # worked; with it, it names the job it terminates and says why it could not.
            ["scancel", "--verbose", job_id],
        ]

    def parse_cancel(self, result: CommandResult) -> bool:
        err = result.stderr
        if "Invalid job id" in err or "already completing or completed" in err:
            return False  # nothing to cancel: the job's record (if any) says how it ended
        if result.ok:
            # scancel exits 0 even when it was refused ("Access/permission denied")
            if "error:" in err:
                raise SchedulerError(err.strip(), result)
            # "scancel: Terminating job N". A silent success (a scancel run without
            # --verbose) cannot tell an accepted cancel from a job already gone; taken as
            # accepted, the poller's next look still finds how the job really ended.
            return True
        raise self.classify_error(result)


# -- job variables and the worker ------------------------------------------------

_MEMORY_RE = re.compile(r"^\d+[KMGT]?$")


#: --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit (Slurm reads
#: UNLIMITED and INFINITE in any case)
TIME_LIMIT = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
    r"|UNLIMITED|INFINITE|unlimited|infinite)$"
)

_TimeLimit = in_syntax(TIME_LIMIT, "'90' (minutes), '2:30:00', '1-12:00:00'")
_Memory = in_syntax(_MEMORY_RE, "'16G', '512M', '4096'")
_Word = in_syntax(re.compile(r"^\S+$"), "a single word", in_form=False)
#: --constraint is an expression of node features ('a100&ib'), not one word
_Line = in_syntax(re.compile(r"^[^\n\r]*$"), "a single line", in_form=False)


class SlurmJobConfiguration(BatchJobConfiguration):
    partition: _Word = Field(
        default=None,
        title="Partition",
        description="Slurm partition (queue) to submit to (--partition).",
    )
    account: _Word = Field(
        default=None,
        title="Account",
        description="Account to charge the job to (--account).",
    )
    qos: _Word = Field(
        default=None,
        title="QOS",
        description="Quality of service (--qos).",
    )
    time_limit: _TimeLimit = Field(
        default=None,
        title="Time limit",
        description="Wall-clock limit (--time): minutes, 'HH:MM:SS' or 'D-HH:MM:SS'.",
    )
    nodes: AtLeastOne = Field(
        default=None,
        title="Nodes",
        description="Number of nodes (--nodes).",
    )
    ntasks: AtLeastOne = Field(
        default=None,
        title="Tasks",
        description="Number of tasks (--ntasks).",
    )
    cpus_per_task: AtLeastOne = Field(
        default=None,
        title="CPUs per task",
        description="CPUs per task (--cpus-per-task).",
    )
    memory: _Memory = Field(
        default=None,
        title="Memory",
        description="Memory per node (--mem), e.g. '16G' or '512M'.",
    )
    gpus: ZeroOrMore = Field(
        default=None,
        title="GPUs",
        description="GPUs per node, requested as --gres=gpu[:type]:N.",
    )
    gpu_type: _Word = Field(
        default=None,
        title="GPU type",
        description="GPU type in the gres request, e.g. 'a100'.",
    )
    constraint: _Line = Field(
        default=None,
        title="Constraint",
        description="Node features required (--constraint).",
    )
    het_job: bool = Field(
        default=True,
        title="Gangs as one heterogeneous job",
        description=(
            "A JobGroup whose members all run on this pool goes to Slurm as one heterogeneous job "
            "(#SBATCH hetjob), one component per member with its own requirements, so Slurm starts them "
            "together; each member is still its own flow run (job id <job>+<component>). Slurm gives each "
            "component nodes of its own: a group needs as many nodes as members. Off (for the pool, or in the "
            "members' job_variables): the members are separate jobs held together by the work unit's "
            "start deadline."
        ),
    )

    def gangs_as_one_job(self) -> bool:
        return self.het_job


class SlurmWorker(BatchWorker):
    type: ClassVar[str] = "xm-slurm"
    job_configuration = SlurmJobConfiguration
    scheduler: ClassVar[Scheduler] = SlurmScheduler()
    _description = (
        "Runs each flow run as a Slurm batch job (sbatch), tracks it with one squeue per "
        "poll for all jobs, and cancels it with scancel. Locally or over SSH."
    )
    _display_name = "Slurm (prefect-xm)"
    _logo_url = "https://slurm.schedmd.com/slurm_logo.png"
