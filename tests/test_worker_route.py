"""One route through the worker: every decision about a run's job is made by the
scheduler `scheduler_for(configuration)` picks (xm-pbs picks PBS Pro or Torque per
pool or run), never by the worker type's default one. A worker whose dialect differs
from its default in everything shows which one each step asked."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest
from prefect.exceptions import InfrastructureNotAvailable

from prefect_xm.workers.configuration import BatchJobConfiguration
from prefect_xm.workers.pbs import DIALECTS, PbsJobConfiguration, PbsWorker, TorqueScheduler
from prefect_xm.workers.scheduler import CommandResult, JobState
from prefect_xm.workers.slurm import SlurmJobConfiguration, SlurmScheduler, SlurmWorker


class Dialect(SlurmScheduler):
    name: ClassVar[str] = "dialect"
    template_name: ClassVar[str] = "sge.sh.j2"

    def cancel_argvs(self, job_id, grace_seconds):
        return [["dialect-cancel", job_id]]


class RoutedWorker(SlurmWorker):
    type: ClassVar[str] = "xm-route-test"
    dialect: ClassVar[Dialect] = Dialect()

    def scheduler_for(self, configuration: BatchJobConfiguration):
        return self.dialect


class RecordingTransport:
    def __init__(self):
        self.calls: list[list[str]] = []

    async def run(self, argv, stdin=None, timeout=None):
        self.calls.append(list(argv))
        return CommandResult(argv, 0, "", "")


def _worker_on(transport: RecordingTransport, worker_cls=RoutedWorker):
    worker = worker_cls(work_pool_name="route-test")

    async def transport_for(configuration):
        return transport

    worker.transport_for = transport_for
    return worker


def test_the_template_is_the_configurations_schedulers():
    worker = RoutedWorker(work_pool_name="route-test")
    assert "#$ -N" in worker.load_template(SlurmJobConfiguration())


def test_kill_infrastructure_cancels_with_the_configurations_scheduler():
    transport = RecordingTransport()
    worker = _worker_on(transport)
    configuration = SlurmJobConfiguration(cluster="c1")
    asyncio.run(worker.kill_infrastructure("dialect:c1:42", configuration, grace_seconds=0))
    assert transport.calls == [["dialect-cancel", "42"]]
    with pytest.raises(InfrastructureNotAvailable):  # the pid's scheduler is the dialect's, not the default's
        asyncio.run(worker.kill_infrastructure("slurm:c1:42", configuration, grace_seconds=0))


def test_a_torque_run_is_cancelled_by_the_torque_dialect(monkeypatch):
    called = []
    monkeypatch.setattr(TorqueScheduler, "parse_cancel", lambda self, result: called.append(self) or True)
    transport = RecordingTransport()
    worker = _worker_on(transport, PbsWorker)
    asyncio.run(worker.kill_infrastructure("pbs:local:7.srv", PbsJobConfiguration(dialect="torque"), 0))
    assert transport.calls == [["qdel", "7.srv"]] and called == [DIALECTS["torque"]]


def test_cancel_job_takes_the_scheduler_it_is_given():
    transport = RecordingTransport()
    worker = _worker_on(transport)
    assert asyncio.run(worker.cancel_job(Dialect(), "9", transport, 0, JobState.PENDING)) is True
    assert transport.calls == [["dialect-cancel", "9"]]
