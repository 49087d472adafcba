"""Is anyone serving the work pools an experiment's jobs wait on?

A job on a pool stays Scheduled until one of the pool's workers picks it up; with no
worker, a sweep shows "1 pending" forever. Prefect records each worker's heartbeats per
pool, so a launcher whose jobs wait Scheduled on a pool reads that pool's workers and,
when none is serving it, says so once, with the command that starts one.

The reads are few: a pool is read only while jobs of the experiment wait Scheduled on
it, at most once per CHECK_SECONDS, and no more once it has been reported.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shlex
from typing import Callable, Iterable

#: seconds between two reads of a pool's workers while jobs wait on it (the first read
#: is made as soon as jobs wait there)
CHECK_SECONDS = float(os.environ.get("PREFECT_XM_WORKER_CHECK_SECONDS", "10"))
#: heartbeats a worker may miss and still count as serving its pool (Prefect's own
#: inactivity multiple), of its interval (30 s when it did not say)
MISSED_HEARTBEATS = 3
DEFAULT_HEARTBEAT_SECONDS = 30


def is_serving(worker, now: datetime.datetime) -> bool:
    """Whether a worker (Prefect's Worker of a pool) serves its pool: Prefect says it is
    online, or its last heartbeat is recent."""
    from prefect.client.schemas.objects import WorkerStatus

    if worker.status == WorkerStatus.ONLINE:
        return True
    if worker.last_heartbeat_time is None:
        return False
    window = MISSED_HEARTBEATS * (worker.heartbeat_interval_seconds or DEFAULT_HEARTBEAT_SECONDS)
    return (now - worker.last_heartbeat_time).total_seconds() < window


def start_command(pool: str, pool_type: str) -> str:
    return f"prefect worker start --pool {shlex.quote(pool)} --type {shlex.quote(pool_type)}"


def no_worker_message(pool: str, pool_type: str) -> str:
    return f"no worker is serving work pool '{pool}': start one with: {start_command(pool, pool_type)}"


class PoolWatch:
    """Says, once per pool, that jobs wait on a pool no worker serves (`say(message)`)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say
        self.reported: set[str] = set()
        self._next_read: dict[str, float] = {}  # (loop time) per pool

    async def check(self, client, waiting_on: Iterable[str]) -> None:
        """`waiting_on`: the pools jobs wait Scheduled on now."""
        loop = asyncio.get_running_loop()
        for pool in sorted(set(waiting_on) - self.reported):
            if self._next_read.get(pool, 0.0) > loop.time():
                continue
            self._next_read[pool] = loop.time() + CHECK_SECONDS
            workers = await client.read_workers_for_work_pool(pool)
            now = datetime.datetime.now(datetime.timezone.utc)
            if any(is_serving(w, now) for w in workers):
                continue
            work_pool = await client.read_work_pool(pool)
            self.reported.add(pool)
            self._say(no_worker_message(pool, work_pool.type))
