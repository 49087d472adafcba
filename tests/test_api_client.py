"""prefect-xm's Prefect clients (the launcher's and the worker's): a SQLite-backed server
answers 503 on a write conflict; those are retried within a second at first, instead of
after Prefect's 2 s back-off, and for as long as the patience allows, instead of Prefect's
five tries (after which its worker crashed the run it was submitting)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from prefect_xm import api_client


class _Answers(httpx.AsyncBaseTransport):
    """Answers from a list (a stand-in for the server's own transport), counting requests."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = list(codes)
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(await request.aread())
        return httpx.Response(self.codes.pop(0), json={"n": len(self.bodies)})


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The waits the transport asks for, recorded instead of slept (these machines are
    too noisy for wall time)."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay):
        asked.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(api_client.asyncio, "sleep", recorded_sleep)
    return asked


def test_conflicts_are_retried_quickly_with_the_same_request(waits):
    inner = _Answers([503, 503, 201])

    async def post():
        async with httpx.AsyncClient(transport=api_client.BusyServerTransport(inner), base_url="http://127.0.0.1:1") as c:
            return await c.post("/api/task_runs/", json={"name": "link"})

    response = asyncio.run(post())
    assert response.status_code == 201 and response.json() == {"n": 3}
    assert inner.bodies == [b'{"name":"link"}'] * 3
    # the waits it chose (jittered around the first two delays), not Prefect's 2 s + 4 s;
    # measured as the delays asked for, not as wall time (these machines are noisy)
    assert len(waits) == 2 and all(0.5 * d <= w <= 1.5 * d for w, d in zip(waits, api_client.QUICK_RETRY_DELAYS))
    assert sum(api_client.QUICK_RETRY_DELAYS) < 2.0  # all its retries, on average, within Prefect's first wait


def test_a_busy_server_is_waited_out_past_prefects_retries(waits):
    # 30 answers of 503: Prefect's client alone gives up after 5 retries
    inner = _Answers([503] * 30 + [201])

    async def patch():
        async with httpx.AsyncClient(transport=api_client.BusyServerTransport(inner, patience=600),
                                     base_url="http://127.0.0.1:1") as c:
            return await c.patch("/api/flow_runs/x/labels", json={"a": "b"})

    assert asyncio.run(patch()).status_code == 201
    assert len(inner.bodies) == 31
    # quick at first, then about a second apart (jittered)
    quick = len(api_client.QUICK_RETRY_DELAYS)
    assert all(0.5 * api_client.SLOW_RETRY_DELAY <= w <= 1.5 * api_client.SLOW_RETRY_DELAY for w in waits[quick:])


def test_past_its_patience_a_503_reaches_prefects_own_retries():
    inner = _Answers([503] * 10)

    async def get():
        async with httpx.AsyncClient(transport=api_client.BusyServerTransport(inner, patience=0),
                                     base_url="http://127.0.0.1:1") as c:
            return await c.get("/api/health")

    assert asyncio.run(get()).status_code == 503
    assert len(inner.bodies) == 1


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:4200/api",
    "https://api.prefect.cloud/api/accounts/a/workspaces/w",
    "http://prefect.internal:4200/api",
])
def test_any_servers_client_keeps_prefects_transport_inside(url):
    """Prefect's transport (its TLS, proxies and connection retries) stays, wrapped."""
    import httpx as _httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        client = api_client.absorb_busy_answers(get_client())
    transport = client._client._transport
    assert isinstance(transport, api_client.BusyServerTransport)
    assert isinstance(transport.inner, _httpx.AsyncHTTPTransport)
    assert api_client.absorb_busy_answers(client)._client._transport is transport  # once


class _Concurrency(httpx.AsyncBaseTransport):
    """Answers 503 to the first request, then 200s that take a while, recording how many
    writes and reads were in flight at once."""

    def __init__(self) -> None:
        self.first = True
        self.in_flight = {"write": 0, "read": 0}
        self.most = {"write": 0, "read": 0}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.first:
            self.first = False
            return httpx.Response(503)
        kind = "write" if api_client.writes(request) else "read"
        self.in_flight[kind] += 1
        self.most[kind] = max(self.most[kind], self.in_flight[kind])
        await asyncio.sleep(0.05)
        self.in_flight[kind] -= 1
        return httpx.Response(201)


def _requests_at_once(after_a_conflict: bool) -> dict[str, int]:
    inner = _Concurrency()
    inner.first = after_a_conflict

    async def burst():
        async with httpx.AsyncClient(transport=api_client.BusyServerTransport(inner), base_url="http://127.0.0.1:1") as c:
            if after_a_conflict:
                await c.post("/api/flow_runs/", json={})
            await asyncio.gather(*[c.post("/api/flow_runs/", json={}) for _ in range(8)],
                                 *[c.patch(f"/api/flow_runs/{i}", json={}) for i in range(4)],
                                 *[c.post("/api/flow_runs/filter", json={}) for _ in range(4)],
                                 *[c.get("/api/flow_runs/x") for _ in range(4)])

    asyncio.run(burst())
    return inner.most


def test_after_a_conflict_writes_go_one_at_a_time_and_reads_stay_concurrent():
    assert _requests_at_once(after_a_conflict=True) == {"write": 1, "read": 8}


def test_a_server_that_never_conflicts_gets_concurrent_writes():
    assert _requests_at_once(after_a_conflict=False)["write"] == 12


def test_reads_and_writes_of_prefects_api():
    def writes(method, path):
        return api_client.writes(httpx.Request(method, f"http://127.0.0.1:1{path}"))

    assert writes("POST", "/api/flow_runs/") and writes("POST", "/api/flow_runs/x/set_state")
    assert writes("PATCH", "/api/flow_runs/x") and writes("DELETE", "/api/flow_runs/x")
    assert not writes("POST", "/api/flow_runs/filter") and not writes("POST", "/api/task_runs/count/")
    assert not writes("GET", "/api/flow_runs/x")


class _BulkServer:
    """A stand-in for the bulk creation route as Prefect's server answers it when its
    database is busy: 200, with the database's refusal inside the results; a refusal
    rolls back the runs of its request answered before it."""

    def __init__(self, busy_answers: int) -> None:
        self.busy_answers = busy_answers
        self.requests: list[list[str]] = []
        self.stored: dict = {}
        outer = self

        class Http:
            async def post(self, url, json):
                names = [r["name"] for r in json]
                outer.requests.append(names)
                results, rolled_back = [], []
                for k, name in enumerate(names):
                    if outer.busy_answers and k == 1:
                        outer.busy_answers -= 1
                        results.append({"status": "FAILED", "error": "(sqlite3.OperationalError) database is locked"})
                        results += [{"status": "FAILED", "error": "Can't operate on closed transaction"}] * (len(names) - 2)
                        for r in rolled_back:
                            outer.stored.pop(r)
                        break
                    run_id = uuid.uuid4()
                    outer.stored[run_id] = name
                    rolled_back.append(run_id)
                    results.append({"status": "CREATED", "flow_run_id": str(run_id)})
                return httpx.Response(200, json={"results": results})

        self._client = Http()

    async def read_flow_runs(self, flow_run_filter, limit):
        class Run:
            def __init__(self, i):
                self.id = i
        return [Run(i) for i in flow_run_filter.id.any_ if i in self.stored]


def test_a_busy_database_inside_bulk_results_is_waited_out_and_no_run_is_made_twice(monkeypatch):
    async def no_wait(delay):
        return None

    monkeypatch.setattr(api_client.asyncio, "sleep", no_wait)
    server = _BulkServer(busy_answers=3)
    created = asyncio.run(api_client.create_flow_runs_from_deployment(
        server, uuid.uuid4(), [{"name": f"r{i}"} for i in range(5)]))
    assert all(c.flow_run_id for c in created), created
    assert [server.stored[c.flow_run_id] for c in created] == [f"r{i}" for i in range(5)]
    assert len(server.stored) == 5  # the rolled-back ones were made once, when sent again
    assert len(server.requests) == 4


def test_a_busy_database_inside_bulk_state_answers_is_waited_out(monkeypatch):
    async def no_wait(delay):
        return None

    monkeypatch.setattr(api_client.asyncio, "sleep", no_wait)
    ids = [uuid.uuid4() for _ in range(3)]
    sent: list[list[str]] = []

    class Http:
        async def post(self, url, json):
            asked = json["flow_runs"]["id"]["any_"]
            sent.append(asked)
            results = []
            for i in asked:
                busy = i == str(ids[1]) and len(sent) < 3
                results.append({"flow_run_id": i, "status": "ABORT" if busy else "ACCEPT",
                                "state": None if busy else {"type": "PENDING", "name": "Pending"},
                                "details": {"reason": "(sqlite3.OperationalError) database is locked"} if busy else {}})
            return httpx.Response(200, json={"results": results})

    class Client:
        _client = Http()

    from prefect.states import Pending

    answers = asyncio.run(api_client.set_flow_run_states(Client(), ids, Pending()))
    assert [a.flow_run_id for a in answers] == ids and all(a.accepted for a in answers), answers
    assert sent[1:] == [[str(ids[1])], [str(ids[1])]]  # only the busy one went again


def test_a_bulk_routes_database_error_keeps_no_statement_or_parameters():
    error = ("(sqlite3.OperationalError) database is locked\n[SQL: INSERT INTO flow_run (parameters) VALUES (?)]\n"
             "[parameters: {'env': {'WANDB_API_KEY': 'secret-value'}}]\n(Background on this error at: https://x)")
    assert api_client.database_error(error) == "(sqlite3.OperationalError) database is locked"
    assert api_client._server_was_busy(api_client.database_error(error))
