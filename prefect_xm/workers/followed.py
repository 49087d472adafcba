"""A run the worker follows: its job, the poller and transport of its cluster, its
configuration, and what the worker has done about it (a cancel asked for, Running set)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional
from uuid import UUID

from prefect_xm.workers.configuration import BatchJobConfiguration
from prefect_xm.workers.poller import JobPoller, TrackedJob
from prefect_xm.workers.transport import Transport


@dataclass
class FollowedRun:
    flow_run_id: UUID
    job_id: str
    poller: JobPoller
    transport: Transport
    configuration: BatchJobConfiguration
    tracked: TrackedJob
    cancel_requested: bool = False
    cancel_task: Optional[asyncio.Task] = None
    #: this worker has put the run in Running (a direct job has no engine to say so)
    marked_running: bool = False
    #: taken over after a restart: its output may be partly in the logs already
    resumed: bool = False
    #: why the worker stopped waiting for the job's end (its run then ends with this)
    gave_up: Optional[str] = None
    #: where its stderr tail was read from, for the run's final message
    stderr_path: Optional[str] = None
