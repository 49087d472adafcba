"""How fast a Prefect server takes a sweep's links (the task runs its runs hang from), by
the two routes prefect-xm can use, on an otherwise idle server: as events recorded by
the server's task run recorder (prefect_xm.task_run_links, one POST /events per batch),
and through the API (POST /task_runs/, a request each, 8 at a time). Prints figures;
asserts nothing.

    .venv/bin/python bench/link_bench.py [--links 1000] [--sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


async def measure(n: int) -> None:
    from prefect import Task, flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from prefect_xm.task_run_links import TaskRunLinks

    @flow(name="link-bench")
    def parent():
        pass

    async with get_client() as client:
        run = await client.create_flow_run(parent, name=f"p-{uuid.uuid4().hex[:6]}", state=Running())
        links = TaskRunLinks(client)
        started = time.monotonic()
        await asyncio.gather(*(links.create(run.id, f"work-unit-{i}", "xm.work_unit", str(i)) for i in range(n)))
        events = time.monotonic() - started

        run2 = await client.create_flow_run(parent, name=f"p-{uuid.uuid4().hex[:6]}", state=Running())
        slots = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            task = Task(name=f"work-unit-{i}", fn=lambda: None)
            task.task_key = "xm.work_unit"
            async with slots:
                await client.create_task_run(task=task, flow_run_id=run2.id, dynamic_key=str(i), state=Running())
        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        api = time.monotonic() - started
    print(f"{n} links: as events (one POST /events per 200, recorded by the server) {events:.1f} s "
          f"({n / events:.0f}/s); through POST /task_runs/ (8 at a time) {api:.1f} s ({n / api:.0f}/s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--links", type=int, default=1000)
    parser.add_argument("--sqlite", action="store_true")
    args = parser.parse_args()
    from scale_bench import start_server

    with tempfile.TemporaryDirectory(prefix="xm-link-bench-") as tmp:
        server, stop, _, backend = start_server(Path(tmp), args.sqlite)
        try:
            os.environ["PREFECT_API_URL"] = server.api_url
            from prefect.context import refresh_global_settings_context

            refresh_global_settings_context()
            print(f"Prefect server on {backend}, idle; 2 cores", flush=True)
            asyncio.run(measure(args.links))
        finally:
            stop()


if __name__ == "__main__":
    main()
