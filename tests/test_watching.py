"""How a launcher watches its work units' runs: one read serves every unit, and each unit
acts on every read once (end to end, in test_experiment_*)."""

from __future__ import annotations

import asyncio
import math
import uuid
from types import SimpleNamespace

from prefect.client.schemas.objects import StateType

from prefect_xm.core import orchestration, store


async def test_each_watcher_gets_the_read_after_the_one_it_acted_on_and_reads_are_a_poll_apart(monkeypatch):
    """...and a run is read whole only when it fails: the unit's end repeats its message."""
    poll = 0.2
    monkeypatch.setattr(orchestration, "POLL_SECONDS", poll)
    sent: list[float] = []
    failed: set = set()
    read_whole: list = []

    async def client():
        return None

    async def read_state_types(client, ids):
        sent.append(asyncio.get_running_loop().time())
        return {i: StateType.FAILED if i in failed else StateType.RUNNING for i in ids}

    async def read_runs(client, *, tags, ids):
        read_whole.extend(ids)
        return [SimpleNamespace(id=i, state=SimpleNamespace(type=StateType.FAILED, message="exit 3")) for i in ids]

    monkeypatch.setattr(store, "client", client)
    monkeypatch.setattr(store, "read_state_types", read_state_types)
    monkeypatch.setattr(store, "read_runs", read_runs)
    reads = orchestration.SharedReads()
    units = [[uuid.uuid4(), uuid.uuid4()] for _ in range(50)]
    seen = [-math.inf] * len(units)
    for _ in range(3):
        answers = await asyncio.gather(*(reads.read(ids, after) for ids, after in zip(units, seen)))
        began = [started for started, _ in answers]
        assert len(set(began)) == 1, "one read serves every unit"
        assert all(b > s for b, s in zip(began, seen)), "never a read a unit acted on already"
        assert all(set(runs) == set(ids) for (_, runs), ids in zip(answers, units))
        seen = began
    assert len(sent) == 3
    # Only a run that turned Failed (or Crashed) is read whole, for its message, once.
    assert read_whole == []
    failed.add(units[7][0])
    for _ in range(2):
        started, runs = await reads.read(units[7], seen[7])
        assert runs[units[7][0]].message == "exit 3" and runs[units[7][1]].type == StateType.RUNNING
        seen[7] = started
    assert read_whole == [units[7][0]]

    # A stop asks for the next read at once, not after a large sweep's spacing.
    monkeypatch.setattr(orchestration, "POLL_SECONDS", 60.0)
    latest, _ = await reads.read(units[0], seen[7])  # (the read after this one waits a minute)
    waiting = asyncio.ensure_future(reads.read(units[0], latest))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    reads.read_now()
    await asyncio.wait_for(waiting, 30)
    assert all(later - earlier >= poll * 0.99 for earlier, later in zip(sent, sent[1:]))


async def test_the_progress_line_counts_units_from_one_read_of_their_state_types(monkeypatch):
    from prefect_xm.core import summary

    done, running = uuid.uuid4(), uuid.uuid4()
    asked = []

    async def read_state_types(client, ids):
        asked.append(list(ids))
        return {done: StateType.COMPLETED, running: StateType.RUNNING}

    async def read_runs(client, **kw):
        raise AssertionError("whole runs read for a count")

    monkeypatch.setattr(store, "read_state_types", read_state_types)
    monkeypatch.setattr(store, "read_runs", read_runs)
    # (a unit whose run is not created yet is pending)
    counts = await summary.work_unit_counts(None, [done, running, None])
    assert counts == {"COMPLETED": 1, "RUNNING": 1, "PENDING": 1} and asked == [[done, running]]
    assert summary.work_units_done(counts) == 1
