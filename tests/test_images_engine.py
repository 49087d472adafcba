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
        # Earlier builds of this image go (this one stays: its layers are the next run's cache).
        repository = image.rsplit(":", 1)[0]
        stale = [ref for ref in _podman("images", "--format", "{{.Repository}}:{{.Tag}}").split()
                 if ref.rsplit(":", 1)[0].rsplit("/", 1)[-1] == repository and not ref.endswith(":" + image.split(":")[1])]
        if stale:
            _podman("rmi", *stale)
