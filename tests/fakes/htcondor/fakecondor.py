#!/usr/bin/env python3
"""A fake HTCondor CLI for tests: condor_submit, condor_q, condor_history, condor_rm,
condor_hold, condor_release, condor_vacate_job (symlinks to this file; the command is the name
it is called by).
Standard library only.

What it reproduces (formats from the HTCondor manual and tests/data/vectors/htcondor.json):
- `condor_submit [-terse] [-batch-name name] [file]` reads a submit description (from stdin without a
  file): `key = value` commands, `+Attr = value` custom attributes, one `queue [N]`.
  Known: universe, executable, arguments, output, error, log, initialdir, batch_name,
  getenv, environment (new syntax "a=1 b='x y'" or old a=1;b=2), request_cpus/memory/
  disk/gpus, requirements, accounting_group, allowed_execute_duration, hold,
  leave_in_queue, max_materialize. `-terse` prints "15.0 - 15.0" ("15.0 - 15.4" for
  `queue 5`), the plain form "Submitting job(s).\\n1 job(s) submitted to cluster 15." (one
  dot per job). Refusals (exit 1): "ERROR: I don't know about the 'x' universe.",
  "ERROR: Executable file x does not exist", "ERROR: Can't open \"x\"  with flags 01101
  (Permission denied)" style checks are limited to these two.
- `condor_vacate_job ids`: a running job is evicted from its slot (SIGTERM, SIGKILL after
  FAKE_CONDOR_KILL_TIMEOUT) and returns to Idle, to be matched again (not before
  FAKE_CONDOR_REMATCH_DELAY, 5 s: the negotiator's next cycle) and run from the start,
  NumJobStarts counting; the log gets "Job was evicted." (004). "Job N.P vacated"; a
  job not running: this fake's own refusal on stderr, exit 1.
- Clusters of many procs (`queue N`): N job ads ClusterId.0 ... ClusterId.N-1, each its
  own job (states, holds, removal, history); `$(Cluster)`/`$(ClusterId)` and
  `$(Process)`/`$(ProcId)`/`$(Step)` are expanded per proc in every command (other
  macros are not). More than FAKE_CONDOR_MAX_JOBS_PER_SUBMISSION (HTCondor's
  MAX_JOBS_PER_SUBMISSION, default 20000) procs: nothing is queued, exit 1, and on stderr
  "\\nERROR: Failed to create proc\\nNumber of submitted jobs would exceed
  MAX_JOBS_PER_SUBMISSION" (condor_submit's words, submit.cpp).
- Late materialization (`max_materialize = M`, the manual's "Submitting Lots of Jobs"):
  at most M jobs of the cluster are in the queue, in any state (a completed job kept by
  leave_in_queue or a held one counts); the next proc materializes when one leaves. The
  procs not materialized yet are in no listing; job ads of the cluster show the cluster
  ad's JobMaterializeNextProcId and JobMaterializeLimit. The limit on such a cluster is
  not refused: it applies to M. No factory ad (`condor_q -factory`) is listed.
- Jobs run as REAL processes (the executable, argv from `arguments`), detached in their
  own session through a per-job "starter": stdout/stderr to output/error (relative to
  initialdir), cwd = initialdir, the environment of condor_submit when getenv = True
  (plus `environment`), and _CONDOR_SCRATCH_DIR, _CONDOR_SLOT, _CONDOR_JOB_AD (a file),
  _CONDOR_JOB_IWD, _CONDOR_JOB_PIDS. A job event log (submit 000, execute 001,
  terminated 005, aborted 009, held 012, released 013) is written to `log`.
- At most FAKE_CONDOR_SLOTS (2) CPUs busy; other jobs stay idle (JobStatus 1).
- `hold = True`: JobStatus 5, HoldReason "submitted on hold at user's request",
  HoldReasonCode 15, until `condor_release`.
- Start attributes, as the job ClassAd attributes manual describes them: NumJobStarts
  (0 at submit, +1 each time the executable starts), JobStartDate (the first start) and
  JobCurrentStartDate (the latest), both set when the job goes running (JobStatus 2).
- `condor_hold N.P`: JobStatus 5, HoldReason "via condor_hold (by user <u>)",
  HoldReasonCode 1, HoldReasonSubCode 0; "Job N.P held" (exit 0), "Job N.P already held" /
  "Job N.P not found" on stderr (exit 1), as condor_hold prints them. An idle job is
  held at once (event 012). A running one is killed (the manual: "sent a hard kill
  signal"; here like condor_rm below: SIGTERM, SIGKILL FAKE_CONDOR_KILL_TIMEOUT later)
  and, once dead, gets events 004 (evicted) and 012; it stays held and keeps its start
  attributes, and `condor_release` makes it idle to start again from scratch (not before
  the killed process is gone).
- allowed_execute_duration: at the limit the job is hard-killed (SIGKILL) and held:
  JobStatus 5, HoldReason "The job exceeded allowed execute duration of 1:00",
  HoldReasonCode 47. It stays held.
- `condor_rm`: idle/held jobs leave the queue at once (JobStatus 3, RemoveReason
  "via condor_rm (by user <u>)"); running ones get SIGTERM, SIGKILL
  FAKE_CONDOR_KILL_TIMEOUT (2 s) later, and leave once dead. "Job N.P marked for
  removal" (exit 0); "Job N.P not found" / "Job N.P already marked for removal" on
  stderr (exit 1). A proc not materialized yet is "not found" (assumed: only the
  cluster's removal stops its materialization). `condor_rm N` (a cluster) removes every
  job of it and ends its materialization: "All jobs in cluster N have been marked for
  removal" (exit 0), or "Couldn't find/remove all jobs in cluster N." on stderr (exit 1)
  when it removed nothing; condor_hold/condor_release N likewise ("have been held",
  "have been released").
- Completed jobs (JobStatus 4, ExitCode or ExitBySignal/ExitSignal) leave the queue
  FAKE_CONDOR_LINGER (2 s) after they end, or, with `leave_in_queue = JobStatus == 4 &&
  (time() - EnteredCurrentStatus) < N`, N seconds after ("True": never); then only
  `condor_history` has them.
- `condor_q [ids] [-constraint 'Attr == "v"'] (-json [-attributes a,b] | -af:j a b | -nobatch)`:
  unknown ids are simply not listed (exit 0); -json prints nothing when no job matches.
  `condor_history` takes the same options (and -match/-limit N), newest first.

Not reproduced: ClassAd expressions beyond `Attr == value` constraints and the
leave_in_queue form above, condor_hold's -reason/-subcode/-constraint/user arguments and
holding a completed or removed job (refused here with a message of the fake's own),
periodic_* policies, `queue ... from/in/matching` and several queue statements, other
submit macros ($(Item), $(Row), $(Node), $RANDOM_*...), the max_idle factory limit,
MAX_JOBS_SUBMITTED/MAX_JOBS_PER_OWNER, file transfer, the default batch layout of condor_q
(the -nobatch table is printed), -global/-name/-pool, DAGMan, suspend, request_memory
enforcement, security.

State lives in FAKE_CONDOR_HOME (default /tmp/fake-condor-<uid>): one JSON job ad per
job in queue/, a factory per late-materializing cluster in factories/, history.jsonl, a
counter, and a lock taken around every change.
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

HOME = Path(os.environ.get("FAKE_CONDOR_HOME", f"/tmp/fake-condor-{os.getuid()}"))
QUEUE = HOME / "queue"
HISTORY = HOME / "history.jsonl"
SLOTS = int(os.environ.get("FAKE_CONDOR_SLOTS", "2"))
LINGER = float(os.environ.get("FAKE_CONDOR_LINGER", "2"))
KILL_TIMEOUT = float(os.environ.get("FAKE_CONDOR_KILL_TIMEOUT", "2"))
REMATCH_DELAY = float(os.environ.get("FAKE_CONDOR_REMATCH_DELAY", "5"))
#: the schedd's MAX_JOBS_PER_SUBMISSION (HTCondor's default: 20000)
MAX_JOBS_PER_SUBMISSION = int(os.environ.get("FAKE_CONDOR_MAX_JOBS_PER_SUBMISSION", "20000"))
UNIVERSES = ("vanilla", "scheduler", "local", "grid", "java", "vm", "parallel", "docker", "container")
HOST = socket.gethostname().split(".")[0]
USER = os.environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name
IDLE, RUNNING, REMOVED, COMPLETED, HELD = 1, 2, 3, 4, 5
INTERNAL = ("_env", "_argv", "_keep", "_starter_pid", "_pid", "_kill_at", "_left_at")
STATUS_WORDS = {IDLE: "idle", RUNNING: "running", REMOVED: "removed", COMPLETED: "completed", HELD: "held"}


@contextmanager
def locked():
    QUEUE.mkdir(parents=True, exist_ok=True)
    with open(HOME / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def job_id(ad: dict) -> str:
    return f"{ad['ClusterId']}.{ad['ProcId']}"


def load(jid: str) -> dict | None:
    try:
        return json.loads((QUEUE / f"{jid}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def save(ad: dict) -> None:
    path = QUEUE / f"{job_id(ad)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ad))
    tmp.replace(path)


def queue_ads() -> list[dict]:
    ads = [load(p.stem) for p in QUEUE.glob("*.json")]
    return sorted((a for a in ads if a), key=lambda a: (a["ClusterId"], a["ProcId"]))


def history_ads() -> list[dict]:
    if not HISTORY.exists():
        return []
    return [json.loads(line) for line in HISTORY.read_text().splitlines() if line.strip()][::-1]


def to_history(ad: dict) -> None:
    with open(HISTORY, "a") as f:
        f.write(json.dumps(ad) + "\n")
    (QUEUE / f"{job_id(ad)}.json").unlink(missing_ok=True)


def set_status(ad: dict, status: int) -> None:
    ad["LastJobStatus"] = ad.get("JobStatus")
    ad["JobStatus"] = status
    ad["EnteredCurrentStatus"] = int(time.time())


def alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, OSError):
        return False


def event(ad: dict, code: str, text: str, detail: str = "") -> None:
    log = ad.get("UserLog")
    if not log:
        return
    stamp = time.strftime("%m/%d %H:%M:%S")
    detail = detail.replace("\t", "        ")
    body = f"{code} ({ad['ClusterId']:03d}.{ad['ProcId']:03d}.000) {stamp} {text.rstrip()}\n{detail}...\n"
    try:
        with open(log, "a") as f:
            f.write(body)
    except OSError:
        pass


def schedule() -> None:
    """One pass of the fake schedd/negotiator, with the lock held."""
    now = time.time()
    ads = queue_ads()
    for ad in ads:
        started = ad.get("JobCurrentStartDate", ad.get("JobStartDate", now))
        if ad["JobStatus"] == RUNNING and not alive(ad.get("_starter_pid")) and now - started > 5:
            set_status(ad, HELD)
            ad.update(HoldReason="Job lost its starter", HoldReasonCode=6, HoldReasonSubCode=0)
            save(ad)
        if ad["JobStatus"] in (COMPLETED, REMOVED) and ad.get("_left_at") is not None and now >= ad["_left_at"]:
            to_history(ad)
    materialize()
    ads = queue_ads()
    busy = sum(a.get("RequestCpus", 1) for a in ads if a["JobStatus"] == RUNNING)
    for ad in ads:
        if ad["JobStatus"] != IDLE or ad.get("_not_before", 0) > now:
            continue
        if alive(ad.get("_starter_pid")):
            continue  # released while its killed run is still going away (condor_hold)
        if busy + ad.get("RequestCpus", 1) > SLOTS:
            break
        busy += ad.get("RequestCpus", 1)
        set_status(ad, RUNNING)
        ad.setdefault("JobStartDate", int(now))
        ad["JobCurrentStartDate"] = int(now)
        ad["RemoteHost"] = f"slot1@{HOST}"
        save(ad)
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--starter", job_id(ad)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        ad["_starter_pid"] = proc.pid
        save(ad)


# -- condor_submit ---------------------------------------------------------------------


def parse_description(text: str) -> tuple[dict, dict, list[int]]:
    """Commands, custom attributes, and the count of each `queue [N]` statement."""
    commands: dict[str, str] = {}
    custom: dict[str, str] = {}
    queues: list[int] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^queue(?:\s+(\S+))?\s*$", line, re.I)
        if m:
            if m.group(1) is not None and not m.group(1).isdigit():
                raise ValueError(f"fake condor_submit: 'queue {m.group(1)}': only 'queue [N]' is modelled")
            queues.append(int(m.group(1) or 1))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"ERROR: on Line {raw!r} of submit file: syntax error")
        key, value = key.strip(), value.strip()
        if key.startswith("+") or key.startswith("MY."):
            custom[key.lstrip("+").removeprefix("MY.")] = value
        else:
            commands[key.lower()] = value
    return commands, custom, queues


def classad_value(text: str):
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def memory_mb(value: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)B?", value.strip(), re.I)
    if not m:
        return 0
    n, unit = int(m.group(1)), (m.group(2) or "M").upper()
    return {"K": n // 1024, "M": n, "G": n * 1024, "T": n * 1024 * 1024}[unit]


_MACRO_RE = re.compile(r"\$\((Process|ProcId|Cluster|ClusterId|Step)\)", re.I)


def expand(value: str, cluster: int, proc: int) -> str:
    """The submit macros a `queue N` cluster varies by: $(Cluster)/$(ClusterId) and
    $(Process)/$(ProcId)/$(Step) (the step of `queue N` is the proc id)."""
    return _MACRO_RE.sub(lambda m: str(cluster if m.group(1).lower().startswith("cluster") else proc), value)


def environment_pairs(text: str) -> dict[str, str]:
    """`environment`: the new syntax ("a=1 b='x y'"; its '' and "" escapes are not
    modelled) or the old one (a=1;b=2)."""
    text = text.strip()
    env: dict[str, str] = {}
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        pairs = shlex.split(text[1:-1])
    else:
        pairs = text.split(";")
    for pair in pairs:
        k, _, v = pair.partition("=")
        if k.strip():
            env[k.strip()] = v
    return env


def job_ad(template: dict, cluster: int, proc: int, now: int) -> dict:
    """One proc's job ad, from the submission's commands with its macros expanded."""
    commands = {k: expand(v, cluster, proc) for k, v in template["commands"].items()}
    custom = {k: expand(v, cluster, proc) for k, v in template["custom"].items()}
    iwd = commands.get("initialdir") or template["cwd"]
    resolve = lambda p: p if not p or os.path.isabs(p) else os.path.join(iwd, p)  # noqa: E731
    env = dict(template["getenv"])
    env.update(environment_pairs(commands.get("environment", "")))
    exe = commands["executable"]
    ad = {
        "ClusterId": cluster, "ProcId": proc, "Owner": USER, "QDate": now,
        "JobUniverse": commands.get("universe", "vanilla"),
        "Cmd": exe if os.path.isabs(exe) else os.path.join(iwd, exe), "Args": commands.get("arguments", ""),
        "Iwd": iwd,
        "Out": resolve(commands.get("output", "/dev/null")), "Err": resolve(commands.get("error", "/dev/null")),
        "UserLog": resolve(commands.get("log", "")) or None,
        "JobBatchName": template["batch_name"] or commands.get("batch_name") or None,
        "RequestCpus": int(commands.get("request_cpus", "1")),
        "RequestMemory": memory_mb(commands.get("request_memory", "128")),
        "RequestGPUs": int(commands.get("request_gpus", "0")),
        "Requirements": commands.get("requirements"),
        "AcctGroup": commands.get("accounting_group"),
        "AllowedExecuteDuration": int(commands["allowed_execute_duration"]) if commands.get("allowed_execute_duration") else None,
        "JobStatus": IDLE, "EnteredCurrentStatus": now, "NumJobStarts": 0,
        # as HTCondor: the job's whole environment (getenv's copy included) is in its
        # ad, in the "new" space-separated syntax, for anyone running condor_q -l
        "Environment": " ".join(f"{k}='{v}'" if " " in v else f"{k}={v}" for k, v in env.items()) or None,
        "_env": env, "_argv": shlex.split(commands.get("arguments", "").strip('"')), "_keep": template["keep"],
    }
    ad.update({k: classad_value(v) for k, v in custom.items()})
    if template.get("factory"):
        ad["JobMaterializeLimit"] = template["factory"]["limit"]
    ad = {k: v for k, v in ad.items() if v is not None or k == "_keep"}
    if ad["RequestCpus"] > SLOTS:
        ad["RequestCpus"] = SLOTS  # never matches in a real pool; here: run it anyway
    if template["hold"]:
        set_status(ad, HELD)
        ad.update(HoldReason="submitted on hold at user's request", HoldReasonCode=15, HoldReasonSubCode=0)
    return ad


def queue_job(ad: dict) -> None:
    """A new job in the queue (the lock held): saved, with its submit event."""
    save(ad)
    event(ad, "000", f"Job submitted from host: <127.0.0.1:9618?addrs=127.0.0.1-9618&alias={HOST}>\n")
    if ad["JobStatus"] == HELD:
        event(ad, "012", "Job was held.\n", "\tsubmitted on hold at user's request\n\tCode 15 Subcode 0\n")


# -- late materialization (max_materialize): a factory per cluster ------------------------


def factory_path(cluster: int) -> Path:
    return HOME / "factories" / f"{cluster}.json"


def load_factory(cluster: int) -> dict | None:
    try:
        return json.loads(factory_path(cluster).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def save_factory(template: dict) -> None:
    path = factory_path(template["cluster"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(template))
    tmp.replace(path)


def factories() -> list[dict]:
    found = []
    for path in sorted((HOME / "factories").glob("*.json")) if (HOME / "factories").exists() else []:
        template = load_factory(int(path.stem))
        if template:
            found.append(template)
    return found


def materialize() -> None:
    """The schedd's part of late materialization (the lock held): while a factory cluster
    has fewer jobs in the queue (in any state) than its max_materialize, its next proc is
    made; a factory that made them all, or whose cluster was removed, is gone."""
    ads = queue_ads()
    for template in factories():
        factory = template["factory"]
        present = sum(1 for a in ads if a["ClusterId"] == template["cluster"])
        while not factory["removed"] and factory["next"] < factory["total"] and present < factory["limit"]:
            queue_job(job_ad(template, template["cluster"], factory["next"], int(time.time())))
            factory["next"] += 1
            present += 1
        if factory["removed"] or factory["next"] >= factory["total"]:
            factory_path(template["cluster"]).unlink(missing_ok=True)
        else:
            save_factory(template)


def next_proc_of(cluster: int) -> int | None:
    """The cluster ad's JobMaterializeNextProcId, while its factory lasts."""
    template = load_factory(cluster)
    return template["factory"]["next"] if template else None


def condor_submit(argv: list[str]) -> int:
    terse = "-terse" in argv
    batch_name = None
    if "-batch-name" in argv:
        i = argv.index("-batch-name")
        batch_name = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    files = [a for a in argv if not a.startswith("-")]
    text = Path(files[0]).read_text() if files else sys.stdin.read()
    try:
        commands, custom, queues = parse_description(text)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    universe = commands.get("universe", "vanilla")
    if universe.lower() not in UNIVERSES:
        print(f"\nERROR: I don't know about the '{universe}' universe.", file=sys.stderr)
        return 1
    iwd = commands.get("initialdir") or os.getcwd()
    exe = commands.get("executable")
    if not exe:
        print("\nERROR: No 'executable' parameter was provided", file=sys.stderr)
        return 1
    exe_path = exe if os.path.isabs(exe) else os.path.join(iwd, exe)
    if not os.path.exists(exe_path):
        print(f"\nERROR: Executable file {exe_path} does not exist", file=sys.stderr)
        return 1
    if len(queues) != 1 or queues[0] < 1:
        print("fake condor_submit: exactly one 'queue [N]' statement (N >= 1) is modelled", file=sys.stderr)
        return 1
    count = queues[0]
    limit = commands.get("max_materialize", "").strip()
    if limit and not limit.isdigit():
        print(f"fake condor_submit: max_materialize = {limit}: only a number is modelled", file=sys.stderr)
        return 1
    max_materialize = int(limit) if limit and int(limit) > 0 else None
    if max_materialize is None and count > MAX_JOBS_PER_SUBMISSION:
        # submit.cpp: the schedd refuses the proc beyond the limit; the whole submission
        # is aborted (a late-materialized cluster is not refused: the limit applies to
        # its max_materialize instead)
        print("\nERROR: Failed to create proc\nNumber of submitted jobs would exceed MAX_JOBS_PER_SUBMISSION",
              file=sys.stderr)
        return 1
    keep = None
    leave = commands.get("leave_in_queue", "").strip()
    if leave.lower() == "true":
        keep = float("inf")
    else:
        m = re.search(r"EnteredCurrentStatus\s*\)\s*<\s*(\d+)\s*$", leave)
        if m:
            keep = float(m.group(1))
    template = {
        "commands": commands, "custom": custom, "cwd": os.getcwd(), "batch_name": batch_name,
        "getenv": dict(os.environ) if str(commands.get("getenv", "false")).lower() == "true" else {},
        "keep": keep, "hold": str(commands.get("hold", "false")).lower() == "true",
    }
    with locked():
        counter = HOME / "counter"
        cluster = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(cluster))
        template["cluster"] = cluster
        if max_materialize is not None:
            template["factory"] = {"total": count, "next": 0, "removed": False,
                                   "limit": min(max_materialize, MAX_JOBS_PER_SUBMISSION)}
            save_factory(template)
            materialize()
        else:
            now = int(time.time())
            for proc in range(count):
                queue_job(job_ad(template, cluster, proc, now))
        schedule()
    if terse:
        print(f"{cluster}.0 - {cluster}.{count - 1}")
    else:
        dots = "" if max_materialize is not None else "." * count
        print(f"Submitting job(s){dots}\n{count} job(s) submitted to cluster {cluster}.")
    return 0


# -- the starter: runs one job ------------------------------------------------------------


def format_time_short(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}+{hours:02d}:{minutes:02d}:{secs:02d}"
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def starter(jid: str) -> int:
    with locked():
        ad = load(jid)
        if not ad or ad["JobStatus"] != RUNNING:
            return 0
        scratch = HOME / "execute" / f"dir_{jid}"
        scratch.mkdir(parents=True, exist_ok=True)
        job_ad = scratch / ".job.ad"
        job_ad.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in ad.items() if not k.startswith("_")))
        env = dict(ad["_env"])
        env.update(_CONDOR_SCRATCH_DIR=str(scratch), _CONDOR_SLOT="slot1", _CONDOR_JOB_AD=str(job_ad),
                   _CONDOR_JOB_IWD=ad["Iwd"], BATCH_SYSTEM="HTCondor")
        try:
            out = open(ad["Out"], "ab")
            err = open(ad["Err"], "ab")
            proc = subprocess.Popen(
                [ad["Cmd"], *ad.get("_argv", [])], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=ad["Iwd"], env={**env, "_CONDOR_JOB_PIDS": ""}, start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            set_status(ad, HELD)
            ad.update(HoldReason=f"Error from slot1@{HOST}: Failed to execute '{ad['Cmd']}': {exc.strerror}",
                      HoldReasonCode=6, HoldReasonSubCode=exc.errno or 0)
            save(ad)
            event(ad, "012", "Job was held.\n", f"\t{ad['HoldReason']}\n\tCode 6 Subcode {exc.errno or 0}\n")
            schedule()
            return 0
        ad["_pid"] = proc.pid
        ad["NumJobStarts"] = ad.get("NumJobStarts", 0) + 1
        save(ad)
        event(ad, "001", f"Job executing on host: <127.0.0.1:9618?addrs=127.0.0.1-9618&alias={HOST}>\n")
    started = time.monotonic()
    limit = ad.get("AllowedExecuteDuration")
    over_limit = False
    while True:
        try:
            rc = proc.wait(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            pass
        current = load(jid) or {}
        if current.get("_kill_at") is not None and time.time() >= current["_kill_at"]:
            _signal(proc.pid, signal.SIGKILL)
        if limit and not over_limit and time.monotonic() - started > limit:
            over_limit = True
            _signal(proc.pid, signal.SIGKILL)  # a hold is a hard kill
    with locked():
        ad = load(jid)
        if ad is None:
            return 0
        now = time.time()
        if over_limit:
            set_status(ad, HELD)
            ad.update(HoldReason=f"The job exceeded allowed execute duration of {format_time_short(limit)}",
                      HoldReasonCode=47, HoldReasonSubCode=0)
            event(ad, "012", "Job was held.\n", f"\t{ad['HoldReason']}\n\tCode 47 Subcode 0\n")
        elif ad["JobStatus"] == REMOVED:
            ad["_left_at"] = now
            event(ad, "009", "Job was aborted.\n", f"\t{ad.get('RemoveReason', '')}\n")
        elif ad.pop("_vacated", False):
            # condor_vacate_job: evicted, idle again, to run from the start once matched
            ad.pop("_pid", None)
            ad.pop("_kill_at", None)
            ad["_not_before"] = now + REMATCH_DELAY
            event(ad, "004", "Job was evicted.\n", "\t(0) Job was not checkpointed.\n")
        elif ad["JobStatus"] != RUNNING:
            # held (and maybe released already) while it ran: condor_hold's kill
            ad.pop("_pid", None)
            if ad.pop("_kill_at", None) is not None:
                reason = ad.get("HoldReason") or ad.get("LastHoldReason", "")
                event(ad, "004", "Job was evicted.\n", "\t(0) Job was not checkpointed.\n")
                event(ad, "012", "Job was held.\n", f"\t{reason}\n\tCode 1 Subcode 0\n")
        else:
            set_status(ad, COMPLETED)
            ad["CompletionDate"] = int(now)
            if rc < 0:
                ad.update(ExitBySignal=True, ExitSignal=-rc)
                detail = f"\t(0) Abnormal termination (signal {-rc})\n"
            else:
                ad.update(ExitBySignal=False, ExitCode=rc)
                detail = f"\t(1) Normal termination (return value {rc})\n"
            keep = ad.get("_keep")
            ad["_left_at"] = now + (LINGER if keep is None else min(keep, 10**9))
            event(ad, "005", "Job terminated.\n", detail)
        if ad.get("_starter_pid") == os.getpid():
            del ad["_starter_pid"]  # this run is over: a released job may start again
        save(ad)
        schedule()
    return 0


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# -- queries --------------------------------------------------------------------------------


def parse_query_args(argv: list[str]) -> dict:
    q = {"ids": [], "json": False, "attributes": None, "af": None, "constraint": None, "limit": None}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-json":
            q["json"] = True
        elif a in ("-attributes", "-attrs"):
            q["attributes"] = argv[i + 1].split(",")
            i += 1
        elif a.startswith("-af"):
            q["af"] = argv[i + 1:]
            break
        elif a in ("-constraint", "-const"):
            q["constraint"] = argv[i + 1]
            i += 1
        elif a in ("-match", "-limit"):
            q["limit"] = int(argv[i + 1])
            i += 1
        elif a in ("-nobatch", "-allusers", "-hold", "-global"):
            pass
        elif a.startswith("-"):
            raise ValueError(f"Error: unrecognized option {a}")
        else:
            q["ids"].append(a)
        i += 1
    return q


def matches(ad: dict, q: dict) -> bool:
    if q["ids"]:
        ok = False
        for want in q["ids"]:
            if "." in want:
                ok |= want == job_id(ad)
            elif want.isdigit():
                ok |= int(want) == ad["ClusterId"]
            else:
                ok |= want == ad.get("Owner")
        if not ok:
            return False
    if q["constraint"]:
        m = re.fullmatch(r"\s*(\w+)\s*==\s*(.+?)\s*", q["constraint"])
        if not m:
            raise ValueError(f"Error: fake condor: unsupported constraint {q['constraint']!r}")
        if ad.get(m.group(1)) != classad_value(m.group(2)):
            return False
    return True


def public(ad: dict) -> dict:
    return {k: v for k, v in ad.items() if not k.startswith("_")}


def render(ads: list[dict], q: dict, listing: str) -> str:
    if q["json"]:
        if not ads:
            return ""
        chosen = [public(a) if not q["attributes"] else {k: a[k] for k in q["attributes"] if k in a} for a in ads]
        return "[\n" + "\n,\n".join(json.dumps(c, indent=2) for c in chosen) + "\n]\n"
    if q["af"] is not None:
        lines = []
        for a in ads:
            values = []
            for attr in q["af"]:
                v = a.get(attr)
                values.append("undefined" if v is None else ("true" if v is True else "false" if v is False else str(v)))
            lines.append(" ".join([job_id(a), *values]))
        return "".join(line + "\n" for line in lines)
    if listing == "history":
        rows = [" ID     OWNER          SUBMITTED   RUN_TIME     ST  COMPLETED   CMD"]
        rows += [f" {job_id(a):<6} {a['Owner']:<14} {'C' if a['JobStatus'] == 4 else 'X'}  {a['Cmd']}" for a in ads]
        return "\n".join(rows) + "\n"
    letters = {1: "I", 2: "R", 3: "X", 4: "C", 5: "H", 6: ">", 7: "S"}
    rows = ["", "", f"-- Schedd: {HOST} : <127.0.0.1:9618?... @ {time.strftime('%m/%d/%y %H:%M:%S')}",
            " ID      OWNER            SUBMITTED     RUN_TIME ST PRI SIZE CMD"]
    for a in ads:
        run = int(time.time() - a["JobStartDate"]) if a["JobStatus"] == 2 and a.get("JobStartDate") else 0
        rt = f"{run // 86400}+{run % 86400 // 3600:02d}:{run % 3600 // 60:02d}:{run % 60:02d}"
        rows.append(f" {job_id(a):<7} {a['Owner']:<14} {time.strftime('%m/%d %H:%M', time.localtime(a['QDate']))}"
                    f" {rt:>12} {letters.get(a['JobStatus'], '?')}  0    0.0 {os.path.basename(a['Cmd'])}")
    count = {s: sum(1 for a in ads if a["JobStatus"] == s) for s in range(1, 8)}
    rows += ["", f"{len(ads)} jobs; {count[4]} completed, {count[3]} removed, {count[1]} idle, "
                 f"{count[2]} running, {count[5]} held, {count[7]} suspended"]
    return "\n".join(rows) + "\n"


def query(argv: list[str], listing: str) -> int:
    try:
        q = parse_query_args(argv)
        with locked():
            schedule()
            ads = queue_ads() if listing == "queue" else history_ads()
            if listing == "queue":
                for ad in ads:  # the cluster ad's attribute, as a job ad chained to it shows it
                    nxt = next_proc_of(ad["ClusterId"])
                    if nxt is not None:
                        ad["JobMaterializeNextProcId"] = nxt
        found = [a for a in ads if matches(a, q)]
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if q["limit"] is not None:
        found = found[: q["limit"]]
    sys.stdout.write(render(found, q, listing))
    return 0


# -- condor_rm, condor_release ---------------------------------------------------------------


ACTION_WORDS = {"rm": ("remove", "have been marked for removal"), "hold": ("hold", "have been held"),
                "release": ("release", "have been released")}


def act(argv: list[str], action: str) -> int:
    """condor_rm / condor_hold / condor_release of job ids (N.P) and clusters (N)."""
    ids = [a for a in argv if not a.startswith("-")]
    rc = 0
    for jid in ids:
        with locked():
            if "." not in jid:
                rc |= act_on_cluster(int(jid), action)
                continue
            ad = load(jid)
            if ad is None:
                # (a proc of a late-materialized cluster that is not materialized yet too)
                print(f"Job {jid} not found", file=sys.stderr)
                rc = 1
                continue
            error = act_on(ad, action)
            if error:
                print(error, file=sys.stderr)
                rc = 1
                continue
            words = {"rm": "marked for removal", "hold": "held", "release": "released", "vacate": "vacated"}
            print(f"Job {jid} {words[action]}")
    return rc


def act_on_cluster(cluster: int, action: str) -> int:
    """Every job of the cluster, as `condor_rm N` does it (by the constraint ClusterId ==
    N): 'All jobs in cluster N have been marked for removal', or on stderr "Couldn't
    find/remove all jobs in cluster N." when none was. Removing a cluster also ends its
    late materialization."""
    done = False
    if action == "rm":
        template = load_factory(cluster)
        if template and not template["factory"]["removed"]:
            template["factory"]["removed"] = True
            save_factory(template)
            done = True
    for jid in [job_id(a) for a in queue_ads() if a["ClusterId"] == cluster]:
        ad = load(jid)  # as it is now: acting on one job may have started another
        if ad is not None and act_on(ad, action, reschedule=False) is None:
            done = True
    schedule()
    verb, past = ACTION_WORDS[action]
    if not done:
        print(f"Couldn't find/{verb} all jobs in cluster {cluster}.", file=sys.stderr)
        return 1
    print(f"All jobs in cluster {cluster} {past}")
    return 0


def act_on(ad: dict, action: str, reschedule: bool = True) -> str | None:
    """One job (the lock held); the refusal's message, None when done."""
    jid = job_id(ad)
    if action == "rm":
        if ad["JobStatus"] == REMOVED:
            return f"Job {jid} already marked for removal"
        was = ad["JobStatus"]
        set_status(ad, REMOVED)
        ad["RemoveReason"] = f"via condor_rm (by user {USER})"
        if (was == RUNNING or ad.get("_kill_at") is not None) and alive(ad.get("_pid")):
            # running, or held by condor_hold and still being killed
            _signal(ad["_pid"], signal.SIGTERM)
            ad["_kill_at"] = min(ad.get("_kill_at") or float("inf"), time.time() + KILL_TIMEOUT)
        else:
            ad["_left_at"] = time.time()
            event(ad, "009", "Job was aborted.\n", f"\t{ad['RemoveReason']}\n")
        save(ad)
        if reschedule:
            schedule()
    elif action == "vacate":
        if ad["JobStatus"] != RUNNING or not alive(ad.get("_pid")):
            return f"fake condor_vacate_job: job {jid} is not running"
        set_status(ad, IDLE)
        ad["_vacated"] = True
        _signal(ad["_pid"], signal.SIGTERM)
        ad["_kill_at"] = time.time() + KILL_TIMEOUT
        save(ad)
    elif action == "hold":
        if ad["JobStatus"] == HELD:
            return f"Job {jid} already held"
        if ad["JobStatus"] not in (IDLE, RUNNING):
            return f"fake condor_hold: job {jid} is {STATUS_WORDS[ad['JobStatus']]}: not modelled"
        was = ad["JobStatus"]
        set_status(ad, HELD)
        ad.update(HoldReason=f"via condor_hold (by user {USER})", HoldReasonCode=1, HoldReasonSubCode=0)
        ad["NumHolds"] = ad.get("NumHolds", 0) + 1
        if was == RUNNING and alive(ad.get("_pid")):
            _signal(ad["_pid"], signal.SIGTERM)
            ad["_kill_at"] = time.time() + KILL_TIMEOUT
        else:
            # not started yet (or its starter has not launched it): no process to kill
            event(ad, "012", "Job was held.\n", f"\t{ad['HoldReason']}\n\tCode 1 Subcode 0\n")
        save(ad)
        if reschedule:
            schedule()
    else:
        if ad["JobStatus"] != HELD:
            return f"Job {jid} not held to be released"
        ad["LastHoldReason"] = ad.pop("HoldReason", "")
        ad.pop("HoldReasonCode", None)
        ad.pop("HoldReasonSubCode", None)
        set_status(ad, IDLE)
        save(ad)
        event(ad, "013", "Job was released.\n", f"\tvia condor_release (by user {USER})\n")
        if reschedule:
            schedule()
    return None


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--starter":
        return starter(sys.argv[2])
    command = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    handlers = {
        "condor_submit": lambda: condor_submit(args),
        "condor_q": lambda: query(args, "queue"),
        "condor_history": lambda: query(args, "history"),
        "condor_rm": lambda: act(args, "rm"),
        "condor_hold": lambda: act(args, "hold"),
        "condor_release": lambda: act(args, "release"),
        "condor_vacate_job": lambda: act(args, "vacate"),
    }
    if command not in handlers:
        print(f"fakecondor: call me as one of {', '.join(handlers)}, not {command}", file=sys.stderr)
        return 2
    return handlers[command]()


if __name__ == "__main__":
    sys.exit(main())
