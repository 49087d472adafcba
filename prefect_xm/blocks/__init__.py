"""Prefect blocks of prefect-xm (`prefect block register -m prefect_xm` registers them)."""

from prefect_xm.blocks.ssh import SSHConnection

__all__ = ["SSHConnection"]
