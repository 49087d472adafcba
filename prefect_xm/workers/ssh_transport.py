"""The SSH transport: scheduler commands and files on a login node, over ONE reused
asyncssh connection (through a jump host if need be) and its one SFTP session. A refused
login is an SSHError (final), an unreachable node an SSHConnectError (retried); a command
that overruns is killed on the node and reported as a TransientSchedulerError.

transport.py re-exports every name here: this module imports nothing from it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shlex
import uuid
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from prefect_xm.workers.scheduler import CommandResult, SchedulerError, TransientSchedulerError

if TYPE_CHECKING:
    from prefect_xm.blocks.ssh import SSHConnection


#: commands run at once on one SSH connection (sshd's MaxSessions is 10 by default,
#: and the shared SFTP session takes one)
COMMANDS_AT_ONCE = 8
#: tries to open a command's channel: sshd frees a session a moment after its command
#: exits, so a busy login node can refuse one while our count says a slot is free
CHANNEL_OPEN_ATTEMPTS = 5


class SSHError(SchedulerError):
    """The login node refused us (host key, authentication): retrying will not help."""


class SSHConnectError(TransientSchedulerError):
    """The login node could not be reached. No command ran, so nothing was submitted."""

    command_ran = False


class SSHTransport:
    """Runs scheduler commands on a login node over ONE asyncssh connection, reused by
    every command (submit, poll, cancel, reading logs) and re-established with backoff
    when it drops. Each command's argv is quoted argument by argument for the remote
    shell; environment variables travel in a 0600 file, never on a command line.

    Through a jump host, the connection to the jump host is kept with the one it
    carries, and both are closed together (on close() and when reconnecting)."""

    def __init__(self, connection: "SSHConnection", logger: logging.Logger | None = None):
        self.connection = connection
        self.logger = logger or logging.getLogger("prefect_xm.ssh")
        self._conn: Any = None
        self._tunnel: Any = None  # the jump host connection carrying _conn, if any
        self._lock = asyncio.Lock()
        # The connection's one SFTP session: every file operation (an array's files,
        # each running job's output) is a request on it, pipelined with the others,
        # not a channel and subsystem start of its own.
        self._sftp_session: tuple[Any, Any] | None = None  # (connection, SFTP client)
        self._sftp_lock = asyncio.Lock()
        # Commands in flight on the connection: sshd refuses sessions past MaxSessions
        # (10 by default; the SFTP session takes one).
        self._command_slots = asyncio.Semaphore(COMMANDS_AT_ONCE)
        self._home: str | None = None
        self._login_node_has_timeout: bool | None = None  # coreutils' timeout(1), probed once
        self.connects = 0  # connections opened, for tests and benchmarks
        self.connect_attempts = 3  # per command, 1 s then 2 s apart
        #: seconds an SFTP operation (write_file, read_tail) or the $HOME lookup may
        #: take: a peer that stopped answering (keepalives off) cannot hang the worker
        self.command_timeout = 60.0

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
            # the exception text names the problem, never the key or its passphrase
            hint = ""
            if "bcrypt" in str(exc):
                hint = " (encrypted OpenSSH keys need the bcrypt package: pip install 'asyncssh[bcrypt]')"
            elif isinstance(exc, asyncssh.KeyEncryptionError) or any(
                word in str(exc) for word in ("decrypt", "Passphrase must be specified")
            ):
                hint = " (check the SSH Connection block's Key passphrase)"
            raise SSHError(
                f"SSH private key for {c.describe()} cannot be used: {type(exc).__name__}: {exc}{hint}"
            ) from None
        return ()  # the worker user's default keys and agent

    def _host_key_fix(self) -> str:
        c = self.connection
        where = f"[{c.host}]:{c.port}" if c.port != 22 else c.host
        return (
            f"Add the login node's host key (e.g. the line printed by `ssh-keyscan -p {c.port} {c.host}`, "
            f"checked against a fingerprint you trust, for {where}"
            + (f" and for the jump host {c.jump_host}" if c.jump_host else "")
            + ") to ~/.ssh/known_hosts of the worker's user or to the SSH Connection block's Known hosts field."
        )

    def _known_hosts(self):
        import asyncssh

        c = self.connection
        if not c.verify_host_key:
            self.logger.warning(
                "Host key verification is OFF for %s (SSH Connection block setting); "
                "the connection can be intercepted.", c.describe()
            )
            return None
        if c.known_hosts and c.known_hosts.strip():
            text = c.known_hosts.strip()
            if "\n" not in text and os.path.isfile(os.path.expanduser(text)):
                return os.path.expanduser(text)
            if "\n" not in text and len(text.split()) < 3:  # a path, not a "host keytype key" line
                raise SSHError(
                    f"SSH host key of {c.host}:{c.port} is not trusted: the known hosts file {text!r} named "
                    f"in the SSH Connection block does not exist. Refusing to connect. {self._host_key_fix()}"
                )
            try:
                return asyncssh.import_known_hosts(c.known_hosts)
            except (ValueError, asyncssh.Error) as exc:
                raise SSHError(
                    f"the Known hosts of the SSH Connection block for {c.describe()} cannot be read: {exc}"
                ) from None
        path = os.path.expanduser("~/.ssh/known_hosts")
        if not os.path.isfile(path):
            # not a connection problem: retrying cannot help, so it is refused at once
            raise SSHError(
                f"SSH host key of {c.host}:{c.port} is not trusted: the SSH Connection block gives no "
                f"Known hosts and {path} does not exist. Refusing to connect. {self._host_key_fix()}"
            )
        return path

    async def _open(self, role: str, host: str, port: int, who: str, connect):
        """One asyncssh.connect, its failures told apart: refused (SSHError, final) or
        unreachable (SSHConnectError, retried)."""
        import asyncssh

        try:
            return await connect()
        except asyncssh.HostKeyNotVerifiable as exc:
            raise SSHError(
                f"SSH host key of {role}{host}:{port} is not trusted ({exc.reason}): it is not in the "
                f"known hosts given, or it changed. Refusing to connect. {self._host_key_fix()}"
            ) from None
        except asyncssh.PermissionDenied:
            raise SSHError(f"SSH authentication failed for {role}{who}: the key was refused") from None
        except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
            raise SSHConnectError(f"cannot connect to {role}{who}: {type(exc).__name__}: {exc}") from None

    async def _connect(self):
        """(connection, jump host connection or None)."""
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
        tunnel = None
        if c.jump_host:
            user, _, hostport = c.jump_host.rpartition("@")
            jhost, _, jport = hostport.partition(":")
            jport_n, juser = int(jport or 22), user or c.username
            tunnel = await self._open(
                "jump host ", jhost, jport_n, f"{juser}@{jhost}:{jport_n}",
                lambda: asyncssh.connect(jhost, **{**options, "port": jport_n, "username": juser}),
            )
        try:
            conn = await self._open("", c.host, c.port, c.describe(), lambda: asyncssh.connect(c.host, tunnel=tunnel, **options))
        except BaseException:
            if tunnel is not None:
                tunnel.close()  # not left open behind a failed attempt
            raise
        self.connects += 1
        return conn, tunnel

    async def _connection(self):
        async with self._lock:
            if self._conn is not None and not self._is_closed(self._conn) and (
                self._tunnel is None or not self._is_closed(self._tunnel)
            ):
                return self._conn
            if self._conn is not None:
                self.logger.warning("SSH connection to %s dropped; reconnecting", self.connection.describe())
            self._close_current()
            for attempt in range(1, self.connect_attempts + 1):
                try:
                    self._conn, self._tunnel = await self._connect()
                    return self._conn
                except SSHConnectError:
                    if attempt == self.connect_attempts:
                        raise  # transient for callers: the poller comes back next interval
                    await asyncio.sleep(2 ** (attempt - 1))

    def _close_current(self) -> None:
        """Close the connection and its jump host connection, without waiting."""
        for conn in (self._conn, self._tunnel):  # the tunneled one first, then its carrier
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
        self._conn = self._tunnel = None

    @staticmethod
    def _is_closed(conn) -> bool:
        if conn.is_closed():
            return True
        transport = getattr(conn, "_transport", None)
        return transport is None or transport.is_closing()

    async def home(self) -> str:
        if self._home is None:
            result = await self.run(["sh", "-c", 'printf "%s" "$HOME"'], timeout=self.command_timeout)
            self._home = result.stdout.strip() or "."
        return self._home

    async def expand_path(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            return (await self.home()) + path[1:]
        return path

    # -- commands ---------------------------------------------------------------
    async def run(self, argv: Sequence[str], *, stdin: str | None = None, env: Mapping[str, str] | None = None,
                  timeout: float = 60.0) -> CommandResult:
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
        for attempt in range(1, CHANNEL_OPEN_ATTEMPTS + 1):
            conn = await self._connection()
            waiting_for = argv[0]  # what a timeout names
            try:
                async with self._command_slots:
                    if self._login_node_has_timeout is None:
                        # Within the command's own timeout: the first command on a login
                        # node whose shell start is slow (a loaded node, a heavy ~/.bashrc)
                        # must not fail on the probe's account.
                        waiting_for = f"the probe for timeout(1) before {argv[0]}"
                        probe = await asyncio.wait_for(conn.run("command -v timeout", check=False), timeout)
                        self._login_node_has_timeout = probe.exit_status == 0
                        waiting_for = argv[0]
                    bounded = command
                    if self._login_node_has_timeout:
                        # Bounded on the login node too, a second after we give up: sshd frees
                        # a session channel only once its command has exited, and refuses to
                        # signal commands of root sessions.
                        bounded = f"timeout -k 5 {math.ceil(timeout) + 1} {command}"
                    completed = await asyncio.wait_for(_run_to_exit(conn, bounded, stdin), timeout)
            except asyncio.TimeoutError as exc:
                if getattr(exc, "errno", None) is None:  # ours, not a TCP ETIMEDOUT
                    raise TransientSchedulerError(f"{waiting_for} did not answer within {timeout:g} s (over SSH)") from None
                raise TransientSchedulerError(
                    f"SSH connection to {self.connection.describe()} lost during {waiting_for}: {exc}"
                ) from None
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError, asyncssh.ChannelOpenError, OSError) as exc:
                # a closed connection is replaced (with its jump host connection) by the
                # next _connection(); one still open is kept for the other commands on it
                if attempt < CHANNEL_OPEN_ATTEMPTS and isinstance(exc, asyncssh.ChannelOpenError):
                    if not self._is_closed(conn):
                        await asyncio.sleep(attempt)  # e.g. the server's MaxSessions: wait for a free one
                    continue  # the channel never opened: the command did not run; try again
                raise TransientSchedulerError(
                    f"SSH connection to {self.connection.describe()} lost during {argv[0]}: {exc}"
                ) from None
            returncode = completed.exit_status if completed.exit_status is not None else -1
            return CommandResult(list(argv), returncode, _text(completed.stdout), _text(completed.stderr))
        raise TransientSchedulerError(f"cannot open an SSH channel to {self.connection.describe()}")

    # -- files (SFTP) -----------------------------------------------------------
    async def _sftp(self, action: str, path: str, operation):
        """Run `operation(sftp)` in an SFTP session, within command_timeout. The
        operations are idempotent, so when the connection drops they are retried on a
        new one, with run()'s backoff; what still fails is a TransientSchedulerError
        naming the host and the path."""
        import asyncssh

        where = f"{path} on {self.connection.describe()}"
        last: BaseException | None = None
        for attempt in range(1, self.connect_attempts + 1):
            try:
                conn = await self._connection()
            except SSHConnectError as exc:
                raise SSHConnectError(f"cannot {action} {where}: {exc}") from None
            sftp = None
            try:
                sftp = await asyncio.wait_for(self._sftp_client(conn), self.command_timeout)
                return await asyncio.wait_for(operation(sftp), self.command_timeout)
            except asyncio.TimeoutError as exc:
                self._drop_sftp(sftp)  # a session that stopped answering is not asked again
                if getattr(exc, "errno", None) is None:  # ours, not a TCP ETIMEDOUT
                    raise TransientSchedulerError(
                        f"cannot {action} {where}: no answer within {self.command_timeout:g} s"
                    ) from None
                last = exc
            except asyncssh.SFTPError as exc:
                if not _sftp_connection_error(exc):
                    # the server's answer (permission denied, no space...): retrying cannot help
                    raise TransientSchedulerError(f"cannot {action} {where}: {type(exc).__name__}: {exc}") from None
                self._drop_sftp(sftp)
                last = exc
            except (asyncssh.Error, OSError, EOFError) as exc:
                self._drop_sftp(sftp)
                last = exc  # connection lost, reset, channel not opened
            self.logger.warning(
                "SSH connection to %s failed during an attempt to %s %s (%s: %s)",
                self.connection.describe(), action, path, type(last).__name__, last,
            )
            if attempt < self.connect_attempts:
                await asyncio.sleep(2 ** (attempt - 1))
        raise TransientSchedulerError(
            f"cannot {action} {where} after {self.connect_attempts} attempts: {type(last).__name__}: {last}"
        )

    async def _sftp_client(self, conn):
        """The SFTP session on `conn`, opened on first use."""
        async with self._sftp_lock:
            if self._sftp_session is not None:
                if self._sftp_session[0] is conn:
                    return self._sftp_session[1]
                self._drop_sftp()  # it belonged to a connection since replaced
            sftp = await conn.start_sftp_client()
            self._sftp_session = (conn, sftp)
            return sftp

    def _drop_sftp(self, sftp: Any = None) -> None:
        """End the shared SFTP session (only if it is still `sftp`, when given); the next
        operation opens a new one. Ending it also closes on the server any file an
        interrupted operation left open."""
        if self._sftp_session is None or (sftp is not None and self._sftp_session[1] is not sftp):
            return
        _, client = self._sftp_session
        self._sftp_session = None
        try:
            client.exit()
        except Exception:
            pass

    async def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write the whole file (so a retry after a dropped connection is harmless),
        creating its directory. The file never holds a byte of `text` under another
        mode than `mode`: it is created with it, or truncated and chmod'ed first."""
        import asyncssh

        parent = path.rsplit("/", 1)[0] if "/" in path else ""

        async def write(sftp) -> None:
            if parent:
                await sftp.makedirs(parent, exist_ok=True)
            async with _open(sftp, path, "w", attrs=_sftp_attrs(mode)) as f:
                try:  # an existing file, now empty, gets the mode before the text
                    await f.chmod(mode)
                except asyncssh.SFTPOpUnsupported:
                    await sftp.chmod(path, mode)
                await f.write(text)

        await self._sftp("write", path, write)

    async def read_tail(self, path: str, max_bytes: int = 4000) -> str | None:
        """The last max_bytes of the file; None if it is missing or unreadable."""
        import asyncssh

        async def read(sftp) -> str | None:
            try:
                async with _open(sftp, path, "rb") as f:
                    size = (await f.stat()).size or 0
                    await f.seek(max(0, size - max_bytes))
                    data = await f.read(max_bytes)
            except asyncssh.SFTPError as exc:
                if _sftp_connection_error(exc):
                    raise
                if not isinstance(exc, asyncssh.SFTPNoSuchFile):
                    self.logger.warning("cannot read %s on %s: %s", path, self.connection.describe(), exc)
                return None
            return data.decode(errors="replace")

        return await self._sftp("read", path, read)

    async def read_from(self, path: str, offset: int, max_bytes: int = 1 << 20) -> bytes | None:
        import asyncssh

        async def read(sftp) -> bytes | None:
            try:
                async with _open(sftp, path, "rb") as f:
                    await f.seek(offset)
                    data = await f.read(max_bytes)
            except asyncssh.SFTPError as exc:
                if _sftp_connection_error(exc):
                    raise
                if not isinstance(exc, (asyncssh.SFTPNoSuchFile, asyncssh.SFTPEOFError)):
                    self.logger.warning("cannot read %s on %s: %s", path, self.connection.describe(), exc)
                return b"" if isinstance(exc, asyncssh.SFTPEOFError) else None
            return data or b""

        return await self._sftp("read", path, read)

    async def close(self) -> None:
        self._drop_sftp()
        async with self._lock:  # not while a reconnect is under way: its connection would stay open
            conn, tunnel = self._conn, self._tunnel
            self._conn = self._tunnel = None
        for c in (conn, tunnel):  # the tunneled connection first: its goodbye travels in the tunnel
            if c is None:
                continue
            try:
                c.close()
                await asyncio.wait_for(c.wait_closed(), 10)
            except Exception:  # a peer that does not answer does not hold the worker
                try:
                    c.abort()
                except Exception:
                    pass


def _sftp_connection_error(exc: BaseException) -> bool:
    """An SFTPError that says the connection (not the file system) failed."""
    import asyncssh

    return isinstance(exc, (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection))


@contextlib.asynccontextmanager
async def _open(sftp, path: str, mode: str, **kwargs):
    """A file on the shared SFTP session. The session outlives the operation, so a file
    error (no such file, EOF) closes the handle; a timeout or a lost connection does not
    wait for the peer: the caller drops the session, which closes it on the server."""
    import asyncssh

    f = await sftp.open(path, mode, **kwargs)
    try:
        yield f
    except asyncssh.SFTPError as exc:
        if not _sftp_connection_error(exc):
            try:
                await f.close()
            except Exception:
                pass
        raise
    await f.close()


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _sftp_attrs(mode: int):
    import asyncssh

    return asyncssh.SFTPAttrs(permissions=mode)


async def _run_to_exit(conn, command: str, stdin: str | None):
    """conn.run(), but a command given up on (timeout, cancellation) does not keep its
    channel of the shared connection open. It is also sent SIGKILL, which OpenSSH delivers
    in a user's session (not in a root one: no privilege separation there)."""
    process = await conn.create_process(command, input=stdin)
    try:
        return await process.wait(check=False)
    except BaseException:
        if process.exit_status is None:
            try:
                process.kill()
            except Exception:  # the channel may be gone with the connection
                pass
        process.close()
        raise
