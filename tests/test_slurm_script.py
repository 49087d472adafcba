"""The rendered batch script and the submit path, against the real sbatch."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import uuid
from types import SimpleNamespace

import pytest

from conftest import cluster_is_up, require_service
from prefect_xm.workers.base import ScriptTemplateError
from prefect_xm.workers.scheduler import SubmitRequest
from prefect_xm.workers.slurm import SlurmJobConfiguration, SlurmWorker
from prefect_xm.workers.transport import LocalTransport

FULL = dict(
    partition="debug",
    account="physics",
    qos="normal",
    time_limit="0-00:10:00",
    nodes=1,
    ntasks=1,
    cpus_per_task=1,
    memory="256M",
    modules=["cuda/12.2"],
    setup_commands=["source /etc/profile"],
    extra_directives=["--signal=USR2@90", "--comment=from-prefect-xm"],
    working_dir="/tmp",
    env={"PREFECT_API_KEY": "pnu_secret_value_never_rendered", "FOO": "bar"},
    job_name="train",
    command="python -m prefect flow-run execute --why 'a b'",
)


def slurm_up() -> bool:
    return cluster_is_up("slurm-cluster.sh")


def render(**variables) -> str:
    worker = SlurmWorker(work_pool_name="render-only")
    config = SlurmJobConfiguration(**variables)
    flow_run = SimpleNamespace(id=uuid.UUID(int=7), name="brave-fox")
    return worker.render_script(config, flow_run, "/tmp/pxm-runs/" + str(flow_run.id))


def test_full_variable_set_renders_every_directive():
    script = render(**FULL, gpus=2, gpu_type="a100", constraint="skylake&ib")
    for line in (
        "#SBATCH --job-name=train-00000000-0000-0000-0000-000000000007",
        "#SBATCH --partition=debug", "#SBATCH --account=physics", "#SBATCH --qos=normal",
        "#SBATCH --time=0-00:10:00", "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=1", "#SBATCH --mem=256M", "#SBATCH --gres=gpu:a100:2",
        "#SBATCH --constraint='skylake&ib'", "#SBATCH --chdir=/tmp", "#SBATCH --signal=USR2@90",
        "module load cuda/12.2", "source /etc/profile",
        "exec python -m prefect flow-run execute --why 'a b'",
    ):
        assert line in script.splitlines(), line
    # secrets and the environment travel in the run's 0600 env file, sourced, never inline
    assert "pnu_secret" not in script and "FOO" not in script
    assert ". /tmp/pxm-runs/00000000-0000-0000-0000-000000000007/job.env" in script.splitlines()


def test_full_variable_set_passes_sbatch_test_only(tmp_path):
    require_service("Slurm", slurm_up(), "bash scripts/slurm-cluster.sh start")
    # no GPU (gres) and no node features exist on this node, so those two stay unset
    script = render(**FULL)
    path = tmp_path / "job.sh"
    path.write_text(script)
    out = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "to start at" in out.stderr


def test_undefined_template_variable_is_an_error_naming_it():
    with pytest.raises(ScriptTemplateError, match="'gpu_count' is undefined"):
        render(script_template="#!/bin/bash\n#SBATCH --gres=gpu:{{ gpu_count }}\n")


def test_template_from_a_file(tmp_path):
    t = tmp_path / "site.sh.j2"
    t.write_text("#!/bin/bash\n#SBATCH --partition={{ partition }}\n# {{ job_name }}\n. {{ env_file | q }}\n"
                 "exec {{ command_argv | map('q') | join(' ') }}\n")
    script = render(partition="gpu", script_template=str(t), command="python -c 'print(1)'")
    assert "#SBATCH --partition=gpu" in script
    assert "exec python -c 'print(1)'" in script


def test_a_site_template_includes_the_default_run_section():
    """A site's template writes its own directives and keeps ours for the run (run.sh.j2):
    the environment file, modules, setup lines and the quoted command."""
    script = render(script_template='#!/bin/bash\n#SBATCH --licenses=matlab\n{% include "run.sh.j2" %}',
                    modules=["cuda/12.2"], command="python -c 'print(1)'")
    assert script.splitlines() == [
        "#!/bin/bash", "#SBATCH --licenses=matlab",
        ". /tmp/pxm-runs/00000000-0000-0000-0000-000000000007/job.env", "module load cuda/12.2",
        "exec python -c 'print(1)'"]


def test_bad_values_name_field_and_value():
    for field, value in (("time_limit", "ten minutes"), ("memory", "16 gigs"), ("cpus_per_task", 0), ("job_name", "my job")):
        with pytest.raises(ValueError) as info:
            SlurmJobConfiguration(**{field: value})
        assert field in str(info.value) and str(value) in str(info.value)
    with pytest.raises(ValueError, match="extra_directives"):
        SlurmJobConfiguration(extra_directives=["--exclusive\nrm -rf /"])


def test_submit_that_times_out_is_found_by_name_not_submitted_twice(tmp_path, monkeypatch):
    """sbatch accepts the job and then hangs: the worker's submit times out, looks the
    job up by its unique name and takes that id, instead of submitting again."""
    require_service("Slurm", slurm_up(), "bash scripts/slurm-cluster.sh start")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch.calls"
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        f'echo call >> {calls}\n'
        '/usr/bin/sbatch "$@"\n'
        "sleep 30\n"  # the answer never comes back in time
    )
    (bin_dir / "sbatch").chmod(0o755)
    name = f"timeout-probe-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --output=/dev/null\ntrue\n")
    worker = SlurmWorker(work_pool_name="submit-only")
    # scheduler commands run in the worker's environment
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    request = SubmitRequest(str(script), script.read_text(), name, str(tmp_path))
    config = SlurmJobConfiguration(submit_timeout=2)
    job_id = asyncio.run(worker.submit_job(request, LocalTransport(), config, logging.getLogger("t")))
    assert calls.read_text().count("call") == 1
    listed = subprocess.run(["squeue", "-h", "-t", "all", "--name", name, "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert listed == [job_id]


def test_free_text_run_names_make_job_names_that_keep_the_run_id():
    worker = SlurmWorker(work_pool_name="render-only")
    config = SlurmJobConfiguration()
    run_id = uuid.UUID(int=7)
    for name, expected in (
        ("my sweep, lr=0.1/wu 3", "my-sweep-lr-0.1-wu-3"),
        ("3x2 grid", "xm-3x2-grid"),
        ("", "prefect"),
        ("  ", "prefect"),
    ):
        job_name = worker.job_name(config, SimpleNamespace(id=run_id, name=name))
        assert job_name == f"{expected}-{run_id}", name
    script = render(job_name=None, command="true")
    assert "#SBATCH --job-name=brave-fox-00000000-0000-0000-0000-000000000007" in script.splitlines()


def test_accepted_submit_with_an_unreadable_id_is_found_by_name(tmp_path, monkeypatch):
    """sbatch accepts the job but a site wrapper prints no id: the worker finds the job
    by its unique name instead of crashing the run and leaving the job untracked."""
    require_service("Slurm", slurm_up(), "bash scripts/slurm-cluster.sh start")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n/usr/bin/sbatch \"$@\" >/dev/null || exit $?\necho 'Your job has been submitted. Have a nice day!'\n"
    )
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    name = f"chatty-probe-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --output=/dev/null\ntrue\n")
    request = SubmitRequest(str(script), script.read_text(), name, str(tmp_path))
    job_id = asyncio.run(SlurmWorker(work_pool_name="submit-only").submit_job(
        request, LocalTransport(), SlurmJobConfiguration(), logging.getLogger("t")))
    listed = subprocess.run(["squeue", "-h", "-t", "all", "--name", name, "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert listed == [job_id]
