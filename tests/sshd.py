"""A real OpenSSH server (Debian's openssh-server) on 127.0.0.1, for the SSH tests.

Each SSHServer has its own generated host key, an authorized user key, its own port
and a VERBOSE log, from which tests count accepted connections."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from conftest import free_port, wait_for

SSHD = "/usr/sbin/sshd"


def sshd_available() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None


def keygen(path: Path, comment: str = "prefect-xm-test", passphrase: str = "", *options: str) -> Path:
    """An ed25519 key pair (OpenSSH format; `options` e.g. "-t", "ecdsa", "-m", "PEM")."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", comment, *options, "-f", str(path)],
                   check=True)
    return path


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    children = [int(p) for p in out]
    return [d for c in children for d in descendants(c)] + children


class SSHServer:
    def __init__(self, root: Path, session_path: str | None = None, max_sessions: int = 50):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = keygen(root / "host_key", "host")
        self.user_key = keygen(root / "user_key", "user")
        self.authorized = root / "authorized_keys"
        self.authorized.write_text((root / "user_key.pub").read_text())
        self.authorized.chmod(0o600)
        self.log = root / "sshd.log"
        self.config = root / "sshd_config"
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
            f"MaxSessions {max_sessions}",
            "MaxStartups 50",
        ]
        # Debian's bash sources ~/.bashrc for a command over SSH; where that runs pyenv's
        # rehash (these machines' root), a session killed mid-rehash (sshd restarted,
        # stopped) leaves its lock, and every later command waited 60 s for it
        env = ["PYENV_REHASH_TIMEOUT=1"]
        if session_path:
            # the login node's PATH (e.g. wrappers that count scheduler calls)
            env.insert(0, f"PATH={session_path}")
        lines.append("SetEnv " + " ".join(env))
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory

    @property
    def known_hosts(self) -> str:
        key = (self.root / "host_key.pub").read_text().split()
        return f"[127.0.0.1]:{self.port} {key[0]} {key[1]}\n"

    def start(self) -> "SSHServer":
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.config), "-E", str(self.log)], start_new_session=True
        )
        wait_for(self._listening, 30, interval=0.2, what=f"sshd on port {self.port}")
        return self

    def _listening(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"sshd exited {self.proc.returncode}: {self.log.read_text() if self.log.exists() else ''}")
        return self.log.exists() and f"Server listening on 127.0.0.1 port {self.port}" in self.log.read_text()

    def stop(self) -> None:
        """Stop the listener AND drop every open connection (a `systemctl restart ssh`
        alone keeps sessions alive; a reboot or a crash of the login node does not)."""
        if self.proc and self.proc.poll() is None:
            for pid in [*descendants(self.proc.pid), self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(20)

    def restart(self) -> None:
        self.stop()
        self.start()

    def accepted(self) -> int:
        """Connections sshd accepted (one per successful authentication)."""
        return self.log.read_text().count("Accepted publickey")

    def sftp_sessions(self) -> int:
        """SFTP sessions sshd started."""
        return self.log.read_text().count("subsystem 'sftp'")

    def authorize(self, public_key: Path) -> None:
        """Accept one more user key."""
        with self.authorized.open("a") as f:
            f.write(public_key.read_text())

    def _established(self, where: str) -> list[list[str]]:
        """`ss` rows (Recv-Q, Send-Q, local, peer, process) of established TCP connections."""
        out = subprocess.run(["ss", "-tnpH", "state", "established", where], capture_output=True, text=True,
                             check=True).stdout
        return [line.split(None, 4) for line in out.splitlines() if line.strip()]

    def open_connections(self) -> int:
        """TCP connections open to this server now (its own ends of them)."""
        return len(self._established(f"( sport = :{self.port} )"))

    def client_ports(self, pid: int | None = None) -> list[int]:
        """Local ports of the connections open to this server from process `pid` (any)."""
        return [int(row[2].rsplit(":", 1)[1]) for row in self._established(f"( dport = :{self.port} )")
                if pid is None or f"pid={pid}," in row[-1]]

    def drop_connection(self, client_port: int) -> list[int]:
        """Kill the sshd processes serving the connection from `client_port` (as the OOM
        killer or an admin would), leaving the others up. Returns their pids."""
        pids = {int(p) for row in self._established(f"( sport = :{self.port} and dport = :{client_port} )")
                for p in re.findall(r"pid=(\d+)", row[-1])}
        assert pids, f"no connection from port {client_port}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return sorted(pids)

    def session_pids(self) -> list[int]:
        """The per-connection sshd processes (and what they run), not the listener."""
        return descendants(self.proc.pid) if self.proc else []

    def commands(self) -> int:
        """Commands run (one SSH session each), over all connections."""
        return self.log.read_text().count("Starting session: command")

    def block_fields(self, **overrides) -> dict:
        fields = dict(
            host="127.0.0.1",
            port=self.port,
            username=getpass.getuser(),
            private_key_path=str(self.user_key),
            known_hosts=self.known_hosts,
            connect_timeout=5,
        )
        fields.update(overrides)
        return fields
