"""Executors: where a job runs.

An executor is a Prefect work pool plus that pool's job variables. ``Local`` is the
embedded default (no pool: the job-runner flow runs in the launching process, the
program in a subprocess). ``Slurm`` targets an ``xm-slurm`` work pool. Job variables are
checked against the pool's variable schema (read from the Prefect API) before anything
is submitted, because Prefect silently drops job variables a pool does not declare.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from typing import Any, Mapping, Optional, Sequence

from prefect_xm.core.job_blocks import Executor, ExecutorSpec
from prefect_xm.core.resources import GiB, KiB, MiB, TiB, JobRequirements, ResourceType


def _check_requirements(value: Any, where: str) -> JobRequirements:
    if value is None:
        return JobRequirements()
    if not isinstance(value, JobRequirements):
        raise ValueError(f"{where}.requirements must be xm.JobRequirements, got {value!r}")
    return value


# ------------------------------------------------------------------------- Local


class LocalSpec(ExecutorSpec):
    """Package for the Local executor."""

    runs_locally = True

    def __repr__(self) -> str:
        return "Local.Spec()"


@dataclasses.dataclass
class Local(Executor):
    """Runs jobs on this machine: each job is a flow run of the job-runner flow executed
    by the launching process, its program a subprocess in its own process group.

    requirements are recorded but not enforced locally.
    """

    requirements: Optional[JobRequirements] = None

    def __post_init__(self) -> None:
        self.requirements = _check_requirements(self.requirements, "Local")

    work_pool_name = None

    @classmethod
    def Spec(cls) -> LocalSpec:  # noqa: N802
        return LocalSpec()


# ------------------------------------------------------------------------- Slurm


class SlurmSpec(ExecutorSpec):
    """Package for the Slurm executor (the code must be on a filesystem the nodes see)."""

    def __repr__(self) -> str:
        return "Slurm.Spec()"


_SLURM_TIME = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$"
)


def slurm_time(value: Any, field: str = "time") -> str:
    """A Slurm time limit from a str (Slurm syntax), int minutes or a timedelta."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a Slurm time, minutes or a timedelta, got {value!r}")
    if isinstance(value, datetime.timedelta):
        total = int(math.ceil(value.total_seconds()))
        if total <= 0:
            raise ValueError(f"{field} must be positive, got {value!r}")
        days, rest = divmod(total, 86400)
        h, rest = divmod(rest, 3600)
        m, s = divmod(rest, 60)
        return f"{days}-{h:02d}:{m:02d}:{s:02d}" if days else f"{h:02d}:{m:02d}:{s:02d}"
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{field} must be a positive number of minutes, got {value!r}")
        return str(value)
    if isinstance(value, str) and _SLURM_TIME.match(value.strip()):
        return value.strip()
    raise ValueError(
        f"{field}: {value!r} is not a Slurm time limit (examples: '90', '30:00', '1-02:00:00', "
        f"an int of minutes or a datetime.timedelta)"
    )


def slurm_memory(num_bytes: int) -> str:
    """Bytes -> Slurm memory with a binary unit suffix: 16 GiB -> '16G', 1.5 GiB -> '1536M'."""
    for unit, suffix in ((TiB, "T"), (GiB, "G"), (MiB, "M"), (KiB, "K")):
        if num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    return f"{math.ceil(num_bytes / MiB)}M"


class Slurm(Executor):
    """A job on a Slurm cluster through an ``xm-slurm`` work pool.

    ``Slurm(requirements=xm.JobRequirements(cpu=4, memory=16*xm.GiB, a100=2),
    partition='gpu', time='1-00:00:00')``. Requirements map to the pool's job variables:
    cpu -> cpus_per_task, memory -> memory ('16G'), accelerators -> gpus + gpu_type,
    replicas -> ntasks. ``job_variables`` passes further variables verbatim; all are
    checked against the pool's schema before submission.
    """

    def __init__(self, requirements: Optional[JobRequirements] = None, *, partition=None, account=None,
                 qos=None, time=None, nodes=None, constraint=None, modules=None, setup_commands=None,
                 extra_directives=None, working_dir=None, job_name=None, job_variables=None,
                 work_pool: str = "xm-slurm") -> None:
        self.requirements = _check_requirements(requirements, "Slurm")
        for field, value in (("partition", partition), ("account", account), ("qos", qos),
                             ("constraint", constraint), ("working_dir", working_dir),
                             ("job_name", job_name), ("work_pool", work_pool)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"Slurm.{field} must be a non-empty string, got {value!r}")
        for field, value in (("modules", modules), ("setup_commands", setup_commands),
                             ("extra_directives", extra_directives)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(f"Slurm.{field} must be a list of strings, got {value!r}")
        if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes <= 0):
            raise ValueError(f"Slurm.nodes must be a positive int, got {nodes!r}")
        if job_variables is not None and not isinstance(job_variables, Mapping):
            raise ValueError(f"Slurm.job_variables must be a dict, got {job_variables!r}")
        self.partition, self.account, self.qos = partition, account, qos
        self.time = None if time is None else slurm_time(time, "Slurm.time")
        self.nodes, self.constraint = nodes, constraint
        self.modules = list(modules) if modules is not None else None
        self.setup_commands = list(setup_commands) if setup_commands is not None else None
        self.extra_directives = list(extra_directives) if extra_directives is not None else None
        self.working_dir, self.job_name = working_dir, job_name
        self.job_variables_ = dict(job_variables or {})
        self.work_pool = work_pool
        if self.requirements.location is not None:
            raise ValueError(
                f"Slurm: JobRequirements.location={self.requirements.location!r} is not supported; "
                f"use partition=, constraint= or a separate work pool"
            )
        acc = self.requirements.accelerator
        if acc is not None and acc.is_tpu:
            raise ValueError(f"Slurm: accelerator {acc.value}={self.requirements.accelerator_count} is not available on Slurm")
        self.job_variables()  # fail early on bad requirements

    @property
    def work_pool_name(self) -> str:  # type: ignore[override]
        return self.work_pool

    def __repr__(self) -> str:
        return f"Slurm(work_pool={self.work_pool!r}, job_variables={self.job_variables()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Slurm) and (self.work_pool, self.job_variables()) == (other.work_pool, other.job_variables())

    @classmethod
    def Spec(cls) -> SlurmSpec:  # noqa: N802
        return SlurmSpec()

    def job_variables(self) -> dict[str, Any]:
        req = self.requirements
        out: dict[str, Any] = {}
        if req.cpu is not None:
            out["cpus_per_task"] = int(math.ceil(req.cpu))
        if req.memory is not None:
            out["memory"] = slurm_memory(req.memory)
        acc = req.accelerator
        if acc is not None:
            out["gpus"] = req.accelerator_count
            if acc is not ResourceType.GPU:
                out["gpu_type"] = acc.value
        if req.replicas != 1:
            out["ntasks"] = req.replicas
        for name in ("partition", "account", "qos", "nodes", "constraint", "modules",
                     "setup_commands", "extra_directives", "working_dir", "job_name"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.time is not None:
            out["time_limit"] = self.time
        for key, value in self.job_variables_.items():
            if key in out and out[key] != value:
                raise ValueError(
                    f"Slurm: job variable {key!r} given both by an option ({out[key]!r}) "
                    f"and in job_variables ({value!r})"
                )
            out[key] = value
        return out


# ------------------------------------------------------------ schema validation

_JSON_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
    "null": (type(None),),
}


def _schema_types(prop: Mapping[str, Any]) -> list[str]:
    types: list[str] = []
    if "type" in prop:
        t = prop["type"]
        types.extend(t if isinstance(t, list) else [t])
    for key in ("anyOf", "oneOf"):
        for sub in prop.get(key, []) or []:
            types.extend(_schema_types(sub))
    return types


def validate_job_variables(pool_name: str, variables: Mapping[str, Any], properties: Mapping[str, Any]) -> None:
    """Raises ValueError naming the variable and the pool if a variable is unknown to the
    pool's schema or has the wrong JSON type."""
    unknown = [k for k in variables if k not in properties]
    if unknown:
        raise ValueError(
            f"job variable(s) {', '.join(repr(k) for k in unknown)} are not defined by work pool "
            f"{pool_name!r}; " + (f"it accepts: {', '.join(sorted(properties))}" if properties
                                  else "it declares no job variables")
        )
    for key, value in variables.items():
        types = _schema_types(properties[key] or {})
        if not types:
            continue
        ok = False
        for t in types:
            py = _JSON_TYPES.get(t)
            if py is None or (isinstance(value, py) and not (t in ("integer", "number") and isinstance(value, bool))):
                ok = True
                break
        if not ok:
            raise ValueError(
                f"job variable {key!r}={value!r} for work pool {pool_name!r} must be of type {'/'.join(types)}"
            )


# ------------------------------------------------------------- any work pool


class WorkPoolSpec(ExecutorSpec):
    """Package for a job on a work pool (the code must be where the pool's workers run)."""

    def __repr__(self) -> str:
        return "WorkPool.Spec()"


class WorkPool(Executor):
    """A job on any Prefect work pool, with its job variables given verbatim.

    ``WorkPool("my-process-pool", job_variables={"working_dir": "/scratch"})``. This is
    how schedulers without a dedicated executor class plug in; like the others, the
    variables are checked against the pool's schema before submission.
    """

    def __init__(self, work_pool: str, job_variables: Optional[Mapping[str, Any]] = None,
                 requirements: Optional[JobRequirements] = None) -> None:
        if not isinstance(work_pool, str) or not work_pool.strip():
            raise ValueError(f"WorkPool.work_pool must be a non-empty string, got {work_pool!r}")
        if job_variables is not None and not isinstance(job_variables, Mapping):
            raise ValueError(f"WorkPool.job_variables must be a dict, got {job_variables!r}")
        self.work_pool = work_pool
        self.job_variables_ = dict(job_variables or {})
        self.requirements = _check_requirements(requirements, "WorkPool")

    @property
    def work_pool_name(self) -> str:  # type: ignore[override]
        return self.work_pool

    @classmethod
    def Spec(cls) -> WorkPoolSpec:  # noqa: N802
        return WorkPoolSpec()

    def job_variables(self) -> dict[str, Any]:
        return dict(self.job_variables_)

    def __repr__(self) -> str:
        return f"WorkPool({self.work_pool!r}, job_variables={self.job_variables_!r})"
