"""Slurm's syntax for values both sides check: the launcher's executor (executors.py)
before a job is sent, the xm-slurm worker (workers/slurm.py) on its job variables. One
definition, so both accept the same values; a module of its own, so the launcher checks
without loading the workers."""

from __future__ import annotations

import re

#: --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit (Slurm reads
#: UNLIMITED and INFINITE in any case)
TIME = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
    r"|UNLIMITED|INFINITE|unlimited|infinite)$"
)
