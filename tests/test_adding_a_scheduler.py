"""The "Adding a scheduler" list (docs/adding-a-scheduler.md), held against every batch worker type there is:
each must have every part the list names, so a scheduler added without one fails here,
naming what is missing (and the list cannot drift from the code without this failing)."""

from __future__ import annotations

import importlib
import inspect
import json
import typing
from pathlib import Path
from typing import ClassVar, Optional

import pytest

import prefect_xm.workers
from prefect_xm.workers import batch_worker_types
from prefect_xm import xm_local
from prefect_xm.executors import batch, requirements
from prefect_xm.workers.base import BatchWorker
from prefect_xm.workers.configuration import BatchJobConfiguration
from prefect_xm.workers.scheduler import Scheduler

TESTS = Path(__file__).parent
TEMPLATES = Path(prefect_xm.workers.__file__).parent / "templates"
VECTORS = TESTS / "data" / "vectors"


def schedulers_of(worker: type[BatchWorker]) -> list[Scheduler]:
    """The schedulers a worker type's runs may go to: one, or one per dialect its job
    configuration offers (xm-pbs: PBS Pro and Torque)."""
    field = worker.job_configuration.model_fields.get("dialect")
    if field is None:
        return [worker.scheduler]
    choices = typing.get_args(field.annotation)
    return [worker.scheduler_for(worker, worker.job_configuration.model_construct(dialect=d)) for d in choices]


def vectors_name(scheduler: Scheduler) -> str:
    return getattr(scheduler, "dialect", None) or scheduler.name


def end_to_end_worker_types() -> set[str]:
    """The worker types some test class runs the whole end-to-end suite on."""
    from batch_suite import BatchWorkerSuite

    types = set()
    for path in TESTS.glob("test_*_e2e.py"):
        module = importlib.import_module(path.stem)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BatchWorkerSuite) and hasattr(obj, "harness"):
                types.add(obj.harness.worker_type)
    return types


def executor_for(worker: type[BatchWorker]) -> Optional[type]:
    for obj in vars(batch).values():
        if (inspect.isclass(obj) and issubclass(obj, batch._BatchExecutor) and obj is not batch._BatchExecutor
                and obj.configuration() is worker.job_configuration):
            return obj
    return None


def missing_parts(worker: type[BatchWorker], e2e_types: set[str]) -> list[str]:
    """What of the list (docs/adding-a-scheduler.md) this worker type lacks, each in the list's own words."""
    from prefect.workers.base import BaseWorker

    missing = []
    scheduler = worker.scheduler
    # 1. the module: its Scheduler, its job configuration, its worker
    if not isinstance(scheduler, Scheduler) or type(scheduler) is Scheduler:
        missing.append("1. a Scheduler of its own (`scheduler = FooScheduler()`)")
    if worker.job_configuration is BatchJobConfiguration or not issubclass(worker.job_configuration,
                                                                           BatchJobConfiguration):
        missing.append("1. a job configuration of its own (`job_configuration = FooJobConfiguration`)")
    if not worker.type.startswith("xm-"):
        missing.append(f"1. a worker type named xm-<scheduler> (it is {worker.type!r})")
    # 2. the template, with the shared run section
    for s in schedulers_of(worker):
        template = TEMPLATES / s.template_name
        if not template.is_file():
            missing.append(f"2. its template prefect_xm/workers/templates/{s.template_name}")
        elif '{% include "run.sh.j2"' not in template.read_text():
            missing.append(f"2. {s.template_name} including the run section (run.sh.j2)")
    # 3. registered through the prefect.collections entry point
    if getattr(prefect_xm.workers, worker.__name__, None) is not worker:
        missing.append(f"3. {worker.__name__} imported in prefect_xm/workers/__init__.py")
    if BaseWorker.get_worker_class_from_type(worker.type) is not worker:
        missing.append(f"3. the worker type {worker.type!r} found by Prefect (prefect.collections)")
    # 4. and 5. the mapping and the executor, exported in xm_local
    executor = executor_for(worker)
    if executor is None:
        missing.append("5. an executor in prefect_xm/executors/batch.py whose configuration() is its own")
    else:
        for name in ("requirements_variables", "time_limit"):
            if getattr(getattr(executor, name, None), "__module__", None) != requirements.__name__:
                missing.append(f"4. {executor.__name__}.{name} from prefect_xm/executors/requirements.py")
        if getattr(xm_local, executor.__name__, None) is not executor:
            missing.append(f"5. {executor.__name__} exported in xm_local.py")
        default_pool = inspect.signature(executor).parameters["work_pool"].default
        if default_pool != worker.type:
            missing.append(f"5. {executor.__name__}'s work_pool defaulting to {worker.type!r} (not {default_pool!r})")
        for option in executor.options:
            if option not in worker.job_configuration.model_fields:
                missing.append(f"5. {executor.__name__}'s option {option!r} a job variable of its pool")
    # 6. tests: verbatim vectors read by a parser test, the end-to-end suite
    for s in schedulers_of(worker):
        vectors = VECTORS / f"{vectors_name(s)}.json"
        if not vectors.is_file():
            missing.append(f"6. verbatim outputs in tests/data/vectors/{vectors.name}")
            continue
        if json.loads(vectors.read_text()).get("scheduler") != vectors_name(s):
            missing.append(f"6. tests/data/vectors/{vectors.name} saying it is {vectors_name(s)!r}'s")
        if not any(vectors.name in p.read_text() for p in TESTS.glob("test_*_parsers.py")):
            missing.append(f"6. a parser test (tests/test_*_parsers.py) reading {vectors.name}")
    if worker.type not in e2e_types:
        missing.append(f"6. a BatchWorkerSuite class (tests/test_*_e2e.py) on {worker.type!r}")
    return missing


WORKER_TYPES = batch_worker_types()


def test_every_scheduler_of_the_readme_is_found():
    assert {w.type for w in WORKER_TYPES} == {"xm-slurm", "xm-sge", "xm-pbs", "xm-lsf", "xm-htcondor"}


@pytest.mark.parametrize("worker", WORKER_TYPES, ids=[w.type for w in WORKER_TYPES])
def test_a_scheduler_has_every_part_the_readme_lists(worker):
    assert missing_parts(worker, end_to_end_worker_types()) == []


def test_a_scheduler_with_only_its_module_is_told_every_part_it_lacks():
    """The checklist fails a scheduler that is only its worker module."""

    class FooScheduler(Scheduler):
        name: ClassVar[str] = "foo"
        template_name: ClassVar[str] = "foo.sh.j2"

    class FooJobConfiguration(BatchJobConfiguration):
        pass

    class FooWorker(BatchWorker):
        type: ClassVar[str] = "xm-foo"
        job_configuration = FooJobConfiguration
        scheduler: ClassVar[Scheduler] = FooScheduler()

    missing = missing_parts(FooWorker, end_to_end_worker_types())
    assert [m.split(" ", 1)[0] for m in missing] == ["2.", "3.", "5.", "6.", "6."], missing
    assert "prefect_xm/workers/templates/foo.sh.j2" in missing[0]
    assert "tests/data/vectors/foo.json" in missing[3] and "'xm-foo'" in missing[4]
