"""How a batch worker removes jobs: a run cancelled from the UI or by a stopped
experiment (watched for once per poll, queued or running), Prefect's kill_infrastructure,
and a whole array in one command when all of its live tasks are cancelling.

A mixin of BatchWorker (it uses the worker's followed runs, transports and pollers)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Optional

from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.exceptions import InfrastructureNotAvailable, InfrastructureNotFound

from prefect_xm.workers.scheduler import JobState, Scheduler

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from prefect_xm.workers.followed import FollowedRun
    from prefect_xm.workers.configuration import BatchJobConfiguration
    from prefect_xm.workers.transport import Transport

#: a stopped experiment turns its tasks Cancelling one request at a time: a cancelling
#: array task waits in steps while more of its array keep following, for so long at most
ARRAY_CANCEL_STEP = 1.0
ARRAY_CANCEL_SETTLE = 30.0
#: how long a whole array's cancel is remembered after it ended
ARRAY_CANCEL_KEPT = 600.0


class BatchCancellation:
    """Removing jobs (see the module docstring)."""

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: "BatchJobConfiguration", grace_seconds: int = 30
    ) -> None:
        scheduler = self.scheduler_for(configuration)
        scheduler_name, cluster, job_id = Scheduler.parse_infrastructure_pid(infrastructure_pid)
        if scheduler_name != scheduler.name or cluster != configuration.cluster:
            raise InfrastructureNotAvailable(
                f"{infrastructure_pid!r} is not a {scheduler.name} job on cluster {configuration.cluster!r}"
            )
        followed = next((f for f in self._followed.values() if f.job_id == job_id and f.configuration.cluster == cluster), None)
        array = scheduler.array_of(job_id)
        if array and (cluster, array) in self._array_cancels:
            # its whole array is being (or was) removed in one command; the task may
            # already be unfollowed, having ended by it: no command of its own
            await asyncio.shield(self._array_cancels[(cluster, array)])
            return
        if followed and array:
            await asyncio.shield(self._array_settle(cluster, array))
            if (cluster, array) in self._array_cancels:
                await asyncio.shield(self._array_cancels[(cluster, array)])
                return
        if followed and followed.cancel_task is not None:
            # our supervisor is cancelling it already (Prefect asks too): one removal, not two
            await asyncio.shield(followed.cancel_task)
            return
        if followed:
            followed.cancel_requested = True
        last = followed.tracked.status.state if followed else JobState.PENDING
        gone = await self.cancel_job(scheduler, job_id, await self.transport_for(configuration), grace_seconds, last,
                                     followed)
        if not gone:
            raise InfrastructureNotFound(f"{scheduler.name} job {job_id} not found")

    async def cancel_job(
        self,
        scheduler: Scheduler,
        job_id: str,
        transport: "Transport",
        grace_seconds: float,
        last_state: JobState,
        followed: Optional["FollowedRun"] = None,
    ) -> bool:
        """A grace signal first (if the job runs), then the kill. True if the scheduler
        accepted the cancel, False if it did not know the job."""
        argvs = scheduler.cancel_argvs(job_id, int(grace_seconds))
        if last_state == JobState.RUNNING and len(argvs) > 1:
            for argv in argvs[:-1]:
                await transport.run(argv, timeout=60)
            if followed:
                await self._wait_final(followed, grace_seconds)
                if followed.tracked.is_final:
                    return True
        result = await transport.run(argvs[-1], timeout=60)
        accepted = scheduler.parse_cancel(result)
        if followed:
            # A job removed while queued may leave no terminal record (SGE's qacct):
            # once it has left the queue, the poller knows it was cancelled.
            followed.tracked.cancelled = True
            followed.poller.poll_soon()
        return accepted

    async def _wait_final(self, followed: "FollowedRun", timeout: float) -> None:
        deadline = time.monotonic() + timeout
        followed.poller.poll_soon()
        while not followed.tracked.is_final and time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, self.poll_interval))
            followed.poller.poll_soon()

    async def _cancel_cancelling_runs(self) -> None:
        """Prefect only kills infrastructure of runs that never started; we watch our
        own runs for Cancelling, queued or running, with one API call per interval."""
        ids = [run_id for run_id, f in self._followed.items() if not f.cancel_requested]
        if not ids:
            return
        runs = await self._read_all_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=ids),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])),
            )
        )
        # An array's tasks wait to see whether the whole array is being stopped (then it
        # goes in one command); any other run is removed on its own at once.
        for run in runs:
            followed = self._followed.get(run.id)
            if followed is None or followed.cancel_requested:
                continue
            array = followed.poller.scheduler.array_of(followed.job_id)
            if array:
                self._array_settle(followed.configuration.cluster, array)
            else:
                self._cancel_on_its_own(followed, run)

    def _cancel_on_its_own(self, followed: "FollowedRun", run: "FlowRun") -> None:
        followed.cancel_requested = True
        self.get_flow_run_logger(run).info(
            f"Flow run is cancelling: cancelling {followed.poller.scheduler.name} job {followed.job_id}"
        )
        followed.cancel_task = self.spawn(
            self.cancel_job(followed.poller.scheduler, followed.job_id, followed.transport, 30,
                            followed.tracked.status.state, followed)
        )
        scheduler = followed.poller.scheduler
        if scheduler.is_het_component(followed.job_id):
            # Removing one component removes its whole heterogeneous job: the other members
            # end because this worker removed them (Cancelled, with no command of their
            # own), not by a crash, even before their own Cancelling reaches the worker.
            het_job = scheduler.het_job_of(followed.job_id)
            for member in self._followed.values():
                if (member is not followed and member.configuration.cluster == followed.configuration.cluster
                        and scheduler.is_het_component(member.job_id) and scheduler.het_job_of(member.job_id) == het_job):
                    member.cancel_requested = True
                    member.cancel_task = followed.cancel_task

    def _array_settle(self, cluster: str, array: str) -> asyncio.Task:
        """The one settle_array_cancel in flight for this array (both the supervisor and
        Prefect's cancellation observer ask for it)."""
        key = (cluster, array)
        if key not in self._array_settles:
            task = self.spawn(self.settle_array_cancel(cluster, array))
            self._array_settles[key] = task
            task.add_done_callback(lambda _: self._array_settles.pop(key, None))
        return self._array_settles[key]

    async def settle_array_cancel(self, cluster: str, array: str) -> None:
        """Cancel what of an array is cancelling: the whole array in one command when
        every live task is (a stopped experiment), else each cancelling task on its own.
        The worker hears of each task as it turns Cancelling, and a stop turns them one
        request at a time: so wait, in steps, while more of the array keep following."""
        seen, deadline = -1, time.monotonic() + ARRAY_CANCEL_SETTLE
        while True:
            whole, cancelling = await self._cancel_array_if_all_cancelling(cluster, array)
            if whole is not None:
                await asyncio.shield(whole)
                return
            if len(cancelling) <= seen or time.monotonic() >= deadline:
                break
            seen = len(cancelling)
            await asyncio.sleep(ARRAY_CANCEL_STEP)
        for followed, run in cancelling:
            if not followed.cancel_requested:
                self._cancel_on_its_own(followed, run)

    async def _cancel_array_if_all_cancelling(
        self, cluster: str, array: str
    ) -> tuple[Optional[asyncio.Task], list[tuple["FollowedRun", "FlowRun"]]]:
        """One cancel of the whole array when every live task of it is cancelling (a
        stopped experiment), and that cancel's task; else None, and the live tasks that
        are cancelling, with their runs."""
        key = (cluster, array)
        if key in self._array_cancels:
            return self._array_cancels[key], []
        members = [f for f in self._followed.values()
                   if f.configuration.cluster == cluster and f.poller.scheduler.array_of(f.job_id) == array
                   and not f.tracked.is_final]
        if not members:
            return None, []
        runs = await self._read_all_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[m.flow_run_id for m in members]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.CANCELLING, StateType.CANCELLED]))))
        by_id = {m.flow_run_id: m for m in members}
        cancelling = [(by_id[r.id], r) for r in runs if r.id in by_id]
        if len(members) < 2 or len(cancelling) < len(members):
            return None, cancelling
        if key in self._array_cancels:  # asked for meanwhile
            return self._array_cancels[key], []
        for run in runs:
            self.get_flow_run_logger(run).info(
                f"Flow run is cancelling with the rest of its array: cancelling "
                f"{members[0].poller.scheduler.name} array {array} ({len(members)} tasks)")
        task = self.spawn(self.cancel_array(array, members))
        self._array_cancels[key] = task
        # kept a while for Prefect's late asks about its tasks (no second command), then
        # dropped: a long-lived worker sees many stopped arrays
        task.add_done_callback(lambda _: asyncio.get_running_loop().call_later(
            ARRAY_CANCEL_KEPT, self._array_cancels.pop, key, None))
        for member in members:
            member.cancel_requested = True
            member.cancel_task = task
        return task, []

    async def cancel_array(self, array_id: str, members: list["FollowedRun"], grace_seconds: float = 30) -> None:
        """Every live task of an array, with one command per step (grace signal, kill)."""
        scheduler = members[0].poller.scheduler
        transport = members[0].transport
        argvs = scheduler.cancel_argvs(array_id, int(grace_seconds))
        if len(argvs) > 1 and any(m.tracked.status.state == JobState.RUNNING for m in members):
            for argv in argvs[:-1]:
                await transport.run(argv, timeout=60)
            deadline = time.monotonic() + grace_seconds
            while not all(m.tracked.is_final for m in members) and time.monotonic() < deadline:
                members[0].poller.poll_soon()
                await asyncio.sleep(min(1.0, self.poll_interval))
        if not all(m.tracked.is_final for m in members):
            scheduler.parse_cancel(await transport.run(argvs[-1], timeout=60))
        for member in members:
            member.tracked.cancelled = True
        members[0].poller.poll_soon()
