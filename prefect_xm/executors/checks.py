"""Checks every executor makes of its arguments before anything is submitted; each error
names the executor's field and the value."""

from __future__ import annotations

from typing import Any, Mapping

from prefect_xm.core.resources import JobRequirements


def check_requirements(value: Any, where: str, clusters: bool = False) -> JobRequirements:
    if value is None:
        return JobRequirements()
    if not isinstance(value, JobRequirements):
        raise ValueError(f"{where}.requirements must be xm.JobRequirements, got {value!r}")
    if value.cluster is not None and not clusters:
        raise ValueError(f"{where}: JobRequirements(cluster={value.cluster!r}) is for the batch executors "
                         f"(Slurm, SGE, PBS, LSF, HTCondor); {where} chooses where it runs by its work pool")
    return value


# ------------------------------------------------------------------------- Local


def check_str(owner: str, field: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{owner}.{field} must be a non-empty string, got {value!r}")


def check_str_dict(owner: str, field: str, value: Any) -> None:
    if value is not None and (not isinstance(value, Mapping)
                              or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise ValueError(f"{owner}.{field} must be a dict of strings, got {value!r}")
