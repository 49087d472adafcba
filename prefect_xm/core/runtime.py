"""A background event loop that drives experiments for synchronous launch scripts.

Launch scripts are usually synchronous (``with create_experiment(...)``), while the
orchestration (creating runs, running Local jobs, watching gangs) is asyncio. One daemon
thread per process runs an event loop and a Prefect client; the public API submits
coroutines to it and waits on the results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine, Optional, TypeVar

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

                from prefect_xm.api_client import absorb_busy_answers
                from prefect_xm.core.embedded_server import ensure_api

                # Before any Prefect client exists: with no PREFECT_API_URL, our own start
                # of the embedded server replaces Prefect's (which times out on a first run).
                await asyncio.to_thread(ensure_api)
                client = absorb_busy_answers(get_client())
                await client.__aenter__()
                self._client = client
        return self._client


#: the longest an experiment's end waits for Prefect's events worker to send its events
EVENTS_FLUSH_SECONDS = 10.0


async def flush_prefect_events(timeout: float = EVENTS_FLUSH_SECONDS) -> bool:
    """Waits until Prefect's events worker has sent every event this process emitted
    (the artifacts' events Prefect's client emits, the launcher's heartbeats), at most
    `timeout` seconds; False if it had not by then. An event still queued at exit is
    sent while the interpreter shuts down, under Prefect's warning "EventsWorker - Still
    processing items": an experiment's end flushes them, so a launch script ends quietly.
    The worker is not stopped: what is emitted later is sent as before."""
    from prefect.events.worker import EventsWorker

    # (the running instances: EventsWorker.instance() would start one where none runs)
    workers = list(getattr(EventsWorker, "_instances", {}).values())
    if not workers:
        return True
    sent = threading.Event()

    def wait() -> None:
        for worker in workers:
            worker.wait_until_empty()
        sent.set()

    # A daemon thread: a worker that can no longer send holds nothing but it at exit.
    threading.Thread(target=wait, name="prefect-xm-events-flush", daemon=True).start()
    deadline = asyncio.get_running_loop().time() + timeout
    while not sent.is_set() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    return sent.is_set()


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
