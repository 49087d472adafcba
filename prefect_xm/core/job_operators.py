"""XManager's ``xm.job_operators``: walks over a job structure (a Job, a JobGroup of
them, nested, or a job generator) that launch scripts and libraries built on XManager
call. Same names, signatures and results as XManager's."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, List, Sequence, TypeVar, Union

from prefect_xm.core.job_blocks import Constraint, Job, JobConfig, JobGroup

JobTypeVar = TypeVar("JobTypeVar")


def shallow_copy_job_type(job_type: JobTypeVar) -> JobTypeVar:
    """A copy of the structure: new Jobs and JobGroups, the same executables and
    executors; a job generator is returned as it is."""
    if isinstance(job_type, JobGroup):
        group = copy.copy(job_type)
        group.jobs = {key: shallow_copy_job_type(member) for key, member in job_type.jobs.items()}
        return group  # type: ignore[return-value]
    if isinstance(job_type, JobConfig):
        return copy.copy(job_type)
    return job_type


def populate_job_names(job_type: Any) -> None:
    """Names each unnamed Job by its path in the groups ('learner', 'actors_0'), or by its
    executable's name when it stands alone."""

    def walk(prefix: Sequence[str], target: Any) -> None:
        if isinstance(target, Job):
            if target.name is None:
                target.name = "_".join(prefix) if prefix else target.executable.name
        elif isinstance(target, JobGroup):
            for key, member in target.jobs.items():
                walk([*prefix, key], member)

    walk([], job_type)


def collect_jobs_by_filter(job_group: Union[JobGroup, Job], predicate: Callable[[Job], bool]) -> List[Job]:
    """The Jobs of a (nested) group that satisfy ``predicate``, in order."""
    if isinstance(job_group, Job):
        return [job_group] if predicate(job_group) else []
    return [job for member in job_group.jobs.values() for job in collect_jobs_by_filter(member, predicate)]


@dataclasses.dataclass
class ConstraintClique:
    """A constraint with the jobs it applies to."""

    constraint: Constraint
    jobs: List[Job]


def aggregate_constraint_cliques(job_group: JobGroup) -> List[ConstraintClique]:
    """For each constraint of the group and of its nested groups, the jobs it applies
    to: the outer group's constraints first."""
    cliques: List[ConstraintClique] = []
    for member in job_group.jobs.values():
        if isinstance(member, JobGroup):
            cliques += aggregate_constraint_cliques(member)
    jobs = flatten_jobs(job_group)
    return [ConstraintClique(constraint, jobs) for constraint in job_group.constraints] + cliques


def flatten_jobs(job_group: JobGroup) -> List[Job]:
    return collect_jobs_by_filter(job_group, lambda _: True)
