"""Images for ``xm.python_container`` and ``xm.dockerfile_container`` on the container
executors (Docker, Kubernetes, Vertex AI), built at ``package()`` as XManager builds them:
the code at ``path`` copied in, its ``requirements.txt`` installed, ``docker_instructions``
applied (or the user's own Dockerfile built), and prefect-xm with its dependencies
installed, because the job-runner flow runs inside the image.
prefect-docker builds and pushes it (its ``build_docker_image`` and ``push_docker_image``
steps, through the Docker engine that ``DOCKER_HOST`` names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

#: where the code goes in the image, and where the job runs (XManager's workdir)
WORKDIR = "/workdir"
#: prefect-xm's own package in the image, on PYTHONPATH
PACKAGE_HOME = "/opt/prefect-xm"
#: files of the code that never go into an image
IGNORED = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".venv", ".xm-*")


def default_base_image() -> str:
    """The launcher's Python minor version, so what was tested here runs there."""
    return f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"


def runtime_requirements() -> list[str]:
    """prefect-xm's own dependencies (no extras), with Prefect pinned to this launcher's
    version: the job runner inside the image talks to the same server."""
    import prefect
    from packaging.requirements import Requirement

    requirements = []
    for text in importlib.metadata.requires("prefect-xm") or []:
        requirement = Requirement(text)
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        if requirement.name.lower() == "prefect":
            requirement.specifier = type(requirement.specifier)(f"=={prefect.__version__}")
        requirements.append(str(requirement))
    return requirements


def job_runner_steps(requirements: list[str]) -> list[str]:
    """The Dockerfile steps that put the job runner (prefect-xm, its dependencies) into an
    image that has ``python`` with pip; the build context holds ``prefect-xm/``."""
    quoted = " ".join("'" + r.replace("'", "'\\''") + "'" for r in requirements)
    return [
        f"RUN python -m pip install --no-cache-dir {quoted}",
        f"COPY prefect-xm/ {PACKAGE_HOME}/",
        f"ENV PYTHONPATH={PACKAGE_HOME}",
    ]


def dockerfile(base_image: Optional[str], docker_instructions: Optional[list[str]],
               requirements: list[str], deep_module_dir: Optional[str] = None) -> str:
    """XManager's python_container image: without docker_instructions, the code copied to
    the workdir and its requirements.txt installed; with them, they replace those steps.
    With use_deep_module (``deep_module_dir``, the code's directory name) the code goes
    to ``/workdir/<its name>``, as XManager puts it, so ``<its name>.module`` imports."""
    code_dir = f"{WORKDIR}/{deep_module_dir}" if deep_module_dir else WORKDIR
    requirements_txt = f"{deep_module_dir}/requirements.txt" if deep_module_dir else "requirements.txt"
    lines = [
        f"FROM {base_image or default_base_image()}",
        *job_runner_steps(requirements),
        f"WORKDIR {WORKDIR}",
    ]
    lines += docker_instructions if docker_instructions is not None else [
        f"COPY code/ {code_dir}/",
        f"RUN if [ -f {requirements_txt} ]; then python -m pip install --no-cache-dir -r {requirements_txt}; fi",
    ]
    return "\n".join(lines) + "\n"


def _copy_prefect_xm(dest: Path) -> None:
    import prefect_xm

    shutil.copytree(Path(prefect_xm.__file__).parent, dest / "prefect-xm" / "prefect_xm", ignore=IGNORED)


def build_context(spec: Any, path: str, dest: Path) -> Path:
    """The build context of ``spec`` (an xm.PythonContainer whose code is at ``path``):
    Dockerfile, code/ and prefect-xm/ (this prefect-xm's package, as it runs here)."""
    shutil.copytree(path, dest / "code", ignore=IGNORED)
    _copy_prefect_xm(dest)
    deep = os.path.basename(os.path.abspath(path)) if getattr(spec, "use_deep_module", False) else None
    (dest / "Dockerfile").write_text(dockerfile(spec.base_image, spec.docker_instructions, runtime_requirements(),
                                                deep))
    return dest


def job_runner_layer(image: str, requirements: list[str], user: str = "") -> str:
    """The Dockerfile of the layer that goes on an image built from the user's own
    Dockerfile: the job runner added (as root), the entrypoint cleared so that Prefect's
    command starts it (the image's entrypoint becomes the job's command instead), the rest
    of the image (WORKDIR, ENV, the USER it runs as) as the user's Dockerfile left it."""
    lines = [f"FROM {image}", "USER root", *job_runner_steps(requirements)]
    if user:
        lines.append(f"USER {user}")
    return "\n".join([*lines, "ENTRYPOINT []", "CMD []"]) + "\n"


def content_tag(context: Path) -> str:
    """A tag that changes with what goes into the image, so an unchanged package is not
    rebuilt under a new name."""
    digest = hashlib.sha256()
    for file in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(context)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def _docker_steps(what: str):
    try:
        from prefect_docker.deployments import steps
    except ImportError as e:
        raise ValueError(f"{what} on a container executor is built into an image at package(): that needs "
                         f"prefect-docker (pip install 'prefect-xm[docker]'): {e}") from None
    return steps


def _image_name_and_tag(name: str, push_image_tag: Optional[str], context: Path) -> tuple[str, str]:
    if push_image_tag:
        image_name, _, tag = push_image_tag.rpartition(":") if ":" in push_image_tag.rsplit("/", 1)[-1] \
            else (push_image_tag, "", "")
        return image_name, tag or content_tag(context)
    # (a repository name: lower case, digits and . _ - only)
    return "xm-" + re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._"), content_tag(context)


def _build(what: str, image_name: str, tag: str, dockerfile_path: str, context: Path, hint: str = "") -> None:
    steps = _docker_steps(what)
    try:
        # As `docker build` does by default: the base image is pulled only when the
        # engine lacks it, so one made or loaded locally is used as it is (prefect-docker
        # asks for pull=True, which fails for an image no registry has), and intermediate
        # containers are removed (docker-py's default is rm=False: they stay behind).
        steps.build_docker_image(image_name=image_name, tag=tag, dockerfile=dockerfile_path,
                                 path=str(context), pull=False, rm=True)
    except Exception as e:  # the engine's refusal, as it said it
        raise ValueError(f"{what}: building image {image_name}:{tag} failed ({type(e).__name__}: {e}); "
                         f"{hint}a Docker engine must answer where DOCKER_HOST points, or build the image "
                         f"yourself and give it as xm.container(...)") from None


def _push(what: str, image_name: str, tag: str) -> None:
    try:
        _docker_steps(what).push_docker_image(image_name=image_name, tag=tag)
    except Exception as e:  # the registry's refusal
        raise ValueError(f"{what}: pushing image {image_name}:{tag} failed ({type(e).__name__}: {e})") from None


def build_image(spec: Any, path: str, name: str, push_image_tag: Optional[str]) -> str:
    """Builds the image (and pushes it to ``push_image_tag``'s registry when given);
    returns its reference. Without push_image_tag the image is ``xm-<name>:<content
    hash>`` in the local engine (Docker pools on this machine)."""
    what = f"python_container(path={path!r})"
    _docker_steps(what)
    with tempfile.TemporaryDirectory(prefix="xm-image-") as tmp:
        context = build_context(spec, path, Path(tmp))
        image_name, tag = _image_name_and_tag(name, push_image_tag, context)
        _build(what, image_name, tag, str(context / "Dockerfile"), context)
        if push_image_tag:
            _push(what, image_name, tag)
    return f"{image_name}:{tag}"


@dataclasses.dataclass(frozen=True)
class DockerfileImage:
    """An image built from the user's Dockerfile with the job runner layered on, and what
    the user's image runs: its ENTRYPOINT (the job's command; the container starts in the
    image's own WORKDIR)."""

    reference: str
    entrypoint: list[str]


def build_dockerfile_image(path: str, dockerfile_path: Optional[str], name: str,
                           push_image_tag: Optional[str]) -> DockerfileImage:
    """XManager's dockerfile_container: the Dockerfile (default ``<path>/Dockerfile``)
    built with ``path`` as its context, as the user wrote it; then, because the job runner
    runs inside the image, a layer with prefect-xm on top (the image needs ``python``
    with pip). Pushed to ``push_image_tag``'s registry when given."""
    from prefect.utilities.dockerutils import docker_client

    what = f"dockerfile_container(path={path!r})"
    dockerfile_path = os.path.abspath(dockerfile_path or os.path.join(path, "Dockerfile"))
    if not os.path.isfile(dockerfile_path):
        raise ValueError(f"{what}: Dockerfile {dockerfile_path!r} is not a file")
    _docker_steps(what)
    user_name, user_tag = _image_name_and_tag(name + "-dockerfile", None, Path(path))
    _build(what, user_name, user_tag, dockerfile_path, Path(path))
    with docker_client() as client:
        config = client.images.get(f"{user_name}:{user_tag}").attrs.get("Config") or {}
    with tempfile.TemporaryDirectory(prefix="xm-image-") as tmp:
        context = Path(tmp)
        _copy_prefect_xm(context)
        (context / "Dockerfile").write_text(job_runner_layer(f"{user_name}:{user_tag}", runtime_requirements(),
                                                                 config.get("User") or ""))
        image_name, tag = _image_name_and_tag(name, push_image_tag, context)
        if not push_image_tag:
            tag = f"{user_tag}-{tag}"  # (a new user's image is a new image)
        _build(what, image_name, tag, str(context / "Dockerfile"), context,
               hint="the job runner runs inside the image, so the Dockerfile's image needs `python` with pip; ")
        if push_image_tag:
            _push(what, image_name, tag)
    return DockerfileImage(f"{image_name}:{tag}", list(config.get("Entrypoint") or []))
