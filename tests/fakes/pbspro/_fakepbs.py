"""A fake PBS Pro / OpenPBS server behind qsub, qstat, qselect, qdel and qrls (the
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
- qselect [-x] [-N name] [-s states]: ids one per line. qrls: releases a user hold.

Fidelity limits (what it does not do): no daemons, so states advance when a command
runs (the worker polls every second; a test that never runs a command sees no change);
one node, ncpus counted per job as 1 whatever `select` asks (select/mem/ngpus are
recorded in Resource_List, not enforced); no arrays (-J is refused), no dependencies,
no reservations, no stage-in/out (output is written directly, as with `-k oed`); the
walltime comment's wording is this fake's, only Exit_status -29 and the stderr line are
PBS's own; qdel of a running job returns before the job is gone (as PBS does);
tracejob is not provided (so it is 'command not found', as on a login node without
access to the server's logs).
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
EXITING_SECONDS = float(os.environ.get("FAKE_PBS_EXITING_SECONDS", "1"))
HISTORY_SECONDS = float(os.environ.get("FAKE_PBS_HISTORY_SECONDS", str(14 * 24 * 3600)))
QUEUES = os.environ.get("FAKE_PBS_QUEUES", "workq").split(",")
VERSION = "2022.1.3"
SUBSTATE = {"Q": 10, "H": 20, "R": 42, "E": 50, "F": 92}


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


def signal_job(job: dict, sig: int) -> None:
    pid = job.get("pid") or _read_int(JOBS / f"{job['seq']}.pid")
    if pid:
        job["pid"] = pid
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def tick(jobs: dict[str, dict]) -> None:
    """Advance every job: reap exits, enforce walltime and kill delays, start queued jobs."""
    now = time.time()
    for job in jobs.values():
        changed = False
        if job["state"] == "R":
            code = _read_int(JOBS / f"{job['seq']}.exit")
            if code is not None:
                if job.get("killed_for") == "walltime":
                    job["exit_status"] = -29
                    job["comment"] = (
                        f"Job run at {job['run_at']} on ({HOST}:ncpus=1) and was killed: "
                        f"walltime {int(job['killed_at'] - job['stime'])} exceeded limit {job['walltime_s']}"
                    )
                else:
                    job["exit_status"] = code
                    job["comment"] = f"Job run at {job['run_at']} on ({HOST}:ncpus=1) and finished"
                job["state"], job["exit_time"] = "E", now
                changed = True
            else:
                limit = job.get("walltime_s")
                if limit and not job.get("kill_at") and now - job["stime"] > limit:
                    job["killed_for"], job["killed_at"], job["kill_at"] = "walltime", now, now
                    _append(job["stderr"], f"=>> PBS: job killed: walltime {int(now - job['stime'])} exceeded limit {limit}\n")
                    changed = True
                if job.get("kill_at") and not job.get("term_sent"):
                    signal_job(job, signal.SIGTERM)
                    job["term_sent"] = now
                    changed = True
                elif job.get("term_sent") and now - job["term_sent"] >= KILL_DELAY and not job.get("kill_sent"):
                    signal_job(job, signal.SIGKILL)
                    job["kill_sent"] = now
                    changed = True
        if job["state"] == "E" and now - job["exit_time"] >= EXITING_SECONDS:
            job["state"], job["finished"] = "F", now
            changed = True
        if changed:
            save(job)
    running = sum(1 for j in jobs.values() if j["state"] in ("R", "E"))
    for job in jobs.values():
        if job["state"] != "Q":
            continue
        if running < NCPUS:
            start(job, now)
            running += 1
        else:
            comment = f"Not Running: Insufficient amount of resource: ncpus (R: 1 A: 0 T: {NCPUS})"
            if job.get("comment") != comment:
                job["comment"] = comment
                save(job)


def _append(path: str, text: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError:
        pass


def start(job: dict, now: float) -> None:
    job["state"], job["stime"] = "R", now
    job["run_at"] = time.strftime("%a %b %e at %H:%M", time.localtime(now))
    job["comment"] = f"Job run at {job['run_at']} on ({HOST}:ncpus=1)"
    job["run_count"] = job.get("run_count", 0) + 1
    save(job)
    subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--run-job", str(job["seq"])],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )


def run_job(seq: str) -> None:
    """The MoM's part: run the spooled script, record how it ended."""
    job = json.loads((JOBS / f"{seq}.json").read_text())
    env = dict(job["env"])
    home = env.get("HOME") or os.path.expanduser("~")
    nodefile = JOBS / f"{seq}.nodes"
    nodefile.write_text(HOST + "\n")
    env.update(
        PBS_JOBID=job["id"], PBS_JOBNAME=job["name"], PBS_QUEUE=job["queue"],
        PBS_ENVIRONMENT="PBS_BATCH", PBS_NODEFILE=str(nodefile), PBS_JOBDIR=home,
        PBS_TASKNUM="1", PBS_NODENUM="0", PBS_MOMPORT="15003", NCPUS="1", OMP_NUM_THREADS="1",
        TMPDIR=os.environ.get("TMPDIR", "/tmp"), HOME=home,
    )
    for path in (job["stdout"], job["stderr"]):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(job["stdout"], "ab") as out, open(job["stderr"], "ab") as err:
        proc = subprocess.Popen(
            ["/bin/bash", str(JOBS / f"{seq}.SC")], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            env=env, cwd=home, start_new_session=True,
        )
        (JOBS / f"{seq}.pid").write_text(str(proc.pid))
        code = proc.wait()
    status = 256 - code if code < 0 else code  # killed by signal N -> 256+N
    tmp = JOBS / f"{seq}.exit.tmp"
    tmp.write_text(str(status))
    tmp.replace(JOBS / f"{seq}.exit")


# -- output ---------------------------------------------------------------------------


def attributes(job: dict) -> dict:
    a = {
        "Job_Name": job["name"],
        "Job_Owner": f"{job['owner']}@{HOST}",
        "job_state": job["state"],
        "queue": job["queue"],
        "server": SERVER,
        "Checkpoint": "u",
        "ctime": ctime(job["ctime"]),
        "Error_Path": f"{HOST}:{job['stderr']}",
    }
    if job["state"] in ("R", "E", "F") and job.get("stime"):
        a["exec_host"] = f"{HOST}/0"
        a["exec_vnode"] = f"({HOST}:ncpus=1)"
    a.update({
        "Hold_Types": "u" if job["state"] == "H" else "n",
        "Join_Path": "n",
        "Keep_Files": "n",
        "Mail_Points": "a",
        "mtime": ctime(job.get("finished") or job.get("exit_time") or job.get("stime") or job["ctime"]),
        "Output_Path": f"{HOST}:{job['stdout']}",
        "Priority": 0,
        "qtime": ctime(job["ctime"]),
        "Rerunable": "True",
        "Resource_List": job["resources"],
    })
    if job.get("stime"):
        a["stime"] = ctime(job["stime"])
        a["session_id"] = job.get("pid") or _read_int(JOBS / f"{job['seq']}.pid") or 0
        a["jobdir"] = job["env"].get("HOME", "")
    a["substate"] = 91 if job["state"] == "F" and "exit_status" not in job else SUBSTATE[job["state"]]
    # as PBS: the PBS_O_ variables, plus every variable qsub exported (-V, -v)
    exported = job.get("exported", [])
    a["Variable_List"] = {k: v for k, v in job["env"].items() if k.startswith("PBS_O_") or k in exported}
    if job.get("comment"):
        a["comment"] = job["comment"]
    a["etime"] = ctime(job["ctime"])
    if job.get("run_count"):
        a["run_count"] = job["run_count"]
    if "exit_status" in job and job["state"] in ("E", "F"):
        a["Exit_status"] = job["exit_status"]
    a["Submit_arguments"] = job["submit_args"]
    if job["state"] == "F":
        a["history_timestamp"] = int(job.get("finished", time.time()))
    a["project"] = "_pbs_project_default"
    return a


def print_json(jobs: list[dict]) -> None:
    doc = {"timestamp": int(time.time()), "pbs_version": VERSION, "pbs_server": SERVER}
    if jobs:
        doc["Jobs"] = {j["id"]: attributes(j) for j in jobs}
    print(json.dumps(doc, indent=4, separators=(",", ":")))


def print_full(jobs: list[dict]) -> None:
    for job in jobs:
        print(f"Job Id: {job['id']}")
        for key, value in attributes(job).items():
            if isinstance(value, dict):
                if key == "Variable_List":
                    print(f"    {key} = " + ",".join(f"{k}={v}" for k, v in value.items()))
                else:
                    for k, v in value.items():
                        print(f"    {key}.{k} = {v}")
            else:
                print(f"    {key} = {value}")
        print()


def print_table(jobs: list[dict]) -> None:
    print(f"{'Job id':<17} {'Name':<16} {'User':<16}  {'Time Use':>8} S Queue")
    print(f"{'-' * 16:<17} {'-' * 16} {'-' * 16}  {'-' * 8} - -----")
    for j in jobs:
        jid = j["id"] if len(j["id"]) <= 16 else j["id"][:15] + "*"
        name = j["name"] if len(j["name"]) <= 16 else j["name"][:15] + "*"
        print(f"{jid:<17} {name:<16} {j['owner']:<16}  {'0':>8} {j['state']} {j['queue']}")


# -- commands -------------------------------------------------------------------------


def visible(job: dict, now: float) -> bool:
    return not (job["state"] == "F" and now - job.get("finished", now) > HISTORY_SECONDS)


def qstat(argv: list[str]) -> int:
    full = history = False
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
        else:
            ids.append(arg)
    if fmt and fmt.lower() not in ("json", "dsv"):
        print(f"qstat: invalid output format: {fmt}", file=sys.stderr)
        return 2
    with locked():
        jobs = load_all()
        tick(jobs)
    now = time.time()
    shown, rc = [], 0
    if ids:
        for raw in ids:
            job = jobs.get(raw) or jobs.get(f"{raw.split('.')[0]}.{SERVER}")
            if job is None or not visible(job, now):
                print(f"qstat: Unknown Job Id {raw}", file=sys.stderr)
                rc = 153
            elif job["state"] == "F" and not history:
                print(f"qstat: {job['id']} Job has finished, use -x or -H to obtain historical job information", file=sys.stderr)
                rc = rc or 35
            else:
                shown.append(job)
    else:
        shown = [j for j in jobs.values() if visible(j, now) and (history or j["state"] != "F")]
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
    if opts.get("J"):
        print("qsub: job arrays are not supported by this fake", file=sys.stderr)
        return 2
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
    with locked():
        seq = next_seq()
        job_id = f"{seq}.{SERVER}"

        def path_of(opt: str, default_suffix: str) -> str:
            value = opts.get(opt)
            if not value:
                return os.path.join(cwd, f"{name}.{default_suffix}{seq}")
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
        save(job)
        jobs = load_all()
        tick(jobs)
    print(job_id)
    return 0


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
            job = jobs.get(raw) or jobs.get(f"{raw.split('.')[0]}.{SERVER}")
            if job is None or not visible(job, now):
                print(f"qdel: Unknown Job Id {raw}", file=sys.stderr)
                rc = 153
            elif job["state"] in ("F", "E"):
                print(f"qdel: Job has finished {job['id']}", file=sys.stderr)
                rc = rc or 35
            elif job["state"] in ("Q", "H"):
                job["state"], job["finished"] = "F", now
                job["comment"] = f"Job deleted by {user()}@{HOST}"
                save(job)
            elif job["state"] == "R" and not job.get("kill_at"):
                job["kill_at"] = now
                save(job)
        tick(jobs)
    return rc


def qrls(argv: list[str]) -> int:
    rc = 0
    with locked():
        jobs = load_all()
        for raw in [a for a in argv if not a.startswith("-")]:
            job = jobs.get(raw) or jobs.get(f"{raw.split('.')[0]}.{SERVER}")
            if job is None:
                print(f"qrls: Unknown Job Id {raw}", file=sys.stderr)
                rc = 153
            elif job["state"] == "H":
                job["state"] = "Q"
                save(job)
        tick(jobs)
    return rc


def qselect(argv: list[str]) -> int:
    opts, _ = parse_options([a for a in argv if a != "-x"])
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
        print(job["id"])
    return 0


COMMANDS = {"qstat": qstat, "qsub": qsub, "qdel": qdel, "qrls": qrls, "qselect": qselect}


def main(command: str) -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--run-job":
        run_job(sys.argv[2])
        return
    sys.exit(COMMANDS[command](sys.argv[1:]))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--run-job":
        run_job(sys.argv[2])
