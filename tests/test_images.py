"""xm.python_container on the container executors: the image built at package(), as
XManager builds it. The build context and the Dockerfile are tested here, and the
build's refusal without an engine (clear, at package(), before anything is added); the
build itself, in a real engine (podman's Docker API), in tests/test_images_engine.py."""

from __future__ import annotations

import prefect
import pytest

from prefect_xm import xm, xm_local
from prefect_xm.core.images import PACKAGE_HOME, WORKDIR, build_context, content_tag, default_base_image
from prefect_xm.core.job_blocks import package_spec


@pytest.fixture
def code(tmp_path):
    code = tmp_path / "project"
    (code / ".git").mkdir(parents=True)
    (code / ".git" / "HEAD").write_text("ref")
    (code / "cifar10.py").write_text("print('train')\n")
    (code / "requirements.txt").write_text("numpy\n")
    return code


def test_the_build_context_holds_the_code_prefect_xm_and_xmanagers_dockerfile(code, tmp_path):
    spec = xm.PythonContainer(entrypoint=xm.ModuleName("cifar10"), path=str(code), base_image="pytorch/pytorch:2.3")
    context = build_context(spec, str(code), tmp_path / "context")
    lines = (context / "Dockerfile").read_text().splitlines()
    assert lines[0] == "FROM pytorch/pytorch:2.3"
    # the job runner runs inside the image: prefect-xm's dependencies, Prefect as here
    assert lines[1].startswith("RUN python -m pip install --no-cache-dir ")
    assert f"'prefect=={prefect.__version__}'" in lines[1]
    assert "asyncssh" in lines[1] and "prefect-docker" not in lines[1]  # no extras
    assert lines[2:] == [f"COPY prefect-xm/ {PACKAGE_HOME}/", f"ENV PYTHONPATH={PACKAGE_HOME}", f"WORKDIR {WORKDIR}",
                         f"COPY code/ {WORKDIR}/",
                         "RUN if [ -f requirements.txt ]; then python -m pip install --no-cache-dir -r requirements.txt; fi"]
    assert (context / "code" / "cifar10.py").read_text() == "print('train')\n"
    assert not (context / "code" / ".git").exists()
    assert (context / "prefect-xm" / "prefect_xm" / "flows" / "job_runner.py").is_file()


def test_docker_instructions_replace_the_code_steps_and_the_base_image_defaults_to_this_python(code, tmp_path):
    spec = xm.PythonContainer(entrypoint=xm.ModuleName("cifar10"), path=str(code),
                              docker_instructions=["COPY code/cifar10.py cifar10.py", "RUN true"])
    lines = (build_context(spec, str(code), tmp_path / "c") / "Dockerfile").read_text().splitlines()
    assert lines[0] == f"FROM {default_base_image()}" and lines[-2:] == ["COPY code/cifar10.py cifar10.py", "RUN true"]
    assert f"COPY code/ {WORKDIR}/" not in lines


def test_the_images_tag_follows_its_content(code, tmp_path):
    spec = xm.PythonContainer(entrypoint=xm.ModuleName("cifar10"), path=str(code))
    first = content_tag(build_context(spec, str(code), tmp_path / "a"))
    assert content_tag(build_context(spec, str(code), tmp_path / "b")) == first
    (code / "cifar10.py").write_text("print('changed')\n")
    assert content_tag(build_context(spec, str(code), tmp_path / "c")) != first


def test_package_builds_the_image_and_says_clearly_when_no_engine_answers(code, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    packageable = xm.python_container(executor_spec=xm_local.Docker.Spec(), path=str(code),
                                      entrypoint=xm.ModuleName("cifar10"))
    with pytest.raises(ValueError) as raised:
        package_spec(packageable)
    message = str(raised.value)
    assert f"python_container(path={str(code)!r})" in message and "building image xm-cifar10:" in message
    assert "xm.container(" in message
    # a cluster pulls from a registry: Kubernetes and Vertex need somewhere to push it
    for executor in (xm_local.Kubernetes, xm_local.Vertex):
        with pytest.raises(ValueError, match=rf"give {executor.__name__}.Spec\(push_image_tag="):
            package_spec(xm.python_container(executor_spec=executor.Spec(), path=str(code),
                                             entrypoint=xm.ModuleName("cifar10")))
    # Local and the batch executors run the code where it is: nothing is built
    assert package_spec(xm.python_container(executor_spec=xm_local.Local.Spec(), path=str(code),
                                            entrypoint=xm.ModuleName("cifar10"))).path == str(code)


def test_a_dockerfiles_image_gets_the_job_runner_layered_on_keeping_its_user(tmp_path, monkeypatch):
    from prefect_xm.core.images import job_runner_layer, runtime_requirements

    layer = job_runner_layer("xm-tool-dockerfile:abc", runtime_requirements(), "app")
    lines = layer.splitlines()
    assert lines[:2] == ["FROM xm-tool-dockerfile:abc", "USER root"]
    assert any(line.startswith("RUN python -m pip install") and "'prefect==" in line for line in lines)
    # the entrypoint goes (Prefect's command starts the job runner); the user it ran as stays
    assert lines[-3:] == ["USER app", "ENTRYPOINT []", "CMD []"]
    assert "USER" not in job_runner_layer("i:1", [], "").split("USER root", 1)[1]

    # without an engine: the error names the Dockerfile's directory and what failed
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    (tmp_path / "tool").mkdir()
    (tmp_path / "tool" / "Dockerfile").write_text("FROM scratch\n")
    with pytest.raises(ValueError) as raised:
        package_spec(xm.dockerfile_container(xm_local.Docker.Spec(), str(tmp_path / "tool")))
    assert f"dockerfile_container(path={str(tmp_path / 'tool')!r})" in str(raised.value)
    assert "building image xm-tool-dockerfile:" in str(raised.value)
    with pytest.raises(ValueError, match="Dockerfile .*Dockerfile.gpu' is not a file"):
        package_spec(xm.dockerfile_container(xm_local.Docker.Spec(), str(tmp_path / "tool"),
                                             str(tmp_path / "tool" / "Dockerfile.gpu")))
    with pytest.raises(ValueError, match=r"give Vertex.Spec\(push_image_tag="):
        package_spec(xm.dockerfile_container(xm_local.Vertex.Spec(), str(tmp_path / "tool")))


def test_use_deep_module_imports_the_module_under_its_code_directorys_name(tmp_path):
    """XManager's layout: launcher.py and cifar10.py in local_container_gpu/, entrypoint
    ModuleName('local_container_gpu.cifar10') with use_deep_module=True."""
    import os
    import subprocess

    from prefect_xm.job_spec import build_argv

    code = tmp_path / "local_container_gpu"
    code.mkdir()
    (code / "cifar10.py").write_text("import sys; print('deep', __name__, sys.argv[1:])\n")
    packageable = xm.python_container(executor_spec=xm_local.Local.Spec(), path=str(code),
                                      entrypoint=xm.ModuleName("local_container_gpu.cifar10"), use_deep_module=True)
    exe = package_spec(packageable)
    assert exe.path == str(tmp_path)
    params = exe.runner_parameters(xm.SequentialArgs.from_collection(["--lr=0.1"]), {})
    argv, env = build_argv(params["executable"], params["args"])
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, cwd="/")
    assert done.stdout.strip() == "deep __main__ ['--lr=0.1']", done.stderr
    # in an image the code goes to /workdir/<its name>, as XManager's default steps put it
    text = (build_context(packageable.executable_spec, str(code), tmp_path / "ctx") / "Dockerfile").read_text()
    assert f"COPY code/ {WORKDIR}/local_container_gpu/" in text and f"WORKDIR {WORKDIR}\n" in text
