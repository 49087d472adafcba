"""Prefect workers for batch schedulers.

Importing this package registers the worker types with Prefect (it is the target of
the `prefect.collections` entry point), so `prefect worker start --type xm-slurm` works.
"""

from prefect_xm.workers.base import BatchWorker
from prefect_xm.workers.configuration import BatchJobConfiguration, BatchVariables
from prefect_xm.workers.pbs import PbsScheduler, PbsWorker, TorqueScheduler
from prefect_xm.workers.scheduler import JobState, JobStatus, Scheduler
from prefect_xm.workers.slurm import SlurmScheduler, SlurmWorker
from prefect_xm.workers.sge import SgeScheduler, SgeWorker
from prefect_xm.workers.lsf import LsfScheduler, LsfWorker
from prefect_xm.workers.htcondor import HTCondorScheduler, HTCondorWorker

__all__ = [
    "BatchJobConfiguration",
    "BatchVariables",
    "BatchWorker",
    "HTCondorScheduler",
    "HTCondorWorker",
    "JobState",
    "JobStatus",
    "PbsScheduler",
    "PbsWorker",
    "LsfScheduler",
    "LsfWorker",
    "Scheduler",
    "SgeScheduler",
    "SgeWorker",
    "SlurmScheduler",
    "SlurmWorker",
    "TorqueScheduler",
]
