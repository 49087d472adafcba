"""JobRequirements and ResourceType (XManager's vocabulary), with validation.

``JobRequirements(cpu=4, memory=16 * xm.GiB, a100=2, replicas=2)``. Memory-like values
are bytes (int/float) or strings such as ``"16GiB"``, ``"512M"``. Invalid values raise
ValueError naming the field and the value.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Any, Mapping, Optional, Union

# Units (XManager exposes these as xm.KiB, xm.GiB, ...).
KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
PiB = 1024**5
KB = 1000
MB = 1000**2
GB = 1000**3
TB = 1000**4
PB = 1000**5
vCPU = 1
mCPU = 1e-3  # noqa: N816


class _CaseInsensitiveEnumMeta(enum.EnumMeta):
    """`ResourceType['v100']` as XManager allows: names in any case."""

    def __getitem__(cls, name: str):
        try:
            return super().__getitem__(str(name).upper())
        except KeyError:
            raise KeyError(f"Unknown {cls.__name__} {name!r}") from None


class ResourceType(enum.Enum, metaclass=_CaseInsensitiveEnumMeta):
    CPU = "cpu"
    RAM = "ram"
    MEMORY = "memory"
    EPHEMERAL_STORAGE = "ephemeral_storage"
    DISK = "disk"
    GPU = "gpu"
    # XManager's GPUs of the local machine (Local/Docker): any GPU, as `gpu`
    LOCAL_GPU = "local_gpu"
    # NVIDIA accelerators
    A100 = "a100"
    A100_80GIB = "a100_80gib"
    H100 = "h100"
    H200 = "h200"
    L4 = "l4"
    L40S = "l40s"
    T4 = "t4"
    V100 = "v100"
    P100 = "p100"
    P4 = "p4"
    K80 = "k80"
    A10 = "a10"
    A40 = "a40"
    RTX6000 = "rtx6000"
    B200 = "b200"
    # TPUs (accepted for compatibility; no batch executor maps them)
    TPU_V2 = "tpu_v2"
    TPU_V3 = "tpu_v3"
    TPU_V4 = "tpu_v4"
    TPU_V5E = "tpu_v5e"
    TPU_V5P = "tpu_v5p"
    TPU_V6E = "tpu_v6e"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: Union[str, "ResourceType"]) -> "ResourceType":
        if isinstance(name, ResourceType):
            return name
        key = str(name).strip().lower()
        for member in cls:
            if member.value == key:
                return member
        raise ValueError(
            f"unknown resource {name!r}; known: {', '.join(m.value for m in cls)}"
        )

    @property
    def is_memory(self) -> bool:
        return self in (ResourceType.RAM, ResourceType.MEMORY, ResourceType.EPHEMERAL_STORAGE, ResourceType.DISK)

    @property
    def is_accelerator(self) -> bool:
        return self not in (
            ResourceType.CPU, ResourceType.RAM, ResourceType.MEMORY,
            ResourceType.EPHEMERAL_STORAGE, ResourceType.DISK,
        )

    @property
    def is_tpu(self) -> bool:
        return self.value.startswith("tpu")

    @property
    def is_any_gpu(self) -> bool:
        """A GPU request that names no model: whatever GPUs the place has."""
        return self in (ResourceType.GPU, ResourceType.LOCAL_GPU)


class ServiceTier(enum.Enum, metaclass=_CaseInsensitiveEnumMeta):
    """XManager's availability tier of a job. Recorded on JobRequirements; the pools
    here take their partition or QOS from their own job variables, so it selects none."""

    PROD = 200
    BATCH = 100
    FREEBIE = 25


class _ResourceSubsetMeta(type):
    def __iter__(cls):
        return iter(cls._members)

    def __contains__(cls, value: object) -> bool:
        return value in cls._members

    def __getitem__(cls, name: str) -> ResourceType:
        member = ResourceType[name]
        if member not in cls._members:
            raise KeyError(f"Unknown {cls.__name__} {name!r}")
        return member

    def __getattr__(cls, name: str) -> ResourceType:
        try:
            return cls[name]
        except KeyError:
            raise AttributeError(f"type object {cls.__name__!r} has no attribute {name!r}") from None


class GpuType(metaclass=_ResourceSubsetMeta):
    """The GPU models among ResourceType (`xm.GpuType.V100 is xm.ResourceType.V100`)."""

    _members = frozenset(r for r in ResourceType if r.is_accelerator and not r.is_tpu and not r.is_any_gpu)


class TpuType(metaclass=_ResourceSubsetMeta):
    """The TPU types among ResourceType."""

    _members = frozenset(r for r in ResourceType if r.is_tpu)


class AcceleratorType(metaclass=_ResourceSubsetMeta):
    """The accelerators among ResourceType: the GPU and TPU types (a JobRequirements
    takes one of them), as XManager's AcceleratorType subset."""

    _members = frozenset(r for r in ResourceType if r.is_accelerator)


class Architecture(enum.Enum):
    """XManager's CPU architecture of an executable's platform."""

    X86_64 = "x86_64"
    ARM64 = "arm64"


class InvalidTpuTopologyError(Exception):
    """An accelerator topology that is not 'N', 'NxM', 'NxMxK' (optionally _twisted)."""


class Topology:
    """XManager's accelerator topology: '4' (4 GPUs on a host), '2x2' (a TPU grid)."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not re.fullmatch(r"(\d+x?)+(_(un)?twisted)?", name) or name.endswith("x"):
            raise InvalidTpuTopologyError(f"Invalid TPU topology: {name}.")
        self._name = name
        self._dimensions = [int(d) for d in name.split("_")[0].split("x")]

    @property
    def name(self) -> str:
        return self._name

    @property
    def chip_count(self) -> int:
        return math.prod(self._dimensions)

    def __repr__(self) -> str:
        return f"xm.Topology({self._name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and self._name == other._name

    def __hash__(self) -> int:
        return hash(self._name)


ResourceQuantity = Union[int, float, str, Topology]


class ResourceDict(dict):
    """Amounts by ResourceType (JobRequirements.task_requirements)."""

    def __str__(self) -> str:
        return ", ".join(sorted(f"{key}: {value}" for key, value in self.items()))


_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?)(B?)\s*$", re.IGNORECASE)
_PREFIX = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_bytes(value: Any, field: str = "memory") -> int:
    """Bytes from an int/float or a string like '16GiB', '16G' (binary), '500MB' (decimal)."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected an amount of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{field} must be a positive amount of bytes, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _MEM_RE.match(value)
        if not m:
            raise ValueError(
                f"{field}: cannot parse {value!r} as memory (examples: 16GiB, 512M, 2T)"
            )
        number, prefix, i, b = m.groups()
        power = _PREFIX[prefix.upper()]
        # '16G' and '16GiB' are binary (as in Slurm), '16GB' is decimal.
        base = 1000 if (b and not i and prefix) else 1024
        result = int(float(number) * base**power)
        if result <= 0:
            raise ValueError(f"{field} must be positive, got {value!r}")
        return result
    raise ValueError(f"{field}: expected bytes or a string like '16GiB', got {value!r}")


def _positive_number(field: str, value: Any, integer: bool = False) -> Union[int, float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value) if not integer else int(value)
            except ValueError:
                raise ValueError(f"{field} must be a positive number, got {value!r}") from None
        else:
            raise ValueError(f"{field} must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field} must be positive, got {value!r}")
    if integer:
        if int(value) != value:
            raise ValueError(f"{field} must be a whole number, got {value!r}")
        return int(value)
    return int(value) if float(value).is_integer() else value


class JobRequirements:
    """Resources a job needs: ``JobRequirements(cpu=4, memory=16*GiB, a100=2, replicas=2)``.

    Also accepts a positional mapping ``{ResourceType.CPU: 4, 'ram': '8GiB'}`` as in
    XManager, ``ram=`` as an alias of ``memory=``, and ``location=``. ``cluster=`` (as
    xm-slurm users write it) names the batch cluster the job runs on: the batch executors
    reach it through the SSH Connection block of that name.
    """

    def __init__(
        self,
        resources: Optional[Mapping[Union[str, ResourceType], Any]] = None,
        *,
        location: Optional[str] = None,
        replicas: Optional[int] = None,
        service_tier: Optional[ServiceTier] = None,
        cluster: Optional[str] = None,
        **kw_resources: Any,
    ) -> None:
        self.task_requirements: ResourceDict = ResourceDict()
        self.topology: Optional[Topology] = None
        if service_tier is not None and not isinstance(service_tier, ServiceTier):
            raise ValueError(f"JobRequirements: service_tier must be xm.ServiceTier, got {service_tier!r}")
        self.service_tier = service_tier or ServiceTier.PROD
        merged: list[tuple[Any, Any]] = list((resources or {}).items()) + list(kw_resources.items())
        for name, value in merged:
            try:
                rtype = ResourceType.parse(name)
            except ValueError as e:
                raise ValueError(f"JobRequirements: {e}") from None
            field = rtype.value
            if rtype in (ResourceType.RAM, ResourceType.MEMORY):
                rtype, field = ResourceType.RAM, str(name.value if isinstance(name, ResourceType) else name)
            if rtype in self.task_requirements:
                raise ValueError(f"JobRequirements: {field} given twice")
            topology = None
            if isinstance(value, Topology) or (isinstance(value, str) and "x" in value):
                if not rtype.is_accelerator:
                    raise ValueError(f"JobRequirements: {field}={value!r}: a topology is for accelerators only")
                topology = value if isinstance(value, Topology) else Topology(value)
                value = topology.chip_count
            if rtype.is_memory:
                self.task_requirements[rtype] = parse_bytes(value, field)
            elif rtype.is_accelerator:
                self.task_requirements[rtype] = _positive_number(field, value, integer=True)
                self.topology = topology or Topology(str(self.task_requirements[rtype]))
            else:
                self.task_requirements[rtype] = _positive_number(field, value)
        accelerators = [r for r in self.task_requirements if r.is_accelerator]
        if len(accelerators) > 1:
            raise ValueError(
                "JobRequirements: only one accelerator type per job, got "
                + ", ".join(f"{r.value}={self.task_requirements[r]}" for r in accelerators)
            )
        if location is not None and (not isinstance(location, str) or not location.strip()):
            raise ValueError(f"JobRequirements: location must be a non-empty string, got {location!r}")
        self.location = location
        if cluster is not None and (not isinstance(cluster, str) or not cluster.strip()):
            raise ValueError(f"JobRequirements: cluster must be a non-empty string, got {cluster!r}")
        self.cluster = cluster
        self.replicas = 1 if replicas is None else _positive_number("replicas", replicas, integer=True)

    # Convenience accessors.
    @property
    def cpu(self) -> Optional[Union[int, float]]:
        return self.task_requirements.get(ResourceType.CPU)

    @property
    def memory(self) -> Optional[int]:
        return self.task_requirements.get(ResourceType.RAM)  # type: ignore[return-value]

    ram = memory

    @property
    def accelerator(self) -> Optional[ResourceType]:
        for r in self.task_requirements:
            if r.is_accelerator:
                return r
        return None

    @property
    def accelerator_count(self) -> int:
        acc = self.accelerator
        return int(self.task_requirements[acc]) if acc else 0

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, JobRequirements)
            and self.task_requirements == other.task_requirements
            and self.location == other.location
            and self.cluster == other.cluster
            and self.replicas == other.replicas
        )

    def __repr__(self) -> str:
        parts = [f"{r.value}={v!r}" for r, v in self.task_requirements.items()]
        if self.location:
            parts.append(f"location={self.location!r}")
        if self.cluster:
            parts.append(f"cluster={self.cluster!r}")
        if self.service_tier is not ServiceTier.PROD:
            parts.append(f"service_tier=xm.{self.service_tier}")
        if self.replicas != 1:
            parts.append(f"replicas={self.replicas}")
        return f"JobRequirements({', '.join(parts)})"
