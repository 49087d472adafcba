"""Parsers of scheduler output the workers never ask for (HTCondor's `-af:j`, table and
event log, LSF's `bjobs -json` and tables, Torque's `qstat -x` XML, PBS's and SGE's
tables). They live here, not in prefect_xm: each reads a recorded output form into the
product's own state model (ad_to_status, to_status, job_status, state_of), so the
mapping of states, exit codes and hold reasons is tested on verbatim outputs of every
form the vectors hold, not only the one the worker queries."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from typing import Any, Optional, Sequence

from prefect_xm.workers.htcondor import _JOB_ID_RE as HTCONDOR_JOB_ID_RE
from prefect_xm.workers.htcondor import ad_to_status
from prefect_xm.workers.lsf import _JOB_ID_RE as LSF_JOB_ID_RE
from prefect_xm.workers.lsf import record_status, to_status
from prefect_xm.workers.pbs import job_status
from prefect_xm.workers.scheduler import JobState, JobStatus, SchedulerError
from prefect_xm.workers.sge import _reason_of as sge_reason_of
from prefect_xm.workers.sge import state_of


# -- HTCondor ---------------------------------------------------------------------

#: the letters condor_q's table prints in its ST column
ST_LETTERS = {"I": 1, "R": 2, "X": 3, "C": 4, "H": 5, ">": 6, "S": 7, "<": 2}


def parse_autoformat(output: str, attributes: Sequence[str]) -> dict[str, JobStatus]:
    """`-af:j attr...` lines: '<cluster.proc> value value ...'; the last attribute may
    hold blanks (a HoldReason)."""
    statuses: dict[str, JobStatus] = {}
    for line in output.splitlines():
        parts = line.strip().split(None, len(attributes))
        if len(parts) < len(attributes) + 1 or not HTCONDOR_JOB_ID_RE.match(parts[0]):
            continue
        cluster, proc = parts[0].split(".")
        ad: dict[str, Any] = {"ClusterId": cluster, "ProcId": proc}
        ad.update({a: (None if v == "undefined" else v) for a, v in zip(attributes, parts[1:])})
        status = ad_to_status(ad)
        if status:
            statuses[status.job_id] = status
    return statuses


def parse_condor_q_table(output: str) -> dict[str, str]:
    """`condor_q -nobatch` rows: job id -> the ST letter (I R X C H > S ...)."""
    states: dict[str, str] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 6 and HTCONDOR_JOB_ID_RE.match(parts[0]) and re.match(r"^\d+\+\d\d:\d\d:\d\d$", parts[4]):
            states[parts[0]] = parts[5]
    return states


def parse_event_log(text: str) -> dict[str, JobStatus]:
    """The job event log (`log = ...`): the last termination/abort/hold event per job."""
    statuses: dict[str, JobStatus] = {}
    for event in re.split(r"(?m)^\.\.\.\s*$", text):
        m = re.search(r"^(\d{3}) \((\d+)\.(\d+)\.\d+\) [^\n]*?(\S[^\n]*)$", event.strip(), re.M)
        if not m:
            continue
        code, job_id = m.group(1), f"{int(m.group(2))}.{int(m.group(3))}"
        if code == "005":
            normal = re.search(r"Normal termination \(return value (\d+)\)", event)
            sig = re.search(r"Abnormal termination \(signal (\d+)\)", event)
            ad = {"ClusterId": m.group(2), "ProcId": m.group(3), "JobStatus": 4}
            if normal:
                ad["ExitCode"] = normal.group(1)
            elif sig:
                ad.update(ExitBySignal=True, ExitSignal=sig.group(1))
            statuses[job_id] = ad_to_status(ad)
        elif code == "009":
            statuses[job_id] = JobStatus(job_id, JobState.CANCELLED, "REMOVED", "aborted")
        elif code == "012":
            reason = re.search(r"\n\s+(.+)", event)
            statuses[job_id] = JobStatus(job_id, JobState.PENDING, "HELD", reason.group(1).strip() if reason else "")
        elif code in ("000", "001"):
            statuses.setdefault(job_id, JobStatus(job_id, JobState.PENDING if code == "000" else JobState.RUNNING,
                                                  "IDLE" if code == "000" else "RUNNING"))
            if code == "001":
                statuses[job_id] = JobStatus(job_id, JobState.RUNNING, "RUNNING")
    return statuses


# -- LSF --------------------------------------------------------------------------

def parse_bjobs_json(output: str, job_ids: Sequence[str] = ()) -> dict[str, JobStatus]:
    """Statuses from `bjobs -json -o ...`. A record without JOBID (the field was not
    asked for) is the job named on the command line, when exactly one was."""
    data = json.loads(output)
    statuses: dict[str, JobStatus] = {}
    for record in data.get("RECORDS", []):
        if "ERROR" in record and "STAT" not in record:
            continue  # "Job <1> is not found"
        job_id = record.get("JOBID") or (job_ids[0] if len(job_ids) == 1 else "")
        if not job_id:
            continue
        status = record_status(job_id, {k.lower(): v for k, v in record.items()})
        statuses[status.job_id] = status
    return statuses


def parse_bjobs_table(output: str) -> dict[str, JobStatus]:
    """Statuses from bjobs' default or wide (-w) table: JOBID USER STAT ... Banner lines
    before the header and wrapped EXEC_HOST continuation lines are skipped."""
    statuses: dict[str, JobStatus] = {}
    seen_header = False
    for line in output.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "JOBID":
            seen_header = True
            continue
        if not seen_header or len(parts) < 3 or not LSF_JOB_ID_RE.match(parts[0]):
            continue
        statuses[parts[0]] = to_status(parts[0], parts[2])
    return statuses


# -- PBS Pro / Torque -------------------------------------------------------------

def parse_pbs_qstat_xml(text: str, dialect: str = "torque") -> dict[str, JobStatus]:
    """Statuses from Torque's `qstat -x` (XML, one <Job> per job)."""
    try:
        root = ET.fromstring(text.strip())
    except ET.ParseError as exc:
        raise SchedulerError(f"qstat printed invalid XML: {exc}") from None
    statuses: dict[str, JobStatus] = {}
    for job in root.iter("Job"):
        attrs = {child.tag: (child.text or "").strip() for child in job if len(child) == 0}
        job_id = attrs.get("Job_Id", "")
        if job_id:
            statuses[job_id] = job_status(job_id, attrs, dialect)
    return statuses


def parse_pbs_qstat_table(text: str, dialect: str = "pbspro") -> dict[str, JobStatus]:
    """Statuses from qstat's one-line-per-job formats (default, -a, -n1, -Ex -w): the
    state is the column headed 'S' (located by the dashes under the header); lines
    without a header (grep'd) take the second-to-last word. Truncated ids ('123.ser*')
    are kept as printed."""
    lines = text.splitlines()
    spans: Optional[list[tuple[int, int]]] = None
    state_col: Optional[int] = None
    statuses: dict[str, JobStatus] = {}
    for i, line in enumerate(lines):
        if re.match(r"^-+(\s+-+)+\s*$", line):
            spans = [(m.start(), m.end()) for m in re.finditer(r"-+", line)]
            header = lines[i - 1] if i else ""
            state_col = next(
                (k for k, (a, b) in enumerate(spans) if header[a : b + 1].strip() == "S"), None
            )
            continue
        words = line.split()
        if not words or not re.match(r"^\d", words[0]):
            continue
        if spans is not None and state_col is not None:
            a, b = spans[state_col]
            native = line[a:b].strip()
            if not re.match(r"^[A-Z]$", native) and len(words) >= len(spans):
                native = words[state_col]  # misaligned columns: count words instead
        elif len(words) >= 3:
            native = words[-2]
        else:
            continue
        statuses[words[0]] = job_status(words[0], {"job_state": native}, dialect)
    return statuses


# -- SGE --------------------------------------------------------------------------

SGE_TABLE_ROW_RE = re.compile(r"^\s*(\d+)\s+[\d.]+\s+\S+\s+\S+\s+([A-Za-z]+)\s")


def parse_sge_qstat_table(output: str) -> dict[str, JobStatus]:
    """Statuses from qstat's default table (SGE, and Univa's with the jclass column)."""
    statuses: dict[str, JobStatus] = {}
    for line in output.splitlines():
        m = SGE_TABLE_ROW_RE.match(line)
        if not m:
            continue
        job_id, code = m.groups()
        statuses.setdefault(job_id, JobStatus(job_id, state_of(code), code, sge_reason_of(code)))
    return statuses
