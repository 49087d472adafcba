"""The SSH transport against a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import json
import os
import signal
import stat
import sys
import threading
import uuid
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from conftest import free_port, require_service, wait_for
from prefect_xm.blocks.ssh import SSHConnection
from prefect_xm.workers.scheduler import TransientSchedulerError
from prefect_xm.workers.transport import SSHConnectError, SSHError, SSHTransport
from sshd import SSHServer, keygen, sshd_available

pytestmark = pytest.mark.e2e


@pytest.fixture
def sshd(tmp_path):
    require_service("sshd", sshd_available(), "apt-get install openssh-server (scripts/test.sh does)")
    server = SSHServer(tmp_path / "sshd").start()
    yield server
    server.stop()


def transport(server: SSHServer, **overrides) -> SSHTransport:
    return SSHTransport(SSHConnection(**server.block_fields(**overrides)))


NASTY = ["a b", "it's", 'say "hi"', "$(touch /tmp/pxm-pwned)", "`touch /tmp/pxm-pwned`", "a;touch /tmp/pxm-pwned",
         "line1\nline2", "*", "~", "$HOME", "", "--flag=x y"]


async def test_argv_reaches_the_remote_program_byte_for_byte(sshd):
    t = transport(sshd)
    marker = Path("/tmp/pxm-pwned")
    marker.unlink(missing_ok=True)
    r = await t.run([sys.executable, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *NASTY])
    assert r.ok, r.stderr
    assert json.loads(r.stdout) == NASTY
    assert not marker.exists()
    await t.close()


async def test_a_command_that_overruns_its_timeout_is_ended_on_the_login_node(sshd, tmp_path):
    """A scheduler command stuck on the login node (a hung sbatch) does not keep running
    there, holding a channel of the one shared connection (sshd's MaxSessions), after the
    worker gave up on it."""
    t = transport(sshd)
    pidfile = tmp_path / "stuck.pid"
    # (long enough for the command to start on a loaded machine: it must be running to overrun)
    with pytest.raises(TransientSchedulerError, match="did not answer within 10 s"):
        await t.run(["sh", "-c", 'echo $$ > "$0"; exec sleep 300', str(pidfile)], timeout=10)
    pid = int(pidfile.read_text())
    conn = await t._connection()
    deadline = time.monotonic() + 30
    while conn._channels and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not conn._channels, conn._channels
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    r = await t.run(["sh", "-c", "read line; echo got $line"], stdin="x\n", timeout=30)
    assert r.ok and r.stdout == "got x\n", r  # the connection is kept; stdin still reaches commands
    await t.close()


async def test_one_connection_for_many_commands_and_files(sshd, tmp_path):
    t = transport(sshd)
    for i in range(20):
        assert (await t.run(["true"])).ok
    await t.write_file(str(tmp_path / "remote" / "job.sh"), "echo hi\n", 0o700)
    assert (tmp_path / "remote" / "job.sh").stat().st_mode & 0o777 == 0o700
    (tmp_path / "err").write_text("".join(f"line {i}\n" for i in range(1000)))
    tail = await t.read_tail(str(tmp_path / "err"), 100)
    assert tail.endswith("line 999\n") and len(tail) <= 100
    assert await t.read_tail(str(tmp_path / "missing")) is None
    assert t.connects == 1 and sshd.accepted() == 1
    await t.close()


async def test_a_burst_of_commands_and_files_fits_sshds_default_session_limit(tmp_path):
    """A sweep's worth of work at once (an array's files, every running job's output,
    status and cancel commands) on one connection to an sshd with OpenSSH's default
    MaxSessions (10): every file operation is a request on one SFTP session, commands
    wait for a free channel, nothing fails."""
    require_service("sshd", sshd_available(), "apt-get install openssh-server (scripts/test.sh does)")
    server = SSHServer(tmp_path / "sshd", max_sessions=10).start()
    try:
        t = transport(server)
        remote = tmp_path / "remote"
        writes = [t.write_file(str(remote / f"run-{i}" / "job.argv"), f"trial {i}\n", 0o600) for i in range(100)]
        commands = [t.run(["sh", "-c", "sleep 0.2; echo $0", str(i)]) for i in range(30)]
        results = await asyncio.gather(*writes, *commands)
        assert [r.stdout for r in results[100:]] == [f"{i}\n" for i in range(30)]
        reads = await asyncio.gather(*(t.read_from(str(remote / f"run-{i}" / "job.argv"), 0) for i in range(100)))
        assert reads == [f"trial {i}\n".encode() for i in range(100)]
        assert t.connects == 1 and server.accepted() == 1
        assert server.sftp_sessions() == 1, server.sftp_sessions()
        await t.close()
    finally:
        server.stop()


def _text_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:  # removed meanwhile by the command that wrote it
        return ""


async def test_environment_travels_in_a_private_file_not_the_command_line(sshd):
    t = transport(sshd)
    # this run's own secret: an interrupted earlier run may have left a file of its own
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    r = await t.run([sys.executable, "-c", "import os; print(os.environ['PXM_SECRET'])"],
                    env={"PXM_SECRET": f"{secret} value"})
    assert r.stdout.strip() == f"{secret} value"
    assert secret not in sshd.log.read_text()
    home = await t.home()
    # removed after use (other tests' commands may have files of their own there meanwhile)
    assert not [p for p in Path(home, ".prefect-xm", "env").glob("*") if secret in _text_or_empty(p)]
    await t.close()


async def test_reconnects_after_sshd_restart(sshd):
    t = transport(sshd)
    assert (await t.run(["true"])).ok
    sshd.restart()
    r = None
    for _ in range(5):  # the first command may find the old connection dead: transient
        try:
            r = await t.run(["echo", "back"])
            break
        except Exception as exc:
            assert "lost" in str(exc) or "connect" in str(exc)
    assert r is not None and r.stdout == "back\n"
    assert t.connects == 2
    await t.close()


async def test_wrong_host_key_is_refused(sshd, tmp_path):
    other = keygen(tmp_path / "other_host")
    k = (tmp_path / "other_host.pub").read_text().split()
    t = transport(sshd, known_hosts=f"[127.0.0.1]:{sshd.port} {k[0]} {k[1]}\n")
    with pytest.raises(SSHError, match="host key .* not trusted"):
        await t.run(["true"])
    assert other.exists()


async def test_unknown_host_is_refused_and_verification_off_is_a_warning(sshd, caplog):
    t = transport(sshd, known_hosts=None)
    t.connection.known_hosts = str(Path(sshd.root) / "empty_known_hosts")
    Path(t.connection.known_hosts).write_text("")
    with pytest.raises(SSHError, match="not trusted"):
        await t.run(["true"])
    t = transport(sshd, verify_host_key=False)
    assert (await t.run(["true"])).ok
    assert "verification is OFF" in caplog.text
    await t.close()


async def test_wrong_user_key_is_refused_without_printing_it(sshd, tmp_path):
    keygen(tmp_path / "stranger")
    key_text = (tmp_path / "stranger").read_text()
    t = transport(sshd, private_key_path=None, private_key=SecretStr(key_text))
    with pytest.raises(SSHError, match="authentication failed") as info:
        await t.run(["true"])
    body = key_text.splitlines()[1]
    assert body not in str(info.value) and body not in repr(t.connection)
    assert "stranger" not in str(info.value)


async def test_closed_port_is_a_clear_connect_error(sshd):
    t = transport(sshd, port=sshd.port)
    sshd.stop()
    with pytest.raises(SSHConnectError, match="cannot connect to .*127.0.0.1"):
        await t.run(["true"])
    assert SSHConnectError.command_ran is False


# -- files over a connection that drops ------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_write_file_after_sshd_restart_reconnects_and_writes_exactly_once(sshd, tmp_path):
    """A submission that coincides with an sshd restart: job.env is written on the old
    connection, job.sh after the restart, without an error reaching the worker."""
    t = transport(sshd)
    remote = tmp_path / "remote"
    await t.write_file(str(remote / "job.env"), "PREFECT_API_KEY='pnu_x'\n", 0o600)
    sshd.restart()  # kills every session too, like a reboot of the login node
    await t.write_file(str(remote / "job.sh"), "#!/bin/sh\necho hi\n", 0o700)
    assert sorted(p.name for p in remote.iterdir()) == ["job.env", "job.sh"]
    assert (remote / "job.env").read_text() == "PREFECT_API_KEY='pnu_x'\n" and mode_of(remote / "job.env") == 0o600
    assert (remote / "job.sh").read_text() == "#!/bin/sh\necho hi\n" and mode_of(remote / "job.sh") == 0o700
    assert t.connects == 2 and sshd.accepted() == 2
    await t.close()


async def test_write_file_interrupted_by_sshd_crash_is_rewritten_whole_and_never_readable(sshd, tmp_path):
    """sshd is killed while the file is being written: the write is retried on a new
    connection; the file ends with exactly the text, and no byte of it was ever there
    under another mode than 0600."""
    t = transport(sshd)
    await t.write_file(str(tmp_path / "warm-up"), "", 0o600)  # connected before the clock starts
    target = tmp_path / "remote" / "job.env"
    text = "".join(f"SECRET_{i}={i:060d}\n" for i in range(400_000))  # ~30 MB: the write takes a while
    seen: list[tuple[int, int]] = []  # (size, mode) of the file, sampled during the write
    stop = threading.Event()
    killed_at: list[int] = []

    def watch() -> None:
        while not stop.is_set():
            try:
                st = target.stat()
            except FileNotFoundError:
                continue
            seen.append((st.st_size, stat.S_IMODE(st.st_mode)))
            if not killed_at and 0 < st.st_size < len(text) // 2:
                killed_at.append(st.st_size)
                sshd.restart()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        await t.write_file(str(target), text, 0o600)
    finally:
        stop.set()
        watcher.join(60)
    assert killed_at, "sshd was not killed during the write; make the text larger"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(text.encode()).hexdigest()
    assert mode_of(target) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["job.env"]
    assert {mode for size, mode in seen if size > 0} == {0o600}
    assert t.connects == 2
    await t.close()


async def test_existing_file_is_emptied_and_chmoded_before_the_secret_goes_in(sshd, tmp_path):
    """An old 0644 file at the path never shows any of the new text under 0644."""
    t = transport(sshd)
    target = tmp_path / "job.env"
    target.write_text("old")
    target.chmod(0o644)
    text = "K=" + "s" * 20_000_000 + "\n"
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            st = target.stat()
            seen.append((st.st_size, stat.S_IMODE(st.st_mode)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        await t.write_file(str(target), text, 0o600)
    finally:
        stop.set()
        watcher.join(60)
    assert target.read_text() == text and mode_of(target) == 0o600
    assert any(size > 3 for size, _ in seen), "the write was too fast to watch"
    assert {mode for size, mode in seen if size > 3} == {0o600}
    await t.close()


async def test_files_when_sshd_stays_down_are_transient_errors_naming_host_and_path(sshd, tmp_path):
    t = transport(sshd)
    await t.write_file(str(tmp_path / "a"), "a", 0o600)
    sshd.stop()
    started = time.monotonic()
    with pytest.raises(TransientSchedulerError) as info:
        await t.write_file(str(tmp_path / "job.sh"), "echo hi\n", 0o700)
    message = str(info.value)
    assert f"write {tmp_path / 'job.sh'} on" in message and f"127.0.0.1:{sshd.port}" in message
    assert "PRIVATE KEY" not in message and sshd.user_key.read_text().splitlines()[1] not in message
    with pytest.raises(TransientSchedulerError, match=f"read {tmp_path / 'a'} on .*127.0.0.1:{sshd.port}"):
        await t.read_tail(str(tmp_path / "a"))
    assert time.monotonic() - started < 30  # backoff 1 s, 2 s: retried, but not for long
    assert not (tmp_path / "job.sh").exists()


async def test_a_refusal_of_the_file_system_is_not_retried(sshd, tmp_path):
    """Not a connection problem (here: the parent is a file): one clear error at once."""
    t = transport(sshd)
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(TransientSchedulerError, match=f"cannot write {tmp_path}/not-a-dir/job.sh on .*: SFTP"):
        await t.write_file(str(tmp_path / "not-a-dir" / "job.sh"), "x", 0o700)
    assert t.connects == 1  # no reconnection, no retry
    assert await t.read_tail(str(tmp_path / "not-a-dir" / "job.err")) is None
    await t.close()


async def test_the_first_command_is_not_held_to_the_file_operations_timeout(sshd):
    """The first command on a connection probes the login node for timeout(1); the probe
    belongs to that command and runs within its timeout, not within command_timeout (the
    bound on file operations), which a slow login shell start can exceed."""
    t = transport(sshd)
    t.command_timeout = 0.001  # below any round trip: a probe held to it always fails
    assert (await t.run(["echo", "first"], timeout=60)).stdout == "first\n"
    assert t._login_node_has_timeout is True
    await t.close()


async def test_a_peer_that_stopped_answering_does_not_hang_files_or_commands(sshd, tmp_path):
    """Keepalives off, the login node's sshd frozen (SIGSTOP: the TCP connection stays up,
    nothing answers): every operation ends after the transport's command timeout."""
    t = transport(sshd, keepalive_interval=0)
    t.command_timeout = 2
    assert (await t.run(["true"])).ok
    frozen = sshd.session_pids()
    assert frozen
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(TransientSchedulerError, match=f"cannot write {tmp_path}/job.sh on .*no answer within 2 s"):
            await t.write_file(str(tmp_path / "job.sh"), "x", 0o700)
        with pytest.raises(TransientSchedulerError, match="no answer within 2 s"):
            await t.read_tail(str(tmp_path / "job.err"))
        with pytest.raises(TransientSchedulerError, match="did not answer within 2 s"):
            await t.expand_path("~/prefect-xm")
        await t.close()
        assert time.monotonic() - started < 30
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


# -- keys, jump hosts, host keys -------------------------------------------------------


@pytest.mark.parametrize("key_format", ["openssh", "pem"])
async def test_passphrase_protected_key_connects_and_a_wrong_passphrase_is_clear(sshd, tmp_path, key_format):
    passphrase = "correct horse battery staple"
    options = () if key_format == "openssh" else ("-t", "ecdsa", "-m", "PEM")
    key = keygen(tmp_path / "locked", "locked", passphrase, *options)
    sshd.authorize(tmp_path / "locked.pub")
    key_text = key.read_text()

    t = transport(sshd, private_key_path=str(key), passphrase=SecretStr(passphrase))
    assert (await t.run(["echo", "unlocked"])).stdout == "unlocked\n"
    await t.close()
    t = transport(sshd, private_key_path=None, private_key=SecretStr(key_text), passphrase=SecretStr(passphrase))
    assert (await t.run(["echo", "unlocked"])).stdout == "unlocked\n"
    await t.close()

    accepted = sshd.accepted()
    for fields in (dict(private_key_path=str(key), passphrase=SecretStr("wrong horse")),
                   dict(private_key_path=None, private_key=SecretStr(key_text), passphrase=SecretStr("wrong horse"))):
        t = transport(sshd, **fields)
        with pytest.raises(SSHError, match="private key for .* cannot be used: .*(passphrase|decrypt).*check .* Key passphrase") as info:
            await t.run(["true"])
        assert not isinstance(info.value, TransientSchedulerError)  # not retried
        shown = str(info.value) + repr(info.value) + repr(t.connection)
        assert "horse" not in shown
        assert all(line not in shown for line in key_text.splitlines() if len(line) >= 40)  # the base64 body
    t = transport(sshd, private_key_path=str(key))  # no passphrase at all
    with pytest.raises(SSHError, match="cannot be used: .*Passphrase must be specified.*Key passphrase"):
        await t.run(["true"])
    assert sshd.accepted() == accepted  # refused before connecting


async def test_jump_host_connection_is_kept_and_closed_with_the_one_it_carries(sshd):
    """127.0.0.1 -> 127.0.0.1 through the same sshd as jump host: two connections,
    replaced together when the tunneled one dies, and none left after close()."""
    t = transport(sshd, jump_host=f"{getpass.getuser()}@127.0.0.1:{sshd.port}")
    r = await t.run(["echo", "via the jump host"])
    assert r.stdout == "via the jump host\n"
    assert sshd.accepted() == 2 and t.connects == 1
    assert sshd.open_connections() == 2

    # the login node's session of the tunneled connection dies; the jump host's stays up
    ours = sshd.client_ports(os.getpid())
    assert len(ours) == 1  # the jump host connection; the other one starts at the jump host
    tunneled = [p for p in sshd.client_ports() if p not in ours]
    assert len(tunneled) == 1
    sshd.drop_connection(tunneled[0])
    r = None
    for _ in range(5):  # the first command may find the dying connection: transient
        try:
            r = await t.run(["echo", "again"])
            break
        except TransientSchedulerError as exc:
            assert "lost" in str(exc) or "connect" in str(exc)
            await asyncio.sleep(0.5)
    assert r is not None and r.stdout == "again\n"
    assert t.connects == 2 and sshd.accepted() == 4  # a new jump host connection and a new tunneled one
    # ... and the old jump host connection was closed, not left behind
    wait_for(lambda: sshd.open_connections() == 2, 20, interval=0.2, what="the old jump host connection to close")
    assert len(sshd.client_ports(os.getpid())) == 1

    await t.close()
    wait_for(lambda: sshd.open_connections() == 0, 20, interval=0.2, what="every connection to close")
    assert sshd.client_ports(os.getpid()) == []


async def test_jump_host_connection_is_closed_when_the_target_cannot_be_reached(sshd):
    t = transport(sshd, port=free_port(), jump_host=f"127.0.0.1:{sshd.port}")
    with pytest.raises(SSHConnectError, match="cannot connect to .*127.0.0.1"):
        await t.run(["true"])
    assert sshd.accepted() == t.connect_attempts  # the jump host, once per attempt
    wait_for(lambda: sshd.open_connections() == 0, 20, interval=0.2, what="the jump host connections to close")


async def test_no_known_hosts_anywhere_is_a_clear_refusal_not_retried(sshd, tmp_path, monkeypatch):
    home = tmp_path / "empty-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    t = transport(sshd, known_hosts=None)
    for attempt in (t.run(["true"]), t.write_file(str(tmp_path / "job.sh"), "x", 0o700)):
        with pytest.raises(SSHError) as info:
            await attempt
        message = str(info.value)
        assert not isinstance(info.value, TransientSchedulerError), message
        assert f"host key of 127.0.0.1:{sshd.port} is not trusted" in message
        assert f"{home}/.ssh/known_hosts does not exist" in message and "Refusing to connect" in message
        assert "Known hosts" in message and f"ssh-keyscan -p {sshd.port} 127.0.0.1" in message
    assert "Connection from" not in sshd.log.read_text()  # refused before connecting: nothing to retry

    t = transport(sshd, known_hosts=str(tmp_path / "missing_known_hosts"))
    with pytest.raises(SSHError, match="known hosts file .*missing_known_hosts.* does not exist"):
        await t.run(["true"])
    assert not (tmp_path / "job.sh").exists()
