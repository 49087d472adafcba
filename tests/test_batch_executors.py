"""xm_local.Slurm, SGE, PBS, LSF and HTCondor: JobRequirements and time in each scheduler's
job variables (the mapping beside each worker), every key one its pool declares, the
directives the worker then writes, and each refusal naming the field and the value."""

from __future__ import annotations

import datetime

import pytest

from prefect_xm import xm, xm_local
from prefect_xm.core.deployments import validate_job_variables
from prefect_xm.workers.htcondor import HTCondorWorker
from prefect_xm.workers.lsf import LsfJobConfiguration, LsfWorker
from prefect_xm.workers.pbs import PbsJobConfiguration, PbsWorker
from prefect_xm.workers.sge import SgeJobConfiguration, SgeWorker
from prefect_xm.workers.slurm import SlurmJobConfiguration, SlurmWorker
from test_batch_templates import render

R = xm.JobRequirements
COMMON = dict(modules=["cuda/12"], setup_commands=["source /etc/profile"], extra_directives=[],
              working_dir="/scratch/exp", job_name="train")


@pytest.mark.parametrize("executor, expected", [
    (xm_local.Slurm(R(cpu=4, memory=16 * xm.GiB, a100=2, replicas=2), partition="gpu", time=90),
     {"cpus_per_task": 4, "memory": "16G", "gpus": 2, "gpu_type": "a100", "ntasks": 2, "partition": "gpu",
      "time_limit": "90"}),
    # h_vmem is per slot: 16 GiB over 4 slots
    (xm_local.SGE(R(cpu=4, memory=16 * xm.GiB, gpu=1), queue="all.q", time=datetime.timedelta(hours=26)),
     {"slots": 4, "memory": "4G", "gpus": 1, "queue": "all.q", "time_limit": "26:00:00"}),
    (xm_local.SGE(R(cpu=3, memory=1 * xm.GiB)), {"slots": 3, "memory": "342M"}),
    # PBS Pro: replicas are chunks, memory per chunk; Torque: the whole job's memory
    (xm_local.PBS(R(cpu=8, memory=32 * xm.GiB, replicas=2, gpu=1), queue="workq", time=90),
     {"nodes": 2, "cpus": 8, "memory": "32gb", "gpus": 1, "queue": "workq", "time_limit": "1:30:00"}),
    (xm_local.PBS(R(cpu=8, memory=32 * xm.GiB, replicas=2), dialect="torque"),
     {"nodes": 2, "cpus": 8, "memory": "64gb", "dialect": "torque"}),
    (xm_local.LSF(R(cpu=2, memory=1536 * xm.MiB, gpu=2), project="p1",
                  time=datetime.timedelta(minutes=90, seconds=1)),
     {"slots": 2, "memory": "1536MB", "gpus": 2, "project": "p1", "time_limit": "1:31"}),
    (xm_local.HTCondor(R(cpu=0.5, memory=8 * xm.GiB, gpu=1), accounting_group="group_physics.alice", time=30),
     {"request_cpus": 1, "request_memory": "8GB", "request_gpus": 1, "accounting_group": "group_physics.alice",
      "time_limit": "0:30:00"}),
])
def test_requirements_and_time_in_each_schedulers_job_variables(executor, expected):
    assert executor.job_variables() == expected


@pytest.mark.parametrize("executor, worker", [
    (xm_local.Slurm(R(cpu=2, memory=xm.GiB, a100=1, replicas=2), partition="p", account="a", qos="q", nodes=1,
                    constraint="ib", time="1-00:00:00", **COMMON), SlurmWorker),
    (xm_local.SGE(R(cpu=2, memory=xm.GiB, gpu=1), queue="all.q", project="p", parallel_environment="mpi",
                  time="3600", **COMMON), SgeWorker),
    (xm_local.PBS(R(cpu=2, memory=xm.GiB, gpu=1, replicas=2), queue="q", account="a", dialect="pbspro",
                  time="1:00:00", **COMMON), PbsWorker),
    (xm_local.LSF(R(cpu=2, memory=xm.GiB, gpu=1), queue="q", project="p", resources="select[mem>4000]",
                  time="1:00", **COMMON), LsfWorker),
    (xm_local.HTCondor(R(cpu=2, memory=xm.GiB, gpu=1), accounting_group="g.alice", universe="vanilla",
                       time="1:00:00", **COMMON), HTCondorWorker),
], ids=["slurm", "sge", "pbs", "lsf", "htcondor"])
def test_every_key_an_executor_gives_is_a_variable_of_its_pool(executor, worker):
    """The check experiment.add makes against the pool's schema, on the default base job
    template of the worker the executor is for, with every option and requirement set."""
    template = worker.get_default_base_job_template()
    variables = executor.job_variables()
    validate_job_variables(executor.work_pool_name, variables, template["variables"]["properties"],
                           template["variables"].get("definitions"))
    assert executor.work_pool_name == worker.type
    assert repr(type(executor).Spec()) == f"{type(executor).__name__}.Spec()"


def test_the_workers_write_what_the_executors_ask():
    sge = xm_local.SGE(R(cpu=4, memory=16 * xm.GiB, gpu=2), queue="all.q", time=90)
    assert {"#$ -pe smp 4", "#$ -l h_vmem=4G", "#$ -l gpu=2", "#$ -q all.q", "#$ -l h_rt=1:30:00"} <= set(
        render(SgeWorker, SgeJobConfiguration, **sge.job_variables()).splitlines())
    pbs = xm_local.PBS(R(cpu=8, memory=32 * xm.GiB, replicas=2, gpu=1), time=datetime.timedelta(hours=2))
    lines = render(PbsWorker, PbsJobConfiguration, **pbs.job_variables()).splitlines()
    assert {"#PBS -l select=2:ncpus=8:ngpus=1:mem=32gb", "#PBS -l walltime=2:00:00"} <= set(lines)
    torque = xm_local.PBS(R(cpu=8, memory=32 * xm.GiB, replicas=2), dialect="torque")
    lines = render(PbsWorker, PbsJobConfiguration, **torque.job_variables()).splitlines()
    assert {"#PBS -l nodes=2:ppn=8", "#PBS -l mem=64gb"} <= set(lines)
    lsf = xm_local.LSF(R(cpu=2, memory=16 * xm.GiB, gpu=1), time=150)
    lines = render(LsfWorker, LsfJobConfiguration, **lsf.job_variables()).splitlines()
    assert {"#BSUB -n 2", "#BSUB -M 16GB", '#BSUB -gpu "num=1"', "#BSUB -W 2:30"} <= set(lines)
    slurm = xm_local.Slurm(R(cpu=2, memory=xm.GiB, v100=1), time=datetime.timedelta(days=1, minutes=1))
    lines = render(SlurmWorker, SlurmJobConfiguration, **slurm.job_variables()).splitlines()
    assert {"#SBATCH --cpus-per-task=2", "#SBATCH --mem=1G", "#SBATCH --time=1-00:01:00"} <= set(lines)


@pytest.mark.parametrize("make, message", [
    # a GPU type has no standard name outside Slurm: refused, saying how the site asks
    (lambda: xm_local.SGE(R(a100=1)), "SGE: JobRequirements(a100=1): SGE has no standard name for a GPU type"),
    (lambda: xm_local.PBS(R(v100=2)), "PBS: JobRequirements(v100=2)"),
    (lambda: xm_local.LSF(R(h100=1)), "gpu_model"),
    (lambda: xm_local.HTCondor(R(t4=1)), "job_variables={'requirements': ...}"),
    (lambda: xm_local.SGE(R(tpu_v5e=4)), "tpu_v5e=4 is not available on SGE"),
    (lambda: xm_local.Slurm(R(tpu_v4=8)), "tpu_v4=8 is not available on Slurm"),
    (lambda: xm_local.LSF(R(replicas=2)), "LSF: JobRequirements.replicas=2"),
    (lambda: xm_local.HTCondor(R(replicas=3)), "HTCondor: JobRequirements.replicas=3"),
    (lambda: xm_local.SGE(R(location="us-east")), "location='us-east'"),
    # a time in the scheduler's syntax is checked by the worker's own rule
    (lambda: xm_local.Slurm(time="two hours"), "Slurm.time='two hours': time_limit: 'two hours' is not valid"),
    (lambda: xm_local.LSF(time="1:75"), "LSF.time='1:75'"),
    (lambda: xm_local.SGE(time=-5), "SGE.time must be positive, got -5"),
    (lambda: xm_local.HTCondor(time=1.5), "HTCondor.time: expected"),
    (lambda: xm_local.PBS(dialect="slurm"), "PBS.dialect='slurm'"),
    (lambda: xm_local.Slurm(partition=5), "Slurm.partition=5"),
    (lambda: xm_local.SGE(queue=""), "SGE.queue must be a non-empty string, got ''"),
    (lambda: xm_local.LSF(modules="cuda"), "LSF.modules must be a list of strings, got 'cuda'"),
    (lambda: xm_local.SGE(job_variables={"slots": 0}), "SGE: job variable slots=0"),
    (lambda: xm_local.PBS(queue="a", job_variables={"queue": "b"}), "job variable 'queue' given both"),
    (lambda: xm_local.HTCondor(work_pool=""), "HTCondor.work_pool must be a non-empty string"),
])
def test_a_bad_executor_is_refused_naming_its_field_and_value(make, message):
    with pytest.raises(ValueError) as raised:
        make()
    assert message in str(raised.value)


def test_slurm_accepts_what_its_worker_accepts():
    """One rule for a time limit, the worker's: the executor once refused 'unlimited'."""
    assert xm_local.Slurm(time="unlimited").job_variables() == {"time_limit": "unlimited"}
    assert xm_local.Slurm(time="30:00").partition is None and xm_local.Slurm(partition="gpu").partition == "gpu"


def test_a_jobs_cluster_is_its_login_nodes_ssh_block():
    """xm-slurm's JobRequirements(cluster=...): one pool, the cluster named per job."""
    assert xm_local.Slurm(R(cpu=1, cluster="mila")).job_variables() == {"cpus_per_task": 1, "ssh_block": "mila"}
    assert xm_local.SGE(R(cluster="hpc2")).job_variables() == {"ssh_block": "hpc2"}
    assert "cluster='mila'" in repr(R(cluster="mila")) and R(cluster="a") != R(cluster="b")
    with pytest.raises(ValueError, match="job variable 'ssh_block' given both"):
        xm_local.LSF(R(cluster="a"), job_variables={"ssh_block": "b"})
    with pytest.raises(ValueError, match=r"Local: JobRequirements\(cluster='mila'\) is for the batch executors"):
        xm_local.Local(R(cluster="mila"))
    with pytest.raises(ValueError, match="cluster must be a non-empty string"):
        R(cluster="")
