"""Local: the embedded default (no pool: the job-runner flow runs in the launching
process, the program in a subprocess)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from prefect_xm.core.job_blocks import Executor, ExecutorSpec
from prefect_xm.core.resources import JobRequirements
from prefect_xm.executors.checks import check_requirements


class LocalSpec(ExecutorSpec):
    """Package for the Local executor."""

    runs_locally = True

    def __repr__(self) -> str:
        return "Local.Spec()"


@dataclasses.dataclass
class DockerOptions:
    """XManager's options for a Local job in a Docker container (ports, volumes, ...).
    Local containers run here with Apptainer/Singularity (no Docker engine is assumed),
    which has no such options: a Local job with docker_options whose executable is a
    container is refused at add(); for other executables they do nothing (as in XManager)."""

    ports: Optional[Mapping[Any, Any]] = None
    volumes: Optional[Mapping[str, str]] = None
    mount_gcs_path: bool = True
    interactive: bool = False


@dataclasses.dataclass
class Local(Executor):
    """Runs jobs on this machine: each job is a flow run of the job-runner flow executed
    by the launching process, its program a subprocess in its own process group.

    requirements are recorded but not enforced locally. experimental_stream_output (on
    by default, as in XManager): each line the program writes is also printed on the
    launcher's terminal, prefixed with the job's name; its run's logs have it either way.
    """

    requirements: Optional[JobRequirements] = None
    docker_options: Optional[DockerOptions] = None
    experimental_stream_output: bool = True

    def __post_init__(self) -> None:
        self.requirements = check_requirements(self.requirements, "Local")
        if self.docker_options is not None and not isinstance(self.docker_options, DockerOptions):
            raise ValueError(f"Local.docker_options must be xm_local.DockerOptions, got {self.docker_options!r}")
        if not isinstance(self.experimental_stream_output, bool):
            raise ValueError(f"Local.experimental_stream_output must be True or False, "
                             f"got {self.experimental_stream_output!r}")

    work_pool_name = None

    def runner_parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.docker_options is not None and (params.get("executable") or {}).get("kind") == "container":
            raise ValueError(f"Local(docker_options={self.docker_options!r}): Local containers run with "
                             f"Apptainer here, which takes no Docker options; use a Docker pool "
                             f"(xm_local.Docker(..., volumes=[...])) for them")
        return params

    @classmethod
    def Spec(cls) -> LocalSpec:  # noqa: N802
        return LocalSpec()


# ----------------------------------------------- batch schedulers: Slurm, SGE, PBS, LSF, HTCondor
