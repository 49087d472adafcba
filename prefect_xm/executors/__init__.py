"""Executors: where a job runs.

An executor is a Prefect work pool plus that pool's job variables. ``Local`` is the
embedded default (no pool: the job-runner flow runs in the launching process, the
program in a subprocess). ``Slurm``, ``SGE``, ``PBS``, ``LSF`` and ``HTCondor`` target our
workers' pools, ``Docker``, ``Kubernetes`` and ``Vertex`` the stock ones, ``WorkPool`` any.
Job variables are checked against the pool's variable schema (core/deployments.py, read
from the Prefect API) before anything is submitted, because Prefect silently drops job
variables a pool does not declare.
"""

from prefect_xm.executors.local import (  # noqa: F401
    DockerOptions,
    Local,
    LocalSpec,
)
from prefect_xm.executors.batch import (  # noqa: F401
    BatchSpec,
    COMMON_OPTIONS,
    HTCondor,
    LSF,
    PBS,
    SGE,
    Slurm,
    SlurmSpec,
    WorkPool,
    WorkPoolSpec,
)
from prefect_xm.executors.containers import (  # noqa: F401
    ContainerSpec,
    Docker,
    GKE_ACCELERATOR_LABEL,
    GOOGLE_KUBERNETES_ENGINE_CLOUD_PROVIDER,
    KUBERNETES_BASE_JOB_TEMPLATE,
    Kubernetes,
    TENSORBOARD_RESOURCE,
    TensorboardCapability,
    TpuCapability,
    VERTEX_BASE_JOB_TEMPLATE,
    Vertex,
    docker_memory,
    k8s_cpu,
    k8s_memory,
    vertex_machine,
)
