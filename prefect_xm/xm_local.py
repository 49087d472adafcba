"""XManager's ``xm_local`` on Prefect: ``from prefect_xm import xm_local``.

create_experiment / get_experiment / list_experiments talk to the Prefect API named by
PREFECT_API_URL, or to Prefect's embedded (ephemeral) server when it is unset.
"""

from prefect_xm import xm_flags  # noqa: F401  (defines XManager's --xm_* flags, as xmanager.xm_local does)
from prefect_xm.core.api import (
    Experiment,
    WorkUnit,
    create_experiment,
    get_experiment,
    list_experiments,
)
from prefect_xm.core.job_blocks import StartDeadline
from prefect_xm.executors import (
    GOOGLE_KUBERNETES_ENGINE_CLOUD_PROVIDER,
    LSF,
    PBS,
    SGE,
    BatchSpec,
    ContainerSpec,
    Docker,
    DockerOptions,
    HTCondor,
    Kubernetes,
    Local,
    LocalSpec,
    Slurm,
    SlurmSpec,
    TensorboardCapability,
    TpuCapability,
    Vertex,
    WorkPool,
    WorkPoolSpec,
)

# XManager's names of the container executors' specs (one ContainerSpec here), and its
# legacy aliases of Vertex
KubernetesSpec = VertexSpec = CaipSpec = ContainerSpec
Caip = Vertex

__all__ = [
    "GOOGLE_KUBERNETES_ENGINE_CLOUD_PROVIDER", "Caip", "CaipSpec", "DockerOptions", "KubernetesSpec",
    "TensorboardCapability", "TpuCapability", "VertexSpec",
    "BatchSpec", "HTCondor", "LSF", "PBS", "SGE",
    "ContainerSpec", "Docker", "Experiment", "Kubernetes", "Local", "LocalSpec", "Slurm", "SlurmSpec", "StartDeadline", "Vertex", "WorkPool", "WorkPoolSpec", "WorkUnit", "create_experiment",
    "get_experiment", "list_experiments",
]
