"""The executors of Prefect's stock container pools: Docker, Kubernetes (GKE
accelerators, TPUs) and Vertex AI (its machine table), each with its mapping of
JobRequirements to the pool's job variables."""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from typing import Any, Mapping, Optional, Sequence

from prefect_xm.core.job_blocks import Executor, ExecutorSpec
from prefect_xm.core.resources import GiB, KiB, MiB, TiB, JobRequirements, ResourceType
from prefect_xm.executors.checks import check_requirements, check_str, check_str_dict


class ContainerSpec(ExecutorSpec):
    """Package for an executor that runs the job in a container image (Docker,
    Kubernetes, Vertex AI): the job runner runs inside the image, which must have
    prefect-xm installed. An ``xm.python_container`` is built into such an image at
    package() (prefect_xm.core.images) and pushed to ``push_image_tag``; Docker on this
    machine's engine needs no registry, a cluster pulls from one."""

    #: package() builds an image of a python_container for it
    builds_images = True

    def __init__(self, push_image_tag: Optional[str] = None, *, executor_name: str = "ContainerSpec",
                 needs_registry: bool = False) -> None:
        check_str(f"{executor_name}.Spec", "push_image_tag", push_image_tag)
        self.push_image_tag = push_image_tag
        self.executor_name = executor_name
        self.needs_registry = needs_registry

    def image_destination(self, path: str) -> Optional[str]:
        """Where the image of the code at ``path`` goes: push_image_tag, or None (the
        local engine) where that is enough."""
        if self.push_image_tag is None and self.needs_registry:
            raise ValueError(
                f"the image built at package() from {path!r} for {self.executor_name} must be "
                f"pushed where the cluster pulls it from: give {self.executor_name}.Spec(push_image_tag="
                f"'<registry>/<name>:<tag>')")
        return self.push_image_tag

    def __repr__(self) -> str:
        tag = f"push_image_tag={self.push_image_tag!r}" if self.push_image_tag else ""
        return f"{self.executor_name}.Spec({tag})" if self.executor_name != "ContainerSpec" else f"ContainerSpec({tag})"


class _ContainerExecutor(Executor):
    """A job in a container image on a stock Prefect worker's pool.

    The job-runner flow runs inside the image (Prefect's ``command``), so the image needs
    prefect-xm. The image is the executor's ``image=``, else the packaged
    ``xm.Container``'s image or ``xm.PythonContainer``'s ``base_image``. An
    ``xm.Container``'s args are the command run inside its image (Prefect's command
    replaces the image's entrypoint).
    """

    kind = "container"
    default_pool = ""

    def __init__(self, requirements: Optional[JobRequirements], image: Optional[str],
                 env: Optional[Mapping[str, str]], job_variables: Optional[Mapping[str, Any]],
                 work_pool: Optional[str]) -> None:
        owner = type(self).__name__
        self.requirements = check_requirements(requirements, owner)
        check_str(owner, "image", image)
        check_str(owner, "work_pool", work_pool)
        check_str_dict(owner, "env", env)
        if job_variables is not None and not isinstance(job_variables, Mapping):
            raise ValueError(f"{owner}.job_variables must be a dict, got {job_variables!r}")
        self.image = image
        self.env = dict(env) if env else None
        self.job_variables_ = dict(job_variables or {})
        self.work_pool = work_pool or self.default_pool
        acc = self.requirements.accelerator
        if acc is not None and acc.is_tpu:
            raise ValueError(f"{owner}: accelerator {acc.value}={self.requirements.accelerator_count}: prefect-xm "
                             f"runs no TPUs on {owner} (its pool templates have no TPU variables)")
        if self.requirements.replicas != 1:
            raise ValueError(f"{owner}: replicas={self.requirements.replicas} is not supported (one container "
                             f"per job); use an xm.JobGroup of jobs")

    @property
    def work_pool_name(self) -> str:  # type: ignore[override]
        return self.work_pool

    @classmethod
    def Spec(cls, push_image_tag: Optional[str] = None) -> ContainerSpec:  # noqa: N802
        return ContainerSpec(push_image_tag, executor_name=cls.__name__, needs_registry=cls is not Docker)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(work_pool={self.work_pool!r}, job_variables={self.job_variables()!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (self.work_pool, self.job_variables()) == (
            other.work_pool, other.job_variables())  # type: ignore[attr-defined]

    def _mapped(self) -> dict[str, Any]:
        raise NotImplementedError

    def job_variables(self) -> dict[str, Any]:
        out = self._mapped()
        if self.image is not None:
            out["image"] = self.image
        if self.env:
            out["env"] = dict(self.env)
        for key, value in self.job_variables_.items():
            if key in out and out[key] != value:
                raise ValueError(
                    f"{type(self).__name__}: job variable {key!r} given both by an option or the "
                    f"requirements ({out[key]!r}) and in job_variables ({value!r})"
                )
            out[key] = value
        return out

    def image_for(self, executable: Any) -> Optional[str]:
        if self.image is not None:
            return self.image
        if "image" in self.job_variables_:
            return self.job_variables_["image"]
        image = getattr(executable, "image", None)
        if image and image.startswith("docker://"):
            image = image[len("docker://"):]
        return image or None

    def job_variables_for(self, executable: Any) -> dict[str, Any]:
        out = self.job_variables()
        image = self.image_for(executable)
        if image is None:
            raise ValueError(
                f"{type(self).__name__}: no container image for {getattr(executable, 'name', executable)!r}: "
                f"give {type(self).__name__}(image=...) or package an xm.Container / "
                f"xm.PythonContainer(base_image=...)"
            )
        out["image"] = image
        return out

    def runner_parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        """The job runner already runs inside the image: run the program directly."""
        params = dict(params)
        spec = dict(params["executable"])
        spec.pop("image", None)
        if spec.get("kind") == "container":
            argv = list(params.get("args") or [])
            if not argv:
                raise ValueError(
                    f"{type(self).__name__}: an xm.Container job runs its args as the command inside the image "
                    f"(Prefect's command replaces the entrypoint); give the program as args, e.g. "
                    f"args=['python', 'train.py']"
                )
            spec = {"kind": "command", "command": [argv[0]]}
            params["args"] = argv[1:]
        params["executable"] = spec
        return params


def docker_memory(num_bytes: int) -> str:
    """Bytes -> a docker-py memory string: 16 GiB -> '16g', 1.5 GiB -> '1536m'."""
    for unit, suffix in ((GiB, "g"), (MiB, "m"), (KiB, "k")):
        if num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    return f"{num_bytes}b"


class Docker(_ContainerExecutor):
    """A job in a container on a ``docker`` work pool (prefect-docker's worker).

    ``Docker(xm.JobRequirements(cpu=2, memory='8GiB', gpu=1), image='me/train:1')``:
    cpu -> ``nano_cpus``, any NVIDIA accelerator -> a ``device_requests`` entry for that
    many GPUs (Docker cannot pick a GPU model: the host's GPUs are used), both through
    ``container_create_kwargs``; memory -> ``mem_limit``; ``env``, ``volumes``,
    ``network_mode`` and ``image`` are the worker's own variables.
    """

    default_pool = "docker"

    def __init__(self, requirements: Optional[JobRequirements] = None, *, image: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None, volumes: Optional[Sequence[str]] = None,
                 network_mode: Optional[str] = None, job_variables: Optional[Mapping[str, Any]] = None,
                 work_pool: str = "docker") -> None:
        super().__init__(requirements, image, env, job_variables, work_pool)
        if volumes is not None and (isinstance(volumes, str) or not all(isinstance(v, str) for v in volumes)):
            raise ValueError(f"Docker.volumes must be a list of 'host:container' strings, got {volumes!r}")
        check_str("Docker", "network_mode", network_mode)
        if self.requirements.location is not None:
            raise ValueError(f"Docker: JobRequirements.location={self.requirements.location!r} is not supported; "
                             f"use a work pool whose workers run there")
        self.volumes = list(volumes) if volumes is not None else None
        self.network_mode = network_mode
        self.job_variables()  # fail early

    def _mapped(self) -> dict[str, Any]:
        req = self.requirements
        out: dict[str, Any] = {}
        create: dict[str, Any] = {}
        if req.cpu is not None:
            create["nano_cpus"] = int(round(req.cpu * 1e9))
        if req.accelerator is not None:
            create["device_requests"] = [
                {"driver": "nvidia", "count": req.accelerator_count, "capabilities": [["gpu"]]}]
        if create:
            out["container_create_kwargs"] = create
        if req.memory is not None:
            out["mem_limit"] = docker_memory(req.memory)
        if self.volumes is not None:
            out["volumes"] = list(self.volumes)
        if self.network_mode is not None:
            out["network_mode"] = self.network_mode
        return out


def k8s_cpu(cpu: float) -> str:
    """CPUs -> a Kubernetes quantity: 4 -> '4', 0.5 -> '500m'."""
    if float(cpu).is_integer():
        return str(int(cpu))
    return f"{int(math.ceil(cpu * 1000))}m"


def k8s_memory(num_bytes: int) -> str:
    """Bytes -> a Kubernetes quantity: 16 GiB -> '16Gi', 1.5 GiB -> '1536Mi'."""
    for unit, suffix in ((TiB, "Ti"), (GiB, "Gi"), (MiB, "Mi"), (KiB, "Ki")):
        if num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    return str(num_bytes)


#: GKE's accelerator node label values (the ``cloud.google.com/gke-accelerator`` label).
GKE_ACCELERATORS: dict[ResourceType, str] = {
    ResourceType.K80: "nvidia-tesla-k80",
    ResourceType.P4: "nvidia-tesla-p4",
    ResourceType.P100: "nvidia-tesla-p100",
    ResourceType.V100: "nvidia-tesla-v100",
    ResourceType.T4: "nvidia-tesla-t4",
    ResourceType.A100: "nvidia-tesla-a100",
    ResourceType.A100_80GIB: "nvidia-a100-80gb",
    ResourceType.L4: "nvidia-l4",
    ResourceType.H100: "nvidia-h100-80gb",
    ResourceType.H200: "nvidia-h200-141gb",
}
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"

#: The base job template with GPU variables that Kubernetes pools for prefect-xm use.
KUBERNETES_BASE_JOB_TEMPLATE = "deployments/kubernetes-gpu-base-job-template.json"


#: XManager's only (and default) Kubernetes cloud provider
GOOGLE_KUBERNETES_ENGINE_CLOUD_PROVIDER = "GOOGLE_KUBERNETES_ENGINE"


@dataclasses.dataclass
class TpuCapability:
    """XManager's TPU software request for Kubernetes (refused: no TPUs here)."""

    tpu_runtime_version: str


#: The base job template with TensorBoard variables that Vertex AI pools for prefect-xm use.
VERTEX_BASE_JOB_TEMPLATE = "deployments/vertex-ai-tensorboard-base-job-template.json"
TENSORBOARD_RESOURCE = re.compile(r"^projects/[^/]+/locations/[^/]+/tensorboards/[^/]+$")


@dataclasses.dataclass
class TensorboardCapability:
    """XManager's Vertex AI TensorBoard integration: the job's CustomJob writes to the
    TensorBoard instance ``name`` (its resource name,
    ``projects/PROJECT/locations/REGION/tensorboards/ID``), with its output, logs under
    ``logs/``, in ``base_output_directory`` (``gs://`` added when missing, as XManager
    does)."""

    name: str
    base_output_directory: Optional[str] = None

    def job_variables(self) -> dict[str, Any]:
        if not isinstance(self.name, str) or not TENSORBOARD_RESOURCE.match(self.name):
            raise ValueError(f"TensorboardCapability.name={self.name!r} is not a TensorBoard resource name "
                             f"(projects/PROJECT/locations/REGION/tensorboards/ID), which Vertex AI needs")
        directory = self.base_output_directory
        if not isinstance(directory, str) or not directory.strip("/"):
            # XManager falls back on its staging bucket; prefect-xm has none
            raise ValueError(f"TensorboardCapability.base_output_directory={directory!r}: give the gs:// directory "
                             f"Vertex AI writes the job's output and TensorBoard logs under")
        if not directory.startswith("gs://"):
            directory = "gs://" + directory.lstrip("/")
        return {"tensorboard": self.name, "base_output_directory": {"output_uri_prefix": directory}}


class Kubernetes(_ContainerExecutor):
    """A job as a Kubernetes Job on a ``kubernetes`` work pool (prefect-kubernetes' worker).

    cpu -> ``cpu_request`` = ``cpu_limit`` ('500m', '4'), memory -> ``memory_request`` =
    ``memory_limit`` ('16Gi'); accelerators -> ``gpu_count`` (an ``nvidia.com/gpu``
    limit) and a ``node_selector`` on ``accelerator_label`` (GKE's
    ``cloud.google.com/gke-accelerator: nvidia-tesla-a100`` by default; None for none).
    The stock template has no GPU variables: create the pool with
    ``deployments/kubernetes-gpu-base-job-template.json``.
    """

    default_pool = "kubernetes"

    def __init__(self, requirements: Optional[JobRequirements] = None, *, image: Optional[str] = None,
                 namespace: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                 node_selector: Optional[Mapping[str, str]] = None,
                 accelerator_label: Optional[str] = GKE_ACCELERATOR_LABEL,
                 service_account_name: Optional[str] = None,
                 job_variables: Optional[Mapping[str, Any]] = None, work_pool: str = "kubernetes",
                 cloud_provider: str = GOOGLE_KUBERNETES_ENGINE_CLOUD_PROVIDER,
                 tpu_capability: Optional["TpuCapability"] = None, **xmanager_options: Any) -> None:
        super().__init__(requirements, image, env, job_variables, work_pool)
        if cloud_provider != GOOGLE_KUBERNETES_ENGINE_CLOUD_PROVIDER:
            raise ValueError(f"Kubernetes: cloud_provider={cloud_provider!r} is not supported: the cluster is the "
                             f"one the {self.work_pool!r} pool's worker runs jobs in")
        if tpu_capability is not None:
            raise ValueError(f"Kubernetes: tpu_capability={tpu_capability!r} is not supported (no TPUs on "
                             f"Kubernetes pools here)")
        check_str("Kubernetes", "namespace", namespace)
        check_str("Kubernetes", "accelerator_label", accelerator_label)
        check_str("Kubernetes", "service_account_name", service_account_name)
        check_str_dict("Kubernetes", "node_selector", node_selector)
        unsupported = sorted(k for k, v in xmanager_options.items() if v)
        if unsupported:  # XManager's cloud_provider/tolerations/...: no stock template variable
            raise ValueError(f"Kubernetes: option(s) {', '.join(unsupported)} are not supported; "
                             f"set them in the pool's base job template")
        if self.requirements.location is not None:
            raise ValueError(f"Kubernetes: JobRequirements.location={self.requirements.location!r} is not "
                             f"supported; use node_selector={{'topology.kubernetes.io/zone': ...}}")
        acc = self.requirements.accelerator
        if acc is not None and accelerator_label == GKE_ACCELERATOR_LABEL and not acc.is_any_gpu \
                and acc not in GKE_ACCELERATORS:
            raise ValueError(f"Kubernetes: accelerator {acc.value} has no GKE node label; use gpu= with your "
                             f"own node_selector, or accelerator_label=None")
        self.namespace, self.service_account_name = namespace, service_account_name
        self.node_selector = dict(node_selector) if node_selector else None
        self.accelerator_label = accelerator_label
        self.job_variables()  # fail early

    def _mapped(self) -> dict[str, Any]:
        req = self.requirements
        out: dict[str, Any] = {}
        if self.namespace is not None:
            out["namespace"] = self.namespace
        if self.service_account_name is not None:
            out["service_account_name"] = self.service_account_name
        if req.cpu is not None:
            out["cpu_request"] = out["cpu_limit"] = k8s_cpu(req.cpu)
        if req.memory is not None:
            out["memory_request"] = out["memory_limit"] = k8s_memory(req.memory)
        selector = dict(self.node_selector or {})
        acc = req.accelerator
        if acc is not None:
            out["gpu_count"] = req.accelerator_count
            if self.accelerator_label and not acc.is_any_gpu:
                value = GKE_ACCELERATORS[acc] if self.accelerator_label == GKE_ACCELERATOR_LABEL else acc.value
                if selector.get(self.accelerator_label, value) != value:
                    raise ValueError(f"Kubernetes: node_selector[{self.accelerator_label!r}]="
                                     f"{selector[self.accelerator_label]!r} contradicts accelerator {acc.value}")
                selector[self.accelerator_label] = value
        if selector:
            out["node_selector"] = selector
        return out


# Vertex AI: machine types for custom training (Compute Engine's shapes). Each row:
# (machine type, vCPUs, memory GiB, accelerator count). Memory is Compute Engine's "GB",
# which are GiB.
_N1 = [(f"n1-standard-{n}", n, n * 3.75, 0) for n in (4, 8, 16, 32, 64, 96)] + \
      [(f"n1-highmem-{n}", n, n * 6.5, 0) for n in (2, 4, 8, 16, 32, 64, 96)]


def _n1_with(limits: Mapping[int, tuple[int, float]]) -> list[tuple[str, int, float, int]]:
    """N1 machines that can carry `count` GPUs: limits = {count: (max vCPUs, max GiB)}."""
    rows = []
    for count, (max_cpu, max_mem) in limits.items():
        rows += [(name, cpu, mem, count) for name, cpu, mem, _ in _N1 if cpu <= max_cpu and mem <= max_mem]
    return rows


#: ResourceType -> (Vertex accelerator_type, [(machine_type, vCPUs, GiB, count), ...]).
VERTEX_ACCELERATORS: dict[ResourceType, tuple[str, list[tuple[str, int, float, int]]]] = {
    ResourceType.T4: ("NVIDIA_TESLA_T4", _n1_with({1: (48, 312), 2: (48, 312), 4: (96, 624)})),
    ResourceType.V100: ("NVIDIA_TESLA_V100", _n1_with({1: (12, 78), 2: (24, 156), 4: (48, 312), 8: (96, 624)})),
    ResourceType.P100: ("NVIDIA_TESLA_P100", _n1_with({1: (16, 104), 2: (32, 208), 4: (64, 208)})),
    ResourceType.P4: ("NVIDIA_TESLA_P4", _n1_with({1: (24, 156), 2: (48, 312), 4: (96, 624)})),
    ResourceType.A100: ("NVIDIA_TESLA_A100", [
        ("a2-highgpu-1g", 12, 85, 1), ("a2-highgpu-2g", 24, 170, 2), ("a2-highgpu-4g", 48, 340, 4),
        ("a2-highgpu-8g", 96, 680, 8), ("a2-megagpu-16g", 96, 1360, 16)]),
    ResourceType.A100_80GIB: ("NVIDIA_A100_80GB", [
        ("a2-ultragpu-1g", 12, 170, 1), ("a2-ultragpu-2g", 24, 340, 2), ("a2-ultragpu-4g", 48, 680, 4),
        ("a2-ultragpu-8g", 96, 1360, 8)]),
    ResourceType.L4: ("NVIDIA_L4", [
        ("g2-standard-4", 4, 16, 1), ("g2-standard-8", 8, 32, 1), ("g2-standard-12", 12, 48, 1),
        ("g2-standard-16", 16, 64, 1), ("g2-standard-32", 32, 128, 1), ("g2-standard-24", 24, 96, 2),
        ("g2-standard-48", 48, 192, 4), ("g2-standard-96", 96, 384, 8)]),
    ResourceType.H100: ("NVIDIA_H100_80GB", [("a3-highgpu-8g", 208, 1872, 8)]),
    ResourceType.H200: ("NVIDIA_H200_141GB", [("a3-ultragpu-8g", 224, 2952, 8)]),
}


def vertex_machine(requirements: JobRequirements) -> tuple[str, Optional[str], Optional[int]]:
    """(machine_type, accelerator_type, accelerator_count) for JobRequirements: the
    smallest machine with enough vCPUs and memory that carries the accelerators.
    Raises ValueError naming the field and the value when none exists."""
    cpu, mem = requirements.cpu or 0, (requirements.memory or 0) / GiB
    acc, count = requirements.accelerator, requirements.accelerator_count
    if acc is None:
        accelerator_type, rows = None, [(n, c, m, 0) for n, c, m, _ in _N1]
    else:
        if acc not in VERTEX_ACCELERATORS:
            known = ", ".join(r.value for r in VERTEX_ACCELERATORS)
            raise ValueError(f"Vertex: accelerator {acc.value}={count} is not available on Vertex AI custom "
                             f"training through prefect-xm (known: {known})")
        accelerator_type, all_rows = VERTEX_ACCELERATORS[acc]
        rows = [r for r in all_rows if r[3] == count]
        if not rows:
            counts = sorted({r[3] for r in all_rows})
            raise ValueError(f"Vertex: {acc.value}={count} is not available: {accelerator_type} comes in counts "
                             f"{', '.join(map(str, counts))} per machine")
    fitting = [r for r in rows if r[1] >= cpu and r[2] >= mem]
    if not fitting:
        biggest_cpu = max(r[1] for r in rows)
        biggest_mem = max(r[2] for r in rows)
        what = f" with {acc.value}={count}" if acc is not None else ""
        if cpu > biggest_cpu:
            raise ValueError(f"Vertex: cpu={requirements.cpu} is more than any machine{what} has "
                             f"(at most {biggest_cpu} vCPUs)")
        if mem > biggest_mem:
            raise ValueError(f"Vertex: memory={requirements.memory} bytes ({mem:g} GiB) is more than any "
                             f"machine{what} has (at most {biggest_mem:g} GiB)")
        raise ValueError(f"Vertex: no machine{what} has both cpu={requirements.cpu} and {mem:g} GiB of memory")
    name, _, _, _ = min(fitting, key=lambda r: (r[1], r[2]))
    return name, accelerator_type, (count if acc is not None else None)


def _hours(value: Any, field: str) -> int:
    """A time limit (timedelta, or int minutes as for Slurm) -> whole hours, rounded up."""
    if isinstance(value, bool) or not isinstance(value, (int, datetime.timedelta)):
        raise ValueError(f"{field}: expected a datetime.timedelta or an int of minutes, got {value!r}")
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value * 60
    if seconds <= 0:
        raise ValueError(f"{field} must be positive, got {value!r}")
    return int(math.ceil(seconds / 3600))


class Vertex(_ContainerExecutor):
    """A job as a Vertex AI CustomJob on a ``vertex-ai`` work pool (prefect-gcp's worker).

    ``Vertex(xm.JobRequirements(a100=2, location='us-central1'), time=datetime.timedelta(hours=6))``:
    cpu, memory and the accelerator choose ``machine_type`` (A100 x2 -> a2-highgpu-2g,
    A100 80GB x4 -> a2-ultragpu-4g, H100 x8 -> a3-highgpu-8g, T4 -> n1-standard-*, L4 ->
    g2-standard-*) with ``accelerator_type``/``accelerator_count``;
    ``JobRequirements.location`` -> ``region``; ``time`` (timedelta or minutes) ->
    ``maximum_run_time_hours`` (rounded up); ``tensorboard`` (XManager's
    TensorboardCapability) -> ``tensorboard`` and ``base_output_directory``, variables
    the stock template lacks: create the pool with
    ``deployments/vertex-ai-tensorboard-base-job-template.json``. An impossible
    combination raises ValueError.
    """

    default_pool = "vertex-ai"

    def __init__(self, requirements: Optional[JobRequirements] = None,
                 tensorboard: Optional[TensorboardCapability] = None, *, image: Optional[str] = None,
                 time: Any = None, service_account_name: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None, job_variables: Optional[Mapping[str, Any]] = None,
                 work_pool: str = "vertex-ai", **xmanager_options: Any) -> None:
        super().__init__(requirements, image, env, job_variables, work_pool)
        check_str("Vertex", "service_account_name", service_account_name)
        if tensorboard is not None and not isinstance(tensorboard, TensorboardCapability):
            raise ValueError(f"Vertex.tensorboard must be an xm_local.TensorboardCapability, got {tensorboard!r}")
        unsupported = sorted(k for k, v in xmanager_options.items() if v)
        if unsupported:  # e.g. pull_images=
            raise ValueError(f"Vertex: option(s) {', '.join(unsupported)} are not supported by prefect-xm")
        self.max_hours = None if time is None else _hours(time, "Vertex.time")
        self.service_account_name = service_account_name
        self.tensorboard = tensorboard
        self.machine = vertex_machine(self.requirements)
        self.job_variables()  # fail early

    def _mapped(self) -> dict[str, Any]:
        machine_type, accelerator_type, count = self.machine
        out: dict[str, Any] = {"machine_type": machine_type}
        if accelerator_type is not None:
            out["accelerator_type"] = accelerator_type
            out["accelerator_count"] = count
        if self.requirements.location is not None:
            out["region"] = self.requirements.location
        if self.max_hours is not None:
            out["maximum_run_time_hours"] = self.max_hours
        if self.service_account_name is not None:
            out["service_account_name"] = self.service_account_name
        if self.tensorboard is not None:
            out.update(self.tensorboard.job_variables())
        return out
