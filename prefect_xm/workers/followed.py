"""A run the worker follows: its job, the poller and transport of its cluster, its
configuration, and what the worker has done about it (a cancel asked for, Running set)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Optional
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
    extra: dict[str, Any] = field(default_factory=dict)
