"""JobRequirements and ``time`` in a batch scheduler's words: the units and refusals every
scheduler's mapping shares, then each scheduler's own (``slurm_variables`` and
``slurm_time_limit``, and so on), which the executors of ``prefect_xm.executors.batch``
call. The values they produce are job variables of the scheduler's pool; its worker's job
configuration checks them.
"""

from __future__ import annotations

import datetime
import math
from typing import Any, Mapping, Optional, Sequence

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


def present(**variables: Any) -> dict[str, Any]:
    """The job variables a mapping has a value for: what JobRequirements leaves unset is
    left to the pool's defaults."""
    return {name: value for name, value in variables.items() if value is not None}


def memory_with_unit(requirements: JobRequirements, units: Sequence[tuple[int, str]] = BINARY_UNITS,
                     per: int = 1) -> Optional[str]:
    """The memory asked for, divided by ``per`` (rounded up) and written with ``units``."""
    if requirements.memory is None:
        return None
    return with_unit(math.ceil(requirements.memory / per), units)


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


# ------------------------------------------------------------------------- Slurm


def slurm_variables(requirements: JobRequirements, options: Mapping[str, Any]) -> dict[str, Any]:
    """cpu -> cpus_per_task, memory -> memory (--mem, '16G'), accelerators -> gpus and
    gpu_type (a100=2 -> --gres=gpu:a100:2), replicas -> ntasks."""
    out = present(cpus_per_task=whole_cpus(requirements), memory=memory_with_unit(requirements))
    accelerator = requirements.accelerator
    if accelerator is not None:
        if accelerator.is_tpu:
            raise ValueError(f"Slurm: accelerator {accelerator.value}={requirements.accelerator_count} "
                             f"is not available on Slurm")
        out["gpus"] = requirements.accelerator_count
        if not accelerator.is_any_gpu:
            out["gpu_type"] = accelerator.value
    if requirements.replicas != 1:
        out["ntasks"] = requirements.replicas
    return out


def slurm_time_limit(value: Any) -> str:
    """--time from an int of minutes (as Slurm reads a bare number), a timedelta
    ('D-HH:MM:SS') or a str in Slurm's syntax."""
    seconds = limit_seconds(value, "time")
    if seconds is None:
        return value.strip()
    if not isinstance(value, datetime.timedelta):
        return str(value)
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}" if days else f"{h:02d}:{m:02d}:{s:02d}"


# --------------------------------------------------------------------------- SGE


def sge_variables(requirements: JobRequirements, options: Mapping[str, Any]) -> dict[str, Any]:
    """cpu -> slots (-pe <parallel_environment> N), memory -> memory per slot (h_vmem is
    per slot: the job's memory divided among its slots), GPUs -> gpus (-l <gpu_resource>=N)."""
    single_replica(requirements, "SGE")
    slots = whole_cpus(requirements)
    return present(
        slots=slots,
        memory=memory_with_unit(requirements, per=slots or 1),
        gpus=untyped_gpus(requirements, "SGE", "pick the type with queue= or the pool's gpu_resource variable"),
    )


#: h_rt ('H:MM:SS') from an int of minutes, a timedelta or a str
sge_time_limit = hours_minutes_seconds_limit


# --------------------------------------------------------------------------- PBS


#: PBS sizes: 1kb = 1024 bytes
PBS_UNITS = ((TiB, "tb"), (GiB, "gb"), (MiB, "mb"), (KiB, "kb"))


def pbs_variables(requirements: JobRequirements, options: Mapping[str, Any]) -> dict[str, Any]:
    """replicas -> nodes (PBS Pro: chunks of select=N; Torque: nodes=N), cpu -> cpus per
    chunk/node (ncpus, ppn), GPUs -> gpus (ngpus), memory -> memory: per chunk on PBS Pro
    (select's mem), the whole job's on Torque (-l mem)."""
    chunks_per_memory = requirements.replicas if options.get("dialect") == "torque" else 1
    memory = None if requirements.memory is None else with_unit(requirements.memory * chunks_per_memory, PBS_UNITS)
    return present(
        nodes=requirements.replicas if requirements.replicas != 1 else None,
        cpus=whole_cpus(requirements),
        memory=memory,
        gpus=untyped_gpus(requirements, "PBS", "pick the type with queue= or a site resource in extra_directives"),
    )


#: walltime ('H:MM:SS') from an int of minutes, a timedelta or a str
pbs_time_limit = hours_minutes_seconds_limit


# --------------------------------------------------------------------------- LSF


LSF_UNITS = ((TiB, "TB"), (GiB, "GB"), (MiB, "MB"), (KiB, "KB"))


def lsf_variables(requirements: JobRequirements, options: Mapping[str, Any]) -> dict[str, Any]:
    """cpu -> slots (-n), memory -> memory (-M, '16GB'), GPUs -> gpus (-gpu num=N)."""
    single_replica(requirements, "LSF")
    return present(
        slots=whole_cpus(requirements),
        memory=memory_with_unit(requirements, LSF_UNITS),
        gpus=untyped_gpus(requirements, "LSF", "name your site's model in job_variables={'gpu_model': ...} "
                                               "(as `lshosts -gpu` shows it)"),
    )


def lsf_time_limit(value: Any) -> str:
    """-W ('H:MM', whole minutes rounded up) from an int of minutes, a timedelta or a str
    in LSF's syntax."""
    seconds = limit_seconds(value, "time")
    if seconds is None:
        return value.strip()
    h, m = divmod(math.ceil(seconds / 60), 60)
    return f"{h}:{m:02d}"


# ---------------------------------------------------------------------- HTCondor


HTCONDOR_UNITS = ((TiB, "TB"), (GiB, "GB"), (MiB, "MB"), (KiB, "KB"))


def htcondor_variables(requirements: JobRequirements, options: Mapping[str, Any]) -> dict[str, Any]:
    """cpu -> request_cpus, memory -> request_memory ('16GB'), GPUs -> request_gpus."""
    single_replica(requirements, "HTCondor")
    return present(
        request_cpus=whole_cpus(requirements),
        request_memory=memory_with_unit(requirements, HTCONDOR_UNITS),
        request_gpus=untyped_gpus(requirements, "HTCondor", "match the type with a ClassAd expression in "
                                                            "job_variables={'requirements': ...}"),
    )


#: the run-time limit ('H:MM:SS') from an int of minutes, a timedelta or a str
htcondor_time_limit = hours_minutes_seconds_limit
