"""Where scheduler commands run: on this machine, or on a login node over SSH.

Every command is an argv list, never a shell string: nothing a user passes is ever
interpreted by a shell. Each call has a timeout; a command that overruns is killed and
reported as a TransientSchedulerError, so a hung controller never hangs the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import signal
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from prefect_xm.workers.scheduler import CommandResult, SchedulerError, TransientSchedulerError

if TYPE_CHECKING:
    from prefect_xm.blocks.ssh import SSHConnection


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

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> CommandResult:
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

    async def expand_path(self, path: str) -> str:
        return os.path.expanduser(path)

    async def close(self) -> None:
        return None


class SSHError(SchedulerError):
    """The login node refused us (host key, authentication): retrying will not help."""


class SSHConnectError(TransientSchedulerError):
    """The login node could not be reached. No command ran, so nothing was submitted."""

    command_ran = False


class SSHTransport:
    """Runs scheduler commands on a login node over ONE asyncssh connection, reused by
    every command (submit, poll, cancel, reading logs) and re-established with backoff
    when it drops. Each command's argv is quoted argument by argument for the remote
    shell; environment variables travel in a 0600 file, never on a command line."""

    def __init__(self, connection: "SSHConnection", logger: logging.Logger | None = None):
        self.connection = connection
        self.logger = logger or logging.getLogger("prefect_xm.ssh")
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._home: str | None = None
        self.connects = 0  # connections opened, for tests and benchmarks
        self.connect_attempts = 3  # per command, 1 s then 2 s apart

    # -- connection -------------------------------------------------------------
    def _client_keys(self):
        import asyncssh

        c = self.connection
        passphrase = c.passphrase.get_secret_value() if c.passphrase else None
        try:
            if c.private_key:
                return [asyncssh.import_private_key(c.private_key.get_secret_value(), passphrase)]
            if c.private_key_path:
                return [asyncssh.read_private_key(os.path.expanduser(c.private_key_path), passphrase)]
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, OSError) as exc:
            # the exception text names the problem, never the key
            raise SSHError(f"SSH private key for {c.describe()} cannot be used: {type(exc).__name__}: {exc}") from None
        return ()  # the worker user's default keys and agent

    def _known_hosts(self):
        import asyncssh

        c = self.connection
        if not c.verify_host_key:
            self.logger.warning(
                "Host key verification is OFF for %s (SSH Connection block setting); "
                "the connection can be intercepted.", c.describe()
            )
            return None
        if c.known_hosts:
            if "\n" not in c.known_hosts.strip() and os.path.isfile(os.path.expanduser(c.known_hosts)):
                return os.path.expanduser(c.known_hosts)
            return asyncssh.import_known_hosts(c.known_hosts)
        return os.path.expanduser("~/.ssh/known_hosts")

    async def _connect(self):
        import asyncssh

        c = self.connection
        options = dict(
            port=c.port,
            username=c.username,
            client_keys=self._client_keys(),
            known_hosts=self._known_hosts(),
            connect_timeout=c.connect_timeout,
            keepalive_interval=c.keepalive_interval or None,
            keepalive_count_max=3,
            agent_path=None if c.private_key or c.private_key_path else (),
        )
        if options["agent_path"] == ():
            options.pop("agent_path")
        try:
            tunnel = None
            if c.jump_host:
                user, _, hostport = c.jump_host.rpartition("@")
                jhost, _, jport = hostport.partition(":")
                tunnel = await asyncssh.connect(jhost, **{**options, "port": int(jport or 22), "username": user or c.username})
            conn = await asyncssh.connect(c.host, tunnel=tunnel, **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise SSHError(
                f"SSH host key of {c.host}:{c.port} is not trusted ({exc.reason}): it is not in the "
                "known hosts given, or it changed. Refusing to connect."
            ) from None
        except asyncssh.PermissionDenied:
            raise SSHError(f"SSH authentication failed for {c.describe()}: the key was refused") from None
        except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
            raise SSHConnectError(f"cannot connect to {c.describe()}: {type(exc).__name__}: {exc}") from None
        self.connects += 1
        return conn

    async def _connection(self):
        async with self._lock:
            if self._conn is not None and not self._is_closed(self._conn):
                return self._conn
            if self._conn is not None:
                self.logger.warning("SSH connection to %s dropped; reconnecting", self.connection.describe())
            self._conn = None
            for attempt in range(1, self.connect_attempts + 1):
                try:
                    self._conn = await self._connect()
                    return self._conn
                except SSHConnectError:
                    if attempt == self.connect_attempts:
                        raise  # transient for callers: the poller comes back next interval
                    await asyncio.sleep(2 ** (attempt - 1))

    @staticmethod
    def _is_closed(conn) -> bool:
        transport = getattr(conn, "_transport", None)
        return transport is None or transport.is_closing()

    async def home(self) -> str:
        if self._home is None:
            result = await self.run(["sh", "-c", 'printf "%s" "$HOME"'], timeout=30)
            self._home = result.stdout.strip() or "."
        return self._home

    async def expand_path(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            return (await self.home()) + path[1:]
        return path

    # -- commands ---------------------------------------------------------------
    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> CommandResult:
        import asyncssh

        env_file = None
        if env:
            env_file = f".prefect-xm/env/{uuid.uuid4().hex}"
            lines = "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items() if v is not None and _ENV_NAME.match(k))
            await self.write_file(env_file, lines, 0o600)
            # the file is read, removed, and the command exec'd with those variables
            command = "sh -c " + shlex.quote('set -a; . "$0"; set +a; rm -f "$0"; exec "$@"') + " " + shlex.join([env_file, *argv])
        else:
            command = shlex.join(argv)
        for attempt in (1, 2):
            conn = await self._connection()
            try:
                completed = await asyncio.wait_for(conn.run(command, input=stdin, check=False), timeout)
            except asyncio.TimeoutError:
                raise TransientSchedulerError(f"{argv[0]} did not answer within {timeout:g} s (over SSH)") from None
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError, asyncssh.ChannelOpenError, OSError) as exc:
                self._conn = None
                if attempt == 1 and isinstance(exc, asyncssh.ChannelOpenError):
                    continue  # the channel never opened: the command did not run; retry once
                raise TransientSchedulerError(
                    f"SSH connection to {self.connection.describe()} lost during {argv[0]}: {exc}"
                ) from None
            returncode = completed.exit_status if completed.exit_status is not None else -1
            return CommandResult(list(argv), returncode, _text(completed.stdout), _text(completed.stderr))
        raise TransientSchedulerError(f"cannot open an SSH channel to {self.connection.describe()}")

    async def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        conn = await self._connection()
        try:
            async with conn.start_sftp_client() as sftp:
                parent = path.rsplit("/", 1)[0] if "/" in path else ""
                if parent:
                    await sftp.makedirs(parent, exist_ok=True)
                # created with its final mode, so a secret is never readable by others
                async with sftp.open(path, "w", attrs=_sftp_attrs(mode)) as f:
                    await f.write(text)
                await sftp.chmod(path, mode)
        except OSError as exc:
            raise TransientSchedulerError(f"cannot write {path} on {self.connection.describe()}: {exc}") from None

    async def read_tail(self, path: str, max_bytes: int = 4000) -> str | None:
        import asyncssh

        conn = await self._connection()
        try:
            async with conn.start_sftp_client() as sftp:
                try:
                    size = (await sftp.stat(path)).size or 0
                except asyncssh.SFTPNoSuchFile:
                    return None
                async with sftp.open(path, "rb") as f:
                    await f.seek(max(0, size - max_bytes))
                    return (await f.read()).decode(errors="replace")
        except (OSError, asyncssh.Error):
            return None

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            try:
                await self._conn.wait_closed()
            except Exception:
                pass
            self._conn = None


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _sftp_attrs(mode: int):
    import asyncssh

    return asyncssh.SFTPAttrs(permissions=mode)
