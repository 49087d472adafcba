"""The job-runner flow: runs one xm job's program and reports it to Prefect.

One job = one flow run of ``xm-job-runner``. The program is started with an argv list
(never a shell string) in its own process group; its stdout and stderr are streamed line
by line into the run's logs. The run ends Failed with the exit code when the program
fails, and Cancelled when the run is cancelled: the job runner watches its own flow run
and, on Cancelling, kills the program's whole process group.

Its parameters are the job's program (job_spec.py reads them, for every place that
starts a job). Deployments name it by ``prefect_xm/flows/job_runner.py:run_job`` (that
module hands these flows on), so entrypoints stored in users' deployments keep working.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import sys
from typing import Any, Callable, Optional

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Failed

from prefect_xm.job_spec import JobSpecError, job_program

JOB_RUNNER_FLOW_NAME = "xm-job-runner"
CANCEL_POLL_SECONDS = float(os.environ.get("PREFECT_XM_CANCEL_POLL_SECONDS", "1.0"))
KILL_GRACE_SECONDS = float(os.environ.get("PREFECT_XM_KILL_GRACE_SECONDS", "3.0"))


#: Process groups of programs started by job runners in this process (killed at exit,
#: so a launcher that exits or is terminated leaves no orphaned Local jobs).
_LIVE_GROUPS: set[int] = set()


def _kill_live_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _LIVE_GROUPS.clear()


atexit.register(_kill_live_groups)


def _kill_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the program's process group, SIGKILL it after a grace period."""
    if proc.returncode is None:
        _kill_group(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), KILL_GRACE_SECONDS)
        except asyncio.TimeoutError:
            pass
    # Children may outlive the leader: kill whatever is left in the group.
    _kill_group(proc, signal.SIGKILL)
    if proc.returncode is None:
        await proc.wait()


async def _pump(stream: asyncio.StreamReader, emit) -> None:
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # line longer than the limit: take what is buffered
            line = await stream.read(1 << 20)
        if not line:
            return
        emit(line.decode("utf-8", errors="replace").rstrip("\n"))


async def _watch_cancellation(flow_run_id) -> str:
    """Returns when this flow run is Cancelling/Cancelled (never returns otherwise)."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        while True:
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            try:
                run = await client.read_flow_run(flow_run_id)
            except Exception:  # API hiccup: keep running, look again
                continue
            if run.state is not None and run.state.type in (StateType.CANCELLING, StateType.CANCELLED):
                return run.state.message or "cancelled"


@flow(name=JOB_RUNNER_FLOW_NAME, log_prints=False, validate_parameters=True)
async def run_job(
    executable: dict[str, Any],
    args: Optional[list[str]] = None,
    env: Optional[dict[str, str]] = None,
    working_dir: Optional[str] = None,
):
    """Run one xm job's program; stream its output; fail with its exit code."""
    from prefect.context import FlowRunContext

    logger = get_run_logger()
    job = job_program(dict(executable=executable, args=args, env=env, working_dir=working_dir))
    argv, cwd = job.argv, job.working_dir
    child_env = {**os.environ, **job.env}
    logger.info("starting %s (%d args)", argv[0], len(argv) - 1)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=child_env,
            start_new_session=True,  # own process group: cancel kills the whole tree
            limit=1 << 20,
        )
    except OSError as e:
        return Failed(message=f"could not start {argv[0]!r}: {e}")
    _LIVE_GROUPS.add(proc.pid)
    program = os.path.basename(argv[0])

    ctx = FlowRunContext.get()
    flow_run_id = ctx.flow_run.id if ctx and ctx.flow_run else None
    pumps = asyncio.gather(
        _pump(proc.stdout, lambda line: logger.info("%s", line)),
        _pump(proc.stderr, lambda line: logger.info("[stderr] %s", line)),
    )
    waiter = asyncio.ensure_future(proc.wait())
    watcher = asyncio.ensure_future(_watch_cancellation(flow_run_id)) if flow_run_id else None
    try:
        pending = {waiter} | ({watcher} if watcher else set())
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if watcher is not None and watcher in done and waiter not in done:
            reason = watcher.result()
            logger.info("flow run is being cancelled (%s): killing the program's process group", reason)
            await _terminate(proc)
            await asyncio.wait_for(pumps, 10)
            return Cancelled(message=f"cancelled: {reason}; the program was killed")
        await pumps
        rc = proc.returncode
    finally:
        if watcher is not None:
            watcher.cancel()
        if proc.returncode is None:  # engine cancelled us or an error: leave no processes
            await _terminate(proc)
        if not pumps.done():
            pumps.cancel()
        _LIVE_GROUPS.discard(proc.pid)
    if rc != 0:
        return Failed(message=exit_message(program, rc))
    logger.info("%s exited with code 0", program)
    return {"exit_code": 0}


def exit_message(program: str, rc: int) -> str:
    if rc < 0:
        try:
            signame = signal.Signals(-rc).name
        except ValueError:
            signame = str(-rc)
        return f"{program} was killed by signal {signame} (exit code {rc})"
    return f"{program} exited with code {rc}"


class _RunLogShipper:
    """A job's output as its flow run's logs: lines are batched and posted every
    LOG_FLUSH_SECONDS (one request per batch), and completely at the end."""

    def __init__(self, client, flow_run_id) -> None:
        self.client = client
        self.flow_run_id = flow_run_id
        self.pending: list = []
        self._flusher: Optional[asyncio.Task] = None
        self._closing = asyncio.Event()

    def emit(self, message: str, level: int = 20) -> None:
        import datetime

        from prefect.client.schemas.actions import LogCreate

        self.pending.append(LogCreate(name="prefect.flow_runs", level=level, message=message,
                                      timestamp=datetime.datetime.now(datetime.timezone.utc),
                                      flow_run_id=self.flow_run_id))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_later())

    async def _flush_later(self) -> None:
        try:  # (woken early by close)
            await asyncio.wait_for(self._closing.wait(), LOG_FLUSH_SECONDS)
        except asyncio.TimeoutError:
            pass
        await self.flush()

    async def flush(self) -> None:
        batch, self.pending = self.pending, []
        if batch:
            try:
                await self.client.create_logs(batch)
            except Exception as e:  # logs are not worth failing the job for
                print(f"prefect-xm: could not ship {len(batch)} log line(s) of flow run {self.flow_run_id}: {e}",
                      file=sys.stderr)

    async def close(self) -> None:
        """Everything emitted, posted, in order. The flusher is woken and waited for,
        never cancelled: cancelled while it posts, its batch would be lost."""
        self._closing.set()
        if self._flusher is not None:
            await self._flusher
        await self.flush()


LOG_FLUSH_SECONDS = float(os.environ.get("PREFECT_XM_LOG_FLUSH_SECONDS", "0.5"))


async def run_direct(client, flow_run_id, parameters: dict[str, Any],
                     echo: Optional[Callable[[str, bool], None]] = None) -> StateType:
    """Runs one job's program for a flow run of ``xm-job-runner`` without Prefect's flow
    engine: this process writes the run's states (Running, then Completed, Failed with the
    exit code, or Cancelled) and posts the program's stdout/stderr as the run's logs.
    Returns the final state's type.

    The run is the same flow run as on the engine path (parameters, tags, parent); what
    is saved is the engine's per-run start-up (context, result store, hooks, events) and
    its thread of API calls, which made the Local jobs of a sweep start one at a time.
    Cancelling the asyncio task that runs this (the orchestrator does, when the run is
    being cancelled) kills the program's process group and records Cancelled. `echo`,
    if given, also gets each output line (and whether it came from stderr).
    """
    from prefect.states import Cancelled, Completed, Crashed, Failed, Running

    logs = _RunLogShipper(client, flow_run_id)
    proc: Optional[asyncio.subprocess.Process] = None
    try:
        try:
            job = job_program(parameters)
        except JobSpecError as e:
            await client.set_flow_run_state(flow_run_id, Failed(message=f"bad job: {e}"), force=True)
            return StateType.FAILED
        argv = job.argv
        result = await client.set_flow_run_state(flow_run_id, Running())
        if result.state is None or not result.state.is_running():
            return result.state.type if result.state is not None else StateType.PENDING
        child_env = {**os.environ, **job.env}
        logs.emit(f"starting {argv[0]} ({len(argv) - 1} args)")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=job.working_dir, env=child_env,
                start_new_session=True, limit=1 << 20,
            )
        except OSError as e:
            message = f"could not start {argv[0]!r}: {e}"
            logs.emit(message, level=40)
            await client.set_flow_run_state(flow_run_id, Failed(message=message), force=True)
            return StateType.FAILED
        _LIVE_GROUPS.add(proc.pid)
        program = os.path.basename(argv[0])
        def out(line: str) -> None:
            logs.emit(line)
            if echo is not None:
                echo(line, False)

        def err(line: str) -> None:
            logs.emit(f"[stderr] {line}")
            if echo is not None:
                echo(line, True)

        await asyncio.gather(_pump(proc.stdout, out), _pump(proc.stderr, err))
        rc = await proc.wait()
        if rc != 0:
            message = exit_message(program, rc)
            logs.emit(message, level=40)
            await logs.close()
            await client.set_flow_run_state(flow_run_id, Failed(message=message), force=True)
            return StateType.FAILED
        logs.emit(f"{program} exited with code 0")
        await logs.close()
        await client.set_flow_run_state(flow_run_id, Completed(message=f"{program} exited with code 0"), force=True)
        return StateType.COMPLETED
    except asyncio.CancelledError:
        async def record_cancelled() -> None:
            if proc is not None:
                await _terminate(proc)
            run = await client.read_flow_run(flow_run_id)
            reason = (run.state.message if run.state is not None and run.state.is_cancelling() else None) or "cancelled"
            logs.emit(f"the run is being cancelled ({reason}): the program's process group was killed")
            await logs.close()
            await client.set_flow_run_state(
                flow_run_id, Cancelled(message=f"cancelled: {reason}; the program was killed"), force=True)

        # A run cancelled from outside is often cancelled twice (its own Cancelling, then its
        # unit's): a second cancel must not cut this short, or the run stays Cancelling.
        recording = asyncio.ensure_future(record_cancelled())
        while not recording.done():
            try:
                await asyncio.shield(recording)
            except asyncio.CancelledError:
                continue
        raise
    except Exception as e:
        if proc is not None:
            await _terminate(proc)
        await logs.close()
        await client.set_flow_run_state(flow_run_id, Crashed(message=f"{type(e).__name__}: {e}"), force=True)
        raise
    finally:
        if proc is not None:
            if proc.returncode is None:
                await asyncio.shield(_terminate(proc))
            _LIVE_GROUPS.discard(proc.pid)


def _main() -> None:  # python -m prefect_xm.job_runner <flow-run-id>: run a precreated run
    import asyncio as _asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow_async

    async def go() -> int:
        async with get_client() as client:
            run = await client.read_flow_run(UUID(sys.argv[1]))
        state = await run_flow_async(run_job, flow_run=run, parameters=run.parameters, return_type="state")
        return 0 if state.is_completed() else 1

    sys.exit(_asyncio.run(go()))


if __name__ == "__main__":
    _main()
