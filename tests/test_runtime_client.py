"""The runtime's Prefect client for a server on this machine: a SQLite-backed server
answers 503 on a write conflict, and those are retried within a second instead of after
Prefect's 2 s back-off."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from prefect_xm.core import runtime


class _Answers(httpx.AsyncBaseTransport):
    """Answers from a list (a stand-in for the server's own transport), counting requests."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = list(codes)
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(await request.aread())
        return httpx.Response(self.codes.pop(0), json={"n": len(self.bodies)})


def test_conflicts_are_retried_quickly_with_the_same_request():
    inner = _Answers([503, 503, 201])

    async def post():
        async with httpx.AsyncClient(transport=runtime._RetryLockConflicts(inner), base_url="http://127.0.0.1:1") as c:
            return await c.post("/api/task_runs/", json={"name": "link"})

    started = time.monotonic()
    response = asyncio.run(post())
    assert response.status_code == 201 and response.json() == {"n": 3}
    assert inner.bodies == [b'{"name":"link"}'] * 3
    assert time.monotonic() - started < 1.5  # not Prefect's 2 s + 4 s


def test_a_lasting_503_reaches_prefects_own_retries():
    inner = _Answers([503] * (len(runtime.LOCK_RETRY_DELAYS) + 1))

    async def get():
        async with httpx.AsyncClient(transport=runtime._RetryLockConflicts(inner), base_url="http://127.0.0.1:1") as c:
            return await c.get("/api/health")

    assert asyncio.run(get()).status_code == 503
    assert len(inner.bodies) == len(runtime.LOCK_RETRY_DELAYS) + 1


@pytest.mark.parametrize("url,local", [
    ("http://127.0.0.1:4200/api", True),
    ("http://localhost:4200/api", True),
    ("https://api.prefect.cloud/api/accounts/a/workspaces/w", False),
    ("http://prefect.internal:4200/api", False),
])
def test_only_servers_on_this_machine_get_the_transport(url, local):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        settings = runtime.local_server_httpx_settings()
    assert (settings is not None) == local
