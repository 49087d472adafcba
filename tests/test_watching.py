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
    assert all(later - earlier >= poll * 0.99 for earlier, later in zip(sent, sent[1:]))
