#!/usr/bin/env python3
"""A fake IBM Spectrum LSF CLI for tests: bsub, bjobs, bkill, bhist, bresume, brequeue (symlinks
to this file; the command is the name it is called by). Standard library only.

What it reproduces (byte-for-byte where the recorded outputs in
tests/data/vectors/lsf.json show the format):
- `bsub [options]` reads the job script on stdin, takes the `#BSUB` directives from it
  (-J -o -e -q -P -W -n -M -R -gpu -cwd -H -r; %J in paths; command-line options win), prints
  "Job <N> is submitted to [default ]queue <q>.", refuses an unknown queue with
  "<q>: No such queue. Job not submitted." (exit 255), a malformed -W with
  "<v>: Bad RUNLIMIT specification. Job not submitted." (exit 255).
- Job arrays, as LSF documents them: `-J "name[index_list]%M"` (index_list: comma-
  separated `start[-end[:step]]`; %M: at most M elements running at once) makes one job
  id N whose elements are `N[i]`, each a job of its own (state, process, exit code,
  record) named `name[i]`, with LSB_JOBINDEX=i and LSB_JOBID=N in its environment and %I
  (the index) and %J (N) substituted in its -o/-e paths. More elements, or an index
  larger, than MAX_JOB_ARRAY_SIZE (FAKE_LSF_MAX_JOB_ARRAY_SIZE, 1000 as LSF's default):
  "Job array index too large. Job not submitted." (exit 255); a malformed index list:
  "Job array index error. Job not submitted." (exit 255). bjobs/bhist/bkill/bresume take
  `N[i]` for one element and `N` for all of them (`bkill N`: "Job <N> is being
  terminated" once for the array); bjobs lists each element, its JOBID column showing N
  (`N[i]` when FAKE_LSF_BJOBS_DISPLAY_ENH=Y, as lsf.conf's LSB_BJOBS_DISPLAY_ENH does),
  fields jobindex and job_name (`name[i]`) telling them apart; `bjobs -A` prints the
  per-array summary table (JOBID ARRAY_SPEC OWNER NJOBS PEND DONE RUN EXIT SSUSP USUSP
  PSUSP); `-J name` matches an array's name and an element's.
- Jobs run as REAL processes, detached in their own session, through a per-job
  "shepherd" (the fake's sbatchd): stdout/stderr to the -o/-e files (stderr to -o when
  no -e), cwd from -cwd or the submission directory, the submission environment plus
  LSB_JOBID, LSB_JOBNAME, LSB_QUEUE, LSB_HOSTS, LSB_MCPU_HOSTS, LSB_DJOB_NUMPROC,
  LSB_JOBINDEX=0, LS_SUBCWD, LSB_OUTPUTFILE, LSB_ERRORFILE.
- At most FAKE_LSF_SLOTS (2) slots busy: other jobs stay PEND ("Not enough job
  slot(s)"). `-H` jobs stay PSUSP ("The job was suspended by the user while pending")
  until `bresume`.
- Run limit (-W): SIGUSR2 at the limit, SIGKILL 5 s later; recorded EXIT with exit code
  140 and exit reason "TERM_RUNLIMIT: job killed after reaching LSF run time limit".
- `bkill`: a pending job ends at once, a running one gets SIGINT, SIGTERM, SIGKILL
  FAKE_LSF_TERMINATE_INTERVAL (2 s; LSF: 10 s) apart; EXIT with the process's exit code
  (128 + signal) and "TERM_OWNER: job killed by owner". "Job <N> is being terminated"
  (exit 0), "Job <N>: Job has already finished" / "Job <N>: No matching job found" on
  stderr (exit 255).
- `brequeue [-H] ids` (IBM's brequeue(1)): a RUN job is killed as by bkill and returned
  to PEND (PSUSP with -H), keeping its job id and submit time; once dispatched (not
  before FAKE_LSF_REQUEUE_DISPATCH_DELAY, 5 s: mbatchd's next scheduling session) it
  starts over from the beginning, appending to its -o/-e files. "Job <N> is being requeued"
  (exit 0); a job not running: "Job <N>: Job is not running" on stderr (exit 255).
- `bjobs [-a] [-noheader] -o "fields delimiter='c'" [-json] [-J name] [ids]`: fields
  jobid id jobindex stat exit_code exec_host exit_reason pend_reason job_name queue user
  (empty -> '-'). Finished jobs are listed for FAKE_LSF_CLEAN_PERIOD seconds (LSF's
  CLEAN_PERIOD, 3600 by default), then "Job <N> is not found" on stderr. Unknown ids:
  those lines on stderr while the others are listed, exit 255; when no id is known,
  exit 0 (as ERT recorded for the -noheader -o form). `-J name` with no match:
  "Job <name> is not found", exit 255. Without ids, -J or -a: unfinished jobs only.
- `bhist -l ids`: every job ever submitted (the event log is never switched), in
  bhist's wrapped long format ("Done successfully", "Exited with exit code N",
  "Completed <exit>; TERM_...", continuation lines indented by 21 blanks);
  "No matching job found" for none.

Not reproduced: the default `bjobs` table and `bjobs -l`, index ranges in ids
(`N[1-3]`), the pending reason of an element held back by %M, job dependencies,
queues' own limits, hosts other than this one, the job report LSF appends to the -o
file, bstop/bmod, brequeue of finished jobs (-d/-e), rerunnable jobs' automatic requeue
(-r is recorded: this fake's one host never fails), user/admin distinctions, LSF_UNIT_FOR_LIMITS (-M is
recorded, not enforced), memory or GPU enforcement.

State lives in FAKE_LSF_HOME (default /tmp/fake-lsf-<uid>): one JSON file per job (per
element for an array: `N[i].json`), a counter, and a lock taken around every change.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HOME = Path(os.environ.get("FAKE_LSF_HOME", f"/tmp/fake-lsf-{os.getuid()}"))
JOBS = HOME / "jobs"
SLOTS = int(os.environ.get("FAKE_LSF_SLOTS", "2"))
CLEAN_PERIOD = float(os.environ.get("FAKE_LSF_CLEAN_PERIOD", "3600"))
TERMINATE_INTERVAL = float(os.environ.get("FAKE_LSF_TERMINATE_INTERVAL", "2"))
REQUEUE_DISPATCH_DELAY = float(os.environ.get("FAKE_LSF_REQUEUE_DISPATCH_DELAY", "5"))
QUEUES = os.environ.get("FAKE_LSF_QUEUES", "normal,short,gpu").split(",")
#: lsb.params MAX_JOB_ARRAY_SIZE: the most elements of an array, and its largest index
MAX_JOB_ARRAY_SIZE = int(os.environ.get("FAKE_LSF_MAX_JOB_ARRAY_SIZE", "1000"))
#: lsf.conf LSB_BJOBS_DISPLAY_ENH: bjobs shows an element's JOBID as N[i]
DISPLAY_ENH = os.environ.get("FAKE_LSF_BJOBS_DISPLAY_ENH", "N").lower() == "y"
DEFAULT_QUEUE = QUEUES[0]
HOST = socket.gethostname().split(".")[0]
USER = os.environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name
FINAL = ("DONE", "EXIT")
PEND_SLOTS = "Not enough job slot(s)"
PEND_HELD = "The job was suspended by the user while pending"
RUNLIMIT_REASON = "TERM_RUNLIMIT: job killed after reaching LSF run time limit"
OWNER_REASON = "TERM_OWNER: job killed by owner"


# -- the job table ------------------------------------------------------------------


@contextmanager
def locked():
    JOBS.mkdir(parents=True, exist_ok=True)
    with open(HOME / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(job_id: str) -> dict | None:
    try:
        return json.loads((JOBS / f"{job_id}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def save(job: dict) -> None:
    path = JOBS / f"{job['id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job))
    tmp.replace(path)


def all_jobs() -> list[dict]:
    jobs = []
    for p in JOBS.glob("*.json"):
        job = load(p.stem)
        if job:
            jobs.append(job)
    return sorted(jobs, key=lambda j: (int(j.get("array") or j["id"]), j.get("index", 0)))


def select(job_id: str, jobs: dict[str, dict]) -> list[dict]:
    """The jobs an id names: the job or element itself, or every element of an array."""
    if job_id in jobs:
        return [jobs[job_id]]
    return [j for j in jobs.values() if j.get("array") == job_id]


def next_id() -> str:
    counter = HOME / "counter"
    n = int(counter.read_text()) + 1 if counter.exists() else 101
    counter.write_text(str(n))
    return str(n)


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def schedule() -> None:
    """One pass of the fake mbatchd: notice lost shepherds, start pending jobs. Called
    with the lock held, by every command and by each shepherd when its job ends."""
    jobs = all_jobs()
    for job in jobs:
        if job["stat"] in ("RUN",) and not alive(job.get("shepherd_pid")) and job.get("started_at", 0) < time.time() - 5:
            job.update(stat="EXIT", exit_code=None, exit_reason="TERM_UNKNOWN: shepherd lost", finished_at=time.time())
            save(job)
    busy = sum(j["slots"] for j in jobs if j["stat"] == "RUN")
    running: dict[str, int] = {}
    for j in jobs:
        if j.get("array") and j["stat"] == "RUN":
            running[j["array"]] = running.get(j["array"], 0) + 1
    for job in jobs:
        if job["stat"] != "PEND" or job.get("not_before", 0) > time.time():
            continue
        limit = job.get("element_limit")
        if limit and running.get(job["array"], 0) >= limit:
            continue  # the array's %M: its other elements wait, other jobs may start
        if busy + job["slots"] > SLOTS:
            break  # first come, first served
        busy += job["slots"]
        if job.get("array"):
            running[job["array"]] = running.get(job["array"], 0) + 1
        job.update(stat="RUN", started_at=time.time(), exec_host=HOST, pend_reason="")
        save(job)
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--shepherd", job["id"]],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        job["shepherd_pid"] = proc.pid
        save(job)


# -- bsub -----------------------------------------------------------------------------


def directives(script: str) -> list[list[str]]:
    """#BSUB lines up to the first command line, each split like a command line."""
    out = []
    for line in script.splitlines():
        s = line.strip()
        if not s or (s.startswith("#") and not s.startswith("#BSUB")):
            continue
        if not s.startswith("#BSUB"):
            break
        out.append(shlex.split(s[len("#BSUB"):]))
    return out


def bsub(argv: list[str]) -> int:
    script = sys.stdin.read()
    opts: dict = {"hold": False}
    # command-line options override the script's #BSUB lines (they are read last);
    # a trailing command instead of a script on stdin is not supported
    for words in [*directives(script), argv]:
        i = 0
        while i < len(words):
            flag = words[i]
            if flag == "-H":
                opts["hold"] = True
                i += 1
                continue
            if flag == "-r":
                opts["rerunnable"] = True
                i += 1
                continue
            if flag in ("-J", "-o", "-e", "-q", "-P", "-W", "-n", "-M", "-R", "-gpu", "-cwd", "-oo", "-eo"):
                if i + 1 >= len(words):
                    print(f"{flag}: option requires an argument. Job not submitted.", file=sys.stderr)
                    return 255
                opts.setdefault(flag, []).append(words[i + 1])
                i += 2
                continue
            print(f"{flag}: Illegal option. Job not submitted.", file=sys.stderr)
            return 255
    queue = opts.get("-q", [None])[-1]
    if queue is not None and queue not in QUEUES:
        print(f"{queue}: No such queue. Job not submitted.", file=sys.stderr)
        return 255
    runlimit = None
    if "-W" in opts:
        w = opts["-W"][-1]
        m = re.fullmatch(r"(?:(\d+):)?(\d+)", w)
        if not m or (m.group(1) and int(m.group(2)) > 59):
            print(f"{w}: Bad RUNLIMIT specification. Job not submitted.", file=sys.stderr)
            return 255
        runlimit = (int(m.group(1) or 0) * 60 + int(m.group(2))) * 60
    slots = int(opts.get("-n", ["1"])[-1])
    if slots > SLOTS:
        print("Too many processors requested. Job not submitted.", file=sys.stderr)
        return 255
    name = opts.get("-J", [None])[-1] or "bsub"
    array = ARRAY_SPEC.fullmatch(name)
    indices, element_limit = [0], None
    if array:
        name = array.group("name")
        indices = array_indices(array.group("list"))
        if indices is None:
            print("Job array index error. Job not submitted.", file=sys.stderr)
            return 255
        if len(indices) > MAX_JOB_ARRAY_SIZE or max(indices) > MAX_JOB_ARRAY_SIZE:
            print("Job array index too large. Job not submitted.", file=sys.stderr)
            return 255
        element_limit = int(array.group("limit")) if array.group("limit") else None
    with locked():
        job_id = next_id()
        spool = JOBS / f"{job_id}.sh"
        spool.write_text(script)
        spool.chmod(0o700)
        for index in indices:
            save(new_job(job_id, index if array else None, name, element_limit, opts, queue, slots, runlimit, spool))
        schedule()
    where = f"queue <{queue}>" if queue else f"default queue <{DEFAULT_QUEUE}>"
    print(f"Job <{job_id}> is submitted to {where}.")
    return 0


#: -J "name[index_list]%M"
ARRAY_SPEC = re.compile(r"(?P<name>[^\[\]]*)\[(?P<list>[^\]]*)\](?:%(?P<limit>\d+))?")


def array_indices(index_list: str) -> list[int] | None:
    """`start[-end[:step]]`, comma-separated, positive and unique; None if malformed."""
    indices: list[int] = []
    for part in index_list.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+)(?::(\d+))?)?\s*", part)
        if not m:
            return None
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else start
        step = int(m.group(3)) if m.group(3) else 1
        if start < 1 or end < start or step < 1:
            return None
        indices.extend(range(start, end + 1, step))
    if len(set(indices)) != len(indices):
        return None
    return indices


def new_job(job_id: str, index: int | None, name: str, element_limit: int | None, opts: dict, queue,
            slots: int, runlimit, spool: Path) -> dict:
    """One job's record, or one array element's (`N[i]`, named `name[i]`)."""
    sub = lambda p: p.replace("%J", job_id).replace("%I", str(index or 0))  # noqa: E731
    out = opts.get("-oo", opts.get("-o", [None]))[-1]
    err = opts.get("-eo", opts.get("-e", [None]))[-1]
    return {
        "id": job_id if index is None else f"{job_id}[{index}]",
        "array": None if index is None else job_id,
        "index": index or 0,
        "array_name": name if index is not None else None,
        "element_limit": element_limit,
        "name": name if index is None else f"{name}[{index}]",
        "queue": queue or DEFAULT_QUEUE,
        "project": opts.get("-P", ["default"])[-1],
        "stat": "PSUSP" if opts["hold"] else "PEND",
        "pend_reason": PEND_HELD if opts["hold"] else PEND_SLOTS,
        "slots": slots,
        "runlimit": runlimit,
        "stdout": sub(out) if out else None,
        "stderr": sub(err) if err else None,
        "cwd": opts.get("-cwd", [os.getcwd()])[-1],
        "sub_cwd": os.getcwd(),
        "env": dict(os.environ),
        "script": str(spool),
        "submitted_at": time.time(),
        "exit_code": None,
        "exit_reason": "",
        "exec_host": "",
        "events": [],
    }


# -- the shepherd: runs one job ------------------------------------------------------


def shepherd(job_id: str) -> int:
    with locked():
        job = load(job_id)
        if not job or job["stat"] != "RUN":
            return 0
        env = dict(job["env"])
        env.update(
            LSB_JOBID=job.get("array") or job_id, LSB_JOBNAME=job["name"], LSB_QUEUE=job["queue"], LSB_HOSTS=HOST,
            LSB_MCPU_HOSTS=f"{HOST} {job['slots']}", LSB_DJOB_NUMPROC=str(job["slots"]),
            LSB_JOBINDEX=str(job.get("index", 0)), LS_SUBCWD=job["sub_cwd"], LSB_JOBFILENAME=job["script"],
        )
        if job["stdout"]:
            env["LSB_OUTPUTFILE"] = job["stdout"]
        if job["stderr"]:
            env["LSB_ERRORFILE"] = job["stderr"]
        out = open(job["stdout"], "ab") if job["stdout"] else subprocess.DEVNULL
        err = open(job["stderr"], "ab") if job["stderr"] else (out if job["stdout"] else subprocess.DEVNULL)
        cwd = job["cwd"] if os.path.isdir(job["cwd"]) else "/tmp"
        argv = [job["script"]] if Path(job["script"]).read_text().startswith("#!") else ["/bin/sh", job["script"]]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd, env=env,
            start_new_session=True, close_fds=True,
        )
        job.update(pid=proc.pid)
        job["events"].append([time.time(), f"Starting (Pid {proc.pid});"])
        save(job)
    started = time.monotonic()
    runlimit_hit = None
    kill_steps: list = []
    while True:
        try:
            rc = proc.wait(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            pass
        job = load(job_id) or {}
        now = time.monotonic()
        if job.get("runlimit") and runlimit_hit is None and now - started > job["runlimit"]:
            runlimit_hit = now
            _signal(proc.pid, signal.SIGUSR2)
        if runlimit_hit is not None and now - runlimit_hit > 5:
            _signal(proc.pid, signal.SIGKILL)
        if (job.get("kill_requested") or job.get("requeue_requested")) and not kill_steps:
            kill_steps = [(now, signal.SIGINT), (now + TERMINATE_INTERVAL, signal.SIGTERM),
                          (now + 2 * TERMINATE_INTERVAL, signal.SIGKILL)]
        while kill_steps and kill_steps[0][0] <= now:
            _signal(proc.pid, kill_steps.pop(0)[1])
    code = rc if rc >= 0 else 128 - rc
    with locked():
        job = load(job_id)
        if job.get("requeue_requested") and not job.get("kill_requested"):
            held = job["requeue_requested"] == "hold"
            job.update(stat="PSUSP" if held else "PEND", pend_reason=PEND_HELD if held else PEND_SLOTS,
                       requeue_requested=False, pid=None, exec_host="", requeues=job.get("requeues", 0) + 1,
                       not_before=time.time() + REQUEUE_DISPATCH_DELAY)
            job["events"].append([time.time(), "Signal <REQUEUE_PEND> requested by user or administrator;"])
            save(job)
            schedule()
            return 0
        reason = ""
        if job.get("kill_requested"):
            reason = OWNER_REASON
        elif runlimit_hit is not None:
            reason = RUNLIMIT_REASON
        job.update(
            stat="DONE" if code == 0 and not reason else "EXIT",
            exit_code=None if code == 0 and not reason else code,
            exit_reason=reason,
            finished_at=time.time(),
        )
        save(job)
        schedule()
    return 0


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# -- bjobs --------------------------------------------------------------------------


def visible(job: dict) -> bool:
    """Still in mbatchd's memory (finished jobs stay CLEAN_PERIOD seconds)."""
    return job["stat"] not in FINAL or time.time() - job.get("finished_at", 0) < CLEAN_PERIOD


def field_value(job: dict, name: str) -> str:
    name = name.lower()
    shown_id = job["id"] if DISPLAY_ENH or not job.get("array") else job["array"]
    value = {
        "jobid": shown_id, "id": shown_id, "jobindex": str(job.get("index", 0)), "stat": job["stat"],
        "exit_code": "" if job["exit_code"] is None else str(job["exit_code"]),
        "exec_host": job.get("exec_host", ""), "exit_reason": job.get("exit_reason", ""),
        "pend_reason": job.get("pend_reason", "") if job["stat"] in ("PEND", "PSUSP") else "",
        "job_name": job["name"], "name": job["name"], "queue": job["queue"], "user": USER,
        "proj_name": job["project"], "slots": str(job["slots"]),
    }.get(name)
    if value is None:
        raise KeyError(name)
    return value


def bjobs(argv: list[str]) -> int:
    show_all = noheader = as_json = arrays = False
    fmt = None
    name = None
    ids: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-a":
            show_all = True
        elif a == "-noheader":
            noheader = True
        elif a == "-json":
            as_json = True
        elif a == "-w":
            pass
        elif a == "-A":
            arrays = True
        elif a in ("-o", "-J", "-u"):
            if i + 1 >= len(argv):
                print(f"{a}: option requires an argument", file=sys.stderr)
                return 255
            if a == "-o":
                fmt = argv[i + 1]
            elif a == "-J":
                name = argv[i + 1]
            i += 1
        elif a.startswith("-"):
            print(f"bjobs: illegal option -- {a.lstrip('-')}", file=sys.stderr)
            return 255
        else:
            ids.append(a)
        i += 1
    if arrays:
        return bjobs_arrays(ids, show_all)
    if fmt is None:
        print("fake bjobs: only the -o and -A forms are supported", file=sys.stderr)
        return 255
    m = re.search(r"\s*delimiter='(.)'\s*$", fmt)
    delimiter = m.group(1) if m else " "
    fields = (fmt[: m.start()] if m else fmt).split()
    with locked():
        schedule()
        jobs = {j["id"]: j for j in all_jobs() if visible(j)}
    missing: list[str] = []
    if ids:
        selected = []
        for job_id in ids:
            found = select(job_id, jobs)
            if found:
                selected.extend(j for j in found if j not in selected)
            else:
                missing.append(job_id)
    else:
        selected = [j for j in jobs.values() if show_all or j["stat"] not in FINAL]
    if name is not None:
        selected = [j for j in selected if name in (j["name"], j.get("array_name"))]
    try:
        rows = [[field_value(j, f) for f in fields] for j in selected]
    except KeyError as exc:
        print(f"{exc.args[0]}: Illegal field name. Specify a valid field name.", file=sys.stderr)
        return 255
    if as_json:
        records = [{f.upper(): v for f, v in zip(fields, row)} for row in rows]
        records += [{"ERROR": f"Job <{j}> is not found"} for j in missing]
        print(json.dumps({"COMMAND": "bjobs", "JOBS": len(records), "RECORDS": records}, indent=2))
        return 0
    if not noheader and rows:
        print(delimiter.join(f.upper() for f in fields))
    for row in rows:
        print(delimiter.join(v or "-" for v in row))
    for job_id in missing:
        print(f"Job <{job_id}> is not found", file=sys.stderr)
    if name is not None and not selected:
        print(f"Job <{name}> is not found", file=sys.stderr)
        return 255
    if not ids and not selected and name is None:
        print("No job found" if show_all else "No unfinished job found", file=sys.stderr)
        return 255
    if missing and len(missing) < len(ids):
        return 255
    return 0


def bjobs_arrays(ids: list[str], show_all: bool) -> int:
    """`bjobs -A`: one summary line per array (with ids: those arrays)."""
    with locked():
        schedule()
        elements = [j for j in all_jobs() if j.get("array") and visible(j)]
    per_array: dict[str, list[dict]] = {}
    for j in elements:
        per_array.setdefault(j["array"], []).append(j)
    wanted = ids or [a for a, js in per_array.items() if show_all or any(j["stat"] not in FINAL for j in js)]
    rows, rc = [], 0
    for array_id in wanted:
        js = per_array.get(array_id)
        if not js:
            print(f"Job <{array_id}> is not found", file=sys.stderr)
            rc = 255
            continue
        indices = [j["index"] for j in js]
        spec = f"{js[0]['array_name']}[{min(indices)}-{max(indices)}]"
        count = lambda *stats: str(sum(j["stat"] in stats for j in js))  # noqa: E731
        rows.append([array_id, spec, USER, str(len(js)), count("PEND"), count("DONE"), count("RUN"),
                     count("EXIT"), count("SSUSP"), count("USUSP"), count("PSUSP")])
    if rows:
        header = ["JOBID", "ARRAY_SPEC", "OWNER", "NJOBS", "PEND", "DONE", "RUN", "EXIT", "SSUSP", "USUSP", "PSUSP"]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print(" ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    elif not ids:
        print("No job found" if show_all else "No unfinished job found", file=sys.stderr)
        return 255
    return rc if rows else 255


# -- bkill, bresume ----------------------------------------------------------------


def bkill(argv: list[str]) -> int:
    ids = [a for a in argv if not a.startswith("-")]
    rc = 0
    for job_id in ids:
        with locked():
            jobs = select(job_id, {j["id"]: j for j in all_jobs() if visible(j)})
            if not jobs:
                print(f"Job <{job_id}>: No matching job found", file=sys.stderr)
                rc = 255
                continue
            live = [j for j in jobs if j["stat"] not in FINAL]
            if not live:
                print(f"Job <{job_id}>: Job has already finished", file=sys.stderr)
                rc = 255
                continue
            for job in live:  # one job, one element, or every element of an array
                if job["stat"] in ("PEND", "PSUSP"):
                    job.update(stat="EXIT", exit_code=None, exit_reason=OWNER_REASON, finished_at=time.time())
                else:
                    job["kill_requested"] = True
                save(job)
            schedule()
        print(f"Job <{job_id}> is being terminated")
    return rc


def brequeue(argv: list[str]) -> int:
    hold = "-H" in argv
    rc = 0
    for job_id in [a for a in argv if not a.startswith("-")]:
        with locked():
            jobs = select(job_id, {j["id"]: j for j in all_jobs() if visible(j)})
            running = [j for j in jobs if j["stat"] == "RUN"]
            if not running:
                print(f"Job <{job_id}>: No matching job found" if not jobs else f"Job <{job_id}>: Job is not running",
                      file=sys.stderr)
                rc = 255
                continue
            for job in running:
                job["requeue_requested"] = "hold" if hold else True
                save(job)
        print(f"Job <{job_id}> is being requeued")
    return rc


def bresume(argv: list[str]) -> int:
    rc = 0
    for job_id in [a for a in argv if not a.startswith("-")]:
        with locked():
            jobs = select(job_id, {j["id"]: j for j in all_jobs()})
            held = [j for j in jobs if j["stat"] == "PSUSP"]
            if not held:
                print(f"Job <{job_id}>: No matching job found" if not jobs else f"Job <{job_id}>: Job is not suspended", file=sys.stderr)
                rc = 255
                continue
            for job in held:
                job.update(stat="PEND", pend_reason=PEND_SLOTS)
                save(job)
            schedule()
        print(f"Job <{job_id}> is being resumed")
    return rc


# -- bhist ------------------------------------------------------------------------


def stamp(t: float) -> str:
    return time.strftime("%a %b %e %H:%M:%S", time.localtime(t))


def wrap(line: str, width: int = 79, indent: int = 21) -> str:
    """LSF's fixed-width wrapping: split anywhere, continuation indented."""
    out = [line[:width]]
    rest = line[width:]
    while rest:
        n = width - indent
        out.append(" " * indent + rest[:n])
        rest = rest[n:]
    return "\n".join(out)


def bhist_record(job: dict) -> str:
    lines = [wrap(f"Job <{job['id']}>, Job Name <{job['name']}>, User <{USER}>, Project <{job['project']}>, Command <{job['script']}>")]
    lines.append(wrap(f"{stamp(job['submitted_at'])}: Submitted from host <{HOST}>, to Queue <{job['queue']}>, CWD <{job['sub_cwd']}>;"))
    if job.get("started_at"):
        lines.append(wrap(f"{stamp(job['started_at'])}: Dispatched {job['slots']} Task(s) on Host(s) <{HOST}>, Allocated {job['slots']} Slot(s) on Host(s) <{HOST}>;"))
        if job.get("pid"):
            lines.append(wrap(f"{stamp(job['started_at'])}: Starting (Pid {job['pid']});"))
    if job["stat"] in FINAL:
        t = stamp(job.get("finished_at", time.time()))
        if job.get("exit_reason") == OWNER_REASON:
            lines.append(wrap(f"{t}: Signal <KILL> requested by user or administrator <{USER}>;"))
        if job["stat"] == "DONE":
            lines.append(wrap(f"{t}: Done successfully. The CPU time used is 0.0 seconds;"))
            lines.append(wrap(f"{t}: Post job process done successfully;"))
        else:
            if job["exit_code"] is not None:
                lines.append(wrap(f"{t}: Exited with exit code {job['exit_code']}. The CPU time used is 0.0 seconds;"))
            tail = f"; {job['exit_reason']}." if job.get("exit_reason") else "."
            lines.append(wrap(f"{t}: Completed <exit>{tail}"))
    return "\n".join(lines) + "\n"


def bhist(argv: list[str]) -> int:
    ids = [a for a in argv if not a.startswith("-")]
    with locked():
        schedule()
        jobs = {j["id"]: j for j in all_jobs()}
    found = [j for i in ids for j in select(i, jobs)] if ids else list(jobs.values())
    if not found:
        print("No matching job found", file=sys.stderr)
        return 0
    print(("\n" + "-" * 78 + "\n\n").join(bhist_record(j) for j in found), end="")
    return 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--shepherd":
        return shepherd(sys.argv[2])
    command = os.path.basename(sys.argv[0])
    handler = {"bsub": bsub, "bjobs": bjobs, "bkill": bkill, "bhist": bhist, "bresume": bresume,
               "brequeue": brequeue}.get(command)
    if handler is None:
        print(f"fakelsf: call me as bsub, bjobs, bkill, bhist, bresume or brequeue, not {command}", file=sys.stderr)
        return 2
    return handler(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
