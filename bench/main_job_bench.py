"""Where the main job's time goes, cold and warm. Prints figures.

    .venv/bin/python bench/main_job_bench.py [--runs 3] [--busy]

The main job is `examples/sweep_local.py` (3x2 sweep, Local executor, Prefect's embedded
server, no PREFECT_API_URL). Each figure is measured several times; the median and the
spread (min..max) are printed:

- baseline: `python -c "import prefect"` (the floor of any Prefect program) and
  `python -c pass`;
- server: the embedded server's start alone (prefect-xm's start: spawn to healthy),
  on a brand-new PREFECT_HOME (cold: database created and migrated) and on a used one;
- main job: the whole sweep, cold (new PREFECT_HOME each run) and warm (the same
  PREFECT_HOME, after one run), wall and CPU (the process and its children).

--busy runs one CPU-bound process per core beside every measurement.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SWEEP = REPO / "examples" / "sweep_local.py"


def _env(home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the process and its children, output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, cpu, proc.stdout + proc.stderr


SERVER_ONLY = """
import time
from prefect_xm.core.embedded_server import EmbeddedServer
from prefect.settings import get_current_settings
s = EmbeddedServer(get_current_settings().home, say=lambda line: None)
s.start()
print(f"SERVER_SECONDS={s.startup_seconds:.3f}")
s.stop()
"""


def _stats(values: list[float]) -> str:
    return f"median {statistics.median(values):6.1f}s  spread {min(values):5.1f}..{max(values):5.1f}s  (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="one CPU-bound process per core beside each run")
    opts = parser.parse_args()
    burners = []
    if opts.busy:
        burners = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    rows: list[tuple[str, str]] = []
    try:
        scratch = Path(tempfile.mkdtemp(prefix="pxm-bench-"))
        rows.append(("python -c pass", _stats([_timed([PY, "-c", "pass"], _env(str(scratch)))[0]
                                                for _ in range(opts.runs)])))
        rows.append(("import prefect", _stats([_timed([PY, "-c", "import prefect"], _env(str(scratch)))[0]
                                                for _ in range(opts.runs)])))

        def server_seconds(home: str) -> float:
            out = _timed([PY, "-c", SERVER_ONLY], _env(home))[2]
            return float(re.search(r"SERVER_SECONDS=([\d.]+)", out).group(1))

        warm_home = tempfile.mkdtemp(prefix="pxm-bench-home-")
        rows.append(("server start, cold", _stats([server_seconds(tempfile.mkdtemp(prefix="pxm-bench-home-"))
                                                    for _ in range(opts.runs)])))
        server_seconds(warm_home)
        rows.append(("server start, warm", _stats([server_seconds(warm_home) for _ in range(opts.runs)])))

        cold_wall, cold_cpu = [], []
        for _ in range(opts.runs):
            wall, cpu, out = _timed([PY, str(SWEEP)], _env(tempfile.mkdtemp(prefix="pxm-bench-home-")))
            assert "best: work unit" in out, out[-2000:]
            cold_wall.append(wall)
            cold_cpu.append(cpu)
        rows.append(("main job, cold: wall", _stats(cold_wall)))
        rows.append(("main job, cold: CPU", _stats(cold_cpu)))
        home = tempfile.mkdtemp(prefix="pxm-bench-home-")
        _timed([PY, str(SWEEP)], _env(home))
        warm_wall, warm_cpu = [], []
        for _ in range(opts.runs):
            wall, cpu, out = _timed([PY, str(SWEEP)], _env(home))
            assert "best: work unit" in out, out[-2000:]
            warm_wall.append(wall)
            warm_cpu.append(cpu)
        rows.append(("main job, warm: wall", _stats(warm_wall)))
        rows.append(("main job, warm: CPU", _stats(warm_cpu)))
    finally:
        for p in burners:
            p.kill()
    print(f"main job bench ({os.cpu_count()} cores{', every core busy' if opts.busy else ''})")
    for name, figure in rows:
        print(f"  {name:24s} {figure}")


if __name__ == "__main__":
    main()
