"""prefect-xm: XManager-style experiments on Prefect 3, and Prefect workers for batch schedulers.

``from prefect_xm import xm, xm_local, hyper`` (loaded lazily).
"""

import importlib as _importlib

# Eager, so `prefect block register -m prefect_xm` finds the blocks.
from prefect_xm.blocks import SSHConnection  # noqa: E402,F401

__all__ = ["SSHConnection", "hyper", "xm", "xm_local"]

_LAZY = ("xm", "xm_local", "hyper")


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
