"""How the xm-slurm worker's hot paths scale, on the real local Slurm. Prints figures.

    .venv/bin/python bench/slurm_worker_bench.py [--jobs 200] [--ssh]

- submit: N held jobs through the worker's submit path (sbatch --parsable), jobs/s
- poll: one poll of N tracked jobs (one `squeue --me`), ms per poll and commands per poll
- parse: parse_squeue over a synthetic 10,000-job listing, ms
- --ssh: the same poll over one SSH connection to a throwaway sshd on 127.0.0.1

Jobs are submitted held (`--hold`) so they never run, and are cancelled at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from prefect_xm.workers.poller import JobPoller  # noqa: E402
from prefect_xm.workers.scheduler import SubmitRequest  # noqa: E402
from prefect_xm.workers.slurm import SlurmJobConfiguration, SlurmScheduler, SlurmWorker, parse_squeue  # noqa: E402
from prefect_xm.workers.transport import LocalTransport, SSHTransport  # noqa: E402


async def submit_many(n: int, root: Path) -> list[str]:
    worker = SlurmWorker(work_pool_name="bench")
    transport = LocalTransport()
    config = SlurmJobConfiguration()
    ids = []
    started = time.perf_counter()
    for i in range(n):
        name = f"bench-{uuid.uuid4().hex[:10]}"
        script = root / f"{name}.sh"
        script.write_text(f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --hold\n#SBATCH --output=/dev/null\ntrue\n")
        ids.append(await worker.submit_job(SubmitRequest(str(script), "", name, str(root)), transport, config, logging.getLogger("bench")))
    elapsed = time.perf_counter() - started
    print(f"submit: {n} jobs in {elapsed:.2f} s = {n / elapsed:.0f} jobs/s ({1000 * elapsed / n:.1f} ms each)")
    return ids


async def poll_figures(ids: list[str], transport, label: str, rounds: int = 20) -> None:
    poller = JobPoller(SlurmScheduler(), transport, interval=3600)
    for job_id in ids:
        poller.track(job_id)
    calls = []
    original = transport.run

    async def counting_run(argv, **kw):
        calls.append(argv[0])
        return await original(argv, **kw)

    transport.run = counting_run
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        await poller.poll_once()
        times.append(1000 * (time.perf_counter() - t))
    await poller.close()
    pending = sum(1 for j in poller.jobs.values() if j.status.reason == "JobHeldUser")
    print(f"poll ({label}): {len(ids)} tracked jobs, median {statistics.median(times):.1f} ms, "
          f"max {max(times):.1f} ms per poll, {len(calls) / rounds:.1f} commands per poll, "
          f"{pending} seen held")


def parse_figure() -> None:
    listing = "".join(f"{i}|PENDING|Priority\n" for i in range(10000))
    t = time.perf_counter()
    statuses = parse_squeue(listing)
    print(f"parse: parse_squeue over {len(statuses)} jobs in {1000 * (time.perf_counter() - t):.1f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--ssh", action="store_true")
    args = parser.parse_args()
    parse_figure()
    root = Path(tempfile.mkdtemp(prefix="pxm-bench-"))
    ids = await submit_many(args.jobs, root)
    try:
        await poll_figures(ids, LocalTransport(), "local")
        if args.ssh:
            from prefect_xm.blocks.ssh import SSHConnection
            from sshd import SSHServer

            server = SSHServer(root / "sshd").start()
            try:
                transport = SSHTransport(SSHConnection(**server.block_fields()))
                await poll_figures(ids, transport, "over SSH")
                print(f"ssh: {transport.connects} connection(s) opened, sshd accepted {server.accepted()}")
                await transport.close()
            finally:
                server.stop()
    finally:
        subprocess.run(["scancel", *ids], check=False)


if __name__ == "__main__":
    asyncio.run(main())
