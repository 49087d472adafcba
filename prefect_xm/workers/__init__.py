"""Prefect workers for batch schedulers.

Importing this package registers the worker types with Prefect (it is the target of
the `prefect.collections` entry point), so `prefect worker start --type xm-slurm` works.
"""

from prefect_xm.workers.base import BatchJobConfiguration, BatchVariables, BatchWorker
from prefect_xm.workers.pbs import PbsScheduler, PbsWorker, TorqueScheduler
from prefect_xm.workers.scheduler import JobState, JobStatus, Scheduler
from prefect_xm.workers.slurm import SlurmScheduler, SlurmWorker

__all__ = [
    "BatchJobConfiguration",
    "BatchVariables",
    "BatchWorker",
    "JobState",
    "JobStatus",
    "PbsScheduler",
    "PbsWorker",
    "Scheduler",
    "SlurmScheduler",
    "SlurmWorker",
    "TorqueScheduler",
]
