"""An experiment's lifecycle after its work units are added: waiting for them, stopping
them, ending the experiment's run in a state its units decide, and re-attaching, when a
launch script is re-run, the work units a dead launcher left unfinished. A mixin of
core/experiment.py's Experiment, which holds the units and runs them."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Optional
from uuid import UUID

from prefect.client.schemas.objects import StateType

from prefect_xm.core import orchestration, store, summary
from prefect_xm.core.orchestration import POLL_SECONDS, Member
from prefect_xm.core.runtime import dual
from prefect_xm.core.status import ExperimentUnitStatus
from prefect_xm.core.work_units import AuxiliaryUnit, WorkUnit

log = logging.getLogger("prefect_xm")


class ExperimentLifecycle:
    """Experiment's waits, stops, end and re-attach; they read and write the state
    Experiment.__init__ sets up, and use its `_load`, `creation_errors` and
    `_run_work_unit`."""

    experiment_id: store.ExperimentId
    flow_run_id: UUID
    _work_units: dict[int, WorkUnit]
    _auxiliary_units: list[AuxiliaryUnit]
    _stopped: bool
    _summary: summary.SummaryArtifact
    _writes: Optional[orchestration.Writes]
    _heartbeat: Optional[asyncio.Task]

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
                    # (a read of every unit: spaced out as the shared reads are, by its pages)
                    pages = -(-len(self._work_units) // store.READ_PAGE)
                    done, _ = await asyncio.wait({gathered}, timeout=POLL_SECONDS * max(1.0, pages / 2))
                    try:
                        counts = await summary.work_unit_counts(await store.client(), self.experiment_id)
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
        if self._heartbeat is not None:
            # (before the final state: a beat after it would start a wait for the next one)
            self._heartbeat.cancel()
            self._heartbeat = None
        await client.set_flow_run_state(self.flow_run_id, state, force=True)
        await self._summary.refresh()
        return state.type.value

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
            await self._stop(f"the launch script raised {type(exc).__name__}: {exc}")
            return
        if not self._stopped:
            try:
                await self._wait_all()
            finally:  # work units that could not be created end the run Failed, saying so
                # The trials have ended: auxiliary units get their termination delay, then stop.
                await asyncio.gather(*(aux._end_after_delay() for aux in self._auxiliary_units))
                await self._finish_run()

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
