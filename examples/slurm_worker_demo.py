"""The xm-slurm worker end to end on this machine, as a user would set it up:

    prefect server start                       (embedded SQLite, a temporary home)
    prefect work-pool create demo-slurm --type xm-slurm
    prefect worker start --pool demo-slurm     (PREFECT_WORKER_ENABLE_CANCELLATION=true)
    deploy examples/flows.py:train to the pool and run it three times

Needs the local Slurm: `bash scripts/slurm-cluster.sh start` (scripts/main.sh does it).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="prefect-xm-demo-"))
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_ENABLE_CANCELLATION="true",
               PREFECT_XM_POLL_INTERVAL="2", PREFECT_WORKER_QUERY_SECONDS="2")
    os.environ.update(env)
    procs = []
    try:
        print(f"starting Prefect server on 127.0.0.1:{port} (home {home})")
        server_log = open(home / "server.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--port", str(port)],
                                      env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True))
        import httpx

        def healthy():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 120, "the Prefect server")
        subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "demo-slurm", "--type", "xm-slurm"],
                       env=env, check=True, capture_output=True)
        worker_log = open(home / "worker.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "demo-slurm"],
                                      env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True))
        asyncio.run(run_flows(home))
        print(f"worker log: {home / 'worker.log'}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


async def run_flows(home: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client

    train = await flow.from_source(source=str(HERE), entrypoint="flows.py:train")
    deployment_id = await train.deploy(name="demo", work_pool_name="demo-slurm", print_next_steps=False,
                                       job_variables={"time_limit": "10", "memory": "512M", "run_dir": str(home / "runs")})
    async with get_client() as client:
        runs = [await client.create_flow_run_from_deployment(deployment_id, parameters={"learning_rate": lr, "batch_size": 64})
                for lr in (0.1, 0.01, 0.001)]
        print(f"submitted {len(runs)} flow runs to the xm-slurm pool 'demo-slurm'")
        done = {}
        deadline = time.monotonic() + 300
        while len(done) < len(runs) and time.monotonic() < deadline:
            for r in runs:
                fr = await client.read_flow_run(r.id)
                if fr.state and fr.state.is_final() and r.id not in done:
                    done[r.id] = fr
            await asyncio.sleep(1)
        print(f"\n{'flow run':<24} {'state':<10} {'slurm job':<10} result")
        for r in runs:
            fr = done.get(r.id) or await client.read_flow_run(r.id)
            result = await fr.state.aresult(raise_on_failure=False) if fr.state.is_completed() else fr.state.message
            print(f"{fr.name:<24} {fr.state.name:<10} {(fr.infrastructure_pid or '-').rsplit(':', 1)[-1]:<10} {result}")
        if any(not fr.state.is_completed() for fr in done.values()) or len(done) < len(runs):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
