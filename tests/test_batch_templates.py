"""The default batch-script templates of xm-sge, xm-pbs (both dialects) and xm-lsf,
rendered with every job variable set: each directive in its scheduler's syntax
(../shared/SCHEDULERS.md), the run's environment sourced from its file, never inline.
The Slurm template has the same test in test_slurm_script.py."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from prefect_xm.workers.lsf import LsfJobConfiguration, LsfWorker
from prefect_xm.workers.pbs import DIALECTS, PbsJobConfiguration, PbsWorker
from prefect_xm.workers.sge import SgeJobConfiguration, SgeWorker
from prefect_xm.workers.slurm import SlurmJobConfiguration, SlurmWorker

COMMON = dict(
    modules=["cuda/12.2"],
    setup_commands=["source /etc/profile"],
    working_dir="/scratch/exp",
    env={"PREFECT_API_KEY": "pnu_secret_value_never_rendered", "FOO": "bar"},
    job_name="train",
    command="python -m prefect flow-run execute --why 'a b'",
)
FLOW_RUN = SimpleNamespace(id=uuid.UUID(int=7), name="brave-fox")
RUN_DIR = "/tmp/pxm-runs/" + str(FLOW_RUN.id)
JOB_NAME = "train-00000000-0000-0000-0000-000000000007"
# what every template ends with, after its directives
BODY = [
    f". {RUN_DIR}/job.env",
    "module load cuda/12.2",
    "source /etc/profile",
    "exec python -m prefect flow-run execute --why 'a b'",
]


def render(worker_cls, config_cls, **variables) -> str:
    worker = worker_cls(work_pool_name="render-only")
    return worker.render_script(config_cls(**variables), FLOW_RUN, RUN_DIR)


def assert_script(script: str, prefix: str, directives: list[str]) -> None:
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in [*directives, *BODY]:
        assert line in lines, f"{line!r} not in:\n{script}"
    # PBS and LSF stop reading directives at the first command: all must come before it
    first_command = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert all(i < first_command for i, ln in enumerate(lines) if ln.startswith(prefix + " ")), script
    # the environment is sourced before the program starts, and the command is exec'd last
    assert lines.index(BODY[0]) < lines.index(BODY[-1]) == len(lines) - 1
    # secrets and the environment travel in the run's 0600 env file, never in the script
    assert "pnu_secret" not in script and "FOO" not in script
    assert "None" not in script


def test_sge_full_variable_set_renders_every_directive():
    script = render(
        SgeWorker, SgeJobConfiguration, **COMMON,
        queue="all.q", project="physics", time_limit="1:30:00", memory="4G", slots=4, gpus=2,
        extra_directives=["-l h=node01", "-R y"],
    )
    assert_script(script, "#$", [
        f"#$ -N {JOB_NAME}",
        f"#$ -o {RUN_DIR}/job.out",
        f"#$ -e {RUN_DIR}/job.err",
        "#$ -S /bin/bash",
        "#$ -q all.q",
        "#$ -P physics",
        "#$ -l h_rt=1:30:00",
        "#$ -l h_vmem=4G",
        "#$ -pe smp 4",
        "#$ -l gpu=2",
        "#$ -wd /scratch/exp",
        "#$ -l h=node01",
        "#$ -R y",
    ])
    assert "#$ -cwd" not in script.splitlines()  # -wd given: not both
    assert "cd /scratch/exp" in script.splitlines()


def test_sge_site_names_for_the_parallel_environment_and_gpu_resource():
    script = render(SgeWorker, SgeJobConfiguration, command="true", slots=8, gpus=1,
                    parallel_environment="mpi", gpu_resource="gpu_a100", shell="/bin/zsh")
    lines = script.splitlines()
    assert "#$ -pe mpi 8" in lines and "#$ -l gpu_a100=1" in lines and "#$ -S /bin/zsh" in lines


def test_sge_single_slot_needs_no_parallel_environment():
    script = render(SgeWorker, SgeJobConfiguration, command="true", slots=1)
    assert "-pe" not in script
    assert "#$ -cwd" in script.splitlines()  # no working_dir: the submission directory


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_pbs_full_variable_set_renders_every_directive(dialect):
    script = render(
        PbsWorker, PbsJobConfiguration, **COMMON, dialect=dialect,
        queue="workq", account="physics", time_limit="01:30:00", nodes=2, cpus=8, memory="32gb", gpus=2,
        hold=True, extra_directives=["-m abe", "-l place=scatter"],
    )
    resources = {
        "pbspro": ["#PBS -l select=2:ncpus=8:ngpus=2:mem=32gb"],
        "torque": ["#PBS -l nodes=2:ppn=8:gpus=2", "#PBS -l mem=32gb"],
    }[dialect]
    assert_script(script, "#PBS", [
        f"#PBS -N {JOB_NAME}",
        f"#PBS -o {RUN_DIR}/job.out",
        f"#PBS -e {RUN_DIR}/job.err",
        "#PBS -q workq",
        "#PBS -A physics",
        "#PBS -l walltime=01:30:00",
        *resources,
        "#PBS -h",
        "#PBS -m abe",
        "#PBS -l place=scatter",
    ])
    # each dialect's resource syntax only
    other = {"pbspro": "nodes=", "torque": "select="}[dialect]
    assert other not in script
    # PBS starts the job in $HOME: the script changes directory itself, and fails if it cannot
    assert "cd /scratch/exp || exit 1" in script.splitlines()


@pytest.mark.parametrize("dialect,line", [
    ("pbspro", "#PBS -l select=1:ncpus=1:ngpus=1"),
    ("torque", "#PBS -l nodes=1:ppn=1:gpus=1"),
])
def test_pbs_gpus_alone_still_ask_for_one_node(dialect, line):
    script = render(PbsWorker, PbsJobConfiguration, command="true", dialect=dialect, gpus=1)
    assert line in script.splitlines()
    assert 'cd "${PBS_O_WORKDIR:-$HOME}" || exit 1' in script.splitlines()


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_pbs_without_resources_asks_none(dialect):
    script = render(PbsWorker, PbsJobConfiguration, command="true", dialect=dialect)
    assert not [ln for ln in script.splitlines() if ln.startswith("#PBS -l")]
    assert "#PBS -h" not in script.splitlines()


def test_lsf_full_variable_set_renders_every_directive():
    script = render(
        LsfWorker, LsfJobConfiguration, **COMMON,
        queue="normal", project="physics", time_limit="1:30", slots=4, memory="16G", reserve_memory=True,
        resources="span[hosts=1]", gpus=2, gpu_model="a100", hold=True, extra_directives=["-x"],
    )
    assert_script(script, "#BSUB", [
        f"#BSUB -J {JOB_NAME}",
        f"#BSUB -o {RUN_DIR}/job.out",
        f"#BSUB -e {RUN_DIR}/job.err",
        "#BSUB -q normal",
        "#BSUB -P physics",
        "#BSUB -W 1:30",
        "#BSUB -n 4",
        "#BSUB -M 16GB",  # LSF wants KB/MB/GB/TB
        '#BSUB -R "rusage[mem=16GB]"',
        '#BSUB -R "span[hosts=1]"',
        '#BSUB -gpu "num=2:gmodel=a100"',
        "#BSUB -cwd /scratch/exp",
        "#BSUB -H",
        "#BSUB -x",
    ])
    assert "cd /scratch/exp" in script.splitlines()


def test_lsf_gpus_without_a_model_and_memory_in_the_site_unit():
    script = render(LsfWorker, LsfJobConfiguration, command="true", gpus=2, memory="4096")
    lines = script.splitlines()
    assert '#BSUB -gpu "num=2"' in lines
    assert "#BSUB -M 4096" in lines  # a bare number stays in LSF_UNIT_FOR_LIMITS
    assert "rusage" not in script  # memory is reserved only when asked


@pytest.mark.parametrize("worker_cls,config_cls,prefix,directive", [
    (SgeWorker, SgeJobConfiguration, "#$", "#$ -r y"),
    (PbsWorker, PbsJobConfiguration, "#PBS", "#PBS -r y"),
    (LsfWorker, LsfJobConfiguration, "#BSUB", "#BSUB -r"),
    (SlurmWorker, SlurmJobConfiguration, "#SBATCH", "#SBATCH --requeue"),
])
def test_requeue_asks_the_scheduler_to_rerun_the_job_and_is_off_by_default(worker_cls, config_cls, prefix, directive):
    assert_script(render(worker_cls, config_cls, **COMMON, requeue=True), prefix, [directive])
    assert directive not in render(worker_cls, config_cls, **COMMON).splitlines()


def test_max_requeues_is_a_count_named_when_wrong():
    with pytest.raises(ValueError, match=r"max_requeues: -1 must be 0 or more"):
        SgeJobConfiguration(max_requeues=-1)
