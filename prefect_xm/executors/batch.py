"""The executors of our batch workers' pools (Slurm, SGE, PBS, LSF, HTCondor), and
WorkPool for any pool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Sequence

import pydantic

from prefect_xm.core.job_blocks import Executor, ExecutorSpec
from prefect_xm.core.resources import JobRequirements
from prefect_xm.executors.checks import check_requirements
from prefect_xm.executors.requirements import (
    htcondor_time_limit,
    htcondor_variables,
    lsf_time_limit,
    lsf_variables,
    pbs_time_limit,
    pbs_variables,
    sge_time_limit,
    sge_variables,
    slurm_time_limit,
    slurm_variables,
)

if TYPE_CHECKING:
    from prefect_xm.workers.configuration import BatchJobConfiguration


class BatchSpec(ExecutorSpec):
    """Package for a batch scheduler's executor (the code must be on a filesystem the
    compute nodes see)."""

    executor_name = "Batch"

    def __repr__(self) -> str:
        return f"{self.executor_name}.Spec()"


#: options of every batch executor, job variables of every batch pool (BatchJobConfiguration)
COMMON_OPTIONS = ("modules", "setup_commands", "extra_directives", "working_dir", "job_name")


class _BatchExecutor(Executor):
    """A job on one of our batch workers' pools. Each scheduler's executor names its
    mapping of JobRequirements and ``time`` to its job variables (in
    ``prefect_xm.executors.requirements``); here are the options every scheduler shares.
    Every value is checked by the worker's own job configuration as it is built, so a
    bad one fails here, naming the executor's field and the value."""

    #: JobRequirements (and the options chosen) in this scheduler's job variables
    requirements_variables: ClassVar[Callable[[JobRequirements, Mapping[str, Any]], dict[str, Any]]]
    #: ``time`` as this scheduler's time_limit job variable
    time_limit: ClassVar[Callable[[Any], str]]
    #: this executor's own options that are job variables of the same name
    options: ClassVar[tuple[str, ...]]

    @staticmethod
    def configuration() -> type[BatchJobConfiguration]:
        """The worker's job configuration, whose validators check what we produce. Each
        executor imports it when asked: importing a worker module loads every worker and
        Prefect's worker machinery, which ``import prefect_xm.xm_local`` does not need."""
        raise NotImplementedError

    def _configure(self, requirements: Optional[JobRequirements], time: Any, options: Mapping[str, Any],
                   common: Mapping[str, Any], job_variables: Optional[Mapping[str, Any]],
                   work_pool: Optional[str]) -> None:
        name = type(self).__name__
        self.requirements = check_requirements(requirements, name, clusters=True)
        if self.requirements.location is not None:
            raise ValueError(
                f"{name}: JobRequirements.location={self.requirements.location!r} is not supported; "
                f"use the scheduler's queue or partition, or a separate work pool")
        if not isinstance(work_pool, str) or not work_pool.strip():
            raise ValueError(f"{name}.work_pool must be a non-empty string, got {work_pool!r}")
        # (their types and syntax are the job configuration's to check, in job_variables)
        for field, value in {**options, **common}.items():
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"{name}.{field} must be a non-empty string, got {value!r}")
        for field in ("modules", "setup_commands", "extra_directives"):
            value = common[field]
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(f"{name}.{field} must be a list of strings, got {value!r}")
        if job_variables is not None and not isinstance(job_variables, Mapping):
            raise ValueError(f"{name}.job_variables must be a dict, got {job_variables!r}")
        # read back as attributes too (Slurm(...).partition), as XManager's executors are
        for field, value in {**options, **common}.items():
            setattr(self, field, list(value) if isinstance(value, (list, tuple)) else value)
        self.time = time
        self.job_variables_ = dict(job_variables or {})
        self.work_pool = work_pool
        self.job_variables()  # fail early, before anything is submitted

    @property
    def work_pool_name(self) -> str:  # type: ignore[override]
        return self.work_pool

    def __repr__(self) -> str:
        return f"{type(self).__name__}(work_pool={self.work_pool!r}, job_variables={self.job_variables()!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (self.work_pool, self.job_variables()) == (
            other.work_pool, other.job_variables())  # type: ignore[attr-defined]

    @classmethod
    def Spec(cls) -> BatchSpec:  # noqa: N802
        spec = BatchSpec()
        spec.executor_name = cls.__name__
        return spec

    def job_variables(self) -> dict[str, Any]:
        name = type(self).__name__
        chosen = {f: getattr(self, f) for f in (*self.options, *COMMON_OPTIONS) if getattr(self, f) is not None}
        out: dict[str, Any] = self.requirements_variables(self.requirements, chosen)
        out.update(chosen)
        if self.requirements.cluster is not None:
            # one pool, several clusters: each is its login node's SSH Connection block
            out["ssh_block"] = self.requirements.cluster
        if self.time is not None:
            try:
                out["time_limit"] = self.time_limit(self.time)
            except ValueError as e:  # "time: ..." -> "SGE.time: ..."
                raise ValueError(f"{name}.{e}") from None
        for key, value in self.job_variables_.items():
            if key in out and out[key] != value:
                raise ValueError(f"{name}: job variable {key!r} given both by an option ({out[key]!r}) "
                                 f"and in job_variables ({value!r})")
            out[key] = value
        configuration = self.configuration()
        fields = {k: v for k, v in out.items() if k in configuration.model_fields}
        try:
            configuration.model_validate(fields)
        except pydantic.ValidationError as e:
            error = e.errors()[0]
            field = ".".join(map(str, error["loc"]))
            reason = str(error.get("ctx", {}).get("error") or error["msg"])
            value = fields.get(field, error.get("input"))
            # named as the user wrote it: Slurm.time='two hours', Slurm.partition=5
            given = ("time" if field == "time_limit" and self.time is not None
                     else field if field in chosen else None)
            where = f"{name}.{given}={self.time if given == 'time' else value!r}" if given else \
                f"{name}: job variable {field}={value!r}"
            raise ValueError(f"{where}: {reason}") from None
        return out


class Slurm(_BatchExecutor):
    """A job on a Slurm cluster through an ``xm-slurm`` work pool.

    ``Slurm(requirements=xm.JobRequirements(cpu=4, memory=16*xm.GiB, a100=2),
    partition='gpu', time='1-00:00:00')``. Requirements map to the pool's job variables:
    cpu -> cpus_per_task, memory -> memory ('16G'), accelerators -> gpus + gpu_type,
    replicas -> ntasks. ``time``: Slurm's syntax, an int of minutes or a timedelta.
    ``job_variables`` passes further variables verbatim; all are checked against the
    pool's schema before submission.
    """

    requirements_variables = staticmethod(slurm_variables)
    time_limit = staticmethod(slurm_time_limit)
    options = ("partition", "account", "qos", "nodes", "constraint")

    @staticmethod
    def configuration() -> type[BatchJobConfiguration]:
        from prefect_xm.workers.slurm import SlurmJobConfiguration

        return SlurmJobConfiguration

    def __init__(self, requirements: Optional[JobRequirements] = None, *, partition: Optional[str] = None,
                 account: Optional[str] = None, qos: Optional[str] = None, time: Any = None,
                 nodes: Optional[int] = None, constraint: Optional[str] = None,
                 modules: Optional[Sequence[str]] = None, setup_commands: Optional[Sequence[str]] = None,
                 extra_directives: Optional[Sequence[str]] = None, working_dir: Optional[str] = None,
                 job_name: Optional[str] = None, job_variables: Optional[Mapping[str, Any]] = None,
                 work_pool: str = "xm-slurm") -> None:
        if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes <= 0):
            raise ValueError(f"Slurm.nodes must be a positive int, got {nodes!r}")
        self._configure(requirements, time,
                        dict(partition=partition, account=account, qos=qos, nodes=nodes, constraint=constraint),
                        dict(modules=modules, setup_commands=setup_commands, extra_directives=extra_directives,
                             working_dir=working_dir, job_name=job_name), job_variables, work_pool)


class SGE(_BatchExecutor):
    """A job on a Sun/Son of/Univa Grid Engine cluster through an ``xm-sge`` work pool.

    ``SGE(requirements=xm.JobRequirements(cpu=4, memory=16*xm.GiB, gpu=1), queue='gpu.q',
    time=datetime.timedelta(hours=2))``. cpu -> slots (in the pool's parallel environment,
    ``parallel_environment`` here), memory -> memory per slot (h_vmem: the job's memory
    divided among its slots), GPUs -> gpus (-l <gpu_resource>=N; a GPU type has no
    standard SGE name and is refused). ``time``: h_rt's syntax, an int of minutes or a
    timedelta.
    """

    requirements_variables = staticmethod(sge_variables)
    time_limit = staticmethod(sge_time_limit)
    options = ("queue", "project", "parallel_environment")

    @staticmethod
    def configuration() -> type[BatchJobConfiguration]:
        from prefect_xm.workers.sge import SgeJobConfiguration

        return SgeJobConfiguration

    def __init__(self, requirements: Optional[JobRequirements] = None, *, queue: Optional[str] = None,
                 project: Optional[str] = None, parallel_environment: Optional[str] = None, time: Any = None,
                 modules: Optional[Sequence[str]] = None, setup_commands: Optional[Sequence[str]] = None,
                 extra_directives: Optional[Sequence[str]] = None, working_dir: Optional[str] = None,
                 job_name: Optional[str] = None, job_variables: Optional[Mapping[str, Any]] = None,
                 work_pool: str = "xm-sge") -> None:
        self._configure(requirements, time,
                        dict(queue=queue, project=project, parallel_environment=parallel_environment),
                        dict(modules=modules, setup_commands=setup_commands, extra_directives=extra_directives,
                             working_dir=working_dir, job_name=job_name), job_variables, work_pool)


class PBS(_BatchExecutor):
    """A job on a PBS Pro/OpenPBS or Torque cluster through an ``xm-pbs`` work pool.

    ``PBS(requirements=xm.JobRequirements(cpu=8, memory=32*xm.GiB, replicas=2), queue='workq',
    time='12:00:00')``. replicas -> nodes (chunks), cpu -> cpus per chunk (ncpus, Torque's
    ppn), GPUs -> gpus (ngpus; a GPU type is refused), memory -> memory: per chunk on PBS
    Pro, the whole job's on Torque (``dialect='torque'``). ``time``: walltime's syntax, an
    int of minutes or a timedelta.
    """

    requirements_variables = staticmethod(pbs_variables)
    time_limit = staticmethod(pbs_time_limit)
    options = ("queue", "account", "dialect")

    @staticmethod
    def configuration() -> type[BatchJobConfiguration]:
        from prefect_xm.workers.pbs import PbsJobConfiguration

        return PbsJobConfiguration

    def __init__(self, requirements: Optional[JobRequirements] = None, *, queue: Optional[str] = None,
                 account: Optional[str] = None, dialect: Optional[str] = None, time: Any = None,
                 modules: Optional[Sequence[str]] = None, setup_commands: Optional[Sequence[str]] = None,
                 extra_directives: Optional[Sequence[str]] = None, working_dir: Optional[str] = None,
                 job_name: Optional[str] = None, job_variables: Optional[Mapping[str, Any]] = None,
                 work_pool: str = "xm-pbs") -> None:
        self._configure(requirements, time, dict(queue=queue, account=account, dialect=dialect),
                        dict(modules=modules, setup_commands=setup_commands, extra_directives=extra_directives,
                             working_dir=working_dir, job_name=job_name), job_variables, work_pool)


class LSF(_BatchExecutor):
    """A job on an IBM Spectrum LSF cluster through an ``xm-lsf`` work pool.

    ``LSF(requirements=xm.JobRequirements(cpu=4, memory=16*xm.GiB, gpu=2), queue='normal',
    time=90)``. cpu -> slots (-n), memory -> memory (-M, '16GB'), GPUs -> gpus (-gpu num=N;
    a GPU type is refused: name your site's model with job_variables={'gpu_model': ...}).
    ``resources`` is a -R string. ``time``: -W's syntax ([H:]M), an int of minutes or a
    timedelta.
    """

    requirements_variables = staticmethod(lsf_variables)
    time_limit = staticmethod(lsf_time_limit)
    options = ("queue", "project", "resources")

    @staticmethod
    def configuration() -> type[BatchJobConfiguration]:
        from prefect_xm.workers.lsf import LsfJobConfiguration

        return LsfJobConfiguration

    def __init__(self, requirements: Optional[JobRequirements] = None, *, queue: Optional[str] = None,
                 project: Optional[str] = None, resources: Optional[str] = None, time: Any = None,
                 modules: Optional[Sequence[str]] = None, setup_commands: Optional[Sequence[str]] = None,
                 extra_directives: Optional[Sequence[str]] = None, working_dir: Optional[str] = None,
                 job_name: Optional[str] = None, job_variables: Optional[Mapping[str, Any]] = None,
                 work_pool: str = "xm-lsf") -> None:
        self._configure(requirements, time, dict(queue=queue, project=project, resources=resources),
                        dict(modules=modules, setup_commands=setup_commands, extra_directives=extra_directives,
                             working_dir=working_dir, job_name=job_name), job_variables, work_pool)


class HTCondor(_BatchExecutor):
    """A job on an HTCondor pool through an ``xm-htcondor`` work pool.

    ``HTCondor(requirements=xm.JobRequirements(cpu=2, memory=8*xm.GiB, gpu=1),
    accounting_group='group_physics.alice')``. cpu -> request_cpus, memory ->
    request_memory ('8GB'), GPUs -> request_gpus (a GPU type is refused: match it with a
    ClassAd expression in job_variables={'requirements': ...}). ``time``: minutes as an
    int, 'H:MM:SS' or a timedelta.
    """

    requirements_variables = staticmethod(htcondor_variables)
    time_limit = staticmethod(htcondor_time_limit)
    options = ("accounting_group", "universe")

    @staticmethod
    def configuration() -> type[BatchJobConfiguration]:
        from prefect_xm.workers.htcondor import HTCondorJobConfiguration

        return HTCondorJobConfiguration

    def __init__(self, requirements: Optional[JobRequirements] = None, *,
                 accounting_group: Optional[str] = None, universe: Optional[str] = None, time: Any = None,
                 modules: Optional[Sequence[str]] = None, setup_commands: Optional[Sequence[str]] = None,
                 extra_directives: Optional[Sequence[str]] = None, working_dir: Optional[str] = None,
                 job_name: Optional[str] = None, job_variables: Optional[Mapping[str, Any]] = None,
                 work_pool: str = "xm-htcondor") -> None:
        self._configure(requirements, time, dict(accounting_group=accounting_group, universe=universe),
                        dict(modules=modules, setup_commands=setup_commands, extra_directives=extra_directives,
                             working_dir=working_dir, job_name=job_name), job_variables, work_pool)


#: XManager-era name of the Slurm executor's spec
SlurmSpec = BatchSpec


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
        self.requirements = check_requirements(requirements, "WorkPool")

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


# ------------------------------------------- stock workers: Docker, Kubernetes, Vertex AI
