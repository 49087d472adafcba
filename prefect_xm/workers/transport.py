"""Where scheduler commands run: on this machine, or (issue: SSH transport) on a login node.

Every command is an argv list, never a shell string: nothing a user passes is ever
interpreted by a shell. Each call has a timeout; a command that overruns is killed and
reported as a TransientSchedulerError, so a hung controller never hangs the worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from prefect_xm.workers.scheduler import CommandResult, TransientSchedulerError


class Transport(Protocol):
    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> CommandResult: ...

    async def write_file(self, path: str, text: str, mode: int = 0o644) -> None: ...

    async def read_tail(self, path: str, max_bytes: int = 4000) -> str | None: ...

    async def close(self) -> None: ...


class LocalTransport:
    """Runs scheduler commands as subprocesses of the worker."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> CommandResult:
        full_env = None
        if env:
            full_env = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=full_env,
                # its own process group, so a timeout kills what it started too
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise TransientSchedulerError(f"{argv[0]}: command not found ({exc})") from None
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), timeout
            )
        except asyncio.TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
            raise TransientSchedulerError(
                f"{argv[0]} did not answer within {timeout:g} s"
            ) from None
        return CommandResult(
            argv=list(argv),
            returncode=proc.returncode if proc.returncode is not None else -1,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
        )

    async def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        def _write() -> None:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
            p.chmod(mode)

        await asyncio.to_thread(_write)

    async def read_tail(self, path: str, max_bytes: int = 4000) -> str | None:
        def _read() -> str | None:
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    size = f.tell()
                    f.seek(max(0, size - max_bytes))
                    return f.read().decode(errors="replace")
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(_read)

    async def close(self) -> None:
        return None
