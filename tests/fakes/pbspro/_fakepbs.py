"""A fake PBS Pro / OpenPBS server behind qsub, qstat, qselect, qdel, qrls and qrerun (the
executables beside this file), for tests on machines where PBS cannot run.

What it reproduces (PBS Pro 2022 behaviour as documented; outputs byte-for-byte in the
documented shapes):
- `qsub [opts] script`: #PBS directives read from the script up to its first command,
  command-line options win; prints `<seq>.<server>`; `-h` submits held (H, Hold_Types
  u); unknown queue -> "qsub: Unknown queue" rc 170; bad -N -> "qsub: illegal -N value" rc 2.
- Jobs run as REAL processes: the script is copied at submit (as PBS spools it) and run
  by a detached runner in its own session, cwd $HOME, stdout/stderr straight to the
  -o/-e paths (host: prefixes stripped), with PBS_JOBID, PBS_JOBNAME, PBS_QUEUE,
  PBS_O_WORKDIR, PBS_O_HOST, PBS_ENVIRONMENT=PBS_BATCH, PBS_NODEFILE...; qsub's whole
  environment only with -V (as PBS). At most FAKE_PBS_NCPUS (2) jobs of 1 cpu run at
  once; the others stay Q with the scheduler's comment
  "Not Running: Insufficient amount of resource: ncpus (R: 1 A: 0 T: 2)".
- States Q/H -> R -> E (exiting, FAKE_PBS_EXITING_SECONDS) -> F with Exit_status
  (exit code, or 256+signal). Finished jobs stay in the history (job_history_duration,
  FAKE_PBS_HISTORY_SECONDS, default two weeks), then are unknown.
- walltime: the job is killed (SIGTERM, SIGKILL after kill_delay), "=>> PBS: job killed:
  walltime N exceeded limit M" is appended to its stderr (the MoM's message), and it
  finishes with Exit_status -29 (JOB_EXEC_KILL_WALLTIME) and a comment saying so.
- qdel: a queued/held job -> F at once, no Exit_status; a running one -> SIGTERM to its
  process group, SIGKILL after kill_delay (FAKE_PBS_KILL_DELAY, default 3 s; PBS's is
  10 s), Exit_status 271/265 (256+signal) or its own exit code if it exits on SIGTERM;
  a finished one -> "qdel: Job has finished <id>" rc 35; unknown -> rc 153.
- qstat: `-f` (text, 4-space attributes), `-F json` (4-space indented, "key":value as
  PBS prints it), default table; `-x` includes finished jobs; without it a finished id
  answers "qstat: <id> Job has finished, use -x or -H to obtain historical job
  information" rc 35; an unknown id "qstat: Unknown Job Id <id>" rc 153, the other ids
  still answered on stdout.
- qselect [-x] [-N name] [-s states] [-t]: ids one per line (an array as `12[].server`,
  its subjobs too with -t). qrls: releases a user hold (of a job or a whole array).
- Job arrays (`-J X-Y[:Z][%M]`, also as `#PBS -J`), as PBS Pro 2022 / OpenPBS document
  them: qsub prints `<seq>[].<server>`; the range needs Y > X ("qsub: illegal -J value",
  rc 2, for `1-1`, a lone index, a comma list or `%0`); `%M` is max_run_subjobs (at most
  M subjobs run at once; not echoed in array_indices_submitted). More indices than
  max_array_size (FAKE_PBS_MAX_ARRAY_SIZE, default 10000 as PBS's server) -> "qsub:
  Array job exceeds server or queue size limit", rc 3 (PBSE_MaxArraySize 15107 & 0xff).
  Each subjob `<seq>[<i>].<server>` runs as its own process with PBS_ARRAY_INDEX=<i>,
  PBS_ARRAY_ID=<seq>[].<server> and PBS_JOBID=<seq>[<i>].<server>, `^array_index^` in
  -o/-e replaced by <i> (default paths `<name>.o<seq>.^array_index^`). The array is Q
  (H if held) until a subjob starts, then B ("Job Array Began at ..."), then F once every
  subjob has ended, with Exit_status 0, 1 if a subjob exited > 0, 2 if one ended < 0
  (chk_array_doneness); its record carries array, array_indices_submitted,
  array_indices_remaining, array_state_count, max_run_subjobs. Subjobs are Q, R, E, then
  X, each with its own Exit_status and comment ("... and finished"/"and failed") once
  it ran; a subjob deleted before it ran is X with comment "Subjob terminated" and no
  Exit_status, and a queued subjob is shown from its array's record (stat_job.c
  status_subjob). qstat names a subjob directly (`12[3].server`); the array's id shows
  the array alone, with -t the array and every subjob; without ids, -t adds subjobs
  after each array and -J keeps arrays only (-J -t: their subjobs only). An array's id
  without [] is unknown (rc 153), as is an index outside the range. Ended subjobs show
  without -x while their array is live; once the array is F, its id and its subjobs'
  answer "Job has finished ... use -x" (rc 35) without -x. qdel of a subjob: queued ->
  X at once, running -> killed as a job; ended -> "qdel: Request invalid for finished
  array subjob <id>", rc 55 (PBSE_NOHISTARRAYSUBJOB 15159 & 0xff). qdel of the array:
  every queued subjob X, every running one killed, the array F once all have ended;
  of a finished array: "qdel: Job has finished <id>", rc 35.

Fidelity limits (what it does not do): no daemons, so states advance when a command
runs (the worker polls every second; a test that never runs a command sees no change);
one node, ncpus counted per job or subjob as 1 whatever `select` asks (select/mem/ngpus
are recorded in Resource_List, not enforced); no dependencies, no reservations, no
stage-in/out (output is written directly, as with `-k oed`); arrays: no comma lists or
subjob ranges (`12[2-5]`) in qstat/qdel, no qalter, no per-subjob qrls/qhold (a hold
is the array's), ended subjobs always keep their own record (as with job history
enabled), qselect ignores -J; the walltime comment's wording and the array comment
when subjobs wait on max_run_subjobs are this fake's, only Exit_status -29 and the
stderr line are PBS's own; qdel of a running job returns before the job is gone (as
PBS does); qrerun takes a running job or subjob only (not a whole array, no -W force)
and needs no rerunnable flag (-r y is PBS Pro's default); tracejob is not provided (so it is 'command not found', as on a login node
without access to the server's logs).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HOME = Path(os.environ.get("FAKE_PBS_HOME", f"/tmp/fake-pbspro-{os.getuid()}"))
JOBS = HOME / "jobs"
SERVER = os.environ.get("FAKE_PBS_SERVER", "fakepbs")
HOST = socket.gethostname()
NCPUS = int(os.environ.get("FAKE_PBS_NCPUS", "2"))
KILL_DELAY = float(os.environ.get("FAKE_PBS_KILL_DELAY", "3"))
#: a rerun job waits this long in Q before it may run again (the scheduler's next cycle)
RERUN_DELAY = float(os.environ.get("FAKE_PBS_RERUN_DELAY", "5"))
EXITING_SECONDS = float(os.environ.get("FAKE_PBS_EXITING_SECONDS", "1"))
HISTORY_SECONDS = float(os.environ.get("FAKE_PBS_HISTORY_SECONDS", str(14 * 24 * 3600)))
QUEUES = os.environ.get("FAKE_PBS_QUEUES", "workq").split(",")
VERSION = "2022.1.3"
SUBSTATE = {"Q": 10, "H": 20, "R": 42, "E": 50, "F": 92, "B": 42, "X": 92}
INDEX_TAG = "^array_index^"  # PBS_FILE_ARRAY_INDEX_TAG


def max_array_size() -> int:
    return int(os.environ.get("FAKE_PBS_MAX_ARRAY_SIZE", "10000"))


def ctime(t: float) -> str:
    return time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(t))


def user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


# -- the job table ------------------------------------------------------------------


@contextmanager
def locked():
    JOBS.mkdir(parents=True, exist_ok=True)
    with open(HOME / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load_all() -> dict[str, dict]:
    jobs = {}
    for path in sorted(JOBS.glob("*.json"), key=lambda p: int(p.stem)):
        try:
            job = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        jobs[job["id"]] = job
    return jobs


def save(job: dict) -> None:
    path = JOBS / f"{job['seq']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job))
    tmp.replace(path)


def next_seq() -> int:
    counter = HOME / "seq"
    seq = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(seq))
    return seq


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# -- jobs, arrays and subjobs ----------------------------------------------------------
# A plain job's record is its own "unit" (what runs: state, pid, exit); an array's record
# holds one unit per subjob under "subjobs" (index -> unit) and its own state (Q/H, B, F).


def is_array(job: dict) -> bool:
    return bool(job.get("array"))


def array_id(job: dict) -> str:
    return f"{job['seq']}[].{SERVER}"


def subjob_id(job: dict, index) -> str:
    return f"{job['seq']}[{index}].{SERVER}"


def unit_key(job: dict, index=None) -> str:
    """The name of a unit's files in JOBS: <seq> for a job, <seq>.<index> for a subjob."""
    return str(job["seq"]) if index is None else f"{job['seq']}.{index}"


def units(job: dict):
    """(index or None, unit) for what runs: the job itself, or each subjob in order."""
    if is_array(job):
        for index in job["array"]["indices"]:
            yield index, job["subjobs"][str(index)]
    else:
        yield None, job


def unit_path(job: dict, which: str, index=None) -> str:
    path = job[which]
    return path.replace(INDEX_TAG, str(index)) if index is not None else path


def signal_unit(job: dict, unit: dict, key: str, sig: int) -> None:
    pid = unit.get("pid") or _read_int(JOBS / f"{key}.pid")
    if pid:
        unit["pid"] = pid
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def ended_comment(unit: dict, code: int) -> str:
    return f"Job run at {unit['run_at']} on ({HOST}:ncpus=1) and {'finished' if code == 0 else 'failed'}"


def advance(job: dict, unit: dict, key: str, index, now: float) -> bool:
    """Reap an exit, enforce walltime and kill delays, end exiting units."""
    changed = False
    if unit["state"] == "R":
        code = _read_int(JOBS / f"{key}.exit")
        if code is not None and unit.get("rerun"):
            # qrerun: back to Q, to run its script again from the start (run_count counts)
            for name in ("kill_at", "term_sent", "kill_sent", "rerun", "pid"):
                unit.pop(name, None)
            for suffix in ("exit", "pid"):
                (JOBS / f"{key}.{suffix}").unlink(missing_ok=True)
            unit.update(state="Q", not_before=now + RERUN_DELAY, comment="Job requeued by qrerun")
            return True
        if code is not None:
            if unit.get("killed_for") == "walltime":
                unit["exit_status"] = -29
                unit["comment"] = (
                    f"Job run at {unit['run_at']} on ({HOST}:ncpus=1) and was killed: "
                    f"walltime {int(unit['killed_at'] - unit['stime'])} exceeded limit {job['walltime_s']}"
                )
            else:
                unit["exit_status"] = code
                unit["comment"] = ended_comment(unit, code)
            unit["state"], unit["exit_time"] = "E", now
            changed = True
        else:
            limit = job.get("walltime_s")
            if limit and not unit.get("kill_at") and now - unit["stime"] > limit:
                unit["killed_for"], unit["killed_at"], unit["kill_at"] = "walltime", now, now
                _append(unit_path(job, "stderr", index),
                        f"=>> PBS: job killed: walltime {int(now - unit['stime'])} exceeded limit {limit}\n")
                changed = True
            if unit.get("kill_at") and not unit.get("term_sent"):
                signal_unit(job, unit, key, signal.SIGTERM)
                unit["term_sent"] = now
                changed = True
            elif unit.get("term_sent") and now - unit["term_sent"] >= KILL_DELAY and not unit.get("kill_sent"):
                signal_unit(job, unit, key, signal.SIGKILL)
                unit["kill_sent"] = now
                changed = True
    if unit["state"] == "E" and now - unit["exit_time"] >= EXITING_SECONDS:
        unit["state"], unit["finished"] = ("X" if index is not None else "F"), now
        changed = True
    return changed


def array_counts(job: dict) -> dict[str, int]:
    counts = dict.fromkeys("QREX", 0)
    for _, sub in units(job):
        counts[sub["state"]] += 1
    return counts


def settle_array(job: dict, now: float) -> bool:
    """The array's own state from its subjobs': B once one has started, F once all ended."""
    counts = array_counts(job)
    if job["state"] == "F":
        return False
    if counts["X"] == len(job["array"]["indices"]):
        codes = [sub["exit_status"] for _, sub in units(job) if "exit_status" in sub]
        job["exit_status"] = 2 if any(c < 0 for c in codes) else 1 if any(c > 0 for c in codes) else 0
        job["state"], job["finished"] = "F", now
        if job.get("stime"):
            job["comment"] = f"Job Array Began at {ctime(job['stime'])}"
        return True
    if job["state"] in ("Q", "H") and any(sub.get("stime") for _, sub in units(job)):
        job["state"], job["stime"] = "B", job.get("stime") or now
        job["comment"] = f"Job Array Began at {ctime(job['stime'])}"
        return True
    return False


def tick(jobs: dict[str, dict]) -> None:
    """Advance every job and subjob, then start what may start."""
    now = time.time()
    for job in jobs.values():
        changed = False
        for index, unit in units(job):
            changed |= advance(job, unit, unit_key(job, index), index, now)
        if is_array(job):
            changed |= settle_array(job, now)
        if changed:
            save(job)
    running = sum(1 for job in jobs.values() for _, u in units(job) if u["state"] in ("R", "E"))
    for job in jobs.values():
        if not is_array(job):
            if job["state"] != "Q" or job.get("not_before", 0) > now:
                continue
            if running < NCPUS:
                start(job, job, None, now)
                running += 1
            else:
                set_comment(job, f"Not Running: Insufficient amount of resource: ncpus (R: 1 A: 0 T: {NCPUS})")
            continue
        if job["state"] not in ("Q", "B"):  # held (H) or finished (F)
            continue
        max_run = job["array"].get("max_run")
        active = sum(1 for _, u in units(job) if u["state"] in ("R", "E"))
        waiting = None
        for index, sub in units(job):
            if sub["state"] != "Q" or sub.get("not_before", 0) > now:
                continue
            if max_run and active >= max_run:
                waiting = "Not Running: Number of concurrent running subjobs limit reached"
                break
            if running >= NCPUS:
                waiting = f"Not Running: Insufficient amount of resource: ncpus (R: 1 A: 0 T: {NCPUS})"
                break
            start(job, sub, index, now)
            running += 1
            active += 1
        if settle_array(job, now):
            save(job)
        if waiting:
            set_comment(job, waiting)
        elif job["state"] == "B":
            set_comment(job, f"Job Array Began at {ctime(job['stime'])}")


def set_comment(job: dict, comment: str) -> None:
    if job.get("comment") != comment:
        job["comment"] = comment
        save(job)


def _append(path: str, text: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError:
        pass


def start(job: dict, unit: dict, index, now: float) -> None:
    unit["state"], unit["stime"] = "R", now
    unit["run_at"] = time.strftime("%a %b %e at %H:%M", time.localtime(now))
    unit["comment"] = f"Job run at {unit['run_at']} on ({HOST}:ncpus=1)"
    unit["run_count"] = unit.get("run_count", 0) + 1
    save(job)
    subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--run-job", unit_key(job, index)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )


def run_job(key: str) -> None:
    """The MoM's part: run the spooled script (for a job or one subjob), record how it ended."""
    seq, _, index = key.partition(".")
    job = json.loads((JOBS / f"{seq}.json").read_text())
    index = index or None
    env = dict(job["env"])
    home = env.get("HOME") or os.path.expanduser("~")
    nodefile = JOBS / f"{key}.nodes"
    nodefile.write_text(HOST + "\n")
    env.update(
        PBS_JOBID=job["id"] if index is None else subjob_id(job, index), PBS_JOBNAME=job["name"],
        PBS_QUEUE=job["queue"], PBS_ENVIRONMENT="PBS_BATCH", PBS_NODEFILE=str(nodefile), PBS_JOBDIR=home,
        PBS_TASKNUM="1", PBS_NODENUM="0", PBS_MOMPORT="15003", NCPUS="1", OMP_NUM_THREADS="1",
        TMPDIR=os.environ.get("TMPDIR", "/tmp"), HOME=home,
    )
    if index is not None:
        env.update(PBS_ARRAY_INDEX=str(index), PBS_ARRAY_ID=array_id(job))
    stdout, stderr = unit_path(job, "stdout", index), unit_path(job, "stderr", index)
    for path in (stdout, stderr):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(stdout, "ab") as out, open(stderr, "ab") as err:
        proc = subprocess.Popen(
            ["/bin/bash", str(JOBS / f"{seq}.SC")], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            env=env, cwd=home, start_new_session=True,
        )
        (JOBS / f"{key}.pid").write_text(str(proc.pid))
        code = proc.wait()
    status = 256 - code if code < 0 else code  # killed by signal N -> 256+N
    tmp = JOBS / f"{key}.exit.tmp"
    tmp.write_text(str(status))
    tmp.replace(JOBS / f"{key}.exit")


# -- output ---------------------------------------------------------------------------


def ranges(indices: list[int], step: int) -> str:
    """Indices as PBS prints them (cvt_range): 'X', 'X,Y', 'X-Y' or 'X-Y:Z', comma-joined."""
    out, i = [], 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] - indices[j] == step:
            j += 1
        if j > i + 1:
            out.append(f"{indices[i]}-{indices[j]}" + (f":{step}" if step > 1 else ""))
        elif j == i + 1:
            out.append(f"{indices[i]},{indices[j]}")
        else:
            out.append(str(indices[i]))
        i = j + 1
    return ",".join(out)


def attributes(job: dict, index=None) -> dict:
    """A record as qstat -f shows it: a job's, an array's (index None) or a subjob's. A
    subjob that has not started, or was deleted before it ran, is shown from its array's
    record with its own state (stat_job.c status_subjob)."""
    array = is_array(job)
    unit = job["subjobs"][str(index)] if array and index is not None else job
    own = unit if (not array or index is None or unit.get("stime")) else None
    state = unit["state"]
    shown = own or job
    a = {
        "Job_Name": job["name"],
        "Job_Owner": f"{job['owner']}@{HOST}",
        "job_state": state,
        "queue": job["queue"],
        "server": SERVER,
        "Checkpoint": "u",
        "ctime": ctime(job["ctime"]),
        "Error_Path": f"{HOST}:{unit_path(job, 'stderr', index if own is not None else None)}",
    }
    if own is not None and state in ("R", "E", "F", "X") and own.get("stime") and not (array and index is None):
        a["exec_host"] = f"{HOST}/0"
        a["exec_vnode"] = f"({HOST}:ncpus=1)"
    a.update({
        "Hold_Types": "u" if job["state"] == "H" else "n",
        "Join_Path": "n",
        "Keep_Files": "n",
        "Mail_Points": "a",
        "mtime": ctime(shown.get("finished") or shown.get("exit_time") or shown.get("stime") or job["ctime"]),
        "Output_Path": f"{HOST}:{unit_path(job, 'stdout', index if own is not None else None)}",
        "Priority": 0,
        "qtime": ctime(job["ctime"]),
        "Rerunable": "True",
        "Resource_List": job["resources"],
    })
    if own is not None and own.get("stime"):
        a["stime"] = ctime(own["stime"])
        if not (array and index is None):
            a["session_id"] = own.get("pid") or _read_int(JOBS / f"{unit_key(job, index)}.pid") or 0
            a["jobdir"] = job["env"].get("HOME", "")
    if state in ("F", "X") and "exit_status" not in (own or {}):
        a["substate"] = 91  # deleted before it ran
    else:
        a["substate"] = SUBSTATE[state]
    # as PBS: the PBS_O_ variables, plus every variable qsub exported (-V, -v)
    exported = job.get("exported", [])
    a["Variable_List"] = {k: v for k, v in job["env"].items() if k.startswith("PBS_O_") or k in exported}
    comment = unit.get("comment") if index is not None and (own is not None or state == "X") else job.get("comment")
    if comment:
        a["comment"] = comment
    a["etime"] = ctime(job["ctime"])
    if own is not None and own.get("run_count"):
        a["run_count"] = own["run_count"]
    if own is not None and "exit_status" in own and state in ("E", "F", "X"):
        a["Exit_status"] = own["exit_status"]
    a["Submit_arguments"] = job["submit_args"]
    if state in ("F", "X") and unit.get("finished"):
        a["history_timestamp"] = int(unit["finished"])
    a["project"] = "_pbs_project_default"
    if array and index is None:
        counts = array_counts(job)
        a["array"] = "True"
        a["array_state_count"] = (f"Queued:{counts['Q']} Running:{counts['R']} "
                                  f"Exiting:{counts['E']} Expired:{counts['X']} ")
        a["array_indices_submitted"] = job["array"]["submitted"]
        queued = [i for i, sub in units(job) if sub["state"] == "Q"]
        a["array_indices_remaining"] = ranges(queued, job["array"]["step"]) or "-"
        if job["array"].get("max_run"):
            a["max_run_subjobs"] = job["array"]["max_run"]
    elif array:
        a["array_id"] = array_id(job)
        a["array_index"] = str(index)
    return a


def record_id(job: dict, index=None) -> str:
    if not is_array(job):
        return job["id"]
    return array_id(job) if index is None else subjob_id(job, index)


def record_state(job: dict, index=None) -> str:
    return job["state"] if index is None else job["subjobs"][str(index)]["state"]


def print_json(records: list[tuple[dict, object]]) -> None:
    doc = {"timestamp": int(time.time()), "pbs_version": VERSION, "pbs_server": SERVER}
    if records:
        doc["Jobs"] = {record_id(j, i): attributes(j, i) for j, i in records}
    print(json.dumps(doc, indent=4, separators=(",", ":")))


def print_full(records: list[tuple[dict, object]]) -> None:
    for job, index in records:
        print(f"Job Id: {record_id(job, index)}")
        for key, value in attributes(job, index).items():
            if isinstance(value, dict):
                if key == "Variable_List":
                    print(f"    {key} = " + ",".join(f"{k}={v}" for k, v in value.items()))
                else:
                    for k, v in value.items():
                        print(f"    {key}.{k} = {v}")
            else:
                print(f"    {key} = {value}")
        print()


def print_table(records: list[tuple[dict, object]]) -> None:
    print(f"{'Job id':<17} {'Name':<16} {'User':<16}  {'Time Use':>8} S Queue")
    print(f"{'-' * 16:<17} {'-' * 16} {'-' * 16}  {'-' * 8} - -----")
    for job, index in records:
        rid = record_id(job, index)
        jid = rid if len(rid) <= 16 else rid[:15] + "*"
        name = job["name"] if len(job["name"]) <= 16 else job["name"][:15] + "*"
        print(f"{jid:<17} {name:<16} {job['owner']:<16}  {'0':>8} {record_state(job, index)} {job['queue']}")


# -- commands -------------------------------------------------------------------------


def visible(job: dict, now: float) -> bool:
    return not (job["state"] == "F" and now - job.get("finished", now) > HISTORY_SECONDS)


_ID_RE = re.compile(r"^(\d+)(?:\[(\d*)\])?(?:\.(\S+))?$")


def resolve(raw: str, jobs: dict[str, dict], now: float):
    """(job, index) for an id as qstat/qdel take it: `12`, `12.server`, an array
    `12[].server` (None index; -1 marks an array named without []), a subjob
    `12[3].server`; None if the server does not know it."""
    m = _ID_RE.match(raw)
    if not m:
        return None
    job = next((j for j in jobs.values() if str(j["seq"]) == m.group(1)), None)
    if job is None or not visible(job, now):
        return None
    bracket = m.group(2)
    if is_array(job):
        if bracket is None:
            return None  # an array is named with its []
        if bracket == "":
            return job, None
        if int(bracket) not in job["array"]["indices"]:
            return None
        return job, int(bracket)
    if bracket is not None:
        return None
    return job, None


def qstat(argv: list[str]) -> int:
    full = history = subjobs = arrays_only = False
    fmt = None
    ids: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-F":
            fmt = next(it, "")
        elif arg.startswith("-F"):
            fmt = arg[2:]
        elif arg.startswith("-") and len(arg) > 1:
            flags = arg[1:]
            full |= "f" in flags
            history |= "x" in flags or "H" in flags
            subjobs |= "t" in flags
            arrays_only |= "J" in flags
        else:
            ids.append(arg)
    if fmt and fmt.lower() not in ("json", "dsv"):
        print(f"qstat: invalid output format: {fmt}", file=sys.stderr)
        return 2
    with locked():
        jobs = load_all()
        tick(jobs)
    now = time.time()
    shown: list[tuple[dict, object]] = []
    rc = 0
    if ids:
        for raw in ids:
            found = resolve(raw, jobs, now)
            if found is None:
                print(f"qstat: Unknown Job Id {raw}", file=sys.stderr)
                rc = 153
                continue
            job, index = found
            if job["state"] == "F" and not history:
                print(f"qstat: {record_id(job, index)} Job has finished, use -x or -H to obtain historical job information", file=sys.stderr)
                rc = rc or 35
                continue
            shown.append((job, index))
            if is_array(job) and index is None and subjobs:
                shown += [(job, i) for i, _ in units(job)]
    else:
        for job in jobs.values():
            if not visible(job, now) or (job["state"] == "F" and not history):
                continue
            if not is_array(job):
                if not arrays_only:
                    shown.append((job, None))
                continue
            if not (arrays_only and subjobs):
                shown.append((job, None))
            if subjobs:
                shown += [(job, i) for i, _ in units(job)]
    if fmt and fmt.lower() == "json":
        print_json(shown)
    elif full:
        print_full(shown)
    elif shown:
        print_table(shown)
    return rc


_OPTS_WITH_VALUE = set("aAcCeJlmMNoPqrSuvWzpk")


def parse_options(args: list[str]) -> tuple[dict, list[str]]:
    opts: dict = {"l": []}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and len(arg) > 1 and not rest:
            letter = arg[1]
            if letter in ("h", "V", "I", "X", "z"):
                opts[letter] = True
                if len(arg) > 2:  # -hV style
                    for extra in arg[2:]:
                        opts[extra] = True
            elif letter in _OPTS_WITH_VALUE or letter == "j":
                value = arg[2:] if len(arg) > 2 else (args[i + 1] if i + 1 < len(args) else "")
                if len(arg) == 2:
                    i += 1
                if letter == "l":
                    opts["l"].extend(value.split(","))
                else:
                    opts[letter] = value
            else:
                opts[letter] = True
        else:
            rest.append(arg)
        i += 1
    return opts, rest


def script_directives(text: str) -> list[str]:
    args: list[str] = []
    for line in text.splitlines()[1 if text.startswith("#!") else 0 :]:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#PBS"):
            import shlex

            args.extend(shlex.split(stripped[4:], comments=False))
        elif stripped.startswith("#"):
            continue
        else:
            break  # directives end at the first command
    return args


def walltime_seconds(value: str) -> int | None:
    if not re.match(r"^\d+(:\d+){0,2}(\.\d+)?$", value):
        return None
    total = 0
    for part in value.split(".")[0].split(":"):
        total = total * 60 + int(part)
    return total


def qsub(argv: list[str]) -> int:
    cli, rest = parse_options(argv)
    if not rest:
        print("usage: qsub [-a date_time] ... [script | -- executable [arglist]]", file=sys.stderr)
        return 2
    script = Path(rest[0])
    try:
        text = script.read_text()
    except OSError:
        print(f"qsub: script file:: No such file or directory", file=sys.stderr)
        return 2
    opts, _ = parse_options(script_directives(text))
    opts["l"] = opts["l"] + cli.pop("l")  # later resources override earlier ones
    opts.update(cli)
    array = None
    if "J" in opts:
        m = re.match(r"^(\d+)-(\d+)(?::(\d+))?(?:%(\d+))?$", str(opts["J"]))
        if not m or int(m.group(2)) <= int(m.group(1)) or (m.group(3) and int(m.group(3)) < 1) \
                or (m.group(4) and int(m.group(4)) < 1):
            print("qsub: illegal -J value", file=sys.stderr)
            return 2
        first, last, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
        indices = list(range(first, last + 1, step))
        submitted = str(opts["J"]).split("%")[0]
        array = {"submitted": submitted, "indices": indices, "step": step,
                 "max_run": int(m.group(4)) if m.group(4) else None}
    name = opts.get("N") or script.name
    if not re.match(r"^[A-Za-z0-9][^\s@:/]{0,235}$", name):
        print("qsub: illegal -N value", file=sys.stderr)
        return 2
    queue = opts.get("q") or QUEUES[0]
    queue = queue.split("@")[0]
    if queue not in QUEUES:
        print("qsub: Unknown queue", file=sys.stderr)
        return 170
    resources: dict = {"ncpus": 1, "nodect": 1, "place": "pack", "select": "1:ncpus=1"}
    walltime_s = None
    for item in opts["l"]:
        key, _, value = item.partition("=")
        if key == "walltime":
            walltime_s = walltime_seconds(value)
            if walltime_s is None:
                print("qsub: Illegal attribute or resource value Resource_List.walltime", file=sys.stderr)
                return 2
            h, m, s = walltime_s // 3600, walltime_s % 3600 // 60, walltime_s % 60
            resources["walltime"] = f"{h:02d}:{m:02d}:{s:02d}"
        elif key == "select":
            resources["select"] = value
            m = re.search(r"ncpus=(\d+)", value)
            resources["ncpus"] = int(m.group(1)) if m else 1
        elif key:
            resources[key] = value
    cwd = os.getcwd()
    env = dict(os.environ) if opts.get("V") else {k: v for k, v in os.environ.items() if k in ("HOME", "USER", "LOGNAME", "LANG")}
    exported = sorted(os.environ) if opts.get("V") else []
    env.setdefault("HOME", os.path.expanduser("~"))
    env.setdefault("PATH", "/bin:/usr/bin")
    env.update(
        PBS_O_HOME=os.environ.get("HOME", ""), PBS_O_LANG=os.environ.get("LANG", "C"),
        PBS_O_LOGNAME=user(), PBS_O_PATH=os.environ.get("PATH", ""),
        PBS_O_MAIL=f"/var/mail/{user()}", PBS_O_SHELL=os.environ.get("SHELL", "/bin/bash"),
        PBS_O_WORKDIR=cwd, PBS_O_SYSTEM="Linux", PBS_O_QUEUE=queue, PBS_O_HOST=HOST,
    )
    for pair in filter(None, (opts.get("v") or "").split(",")):
        k, _, v = pair.partition("=")
        env[k] = v if _ else os.environ.get(k, "")
        exported.append(k)
    if array and len(array["indices"]) > max_array_size():
        # the server's verdict (PBSE_MaxArraySize), before any id is given
        print("qsub: Array job exceeds server or queue size limit", file=sys.stderr)
        return 3
    with locked():
        seq = next_seq()
        job_id = f"{seq}[].{SERVER}" if array else f"{seq}.{SERVER}"

        def path_of(opt: str, default_suffix: str) -> str:
            value = opts.get(opt)
            if not value:
                return os.path.join(cwd, f"{name}.{default_suffix}{seq}" + (f".{INDEX_TAG}" if array else ""))
            value = value.split(":", 1)[1] if ":" in value and not value.startswith("/") else value
            return value if value.startswith("/") else os.path.join(cwd, value)

        shutil.copyfile(script, JOBS / f"{seq}.SC")
        job = {
            "seq": seq, "id": job_id, "name": name, "owner": user(), "queue": queue,
            "state": "H" if opts.get("h") else "Q", "ctime": time.time(),
            "stdout": path_of("o", "o"), "stderr": path_of("e", "e"),
            "resources": resources, "walltime_s": walltime_s, "env": env, "exported": exported,
            "submit_args": " ".join(argv),
        }
        if array:
            job["array"] = array
            job["subjobs"] = {str(i): {"state": "Q"} for i in array["indices"]}
        save(job)
        jobs = load_all()
        tick(jobs)
    print(job_id)
    return 0


def delete_unit(job: dict, unit: dict, now: float, subjob: bool) -> None:
    """qdel of what has not ended: a queued one ends at once, a running one is killed."""
    if unit["state"] in ("Q", "H"):
        unit["state"], unit["finished"] = ("X" if subjob else "F"), now
        unit["comment"] = "Subjob terminated" if subjob else f"Job deleted by {user()}@{HOST}"
    elif unit["state"] == "R" and not unit.get("kill_at"):
        unit["kill_at"] = now


def qdel(argv: list[str]) -> int:
    ids = [a for a in argv if not a.startswith("-")]
    if not ids:
        print("usage: qdel [-W force|suppress_email=X] [-x] job_identifier...", file=sys.stderr)
        return 2
    rc = 0
    with locked():
        jobs = load_all()
        tick(jobs)
        now = time.time()
        for raw in ids:
            found = resolve(raw, jobs, now)
            if found is None:
                print(f"qdel: Unknown Job Id {raw}", file=sys.stderr)
                rc = 153
                continue
            job, index = found
            if is_array(job) and index is not None:
                sub = job["subjobs"][str(index)]
                if sub["state"] in ("E", "X"):
                    print(f"qdel: Request invalid for finished array subjob {subjob_id(job, index)}", file=sys.stderr)
                    rc = rc or 55
                    continue
                delete_unit(job, sub, now, subjob=True)
            elif job["state"] in ("F", "E"):
                print(f"qdel: Job has finished {record_id(job)}", file=sys.stderr)
                rc = rc or 35
                continue
            elif is_array(job):
                for _, sub in units(job):
                    delete_unit(job, sub, now, subjob=True)
            else:
                delete_unit(job, job, now, subjob=False)
            if is_array(job):
                settle_array(job, now)
            save(job)
        tick(jobs)
    return rc


def qrerun(argv: list[str]) -> int:
    """qrerun ids: a running job (or subjob) is killed as by qdel and goes back to Q, to
    run again from the start; any other state: PBSE_BADSTATE (15018 & 0xff = 170)."""
    ids = [a for a in argv if not a.startswith("-")]
    rc = 0
    with locked():
        jobs = load_all()
        tick(jobs)
        now = time.time()
        for raw in ids:
            found = resolve(raw, jobs, now)
            if found is None:
                print(f"qrerun: Unknown Job Id {raw}", file=sys.stderr)
                rc = rc or 153
                continue
            job, index = found
            unit = job if index is None else job["subjobs"][str(index)]
            if unit["state"] != "R" or (is_array(job) and index is None):
                print(f"qrerun: Request invalid for state of job {raw}", file=sys.stderr)
                rc = rc or 170
                continue
            unit["rerun"], unit["kill_at"] = True, unit.get("kill_at") or now
            save(job)
        tick(jobs)
    return rc


def qrls(argv: list[str]) -> int:
    rc = 0
    with locked():
        jobs = load_all()
        now = time.time()
        for raw in [a for a in argv if not a.startswith("-")]:
            found = resolve(raw, jobs, now)
            if found is None:
                print(f"qrls: Unknown Job Id {raw}", file=sys.stderr)
                rc = 153
                continue
            job, _ = found  # a hold is the whole array's
            if job["state"] == "H":
                job["state"] = "Q"
                save(job)
        tick(jobs)
    return rc


def qselect(argv: list[str]) -> int:
    opts, _ = parse_options([a for a in argv if a not in ("-x", "-t", "-J")])
    history = "-x" in argv
    with locked():
        jobs = load_all()
        tick(jobs)
    now = time.time()
    for job in jobs.values():
        if not visible(job, now) or (job["state"] == "F" and not history):
            continue
        if opts.get("N") and job["name"] != opts["N"]:
            continue
        if opts.get("s") and job["state"] not in opts["s"]:
            continue
        if opts.get("u") and job["owner"] not in opts["u"].split(","):
            continue
        print(record_id(job))
        if is_array(job) and "-t" in argv:
            for index, _ in units(job):
                print(subjob_id(job, index))
    return 0


COMMANDS = {"qstat": qstat, "qsub": qsub, "qdel": qdel, "qrls": qrls, "qselect": qselect, "qrerun": qrerun}


def main(command: str) -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--run-job":
        run_job(sys.argv[2])
        return
    sys.exit(COMMANDS[command](sys.argv[1:]))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--run-job":
        run_job(sys.argv[2])
