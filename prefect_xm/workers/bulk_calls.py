"""The Prefect calls a batch worker makes for many runs at once: Prefect's BaseWorker
makes them a request per run; here the runs that take the same state at the same time
(a sweep picked up together, an array's tasks) go in one request, each still orchestrated.
Every write waits out a busy server's 503 (api_client.absorb_busy_answers).

A mixin before BaseWorker in BatchWorker's bases: its overrides of Prefect's hooks are
checked by name in tests/test_prefect_contract.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional
from uuid import UUID

from prefect.client.schemas.objects import StateType

from prefect_xm.api_client import CoalescedRunReads, CoalescedStates, absorb_busy_answers, read_once_per_batch

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun


#: flow runs per read (the server's default page, PREFECT_API_DEFAULT_LIMIT)
API_PAGE = 200


class BulkPrefectCalls:
    """States and reads of runs, batched (see the module docstring)."""

    _states: Optional[CoalescedStates] = None
    _run_reads: Optional[CoalescedRunReads] = None

    async def setup(self) -> None:
        await super().setup()
        # Prefect's worker crashes a run it is submitting when its client has retried a
        # busy server's 503 five times; ours waits such answers out (api_client).
        absorb_busy_answers(self._client)
        read_once_per_batch(self._client)
        self._states = CoalescedStates(self._client)
        self._run_reads = CoalescedRunReads(self._client)

    async def _set_state(self, flow_run_id: UUID, state, force: bool = False):
        """Proposes (or with `force`, sets) a run's state, in one bulk request with the
        runs taking the same state at the same time; answers Prefect's verdict
        (accepted, state_type)."""
        if self._states is None:
            self._states = CoalescedStates(self.client)
        return await self._states.set(flow_run_id, state, force=force)

    async def _read_run(self, flow_run_id: UUID):
        """A run as the server has it now, read with the runs asked for at the same time
        (an array's tasks ending in one poll: one request)."""
        if self._run_reads is None:
            self._run_reads = CoalescedRunReads(self.client)
        return await self._run_reads.read(flow_run_id)

    # Prefect's per-run submission states, sent for a batch at once
    async def _propose_pending_state(self, flow_run: "FlowRun") -> bool:
        """Prefect proposes Pending to each run it submits, a request each; the runs it
        picked up together (a sweep's) go in one request here, each still orchestrated
        (a run another worker took, or one cancelled meanwhile, is refused as before)."""
        from prefect.states import Pending

        try:
            answer = await self._states.propose(flow_run.id, Pending()) if self._states else None
        except Exception as e:
            self.get_flow_run_logger(flow_run).warning(
                f"bulk Pending failed ({type(e).__name__}: {e}); proposing it for this run alone")
            answer = None
        if answer is None or answer.status == "WAIT":  # (WAIT: Prefect's own method waits as asked)
            return await super()._propose_pending_state(flow_run)
        if answer.accepted and answer.state_type == StateType.PENDING.value:
            return True
        self.get_flow_run_logger(flow_run).info(
            f"Aborted submission of flow run '{flow_run.id}': the server answered {answer.status} "
            f"with its state {answer.state_type!r}" + (f" ({answer.reason})" if answer.reason else ""))
        return False

    async def _propose_submitting_state(self, flow_run: "FlowRun") -> None:
        """Prefect's Submitting, for a batch at once (as Prefect, a failure is only logged)."""
        from prefect.states import Pending

        try:
            if self._states is not None:
                await self._states.propose(flow_run.id, Pending(name="Submitting"))
                return
        except Exception as e:
            self._logger.debug(f"Failed to update flow run '{flow_run.id}' to Submitting state: {e}")
            return
        await super()._propose_submitting_state(flow_run)

    async def _read_all_flow_runs(self, **filters: Any) -> list["FlowRun"]:
        """Every run the filters match: the API answers at most a page per request (200
        by default), and a 1,000-task sweep is more than a page."""
        from prefect.client.schemas.sorting import FlowRunSort

        runs: dict[UUID, "FlowRun"] = {}
        offset = 0
        while True:
            page = await self.client.read_flow_runs(**filters, sort=FlowRunSort.ID_DESC,
                                                    limit=API_PAGE, offset=offset)
            runs.update((r.id, r) for r in page)  # (a run moved between pages is read once)
            if len(page) < API_PAGE:
                return list(runs.values())
            offset += API_PAGE
