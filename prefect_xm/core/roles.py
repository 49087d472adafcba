"""Experiment unit roles, with XManager's names and signatures: a unit added to an
experiment is a work unit (a trial of the sweep) or an auxiliary unit (TensorBoard, a
parameter controller: alongside the trials, not one of them).

An auxiliary unit's status does not count towards the experiment's, and once every work
unit has ended it is stopped after its `termination_delay_secs` (if it has not ended
itself), as XManager does."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Importance(enum.Enum):
    """XManager's scheduling importance of a unit. Recorded on the unit's run (a tag);
    Prefect's pools and the batch schedulers take their priority from their own job
    variables, so it changes no scheduling here."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"


@dataclass(frozen=True, kw_only=True)
class ExperimentUnitRole:
    importance: Importance = Importance.NORMAL


@dataclass(frozen=True, kw_only=True)
class WorkUnitRole(ExperimentUnitRole):
    """A trial: its status makes the experiment's."""


@dataclass(frozen=True, kw_only=True)
class AuxiliaryUnitRole(ExperimentUnitRole):
    """Not a trial: its status is not the experiment's; stopped `termination_delay_secs`
    after the experiment's work units have all ended."""

    termination_delay_secs: int

    def __post_init__(self) -> None:
        if not isinstance(self.termination_delay_secs, (int, float)) or self.termination_delay_secs < 0:
            raise ValueError(f"termination_delay_secs: {self.termination_delay_secs!r} must be 0 or more seconds")


class AuxiliaryUnitJob:
    """A job (or job group, or job generator) bundled with its AuxiliaryUnitRole:
    `experiment.add(xm.AuxiliaryUnitJob(job, termination_delay_secs=60))`."""

    def __init__(self, job: Any, *, importance: Importance = Importance.NORMAL, termination_delay_secs: int) -> None:
        self.role = AuxiliaryUnitRole(importance=importance, termination_delay_secs=termination_delay_secs)
        self._job = job  # (XManager's attribute name)

    @property
    def job(self) -> Any:
        return self._job

    def __repr__(self) -> str:
        return f"AuxiliaryUnitJob({self._job!r}, role={self.role!r})"
