"""An experiment's lifecycle after its work units are added: waiting for them, stopping
them, ending the experiment's run in a state its units decide, and re-attaching, when a
launch script is re-run, the work units a dead launcher left unfinished. A mixin of
core/experiment.py's Experiment, which holds the units and runs them."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any, Optional
from uuid import UUID

from prefect.client.schemas.objects import StateType

from prefect_xm.core import orchestration, pool_workers, store, summary
from prefect_xm.core.orchestration import POLL_SECONDS, Member
from prefect_xm.core.runtime import dual, flush_prefect_events
from prefect_xm.core.status import ExperimentUnitStatus
from prefect_xm.core.work_units import AuxiliaryUnit, WorkUnit

log = logging.getLogger("prefect_xm")


class ExperimentLifecycle:
    """Experiment's waits, stops, end and re-attach; they read and write the state
    Experiment.__init__ sets up, and use its `_load`, `creation_errors` and
    `_run_work_unit`."""

    experiment_id: store.ExperimentId
    experiment_title: str
    flow_run_id: UUID
    _work_units: dict[int, WorkUnit]
    _auxiliary_units: list[AuxiliaryUnit]
    _stopped: bool
    _summary: summary.SummaryArtifact
    _writes: Optional[orchestration.Writes]
    _reads: orchestration.SharedReads
    _heartbeat: Optional[asyncio.Task]
    _pool_watch: Optional[asyncio.Task]
    #: the state this launcher ended the experiment's run in (None until it has)
    final_state: Any = None
    #: why the launch was refused before its first unit (its empty run not kept); None otherwise
    refused: Optional[str] = None

    async def _wait_all(self) -> dict[int, ExperimentUnitStatus]:
        await self._load()
        tasks = [wu._task for wu in self._work_units.values() if wu._task is not None]
        if tasks:
            gathered = asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
            if summary.PROGRESS_HOOK is None:
                await gathered
            else:
                last = None
                while True:
                    # (a read of every unit: spaced out as the shared reads are)
                    done, _ = await asyncio.wait({gathered}, timeout=POLL_SECONDS * max(
                        1.0, len(self._work_units) / orchestration.RUNS_PER_POLL))
                    try:
                        counts = await summary.work_unit_counts(
                            await store.client(), [wu.flow_run_id for wu in self._work_units.values()])
                        if counts != last:
                            last = counts
                            summary.PROGRESS_HOOK(self, counts)
                    except Exception as e:  # progress is cosmetic
                        log.debug("progress: %s", e)
                    if done:
                        break
        failed = self.creation_errors()
        if failed:
            raise RuntimeError(f"{len(failed)} work unit(s) could not be created: " + "; ".join(
                f"work unit {wid}: {type(e).__name__}: {e}" for wid, e in sorted(failed.items())))
        # one paged read for every unit (not a read each); a unit not yet final (one this
        # launcher does not drive) is waited for on its own
        client = await store.client()
        units = sorted(self._work_units.items())
        runs = {r.id: r for r in await store.read_runs(client, tags=[], ids=[wu.flow_run_id for _, wu in units
                                                                              if wu.flow_run_id is not None])}
        statuses = {}
        for wid, wu in units:
            run = runs.get(wu.flow_run_id)
            status = ExperimentUnitStatus.from_state(run.state) if run is not None and run.state else None
            statuses[wid] = status if status is not None and status.is_final else await wu._wait()
        return statuses

    def wait_until_complete(self) -> Any:
        """Waits until every work unit is final; returns {work_unit_id: status}."""
        return dual(self._wait_all)

    async def _stop(self, reason: str = "experiment stopped by the user") -> None:
        from prefect.states import Cancelled, Cancelling

        await self._load()
        self._stopped = True
        self._reads.read_now()
        client = await store.client()
        units = [*self._work_units.values(), *self._auxiliary_units]
        local_ids = {wu.flow_run_id for wu in units if wu._task is not None}
        wus = await store.experiment_runs(client, self.experiment_id)
        wus += await store.experiment_runs(client, self.experiment_id, store.KIND_AUXILIARY_UNIT)
        for r in wus:
            if store.state_type(r) not in store.FINAL:
                # (proposed: a unit whose own end lands after this read keeps it)
                await client.set_flow_run_state(r.id, Cancelling(message=reason))
        # Work units driven by another (or no) process: cancel their jobs directly.
        jobs = await store.experiment_runs(client, self.experiment_id, store.KIND_JOB)
        for r in jobs:
            wid = store.work_unit_of(r)
            wu = self._work_units.get(int(wid)) if wid and wid.isdigit() else None
            aid = store.auxiliary_unit_of(r)
            if aid and aid.isdigit() and 0 < int(aid) <= len(self._auxiliary_units):
                wu = self._auxiliary_units[int(aid) - 1]
            if wu is not None and wu.flow_run_id in local_ids:
                continue
            if store.state_type(r) not in store.FINAL:
                await store.cancel_pool_run(client, r.id, reason)
        tasks = [wu._task for wu in units if wu._task is not None]
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
        # Work units nobody drives (their launcher is gone): record them as Cancelled.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * orchestration.CANCEL_DEADLINE_SECONDS / 3
        while True:
            wus = await store.experiment_runs(client, self.experiment_id)
            left = [r for r in wus if store.state_type(r) not in store.FINAL]
            if not left or loop.time() > deadline:
                break
            jobs = await store.experiment_runs(client, self.experiment_id, store.KIND_JOB)
            for r in left:
                wid = store.work_unit_of(r)
                mine = [j for j in jobs if store.work_unit_of(j) == wid]
                if all(store.state_type(j) in store.FINAL for j in mine):
                    await client.set_flow_run_state(r.id, Cancelled(message=reason), force=True)
            await asyncio.sleep(POLL_SECONDS)
        self._summary.mark_dirty()
        await self._finish_run(reason)

    def stop(self) -> Any:
        """Cancels every work unit of the experiment and ends its run Cancelled."""
        return dual(self._stop)

    async def _finish_run(self, stop_reason: Optional[str] = None) -> str:
        if self._writes is not None:
            await self._writes.links.drain()  # (the links show their units' ends before the experiment's)
        state = await self._final_state(stop_reason)
        client = await store.client()
        self._stop_watching()
        await client.set_flow_run_state(self.flow_run_id, state, force=True)
        self.final_state = state
        await self._summary.refresh()
        await self._flush_events()
        return state.type.value

    def _stop_watching(self) -> None:
        """Ends the launcher's heartbeat and its watch of the pools' workers (before the
        run's final state: a beat after it would start a wait for the next one)."""
        for task in (self._heartbeat, self._pool_watch):
            if task is not None:
                task.cancel()
        self._heartbeat = self._pool_watch = None

    async def _flush_events(self) -> None:
        if not await flush_prefect_events():
            log.debug("experiment %s: Prefect's events worker still holds events", self.experiment_id)

    async def _final_state(self, stop_reason: Optional[str] = None):
        """The experiment run's final state, from its work units' states."""
        from prefect.states import Cancelled, Completed, Failed

        client = await store.client()
        wus = await store.experiment_runs(client, self.experiment_id)
        counts: dict[StateType, int] = {}
        for r in wus:
            counts[store.state_type(r)] = counts.get(store.state_type(r), 0) + 1
        tally = ", ".join(f"{n} {t.value.lower()}" for t, n in sorted(counts.items())) or "no work units"
        failed = self.creation_errors()
        if failed:
            tally += f"; {len(failed)} could not be created (work unit {min(failed)}: {failed[min(failed)]})"
        if counts.get(StateType.FAILED, 0) + counts.get(StateType.CRASHED, 0) or failed:
            state = Failed(message=f"work units: {tally}")
        elif self._stopped or counts.get(StateType.CANCELLED, 0):
            state = Cancelled(message=f"{stop_reason or 'work units were cancelled'}: {tally}")
        else:
            state = Completed(message=f"work units: {tally}")
        return state

    async def _close(self, exc: Optional[BaseException]) -> None:
        if exc is not None and not self._stopped:
            try:
                if await self._refuse(exc):
                    return
            except Exception as e:  # (then it is stopped as any other)
                log.warning("experiment %s: could not drop the run of a refused launch (%s: %s)",
                            self.experiment_id, type(e).__name__, e)
            await self._stop(f"the launch script raised {type(exc).__name__}: {exc}")
            return
        if not self._stopped:
            try:
                await self._wait_all()
            finally:  # work units that could not be created end the run Failed, saying so
                # The trials have ended: auxiliary units get their termination delay, then stop.
                await asyncio.gather(*(aux._end_after_delay() for aux in self._auxiliary_units))
                await self._finish_run()

    async def _refuse(self, exc: BaseException) -> bool:
        """A launch refused before it added any unit (package() or add() raised, or the
        script did before either): its experiment has nothing to show, so its run is
        deleted (marked Cancelled and named Refused first, which stays if the delete
        fails), and the launcher says so. False, and nothing done, when the experiment
        has units, here or on the server (one reopened by identity, say)."""
        from prefect.states import Cancelled

        await self._load()
        if self._work_units or self._auxiliary_units:
            return False
        client = await store.client()
        for kind in (store.KIND_WORK_UNIT, store.KIND_AUXILIARY_UNIT):
            if await store.experiment_runs(client, self.experiment_id, kind):
                return False
        what = "refused" if isinstance(exc, Exception) else "stopped"
        reason = f"launch {what} before any work unit was added: {type(exc).__name__}: {exc}"
        self._stop_watching()
        # (a final state first: the launcher-gone automation waits for one after a heartbeat)
        await client.set_flow_run_state(self.flow_run_id, Cancelled(name="Refused", message=reason), force=True)
        try:
            await client.delete_flow_run(self.flow_run_id)
            kept = "its run was deleted"
        except Exception as e:
            log.warning("could not delete the run of experiment %s (%s: %s)", self.experiment_id, type(e).__name__, e)
            kept = "its run is kept, named Refused"
        self._stopped = True
        self.refused = reason
        print(f"prefect-xm: experiment {self.experiment_id} ({self.experiment_title}): {reason}; {kept}",
              file=sys.stderr, flush=True)
        await self._flush_events()
        return True

    def _pools_waited_on(self) -> set[str]:
        """The pools that jobs of the units driven here wait Scheduled on, as last read."""
        pools = set()
        for wu in (*self._work_units.values(), *self._auxiliary_units):
            if wu._task is None or wu._task.done():
                continue
            for m in wu._members:
                if m.state_type == StateType.SCHEDULED and m.flow_run_id is not None and m.pool_name:
                    pools.add(m.pool_name)
        return pools

    async def _watch_pools(self) -> None:
        """While the experiment is open here: says once per pool, within a poll or two,
        that its jobs wait on a pool no worker serves (pool_workers)."""
        def say(message: str) -> None:
            print(f"{self.experiment_title} ({self.experiment_id}): {message}", file=sys.stderr, flush=True)

        watch = pool_workers.PoolWatch(say)
        while True:
            await asyncio.sleep(POLL_SECONDS)
            pools = self._pools_waited_on()
            if not pools:
                continue
            try:
                await watch.check(await store.client(), pools)
            except Exception as e:  # a hint only
                log.debug("experiment %s: could not read the workers of %s: %s", self.experiment_id, pools, e)

    async def _reopen(self) -> None:
        """Opens the experiment for this launcher. Work units a dead launcher left
        unfinished are re-attached: their jobs (which went on) are watched from here."""
        from prefect.states import Running

        from prefect_xm.core import launcher

        client = await store.client()
        run = await client.read_flow_run(self.flow_run_id)
        await self._load()
        window = launcher.gone_after_seconds()
        orphans = [wu for wu in self._work_units.values()
                   if wu._task is None and wu._loaded_state is not None and wu._loaded_state not in store.FINAL]
        if orphans and store.state_type(run) not in store.FINAL:
            try:
                beat = await launcher.last_beat(client, self.flow_run_id)
            except Exception as e:  # no events API: a re-run is far likelier a restart than a twin
                log.warning("cannot read experiment %s's launcher heartbeats (%s: %s); re-attaching its "
                            "unfinished work units", self.experiment_id, type(e).__name__, e)
                beat = None
            if beat is not None and beat.is_alive(window):
                log.warning("experiment %s is driven by a live launcher (host %s, pid %s): this one only adds "
                            "work units", self.experiment_id, beat.host, beat.pid)
                orphans = []
        if orphans:
            message = (f"re-attached: {len(orphans)} unfinished work unit(s) of a launcher that is gone, "
                       f"now watched by pid {os.getpid()}")
            await client.set_flow_run_state(self.flow_run_id, Running(message=message), force=True)
            log.info("experiment %s: %s", self.experiment_id, message)
        elif store.state_type(run) != StateType.RUNNING:
            await client.set_flow_run_state(self.flow_run_id, Running(message="reopened"), force=True)
        self._stopped = False
        try:
            await launcher.ensure_gone_automation(client, window)
        except Exception as e:  # the experiment runs without it; only a dead launcher goes unseen
            log.warning("cannot set up the automation that marks experiments whose launcher is gone "
                        "(%s: %s)", type(e).__name__, e)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.ensure_future(
                launcher.keep_beating(self.flow_run_id, launcher.heartbeat_seconds(), window))
        if self._pool_watch is None or self._pool_watch.done():
            self._pool_watch = asyncio.ensure_future(self._watch_pools())
        for wu in orphans:
            wu._task = asyncio.ensure_future(self._reattach(wu))

    async def _reattach(self, wu: WorkUnit) -> None:
        """Drives a work unit whose launcher died, from its jobs' runs: pool jobs went on
        (their workers follow them); a Local job died with its launcher or lost it."""
        from prefect.states import Crashed

        client = await store.client()
        runs = await store.experiment_runs(client, self.experiment_id, store.KIND_JOB, wu.unit_tag)
        members = [Member.from_run(r) for r in runs]
        for m in members:
            if m.is_local and m.state_type not in store.FINAL:
                m.state_type = StateType.CRASHED
                m.message = "its launcher died while it ran in it (a Local job cannot be re-attached)"
                await client.set_flow_run_state(m.flow_run_id, Crashed(message=m.message), force=True)
        expected = int(wu._job_count) if wu._job_count and wu._job_count.isdigit() else len(members)
        if len(members) < expected:
            # The gang is incomplete and its missing jobs are unknown here: stop the rest.
            message = (f"its launcher died after creating {len(members)} of its {expected} jobs; "
                       f"the others were never submitted")
            await orchestration.cancel_members(client, members, message)
            await client.set_flow_run_state(wu.flow_run_id, Crashed(message=message), force=True)
            self._summary.mark_dirty()
            return
        await self._run_work_unit(wu, members)
