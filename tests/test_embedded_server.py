"""The main job on the embedded default, as a new user meets it: a brand-new
PREFECT_HOME (Prefect's database not yet created), no PREFECT_API_URL, and the other
core busy. Prefect's own start of its temporary server gives it 20 s, which a first run
(creating and migrating the database) overruns; prefect-xm's start must not."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.e2e


def _embedded_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PREFECT_API_URL", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        env.pop(name, None)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               # Prefect's own deadline, as a user has it: ours must not depend on it
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="20")
    return env


@contextlib.contextmanager
def busy_cores():
    """Every core busy, as on a machine busy with other work: a CPU-bound process for each
    core the machine's load does not already keep busy (inside the whole suite, run side
    by side, the load alone does; burners there would only take the other tests' cores)."""
    cores = os.cpu_count() or 2
    idle_cores = max(0, cores - int(os.getloadavg()[0]))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(idle_cores)]
    try:
        yield
    finally:
        for p in burners:
            p.kill()
            p.wait()


def _start_sweep(home: Path, tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen([sys.executable, str(REPO / "examples" / "sweep_local.py")],
                            env=_embedded_env(home), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            cwd=tmp_path)
    return proc, log


def _assert_sweep_completed(proc: subprocess.Popen, log: Path) -> str:
    rc = proc.wait(600)
    out = log.read_text()
    assert rc == 0, out[-5000:]
    assert "Timed out while attempting to connect" not in out
    assert out.count("Completed") >= 6 and "best: work unit" in out, out[-3000:]
    return out


def test_first_run_on_a_fresh_home_with_every_core_busy(tmp_path):
    home = tmp_path / "prefect-home"
    assert not home.exists()
    started = time.monotonic()
    # (the first sweep only: the burners slow every test running beside this one)
    with busy_cores():
        proc, log = _start_sweep(home, tmp_path, "first")
        out = _assert_sweep_completed(proc, log)
    # what the user is told while waiting: one line, naming the database being created
    assert "first run: creating its database in" in out, out[:2000]
    assert (home / "prefect.db").exists()
    print(f"first run with {os.cpu_count()} busy cores (load {os.getloadavg()[0]:.1f}): {time.monotonic() - started:.1f}s")
    # the progress display shows work units moving through their states
    assert "6/6 work units done" in out, out[-3000:]
    # the next run of the same home reuses the database
    proc, log = _start_sweep(home, tmp_path, "second")
    out = _assert_sweep_completed(proc, log)
    assert "first run" not in out


def test_two_launch_scripts_starting_together_on_a_fresh_home(tmp_path):
    """Both would migrate the same new database at once; the second waits for the first."""
    home = tmp_path / "prefect-home"
    runs = [_start_sweep(home, tmp_path, f"together-{i}") for i in range(2)]
    outs = [_assert_sweep_completed(proc, log) for proc, log in runs]
    # the database is found missing (and created) once: the check is made under the lock
    assert sum("first run: creating its database" in out for out in outs) == 1, outs


def test_an_xmanager_style_launch_script_on_the_embedded_default(tmp_path):
    """The XManager-style launch script of the Slurm test (tests/xmanager_style_launcher.py)
    with no cluster and no server: Local jobs, Prefect's embedded server on a new home."""
    import json

    code, out = tmp_path / "code", tmp_path / "out"
    code.mkdir(), out.mkdir()
    (code / "train.py").write_text(
        "import json, os, sys, uuid\n"
        f"open(os.path.join({str(out)!r}, uuid.uuid4().hex), 'w').write(json.dumps(sys.argv[1:]))\n")
    cli = str(Path(sys.executable).parent / "prefect-xm")
    result = subprocess.run([cli, "launch", str(REPO / "tests" / "xmanager_style_launcher.py"), "--",
                             "--xm_launch_mode=local", f"--code={code}"],
                            env=_embedded_env(tmp_path / "prefect-home"), capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    completed = sorted(line.split(" ", 2)[1:] for line in result.stdout.splitlines() if line.startswith("COMPLETED"))
    assert completed == [["1", "['train']"], ["2", "['train']"], ["3", "['evaluator', 'learner']"],
                         ["4", "['train']"]], result.stdout
    assert sorted(json.loads(p.read_text()) for p in out.iterdir()) == sorted([
        ["--steps=2", "--role=sweep", "--lr=0.1"], ["--steps=2", "--role=sweep", "--lr=0.01"],
        ["--steps=2", "--role=gang"], ["--steps=2", "--role=gang"],
        ["--steps=2", "--role=generated", "--lr=0.5"]])
