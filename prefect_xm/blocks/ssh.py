"""The SSH connection to a cluster's login node, as a Prefect block.

Create it in the UI (Blocks -> SSH Connection) or in Python, then name it in a batch
pool's `ssh_block` job variable: the worker then runs every scheduler command on the
login node over one reused connection (prefect_xm/workers/transport.py).

Secrets (the private key, its passphrase) are SecretStr: they are stored encrypted by
the Prefect server and never appear in logs, error messages or rendered scripts.
"""

from __future__ import annotations

import re
from typing import Optional

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator


class SSHConnection(Block):
    """How to reach a cluster's login node over SSH."""

    _block_type_name = "SSH Connection"
    _block_type_slug = "xm-ssh-connection"
    _logo_url = "https://www.openssh.com/images/openssh.gif"
    _description = (
        "SSH access to a cluster's login node, used by prefect-xm batch workers to run "
        "sbatch/qsub/bsub/condor_submit there. Host keys are verified by default."
    )
    _documentation_url = "https://github.com/prefect-xm/prefect-xm#submit-from-anywhere-ssh"

    host: str = Field(title="Host", description="Login node host name or address.")
    port: int = Field(default=22, ge=1, le=65535, title="Port")
    username: str = Field(title="User name", description="The cluster account jobs are submitted as.")
    private_key: Optional[SecretStr] = Field(
        default=None,
        title="Private key",
        description="The private key itself (OpenSSH or PEM text). Stored encrypted; never logged.",
    )
    private_key_path: Optional[str] = Field(
        default=None,
        title="Private key file",
        description="Path to the private key on the worker's machine (used if no key text is given).",
    )
    passphrase: Optional[SecretStr] = Field(
        default=None, title="Key passphrase", description="Passphrase of an encrypted private key."
    )
    known_hosts: Optional[str] = Field(
        default=None,
        title="Known hosts",
        description="known_hosts lines for the login node (or a path to such a file). Empty: ~/.ssh/known_hosts.",
    )
    verify_host_key: bool = Field(
        default=True,
        title="Verify host key",
        description="Refuse hosts whose key is not in known hosts. Turning this off is logged as a warning.",
    )
    jump_host: Optional[str] = Field(
        default=None,
        title="Jump host",
        description="A bastion to tunnel through, as [user@]host[:port] (same key and host-key checks).",
    )
    connect_timeout: float = Field(default=15.0, gt=0, title="Connect timeout (s)")
    keepalive_interval: float = Field(
        default=30.0, ge=0, title="Keepalive interval (s)", description="0 disables keepalives."
    )

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v):
            raise ValueError(f"host: {v!r} must be a host name without spaces")
        return v

    @field_validator("jump_host")
    @classmethod
    def _jump_host(cls, v: Optional[str]) -> Optional[str]:
        if v and not re.match(r"^(?:[^@\s]+@)?[^:@\s]+(?::\d+)?$", v):
            raise ValueError(f"jump_host: {v!r} is not [user@]host[:port]")
        return v

    def describe(self) -> str:
        """user@host:port, for messages (never anything secret)."""
        return f"{self.username}@{self.host}:{self.port}"
