"""xm.python_container built into an image for real: a launch script packages it for
xm_local.Docker through experiment.package(), with DOCKER_HOST on podman's
Docker-compatible API (scripts/podman-engine.sh), and the image runs: the code in
/workdir, its requirements.txt installed, the job runner's prefect-xm importable.

The base image is the engine's local one (no registry here); the build pip-installs
prefect-xm's dependencies from PyPI inside the engine (layer-cached between runs)."""

from __future__ import annotations

import json
import subprocess

import prefect
import pytest

from conftest import REPO, cluster_is_up, require_service

pytestmark = [pytest.mark.engine, pytest.mark.e2e]

ENGINE = ["bash", str(REPO / "scripts" / "podman-engine.sh")]
# a tiny package that none of prefect-xm's dependencies pulls in, pinned: the check below
# proves the code's requirements.txt step ran
REQUIREMENT = ("wcwidth", "0.2.13")


@pytest.fixture(scope="module")
def engine():
    require_service("podman engine", cluster_is_up("podman-engine.sh"),
                    "start it with `bash scripts/podman-engine.sh start`")
    docker_host = subprocess.run(ENGINE + ["docker-host"], capture_output=True, text=True, check=True).stdout.strip()
    base_image = subprocess.run(ENGINE + ["base-image"], capture_output=True, text=True, check=True).stdout.strip()
    return docker_host, base_image


def _podman(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr}"
    return done.stdout


def test_package_builds_the_python_container_and_the_image_runs_its_code(engine, prefect_server, tmp_path,
                                                                         monkeypatch):
    from prefect.context import refresh_global_settings_context

    from prefect_xm import xm, xm_local

    refresh_global_settings_context()
    docker_host, base_image = engine
    code = tmp_path / "project"
    code.mkdir()
    (code / "train_in_image.py").write_text("import wcwidth, sys\nprint('trained with', sys.argv[1:])\n")
    (code / "requirements.txt").write_text("%s==%s\n" % REQUIREMENT)
    monkeypatch.setenv("DOCKER_HOST", docker_host)

    with xm_local.create_experiment(experiment_title="image-build") as experiment:
        [executable] = experiment.package([xm.python_container(
            executor_spec=xm_local.Docker.Spec(), path=str(code), base_image=base_image,
            entrypoint=xm.ModuleName("train_in_image"))])

    image = executable.image
    assert image.startswith("xm-train_in_image:") and executable.path == "/workdir"
    try:
        probe = ("import json, os, importlib.metadata as m, prefect, prefect_xm.flows.job_runner as j; "
                 "print(json.dumps([os.getcwd(), sorted(os.listdir()), m.version('wcwidth'), prefect.__version__, "
                 "j.__file__]))")
        cwd, files, version, prefect_version, job_runner = json.loads(
            _podman("run", "--rm", "--network=none", image, "python", "-c", probe).strip().splitlines()[-1])
        assert cwd == "/workdir" and files == ["requirements.txt", "train_in_image.py"]
        assert version == REQUIREMENT[1]
        assert prefect_version == prefect.__version__  # pinned to the launcher's
        assert job_runner == "/opt/prefect-xm/prefect_xm/flows/job_runner.py"
        # the entrypoint, as the Docker executor's job runs it
        assert _podman("run", "--rm", "--network=none", image, "python", "-m", executable.module,
                       "--lr=0.1").strip() == "trained with ['--lr=0.1']"
    finally:
        _remove_older_builds(image)


def _remove_older_builds(image: str) -> None:
    """Earlier builds of this image go (this one stays: its layers are the next run's cache)."""
    repository, tag = image.rsplit(":", 1)
    stale = [ref for ref in _podman("images", "--format", "{{.Repository}}:{{.Tag}}").split()
             if ref.rsplit(":", 1)[0].rsplit("/", 1)[-1] == repository and not ref.endswith(":" + tag)]
    if stale:
        _podman("rmi", *stale)


def test_package_builds_a_dockerfile_container_whose_entrypoint_is_the_jobs_command(engine, prefect_server, tmp_path,
                                                                                    monkeypatch):
    """XManager's examples/dockerfile shape: a Dockerfile with an ENTRYPOINT, the job's args
    after it. The user's image is built as written, the job runner goes on top."""
    from prefect.context import refresh_global_settings_context

    from prefect_xm import xm, xm_local

    refresh_global_settings_context()
    docker_host, base_image = engine
    context = tmp_path / "tool-image"
    context.mkdir()
    (context / "tool.py").write_text("import os, sys\nprint(os.getcwd(), os.environ['TOOL_MODE'], sys.argv[1:])\n")
    (context / "Dockerfile").write_text(f"FROM {base_image}\nWORKDIR /app\nCOPY tool.py tool.py\n"
                                        f"ENV TOOL_MODE=fast\nENTRYPOINT [\"python\", \"tool.py\"]\n")
    monkeypatch.setenv("DOCKER_HOST", docker_host)

    with xm_local.create_experiment(experiment_title="dockerfile-build") as experiment:
        [executable] = experiment.package([xm.dockerfile_container(xm_local.Docker.Spec(), str(context))])

    image = executable.image
    assert image.startswith("xm-tool-image:") and executable.kind == "command"
    assert executable.command == ["python", "tool.py"]  # the image's ENTRYPOINT
    try:
        assert json.loads(_podman("image", "inspect", "--format", "{{json .Config.Entrypoint}}", image)) in (None, [])
        # what the job runner runs inside the image: the entrypoint and the job's args, in its WORKDIR and ENV
        assert _podman("run", "--rm", "--network=none", image, *executable.command, "--a=1").strip() == \
            "/app fast ['--a=1']"
        probe = "import prefect, prefect_xm.flows.job_runner; print(prefect.__version__)"
        assert _podman("run", "--rm", "--network=none", image, "python", "-c", probe).strip().splitlines()[-1] == \
            prefect.__version__
    finally:
        _remove_older_builds(image)
        _remove_older_builds("xm-tool-image-dockerfile:" + image.split(":", 1)[1].split("-", 1)[0])
