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



def batch_worker_types() -> list[type[BatchWorker]]:
    """Every batch worker type this package defines, found by walking its modules rather
    than its exports (a new scheduler's worker shows up without a change here): the docs'
    worker reference and the "Adding a scheduler" checklist are made from it."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found, todo = [], list(BatchWorker.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith(f"{__name__}.") and "type" in vars(cls):
            found.append(cls)
    return sorted(found, key=lambda c: c.type)


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
    "batch_worker_types",
]
