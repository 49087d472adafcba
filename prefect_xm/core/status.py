"""ExperimentUnitStatus: XManager's status vocabulary over a Prefect state."""

from __future__ import annotations

import dataclasses

from prefect.client.schemas.objects import StateType

ACTIVE = frozenset({StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING})
FAILED = frozenset({StateType.FAILED, StateType.CRASHED})


@dataclasses.dataclass(frozen=True)
class ExperimentUnitStatus:
    """The status of a work unit (or a job), read from its Prefect flow run's state."""

    state_type: str  # Prefect StateType value: PENDING, RUNNING, COMPLETED, FAILED, ...
    state_name: str
    message: str = ""

    @classmethod
    def from_state(cls, state) -> "ExperimentUnitStatus":
        if state is None:
            return cls(StateType.PENDING.value, "Pending", "")
        return cls(state.type.value, state.name or state.type.value.title(), state.message or "")

    @property
    def is_active(self) -> bool:
        return self.state_type in ACTIVE

    @property
    def is_running(self) -> bool:
        return self.state_type == StateType.RUNNING

    @property
    def is_completed(self) -> bool:
        return self.state_type == StateType.COMPLETED

    is_succeeded = is_completed

    @property
    def is_failed(self) -> bool:
        return self.state_type in FAILED

    @property
    def is_cancelled(self) -> bool:
        return self.state_type == StateType.CANCELLED

    @property
    def is_final(self) -> bool:
        return not self.is_active

    def __str__(self) -> str:
        return f"{self.state_name}" + (f": {self.message}" if self.message else "")


class ExperimentUnitError(RuntimeError):
    """A work unit could not be completed (XManager's name); ``work_unit`` is the unit."""

    def __init__(self, message: object, *, work_unit: object = None) -> None:
        super().__init__(message)
        self.work_unit = work_unit


class ExperimentUnitFailedError(ExperimentUnitError):
    """A job of the work unit failed (or crashed)."""


class ExperimentUnitNotCompletedError(ExperimentUnitError):
    """The work unit ended neither running nor completed: stopped by a user, for example."""


class ReloadError(ExperimentUnitError):
    """XManager's error of a failed reload check (its XReload); nothing here raises it."""


class NotFoundError(KeyError):
    """An experiment or work unit that does not exist."""


class DebugInterrupt(BaseException):
    """XManager's interrupt of a launch script for debugging: a BaseException, so
    `except Exception` lets it through. Nothing here raises it; raised in a launch
    script's `with` block, it stops the experiment's work units, as any exception does."""
