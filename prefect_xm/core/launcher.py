"""Is an experiment's launcher alive? Heartbeats, and what the server does without them.

The process running a launch script drives its experiment: it creates the runs, watches
the jobs and writes the work units' and the experiment's states. Killed (SIGKILL, a
reboot), it can say nothing, so it says it is alive instead: every
``PREFECT_XM_HEARTBEAT_SECONDS`` (30) it emits a heartbeat event for its experiment run,
naming its host and pid. A Prefect automation (Prefect's documented answer to "zombie"
flow runs) marks the experiment run Crashed when no heartbeat came within three
intervals and the run did not end; running the launch script again re-attaches to it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional
from uuid import UUID

log = logging.getLogger("prefect_xm")

#: a launcher's beat, on its experiment run (its name carries the window it is judged by)
HEARTBEAT_EVENT = "prefect-xm.launcher.heartbeat"
#: the start of the Crashed message the automation writes
GONE_MESSAGE = "its launcher is gone"
_FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


def heartbeat_seconds() -> float:
    return float(os.environ.get("PREFECT_XM_HEARTBEAT_SECONDS", "30"))


def gone_after_seconds(interval: Optional[float] = None) -> int:
    """How long without a heartbeat before the launcher counts as gone: three beats
    (one late beat on a busy machine is not a death), and at least Prefect's minimum
    window for a proactive trigger (10 s)."""
    return max(10, int(round(3 * (interval if interval is not None else heartbeat_seconds()))))


def heartbeat_event(window: int) -> str:
    # Launchers with other intervals are judged by their own automation, not this one.
    return f"{HEARTBEAT_EVENT}.{window}s"


def automation_name(window: int) -> str:
    return f"prefect-xm: experiment launcher gone ({window} s without a heartbeat)"


_ensured: set[tuple[str, int]] = set()
_ensuring: Optional[asyncio.Lock] = None


async def ensure_gone_automation(client, window: int) -> None:
    """The server's automation that crashes an experiment run whose launcher stopped
    beating (once per server and window; made by the first launcher that needs it)."""
    global _ensuring
    key = (str(client.api_url), window)
    if key in _ensured:
        return
    if _ensuring is None:
        _ensuring = asyncio.Lock()
    async with _ensuring:
        if key in _ensured:
            return
        name = automation_name(window)
        if not await client.read_automations_by_name(name):
            await client.create_automation(_gone_automation(name, window))
        _ensured.add(key)


def _gone_automation(name: str, window: int):
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    beat = heartbeat_event(window)
    return AutomationCore(
        name=name,
        description=(
            "prefect-xm: marks an experiment run Crashed when the process running its launch "
            f"script has sent no heartbeat for {window} s and the run has not ended. Its jobs go "
            "on; run the launch script again to re-attach, or `prefect-xm stop ID` to stop them."),
        trigger=EventTrigger(
            after={beat},
            expect={beat, *(f"prefect.flow-run.{s}" for s in _FINAL_EVENTS)},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=datetime.timedelta(seconds=window),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=(f"{GONE_MESSAGE}: no heartbeat for {window} s. Its jobs go on; run the launch "
                     "script again to re-attach, or `prefect-xm stop ID` to stop them."),
        )],
    )


@dataclass
class LastBeat:
    occurred: datetime.datetime
    host: str
    pid: int

    def is_alive(self, window: int) -> bool:
        """Whether this beat's launcher still drives its experiment: a dead pid on this
        host is certain at once; any other launcher is judged by the window."""
        if self.host == socket.gethostname() and self.pid and not _pid_alive(self.pid):
            return False
        age = datetime.datetime.now(datetime.timezone.utc) - self.occurred
        return age.total_seconds() < window


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def last_beat(client, flow_run_id: UUID) -> Optional[LastBeat]:
    """The newest heartbeat of the run's launcher that the server has kept (any window)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=7)
    page = await client.read_events(EventFilter(
        occurred=EventOccurredFilter(since=since),
        event=EventNameFilter(prefix=[HEARTBEAT_EVENT]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    ), limit=50)
    if not page.events:
        return None
    newest = max(page.events, key=lambda e: e.occurred)
    payload = newest.payload or {}
    return LastBeat(newest.occurred, str(payload.get("host", "")), int(payload.get("pid") or 0))


def beat(flow_run_id: UUID, window: int) -> None:
    from prefect.events import emit_event

    emit_event(
        event=heartbeat_event(window),
        resource={"prefect.resource.id": f"prefect.flow-run.{flow_run_id}"},
        payload={"host": socket.gethostname(), "pid": os.getpid()},
    )


async def keep_beating(flow_run_id: UUID, interval: float, window: int) -> None:
    """Beats until cancelled (when the launcher has written the experiment's end)."""
    while True:
        try:
            beat(flow_run_id, window)
        except Exception as e:  # a missed beat is survivable; the window allows two
            log.debug("heartbeat of experiment run %s not sent: %s", flow_run_id, e)
        await asyncio.sleep(interval)
