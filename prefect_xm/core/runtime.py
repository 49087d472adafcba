"""A background event loop that drives experiments for synchronous launch scripts.

Launch scripts are usually synchronous (``with create_experiment(...)``), while the
orchestration (creating runs, running Local jobs, watching gangs) is asyncio. One daemon
thread per process runs an event loop and a Prefect client; the public API submits
coroutines to it and waits on the results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
from typing import Any, Coroutine, Optional, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class Runtime:
    _lock = threading.Lock()
    _instance: Optional["Runtime"] = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="prefect-xm-runtime", daemon=True)
        self._client = None
        self._client_lock: Optional[asyncio.Lock] = None
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> "Runtime":
        with cls._lock:
            if cls._instance is None:
                cls._instance = Runtime()
            return cls._instance

    def submit(self, coro: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("Runtime.run called from the runtime thread")
        return self.submit(coro).result(timeout)

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on the runtime loop from another event loop."""
        return await asyncio.wrap_future(self.submit(coro))

    async def client(self):
        """The runtime's Prefect client (only use it on the runtime loop)."""
        if self._client_lock is None:
            self._client_lock = asyncio.Lock()
        async with self._client_lock:
            if self._client is None:
                from prefect.client.orchestration import get_client

                from prefect_xm.core.embedded_server import ensure_api

                # Before any Prefect client exists: with no PREFECT_API_URL, our own start
                # of the embedded server replaces Prefect's (which times out on a first run).
                await asyncio.to_thread(ensure_api)
                client = get_client(httpx_settings=local_server_httpx_settings())
                await client.__aenter__()
                self._client = client
        return self._client


#: Quick retries of a 503 before Prefect's client sees it (and waits 2 s, then 4 s...).
LOCK_RETRY_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


def local_server_httpx_settings() -> Optional[dict[str, Any]]:
    """httpx settings for a Prefect server on this machine (the embedded one, or a
    `prefect server start`): SQLite-backed, it answers 503 when a write meets another's
    snapshot (SQLITE_BUSY_SNAPSHOT, which busy_timeout does not wait out), and Prefect's
    client backs off 2 s before its first retry, while the conflict is gone in
    milliseconds: each experiment.add() stalled 2 s that way. None (Prefect's defaults)
    for any other server: its TLS and proxy settings stay Prefect's to apply."""
    import httpx
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url or urlsplit(url).scheme != "http" or urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    # The limits Prefect sets on its own transport, which a custom transport replaces.
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=25)
    return {"transport": _RetryLockConflicts(httpx.AsyncHTTPTransport(limits=limits))}


#: POST routes of Prefect's API that only read (filters, counts, pages).
_READING_POSTS = frozenset({"filter", "count", "paginate", "history"})


def _writes(request) -> bool:
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return False
    return not (request.method == "POST" and request.url.path.rstrip("/").rsplit("/", 1)[-1] in _READING_POSTS)


class _RetryLockConflicts:
    """An httpx transport that retries 503 answers a few times within about a second,
    and once a server has answered one, sends it this client's writes one at a time.

    A 503 says the server is SQLite-backed: it takes one write at a time anyway, and
    concurrent ones only meet each other's locks. A 200-trial sweep creating eight work
    units at once made about seven attempts per run (each a conflict, each a retry) and
    slowed to a crawl; queued here, each write goes through at its first attempt. Reads
    stay concurrent, and a server that never answers 503 (PostgreSQL) is never queued."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self._one_write_at_a_time: Optional[asyncio.Lock] = None

    async def handle_async_request(self, request):
        if self._one_write_at_a_time is not None and _writes(request):
            async with self._one_write_at_a_time:
                return await self._send(request)
        return await self._send(request)

    async def _send(self, request):
        for delay in LOCK_RETRY_DELAYS:
            response = await self.inner.handle_async_request(request)
            if response.status_code != 503:
                return response
            await response.aread()
            await response.aclose()
            if self._one_write_at_a_time is None:
                self._one_write_at_a_time = asyncio.Lock()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self):
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.inner.__aexit__(*exc)


def in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def dual(coro_factory):
    """Runs ``coro_factory()`` on the runtime loop: blocks and returns its result when
    called from sync code; returns an awaitable of the result when called from async
    code (so ``await work_unit.wait_until_complete()`` works as in XManager)."""
    if not in_event_loop():
        return Runtime.get().run(coro_factory())
    return Runtime.get().arun(coro_factory())


def install_sigterm_handler() -> None:
    """SIGTERM on a launch script -> KeyboardInterrupt, so `with` blocks stop their work
    units (and kill Local jobs) instead of dying and leaving runs and processes behind.
    Only when SIGTERM has its default disposition and we are on the main thread."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
