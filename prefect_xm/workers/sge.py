"""Son of Grid Engine (and SGE 6.2+ / Univa / Altair Grid Engine): everything the batch
worker needs to know about qsub, qstat, qacct and qdel, and the `xm-sge` worker type.

Parsers are pure functions over command output (tested on verbatim outputs in
tests/test_sge_parsers.py, and on outputs recorded from the real SGE 8.1.9 here).

Choices worth knowing:
- Tracking: one `qstat -xml` per poll for all of the user's jobs (running jobs are under
  <queue_info>, pending ones under <job_info>; one element per running array task).
- Finished jobs leave qstat; their record is `qacct -j ID` (`failed`, `exit_status`),
  which lags the end by the global config's flush_time. "job id N not found" means
  "not yet", never "done". A job deleted while it was pending never reaches qacct: the
  poller's grace period resolves it (Prefect has already marked such a run Cancelled).
- Eqw (error state: the job could not start, e.g. its working directory or output file
  cannot be opened) waits in the queue forever. We treat it as terminal: the job ends
  FAILED with the error reason that `qstat -j ID` gives (fetched only for jobs in an error
  state), the run ends Crashed with that reason, and the job is deleted (cleanup_argvs).
- h_rt: SGE kills the job with SIGKILL at its wall-clock limit; qacct then says
  `failed 37 : qmaster enforced h_rt...` or `failed 100 : assumedly after job` with
  exit_status 137. The reason in the run's message says "wall-clock limit (h_rt=...)".
- Cancel: `qdel ID`; "does not exist" (rc 1) means the job is gone already.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import ClassVar, Mapping, Optional, Sequence

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
    combine_parts,
)

# -- state model ----------------------------------------------------------------


_JOB_ID_RE = re.compile(r"^\d+(?:\.\d+)?$")


def state_of(code: str) -> JobState:
    """An SGE state code (a combination of letters) in the common model.

    d = deletion requested, E = error (Eqw waits forever), r/t = running or being
    transferred, s/S/T = suspended (it has started), q/w/h = queued, waiting, held."""
    code = code.strip()
    if not code:
        return JobState.UNKNOWN
    if "d" in code:
        return JobState.CANCELLED
    if "E" in code:
        return JobState.FAILED
    if any(c in code for c in "rtsST"):
        return JobState.RUNNING
    if any(c in code for c in "qwhPN"):  # P, N: Univa's pending variants
        return JobState.PENDING
    if "R" in code:  # restarted, running again
        return JobState.RUNNING
    return JobState.UNKNOWN


_STATE_CODE_RE = re.compile(r"^[dEhqwrRtsSTzPN]{1,6}$")


def in_error_state(code: str) -> bool:
    """Eqw, Ehqw, ...: the job could not start and waits in the queue forever."""
    return bool(_STATE_CODE_RE.match(code)) and "E" in code


def _reason_of(code: str) -> str:
    if "E" in code:
        return "error state"
    if "h" in code and "r" not in code:
        return "hold"
    if "d" in code:
        return "deletion requested"
    if any(c in code for c in "sST"):
        return "suspended"
    return ""


def expand_tasks(spec: str) -> list[int]:
    """'1-3:1' -> [1, 2, 3]; '1,4-6:2' -> [1, 4, 6]; '2' -> [2]."""
    tasks: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        if hi:
            tasks.extend(range(int(lo), int(hi) + 1, int(step or 1)))
        else:
            tasks.append(int(lo))
    return tasks


# -- parsers --------------------------------------------------------------------


def parse_qsub(stdout: str) -> str:
    """The job id from `qsub -terse` ("1234", array "1234.1-3:1") or from qsub's message
    ('Your job 123 ("name") has been submitted', 'Your job-array 9.1-5:1 (...)'), with
    site banners before it."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        m = re.match(r"^(\d+)(?:\.\d+-\d+:\d+)?$", line)
        if m:
            return m.group(1)
        m = re.search(r"Your job(?:-array)? (\d+)(?:\.\S+)? \(.*\) has been submitted", line)
        if m:
            return m.group(1)
    raise ValueError(f"no job id in qsub output: {stdout.strip()[-500:]!r}")


def parse_qstat_xml(output: str) -> dict[str, JobStatus]:
    """Statuses from `qstat -xml`: every <job_list> (running ones under <queue_info>,
    pending ones under <job_info>). Array tasks are keyed 'ID.TASK' (pending task ranges
    are expanded); other jobs by their number."""
    text = output.strip()
    if not text:
        return {}
    root = ET.fromstring(text)
    statuses: dict[str, JobStatus] = {}
    for item in root.iter("job_list"):
        number = (item.findtext("JB_job_number") or "").strip()
        code = (item.findtext("state") or "").strip()
        if not number or not code or code == "z":
            continue  # zombies (-s z) have left the queue: their record is in qacct
        tasks = (item.findtext("tasks") or "").strip()
        ids = [f"{number}.{t}" for t in expand_tasks(tasks)] if tasks else [number]
        for job_id in ids:
            statuses[job_id] = JobStatus(job_id, state_of(code), code, _reason_of(code))
    return statuses


def parse_qstat_names(output: str) -> dict[str, str]:
    """{job id: job name} of a `qstat -xml` listing (including zombies, with `-s z`)."""
    text = output.strip()
    if not text:
        return {}
    names: dict[str, str] = {}
    for item in ET.fromstring(text).iter("job_list"):
        number = (item.findtext("JB_job_number") or "").strip()
        if number:
            names[number] = (item.findtext("JB_name") or "").strip()
    return names


def parse_qacct_records(output: str) -> list[dict[str, str]]:
    """The records of `qacct -j`: key/value blocks separated by '=====' lines; the
    per-owner summary table some invocations append is ignored."""
    records: list[dict[str, str]] = []
    current: Optional[dict[str, str]] = None
    for line in output.splitlines():
        if re.match(r"^=+\s*$", line):
            current = {}
            records.append(current)
            continue
        if current is None:
            continue
        m = re.match(r"^([a-z_]+)\s+(.*?)\s*$", line)
        if m:
            current.setdefault(m.group(1), m.group(2))
        elif line.strip():
            current = None  # the summary table after the last record
    return [r for r in records if "jobnumber" in r]


def _seconds(value: str) -> Optional[float]:
    """SGE times: '600', '0:1:0', '29919s', '10'."""
    value = value.strip().rstrip("s")
    if re.match(r"^\d+(?:\.\d+)?$", value):
        return float(value)
    m = re.match(r"^(\d+):(\d{1,2}):(\d{1,2})$", value)
    if m:
        h, mi, s = map(int, m.groups())
        return h * 3600 + mi * 60 + s
    return None


def qacct_status(record: Mapping[str, str]) -> JobStatus:
    """One qacct record in the common model. `failed` != 0: SGE could not run the job
    or killed it (37: qmaster enforced a limit; 100: killed, e.g. by qdel or at h_rt);
    otherwise `exit_status` is the script's (128+N: killed by signal N)."""
    job_id = record["jobnumber"].strip()
    task = record.get("taskid", "undefined").strip()
    if task and task != "undefined":
        job_id = f"{job_id}.{task}"
    failed_m = re.match(r"^(\d+)\s*(?::\s*(.*))?$", record.get("failed", "0").strip())
    failed = int(failed_m.group(1)) if failed_m else 0
    failed_text = (failed_m.group(2) or "").strip() if failed_m else ""
    exit_m = re.match(r"^(-?\d+)", record.get("exit_status", "").strip())
    exit_code = int(exit_m.group(1)) if exit_m else None
    signal = exit_code - 128 if exit_code is not None and 128 < exit_code < 160 else None
    reasons = []
    if failed:
        reasons.append(f"failed {failed}: {failed_text}" if failed_text else f"failed {failed}")
    h_rt = re.search(r"\bh_rt=([\d:]+)", record.get("category", ""))
    limit = _seconds(h_rt.group(1)) if h_rt else None
    wallclock = _seconds(record.get("ru_wallclock", ""))
    killed = signal == 9 or failed in (37, 100)
    if limit is not None and killed and (failed == 37 or (wallclock is not None and wallclock >= limit - 1)):
        reasons.append(f"killed at its wall-clock limit (h_rt={h_rt.group(1)})")
    if failed == 0 and exit_code == 0:
        return JobStatus(job_id, JobState.COMPLETED, "DONE", "", 0)
    return JobStatus(job_id, JobState.FAILED, "EXITED", "; ".join(reasons), exit_code, signal)


#: qacct's `failed` of an attempt that was rescheduled (qmod -rj; a failed host with -r y):
#: the job went back to the queue, this is not its end
RESCHEDULED = 25


def parse_qacct(output: str) -> dict[str, JobStatus]:
    statuses: dict[str, JobStatus] = {}
    for record in parse_qacct_records(output):
        if record.get("failed", "").strip().split(":")[0].strip() == str(RESCHEDULED):
            continue
        status = qacct_status(record)
        statuses[status.job_id] = status
    return statuses


def parse_qstat_j_errors(output: str) -> dict[str, JobStatus]:
    """From `qstat -j IDS` (text): the error reason of each job in an error state
    ('error reason    1:   <date> [uid:pid]: error: can't chdir to /x: ...')."""
    statuses: dict[str, JobStatus] = {}
    for block in re.split(r"^=+\s*$", output, flags=re.M):
        number = re.search(r"^job_number:\s+(\d+)", block, re.M)
        if not number:
            continue
        reasons = re.findall(r"^error reason\s+\d*:\s*(.*?)\s*$", block, re.M)
        if not reasons:
            continue
        reason = reasons[0]
        # drop the "11/22/2026 03:07:23 [0:32687]: " prefix, keep SGE's sentence
        reason = re.sub(r"^\d\d/\d\d/\d{4} [\d:]+ \[\d+:\d+\]:\s*", "", reason)
        statuses[number.group(1)] = JobStatus(number.group(1), JobState.FAILED, "Eqw", reason)
    return statuses


def combine_tasks(job_id: str, statuses: Mapping[str, JobStatus]) -> Optional[JobStatus]:
    """An array job as a whole from its tasks ('ID.N'): not started until all have
    started, ended only when all have ended, failed if any failed."""
    parts = [s for k, s in statuses.items() if k.startswith(f"{job_id}.")]
    return combine_parts(job_id, parts, "DONE")


# -- the Scheduler --------------------------------------------------------------


class SgeScheduler(Scheduler):
    name: ClassVar[str] = "sge"
    template_name: ClassVar[str] = "sge.sh.j2"
    directive_prefix: ClassVar[str] = "#$"
    transient_errors: ClassVar[Optional["re.Pattern[str]"]] = re.compile(
        r"unable to contact qmaster|commlib error|failed receiving gdi request|"
        r"got select error|Connection refused|timed out|can't unpack gdi request|"
        r"error: failed to|no (?:route|connection)|temporarily unavailable",
        re.IGNORECASE,
    )
    # qstat -j over many ids prints every job's full record: bounded batches.
    error_batch_size: ClassVar[int] = 50

    def submit_argv(self, request: SubmitRequest) -> list[str]:
        # -V: the job gets qsub's environment (PATH, the site's variables), like sbatch's
        # default; it has no credentials in it (the run's own are in job.env).
        return ["qsub", "-terse", "-V", request.script_path]

    def parse_submit(self, stdout: str) -> str:
        return parse_qsub(stdout)

    def find_by_name_argv(self, job_name: str) -> list[str]:
        # qstat cannot filter a listing by name, and `qstat -j NAME` forgets finished
        # jobs: list live and recently finished (zombie, -s z) jobs, filter in jobs_named.
        return ["qstat", "-xml", "-s", "prsz"]

    def jobs_named(self, job_name: str, stdout: str) -> list[str]:
        return [job_id for job_id, name in parse_qstat_names(stdout).items() if name == job_name]

    def status_argv(self, job_ids: Sequence[str]) -> list[str]:
        # The current user's jobs (qstat's default since SGE 6.2), whatever their number.
        return ["qstat", "-xml"]

    def requeued(self, previous: JobStatus, status: JobStatus) -> bool:
        # A rescheduled job (qmod -rj, a failed execd with -r y) gains the code R: Rq while
        # queued again, Rr once running again, which on an idle cluster a poll may see first.
        return super().requeued(previous, status) or (
            previous.state == JobState.RUNNING and status.state == JobState.RUNNING
            and "R" in status.native_state and "R" not in previous.native_state)

    def parse_status(self, result: CommandResult) -> dict[str, JobStatus]:
        if not result.ok:
            raise self.classify_error(result)
        try:
            return parse_qstat_xml(result.stdout)
        except ET.ParseError as exc:
            raise TransientSchedulerError(f"qstat -xml printed invalid XML ({exc})", result) from None

    def lookup(self, job_id: str, statuses: dict[str, JobStatus]) -> Optional[JobStatus]:
        found = statuses.get(job_id) or combine_tasks(job_id, statuses)
        array = self.array_of(job_id)
        if found is None and array and array in statuses and in_error_state(statuses[array].native_state):
            # `qstat -j ARRAY` gives one error reason for all of its tasks
            whole = statuses[array]
            found = JobStatus(job_id, whole.state, whole.native_state, whole.reason)
        return found

    def terminal_argvs(self, job_ids: Sequence[str]) -> list[list[str]]:
        # qacct takes one job per call (a second -j replaces the first) and scans the
        # accounting file each time: a bounded number per poll. The poller asks for the
        # least recently looked-up jobs first, so every job gets its turn.
        # An array's tasks are all in one `qacct -j ARRAY`.
        wanted: list[str] = []
        for job_id in job_ids:
            number = self.array_of(job_id) or job_id
            if number not in wanted:
                wanted.append(number)
        return [["qacct", "-j", number] for number in wanted[: self.per_id_lookups]]

    def terminal_argvs_for(
        self, job_ids: Sequence[str], live: Mapping[str, JobStatus]
    ) -> list[list[str]]:
        """Jobs in an error state (Eqw) are still in the queue and never reach qacct:
        their reason is in `qstat -j`, asked only for them."""
        in_error = [j for j in job_ids if (s := self.lookup(j, dict(live))) and in_error_state(s.native_state)]
        others = [j for j in job_ids if j not in in_error]
        numbers = list(dict.fromkeys(self.array_of(j) or j for j in in_error))
        argvs = [["qstat", "-j", ",".join(batch)] for batch in chunked(numbers, self.error_batch_size)]
        return argvs + self.terminal_argvs(others)

    def parse_terminal(self, result: CommandResult) -> dict[str, JobStatus]:
        if result.argv[0] == "qstat":
            if not result.ok and "do not exist" in (result.stderr + result.stdout):
                return {}
            if not result.ok:
                raise self.classify_error(result)
            return parse_qstat_j_errors(result.stdout)
        if not result.ok:
            if "not found" in result.stderr or "not found" in result.stdout:
                return {}  # not (yet) in the accounting file
            raise self.classify_error(result)
        return parse_qacct(result.stdout)

    def cleanup_argvs(self, status: JobStatus) -> list[list[str]]:
        # An Eqw job would wait in the queue forever.
        if in_error_state(status.native_state):
            return self.cancel_argvs(status.job_id, 0)[-1:]
        return []

    # -- arrays: one task is `<array>.<index>` in qstat and qacct, `<array> -t <index>` to qdel
    array_index_variable: ClassVar[Optional[str]] = "SGE_TASK_ID"
    array_output_index: ClassVar[str] = "$TASK_ID"

    def array_submit_argv(self, request: SubmitRequest, size: int, throttle: Optional[int]) -> list[str]:
        argv = ["qsub", "-terse", "-V", "-t", f"{self.array_first_index}-{self.array_first_index + size - 1}"]
        if throttle:
            argv += ["-tc", str(throttle)]
        return [*argv, request.script_path]

    def array_task_id(self, array_id: str, index: int) -> str:
        return f"{array_id}.{index}"

    def array_of(self, job_id: str) -> Optional[str]:
        m = re.match(r"^(\d+)\.\d+$", job_id)
        return m.group(1) if m else None

    # "job rejected: N tasks exceeds the maximum of M" (max_aj_tasks), or max_u_jobs/max_jobs
    array_refusal = re.compile(r"max_aj_tasks|tasks? exceeds|exceeds the maximum|too many tasks", re.IGNORECASE)

    def cancel_argvs(self, job_id: str, grace_seconds: int) -> list[list[str]]:
        array = self.array_of(job_id)
        if array:
            return [["qdel", array, "-t", job_id.split(".", 1)[1]]]
        # qdel has no grace signal to choose (a queue's terminate_method or -notify
        # decide); it kills the job.
        return [["qdel", job_id]]

    def parse_cancel(self, result: CommandResult) -> bool:
        text = result.stderr + result.stdout
        if "does not exist" in text:
            return False
        if result.ok:
            return True
        raise self.classify_error(result)


# -- job variables and the worker ------------------------------------------------

_TIME_RE = re.compile(r"^(?:\d+|\d+:\d{1,2}:\d{1,2})$")
_MEMORY_RE = re.compile(r"^\d+(?:\.\d+)?[KkMmGgTt]?$")
_WORD_RE = re.compile(r"^[A-Za-z0-9_.@+*,-]+$")
_TimeLimit = in_syntax(_TIME_RE, "'3600' (seconds) or '1:00:00' (h_rt)")
_Memory = in_syntax(_MEMORY_RE, "'4G', '512M' (h_vmem, per slot)")
_Word = in_syntax(_WORD_RE, "a single word such as 'all.q'", in_form=False)


class SgeJobConfiguration(BatchJobConfiguration):
    queue: _Word = Field(
        default=None,
        title="Queue",
        description="Cluster queue to submit to (-q), e.g. 'all.q'.",
    )
    project: _Word = Field(
        default=None,
        title="Project",
        description="Project to charge (-P).",
    )
    time_limit: _TimeLimit = Field(
        default=None,
        title="Time limit",
        description="Wall-clock limit (-l h_rt=): seconds or 'H:MM:SS'. SGE kills the job (SIGKILL) when it is reached.",
    )
    memory: _Memory = Field(
        default=None,
        title="Memory per slot",
        description="Virtual memory limit per slot (-l h_vmem=), e.g. '4G' or '512M'.",
    )
    slots: AtLeastOne = Field(
        default=None,
        title="Slots (CPUs)",
        description="Slots in the parallel environment (-pe <pe> N).",
    )
    parallel_environment: _Word = Field(
        default="smp",
        title="Parallel environment",
        description="The site's parallel environment for multi-slot jobs (`qconf -spl` lists them).",
    )
    gpus: ZeroOrMore = Field(
        default=None,
        title="GPUs",
        description="GPUs, requested as the site's consumable (-l <resource>=N).",
    )
    gpu_resource: str = Field(
        default="gpu",
        title="GPU resource name",
        description="The site's GPU consumable (`qconf -sc`), e.g. 'gpu'.",
    )
    shell: str = Field(
        default="/bin/bash",
        title="Shell",
        description="The job's shell (-S).",
    )

    @field_validator("gpu_resource")
    @classmethod
    def _gpu_resource(cls, v):
        return check_format(_WORD_RE, "gpu_resource", v, "a single word such as 'gpu'")

    @field_validator("shell")
    @classmethod
    def _shell(cls, v):
        return check_format(re.compile(r"^/[^\s]+$"), "shell", v, "'/bin/bash'")


class SgeWorker(BatchWorker):
    type: ClassVar[str] = "xm-sge"
    job_configuration = SgeJobConfiguration
    scheduler: ClassVar[Scheduler] = SgeScheduler()
    _description = (
        "Runs each flow run as a Grid Engine batch job (qsub), tracks it with one qstat per "
        "poll for all jobs and qacct for finished ones, and cancels it with qdel. Locally or over SSH."
    )
    _display_name = "Grid Engine / SGE (prefect-xm)"
    _logo_url = "https://upload.wikimedia.org/wikipedia/commons/8/8a/Grid_Engine_logo.png"
