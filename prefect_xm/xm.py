"""XManager's vocabulary on Prefect: ``from prefect_xm import xm``.

A launch script written for XManager ports by changing its imports to
``from prefect_xm import xm`` and ``from prefect_xm import xm_local``.
"""

from prefect_xm.core import job_operators
from prefect_xm.core.args import SequentialArgs, ShellSafeArg, UserArgs, merge_args, to_argv
from prefect_xm.core.api import Experiment
from prefect_xm.core.work_units import AuxiliaryUnit, LaunchedJob, WorkUnit, WorkUnitCompletedAwaitable
from prefect_xm.core.job_blocks import (
    BazelBinary,
    BazelContainer,
    Binary,
    BinaryDependency,
    Command,
    CommandList,
    Constraint,
    Container,
    Dockerfile,
    Executable,
    ExecutableSpec,
    Executor,
    ExecutorSpec,
    Job,
    JobConfig,
    JobGeneratorType,
    JobGroup,
    JobType,
    ModuleName,
    Packageable,
    PythonContainer,
    get_args_for_all_jobs,
)
from prefect_xm.core.packagables import (
    bazel_binary,
    bazel_container,
    binary,
    container,
    dockerfile_container,
    python_container,
)
from prefect_xm.core.metadata import ContextAnnotations, MetadataContext
from prefect_xm.core.roles import (
    AuxiliaryUnitJob,
    AuxiliaryUnitRole,
    ExperimentUnitRole,
    Importance,
    WorkUnitRole,
)
from prefect_xm.core.resources import (
    GB,
    KB,
    MB,
    TB,
    AcceleratorType,
    Architecture,
    GiB,
    GpuType,
    InvalidTpuTopologyError,
    JobRequirements,
    KiB,
    MiB,
    PB,
    PiB,
    ResourceDict,
    ResourceQuantity,
    ResourceType,
    ServiceTier,
    TiB,
    Topology,
    TpuType,
    mCPU,
    vCPU,
)
from prefect_xm.core.status import (
    DebugInterrupt,
    ExperimentUnitError,
    ExperimentUnitFailedError,
    ExperimentUnitNotCompletedError,
    ExperimentUnitStatus,
    NotFoundError,
    ReloadError,
)



def run_in_asyncio_loop(f):
    """XManager's decorator for an async `main`: calling it runs the coroutine to its end."""
    import asyncio
    import functools

    @functools.wraps(f)
    def decorated(*args, **kwargs):
        return asyncio.run(f(*args, **kwargs))

    return decorated


WorkUnitStatus = ExperimentUnitStatus
ExperimentUnit = WorkUnit

__all__ = [
    "BazelBinary", "BazelContainer", "BinaryDependency", "Dockerfile", "JobConfig",
    "GpuType", "InvalidTpuTopologyError", "ResourceDict", "ResourceQuantity", "ServiceTier", "Topology", "TpuType",
    "AuxiliaryUnitJob", "AuxiliaryUnitRole", "ContextAnnotations", "MetadataContext", "ExperimentUnitRole", "Importance", "WorkUnitRole",
    "Binary", "Command", "CommandList", "Constraint", "Container", "Executable", "ExecutableSpec", "Executor",
    "ExecutorSpec", "Experiment", "ExperimentUnit", "ExperimentUnitError", "ExperimentUnitFailedError",
    "ExperimentUnitNotCompletedError", "ExperimentUnitStatus", "NotFoundError", "GB", "GiB", "Job",
    "JobGeneratorType", "JobGroup", "JobRequirements", "JobType", "KB", "KiB", "MB", "MiB",
    "ModuleName", "Packageable", "PythonContainer", "ResourceType", "SequentialArgs", "ShellSafeArg", "TB",
    "TiB", "UserArgs", "WorkUnit", "WorkUnitStatus", "bazel_binary", "bazel_container", "binary", "container",
    "dockerfile_container", "get_args_for_all_jobs", "job_operators", "PB", "PiB",
    "LaunchedJob", "ReloadError", "WorkUnitCompletedAwaitable",
    "mCPU", "merge_args", "python_container", "run_in_asyncio_loop", "to_argv", "vCPU",
    "AcceleratorType", "Architecture", "AuxiliaryUnit", "DebugInterrupt",
]
