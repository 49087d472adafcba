"""Images for ``xm.python_container`` on the container executors (Docker, Kubernetes,
Vertex AI), built at ``package()`` as XManager builds them: the code at ``path`` copied
in, its ``requirements.txt`` installed, ``docker_instructions`` applied, and prefect-xm
with its dependencies installed, because the job-runner flow runs inside the image.
prefect-docker builds and pushes it (its ``build_docker_image`` and ``push_docker_image``
steps, through the Docker engine that ``DOCKER_HOST`` names).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
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


def dockerfile(base_image: Optional[str], docker_instructions: Optional[list[str]],
               requirements: list[str]) -> str:
    """XManager's python_container image: without docker_instructions, the code copied to
    the workdir and its requirements.txt installed; with them, they replace those steps."""
    quoted = " ".join("'" + r.replace("'", "'\\''") + "'" for r in requirements)
    lines = [
        f"FROM {base_image or default_base_image()}",
        f"RUN python -m pip install --no-cache-dir {quoted}",
        f"COPY prefect-xm/ {PACKAGE_HOME}/",
        f"ENV PYTHONPATH={PACKAGE_HOME}",
        f"WORKDIR {WORKDIR}",
    ]
    lines += docker_instructions if docker_instructions is not None else [
        f"COPY code/ {WORKDIR}/",
        "RUN if [ -f requirements.txt ]; then python -m pip install --no-cache-dir -r requirements.txt; fi",
    ]
    return "\n".join(lines) + "\n"


def build_context(spec: Any, path: str, dest: Path) -> Path:
    """The build context of ``spec`` (an xm.PythonContainer whose code is at ``path``):
    Dockerfile, code/ and prefect-xm/ (this prefect-xm's package, as it runs here)."""
    import prefect_xm

    shutil.copytree(path, dest / "code", ignore=IGNORED)
    shutil.copytree(Path(prefect_xm.__file__).parent, dest / "prefect-xm" / "prefect_xm", ignore=IGNORED)
    (dest / "Dockerfile").write_text(dockerfile(spec.base_image, spec.docker_instructions, runtime_requirements()))
    return dest


def content_tag(context: Path) -> str:
    """A tag that changes with what goes into the image, so an unchanged package is not
    rebuilt under a new name."""
    digest = hashlib.sha256()
    for file in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(context)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def build_image(spec: Any, path: str, name: str, push_image_tag: Optional[str]) -> str:
    """Builds the image (and pushes it to ``push_image_tag``'s registry when given);
    returns its reference. Without push_image_tag the image is ``xm-<name>:<content
    hash>`` in the local engine (Docker pools on this machine)."""
    try:
        from prefect_docker.deployments.steps import build_docker_image, push_docker_image
    except ImportError as e:
        raise ValueError(f"python_container(path={path!r}) on a container executor is built into an image at "
                         f"package(): that needs prefect-docker (pip install 'prefect-xm[docker]'): {e}") from None
    with tempfile.TemporaryDirectory(prefix="xm-image-") as tmp:
        context = build_context(spec, path, Path(tmp))
        if push_image_tag:
            image_name, _, tag = push_image_tag.rpartition(":") if ":" in push_image_tag.rsplit("/", 1)[-1] \
                else (push_image_tag, "", "")
            tag = tag or content_tag(context)
        else:
            # (a repository name: lower case, digits and . _ - only)
            image_name, tag = "xm-" + re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._"), content_tag(context)
        try:
            # As `docker build` does by default: the base image is pulled only when the
            # engine lacks it, so one made or loaded locally is used as it is (prefect-docker
            # asks for pull=True, which fails for an image no registry has), and intermediate
            # containers are removed (docker-py's default is rm=False: they stay behind).
            build_docker_image(image_name=image_name, tag=tag, dockerfile=str(context / "Dockerfile"),
                               path=str(context), pull=False, rm=True)
            if push_image_tag:
                push_docker_image(image_name=image_name, tag=tag)
        except Exception as e:  # the engine's or the registry's refusal, as it said it
            raise ValueError(f"python_container(path={path!r}): building image {image_name}:{tag} failed "
                             f"({type(e).__name__}: {e}); a Docker engine must answer where DOCKER_HOST "
                             f"points, or build the image yourself and give it as xm.container(...)") from None
    return f"{image_name}:{tag}"
