"""The SSH transport against a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from conftest import require_service
from prefect_xm.blocks.ssh import SSHConnection
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


async def test_environment_travels_in_a_private_file_not_the_command_line(sshd):
    t = transport(sshd)
    r = await t.run([sys.executable, "-c", "import os; print(os.environ['PXM_SECRET'])"], env={"PXM_SECRET": "s3cr3t value"})
    assert r.stdout.strip() == "s3cr3t value"
    assert "s3cr3t" not in sshd.log.read_text()
    home = await t.home()
    assert list(Path(home, ".prefect-xm", "env").glob("*")) == []  # removed after use
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
