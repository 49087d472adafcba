"""JobRequirements in a batch scheduler's words: the units and refusals every scheduler's
mapping shares. Each scheduler module maps requirements to its own job variables with
these (``requirements_variables`` and ``time_limit`` beside its worker), and the
executors of ``prefect_xm.executors`` call that mapping.
"""

from __future__ import annotations

import datetime
import math
from typing import Any, Optional, Sequence

from prefect_xm.core.resources import GiB, KiB, MiB, TiB, JobRequirements

#: binary units, largest first, with the suffixes most schedulers read (1 K = 1024 bytes)
BINARY_UNITS = ((TiB, "T"), (GiB, "G"), (MiB, "M"), (KiB, "K"))


def limit_seconds(value: Any, field: str) -> Optional[int]:
    """An int of minutes or a timedelta, in whole seconds (rounded up); None for a str,
    which is already in the scheduler's own syntax (its job variable checks it)."""
    if isinstance(value, str):
        return None
    if isinstance(value, datetime.timedelta):
        seconds = int(math.ceil(value.total_seconds()))
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = value * 60
    else:
        raise ValueError(f"{field}: expected a time in the scheduler's syntax (str), an int of minutes "
                         f"or a datetime.timedelta, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"{field} must be positive, got {value!r}")
    return seconds


def hours_minutes_seconds(seconds: int) -> str:
    """'H:MM:SS', hours past 24 included: SGE's h_rt, PBS's walltime, HTCondor's limit."""
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def hours_minutes_seconds_limit(value: Any) -> str:
    """A time limit as 'H:MM:SS' (SGE's h_rt, PBS's walltime, HTCondor's run-time limit)
    from an int of minutes, a timedelta, or a str already in the scheduler's syntax."""
    seconds = limit_seconds(value, "time")
    return value.strip() if seconds is None else hours_minutes_seconds(seconds)


def with_unit(num_bytes: int, units: Sequence[tuple[int, str]] = BINARY_UNITS) -> str:
    """Bytes in the largest unit that divides them, else whole MiB rounded up:
    16 GiB -> '16G', 1.5 GiB -> '1536M' (suffixes as ``units`` gives them)."""
    for unit, suffix in units:
        if num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    mib = dict((unit, suffix) for unit, suffix in units)[MiB]
    return f"{math.ceil(num_bytes / MiB)}{mib}"


def whole_cpus(requirements: JobRequirements) -> Optional[int]:
    """Schedulers count whole CPUs: 0.5 asks for one."""
    return None if requirements.cpu is None else int(math.ceil(requirements.cpu))


def untyped_gpus(requirements: JobRequirements, scheduler: str, how_to_type: str) -> Optional[int]:
    """The GPU count where the scheduler has no standard name for a GPU type: a typed
    GPU (a100=2) is refused, saying how the site's own resource names ask for one."""
    accelerator = requirements.accelerator
    if accelerator is None:
        return None
    if accelerator.is_tpu:
        raise ValueError(f"{scheduler}: accelerator {accelerator.value}={requirements.accelerator_count} "
                         f"is not available on {scheduler}")
    if not accelerator.is_any_gpu:
        raise ValueError(
            f"{scheduler}: JobRequirements({accelerator.value}={requirements.accelerator_count}): {scheduler} "
            f"has no standard name for a GPU type; ask for gpu={requirements.accelerator_count} and {how_to_type}")
    return requirements.accelerator_count


def single_replica(requirements: JobRequirements, scheduler: str) -> None:
    if requirements.replicas != 1:
        raise ValueError(f"{scheduler}: JobRequirements.replicas={requirements.replicas} is not supported: "
                         f"one job runs one program here; add one job per replica, or use a JobGroup")
