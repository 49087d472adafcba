"""Where scheduler commands run: on this machine, or on a login node over SSH.

Every command is an argv list, never a shell string: nothing a user passes is ever
interpreted by a shell. Each call has a timeout; a command that overruns is killed and
reported as a TransientSchedulerError, so a hung controller never hangs the worker.
Here: the Transport protocol and the local transport; the SSH one is in ssh_transport.py,
and importable from here too.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from prefect_xm.workers.scheduler import CommandResult, TransientSchedulerError
# importable from here, where they were before the SSH transport had its own module
from prefect_xm.workers.ssh_transport import (
    CHANNEL_OPEN_ATTEMPTS,
    COMMANDS_AT_ONCE,
    SSHConnectError,
    SSHError,
    SSHTransport,
)

__all__ = [
    "CHANNEL_OPEN_ATTEMPTS",
    "COMMANDS_AT_ONCE",
    "CREDENTIAL_NAME",
    "LocalTransport",
    "SSHConnectError",
    "SSHError",
    "SSHTransport",
    "Transport",
    "command_environment",
]


class Transport(Protocol):
    async def run(self, argv: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None,
                  timeout: float = 60.0) -> CommandResult: ...

    async def write_file(self, path: str, text: str, mode: int = 0o644) -> None: ...

    async def read_tail(self, path: str, max_bytes: int = 4000) -> str | None: ...

    async def read_from(self, path: str, offset: int, max_bytes: int = 1 << 20) -> bytes | None:
        """Up to max_bytes of the file from offset (b"" at its end); None if missing."""
        ...

    async def expand_path(self, path: str) -> str: ...

    async def close(self) -> None: ...


#: Names of the worker's own credentials (its Prefect API key, cloud tokens...). Scheduler
#: commands run without them: qsub -V, HTCondor's getenv and bsub copy the submitting
#: environment into the job's record, where other users can read it (qstat -j, qstat -f,
#: condor_q -l). A run's own credentials reach its job through a 0600 file instead.
CREDENTIAL_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|PASSPHRASE|AUTH|CREDENTIAL", re.IGNORECASE)


def command_environment() -> dict[str, str]:
    """The worker's environment without its credentials, for scheduler commands."""
    return {k: v for k, v in os.environ.items() if not CREDENTIAL_NAME.search(k)}


class LocalTransport:
    """Runs scheduler commands as subprocesses of the worker."""

    async def run(self, argv: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None,
                  timeout: float = 60.0) -> CommandResult:
        full_env = {**command_environment(), **{k: v for k, v in (env or {}).items() if v is not None}}
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
            # created with its final mode, so a secret is never readable by others
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as f:
                os.fchmod(fd, mode)
                f.write(text)

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

    async def read_from(self, path: str, offset: int, max_bytes: int = 1 << 20) -> bytes | None:
        def _read() -> bytes | None:
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    return f.read(max_bytes)
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(_read)

    async def expand_path(self, path: str) -> str:
        return os.path.expanduser(path)

    async def close(self) -> None:
        return None
