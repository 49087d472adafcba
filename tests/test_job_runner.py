"""A job's argv for container images (prefect_xm/core/job_spec.py
build_argv), through a stub `apptainer` on PATH: no apptainer runs here."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from prefect_xm.job_spec import JobSpecError, build_argv

# Words a shell would act on: each must reach the program as one argv item, unchanged.
HOSTILE = ["$(touch {marker})", "a b", "x; touch {marker}", "`touch {marker}`", "*", "it's", "--lr=0.1"]


@pytest.fixture
def apptainer(tmp_path, monkeypatch):
    """A stub apptainer, alone on PATH, that records the argv it was given as JSON."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "apptainer"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['STUB_ARGV'], 'w') as f:\n"
        "    json.dump(sys.argv[1:], f)\n"
    )
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return stub


def hostile(tmp_path) -> list[str]:
    return [a.format(marker=tmp_path / "marker") for a in HOSTILE]


def test_container_runs_the_image_with_args_as_separate_items(apptainer, tmp_path):
    args = hostile(tmp_path)
    argv, env = build_argv({"kind": "container", "image": "docker://alpine:3"}, args)
    assert argv == [str(apptainer), "run", "docker://alpine:3", *args]
    assert env == {}
    # executed as the job runner does (no shell): the runtime gets exactly these words
    record = tmp_path / "argv.json"
    subprocess.run(argv, check=True, env={"STUB_ARGV": str(record)}, timeout=60)
    assert json.loads(record.read_text()) == ["run", "docker://alpine:3", *args]
    assert not (tmp_path / "marker").exists()


def test_python_module_in_a_base_image_runs_with_the_images_python(apptainer, tmp_path):
    code = str(tmp_path / "code")
    argv, env = build_argv({"kind": "module", "module": "cifar10", "path": code, "image": "docker://pytorch"},
                           ["--batch_size=64"])
    # the host's sys.executable does not exist inside the image
    assert argv == [str(apptainer), "exec", "--bind", code, "--pwd", code, "docker://pytorch",
                    "python3", "-m", "cifar10", "--batch_size=64"]
    assert env == {"PYTHONPATH": code}


def test_command_list_in_a_base_image_keeps_args_out_of_the_shell_text(apptainer, tmp_path):
    args = hostile(tmp_path)
    argv, _ = build_argv({"kind": "commands", "commands": ["./pre.sh", "python3 -m cifar10"],
                          "image": "docker://pytorch"}, args)
    assert argv == [str(apptainer), "exec", "docker://pytorch",
                    "bash", "-c", './pre.sh\npython3 -m cifar10 "$@"', "xm-entrypoint", *args]


def test_singularity_when_there_is_no_apptainer(tmp_path, monkeypatch):
    singularity_dir, both_dir = tmp_path / "s", tmp_path / "both"
    for d, names in ((singularity_dir, ["singularity"]), (both_dir, ["singularity", "apptainer"])):
        d.mkdir()
        for name in names:
            (d / name).write_text("#!/bin/sh\n")
            (d / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(singularity_dir))
    assert build_argv({"kind": "container", "image": "img.sif"}, [])[0] == [str(singularity_dir / "singularity"), "run", "img.sif"]
    monkeypatch.setenv("PATH", str(both_dir))
    assert build_argv({"kind": "container", "image": "img.sif"}, [])[0][0] == str(both_dir / "apptainer")


def test_container_without_a_runtime_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither apptainer nor singularity
    with pytest.raises(JobSpecError) as info:
        build_argv({"kind": "container", "image": "docker://alpine:3"}, ["x"])
    message = str(info.value)
    assert "docker://alpine:3" in message and "apptainer" in message and "singularity" in message
    assert "installed" in message


def test_container_without_an_image_is_an_error(apptainer):
    with pytest.raises(JobSpecError, match="image is required"):
        build_argv({"kind": "container"}, [])


def test_base_image_without_a_runtime_runs_on_the_host(tmp_path, monkeypatch):
    # PythonContainer's documented fallback: base_image is used only where apptainer is
    monkeypatch.setenv("PATH", str(tmp_path))
    argv, _ = build_argv({"kind": "module", "module": "m", "image": "docker://pytorch"}, ["--x=1"])
    assert argv == [sys.executable, "-m", "m", "--x=1"]


async def test_a_jobs_output_reaches_the_logs_when_it_ends_while_a_batch_is_posted(monkeypatch):
    """A Local job's output is posted in batches; when the program ends while a batch is
    on its way (a slow server), that batch still arrives, before the final lines."""
    import asyncio

    from prefect_xm import job_runner

    monkeypatch.setattr(job_runner, "LOG_FLUSH_SECONDS", 0.01)
    posted: list[list[str]] = []
    sending = asyncio.Event()
    release = asyncio.Event()

    class SlowServer:
        async def create_logs(self, batch):
            sending.set()
            await release.wait()
            posted.append([log.message for log in batch])

    logs = job_runner._RunLogShipper(SlowServer(), uuid.uuid4())
    logs.emit("line 1")
    logs.emit("line 2")
    await asyncio.wait_for(sending.wait(), 10)  # the first batch is on its way
    logs.emit("exited with code 0")
    closing = asyncio.ensure_future(logs.close())
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(closing, 10)
    assert posted == [["line 1", "line 2"], ["exited with code 0"]]
