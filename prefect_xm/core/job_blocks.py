"""XManager's job vocabulary: executable specs, Packageable, Executable, Job, JobGroup."""

from __future__ import annotations

import abc
import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence, Union

from prefect_xm.core.args import SequentialArgs, merge_args, validate_env_vars


# --------------------------------------------------------------------------- specs


class ExecutableSpec(abc.ABC):
    """What to run, before packaging. Use Binary, Command, Container or PythonContainer."""

    @property
    @abc.abstractmethod
    def name(self) -> str: ...


@dataclasses.dataclass
class ModuleName:
    """Entrypoint of a PythonContainer: ``python -m <module_name> <args>``."""

    module_name: str

    def __post_init__(self) -> None:
        if not isinstance(self.module_name, str) or not all(
            part.isidentifier() for part in self.module_name.split(".")
        ):
            raise ValueError(f"ModuleName.module_name must be a dotted Python name, got {self.module_name!r}")


@dataclasses.dataclass
class CommandList:
    """Entrypoint of a PythonContainer given as shell commands (as in XManager).

    The commands are the user's own shell lines, run with ``sh -c``; the job's args are
    passed as the shell's positional parameters ("$@"), never interpolated into the text.
    """

    commands: list[str]

    def __post_init__(self) -> None:
        if isinstance(self.commands, str) or not all(isinstance(c, str) for c in self.commands):
            raise ValueError(f"CommandList.commands must be a list of strings, got {self.commands!r}")
        self.commands = list(self.commands)


def _resolve_path(path: str) -> str:
    """Relative paths resolve against the launch script's directory (as XManager), else cwd."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return str(p)
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    base = Path.cwd()
    if main and main.endswith(".py"):
        main_dir = Path(main).resolve().parent
        if not str(main_dir).startswith((sys.prefix, sys.base_prefix)):
            base = main_dir
    return str((base / p).resolve())


@dataclasses.dataclass
class Binary(ExecutableSpec):
    """A prebuilt program: ``Binary(path='/usr/bin/python3')``."""

    path: str
    dependencies: list[Any] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"Binary.path must be a non-empty string, got {self.path!r}")

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclasses.dataclass
class Command(ExecutableSpec):
    """A plain command line as an argv list: ``Command(['python3', '-c', 'print(1)'])``."""

    command: list[str]

    def __post_init__(self) -> None:
        if isinstance(self.command, str):
            raise ValueError(
                f"Command.command must be an argv list, not a string: {self.command!r} "
                f"(arguments never go through a shell)"
            )
        self.command = [str(c) for c in self.command]
        if not self.command:
            raise ValueError("Command.command must not be empty")

    @property
    def name(self) -> str:
        return os.path.basename(self.command[0])


@dataclasses.dataclass
class Container(ExecutableSpec):
    """A prebuilt container image, run with apptainer: ``Container(image_path='docker://alpine')``."""

    image_path: str

    @property
    def name(self) -> str:
        return self.image_path.rsplit("/", 1)[-1].split(":")[0]


def no_build_step(what: str, name: str) -> NotImplementedError:
    return NotImplementedError(
        f"xm.{what}({name}): prefect-xm does not build {what.split('_')[0].title()} targets; build the image "
        "or binary yourself and use xm.container(image_path=...) or xm.binary(path=...)")


class BinaryDependency(abc.ABC):
    """XManager's base of what a binary depends on (a Bazel target's data)."""


@dataclasses.dataclass
class BazelBinary(ExecutableSpec):
    """XManager's Bazel target spec: package() refuses it (no build step here)."""

    label: str
    dependencies: list[Any] = dataclasses.field(default_factory=list)
    bazel_args: list[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.label.rsplit(":", 1)[-1]


@dataclasses.dataclass
class BazelContainer(ExecutableSpec):
    """XManager's Bazel image target spec: package() refuses it (no build step here)."""

    label: str
    bazel_args: list[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.label.rsplit(":", 1)[-1]


@dataclasses.dataclass
class Dockerfile(ExecutableSpec):
    """XManager's image built from a Dockerfile (``dockerfile``, default
    ``<path>/Dockerfile``, with ``path`` as the build context): built at package() for
    the container executors, with the job runner layered on; the image's ENTRYPOINT is
    the job's command (its CMD is not used: the job's args replace it, as with
    ``docker run IMAGE ARGS``)."""

    path: str = "."
    dockerfile: Optional[str] = None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.abspath(self.path))


@dataclasses.dataclass
class PythonContainer(ExecutableSpec):
    """Python code at `path` with an entrypoint (ModuleName or CommandList).

    On Local and batch executors the code runs with the job runner's Python, with `path`
    as the working directory and on PYTHONPATH; `base_image`, when set and apptainer is
    installed on the node, is used as the container to run in.
    """

    entrypoint: Union[ModuleName, CommandList]
    path: str = "."
    base_image: Optional[str] = None
    docker_instructions: Optional[list[str]] = None
    use_deep_module: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.entrypoint, (ModuleName, CommandList)):
            raise ValueError(
                f"PythonContainer.entrypoint must be xm.ModuleName or xm.CommandList, got {self.entrypoint!r}"
            )

    @property
    def name(self) -> str:
        if isinstance(self.entrypoint, ModuleName):
            return self.entrypoint.module_name.rsplit(".", 1)[-1]
        return os.path.basename(os.path.abspath(self.path))


# ------------------------------------------------------------------ executors (base)


class ExecutorSpec(abc.ABC):
    """Where an executable is packaged for (XManager's ExecutorSpec)."""


class Executor(abc.ABC):
    """Where a job runs: a work pool and its job variables (or the embedded Local)."""

    requirements: Any = None

    @classmethod
    @abc.abstractmethod
    def Spec(cls) -> ExecutorSpec:  # noqa: N802
        ...

    #: The Prefect work pool this executor submits to; None = run locally.
    work_pool_name: Optional[str] = None

    def job_variables(self) -> dict[str, Any]:
        """The pool's job variables for a job on this executor."""
        return {}

    def job_variables_for(self, executable: Any) -> dict[str, Any]:
        """The pool's job variables for `executable` on this executor (container executors
        take the image from it)."""
        return self.job_variables()

    def runner_parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        """The job-runner flow's parameters on this executor (container executors, where
        the runner already runs inside the image, rewrite them)."""
        return params


# --------------------------------------------------------------- packaged executables


@dataclasses.dataclass
class Packageable:
    """What to build and its static args (XManager's Packageable)."""

    executable_spec: ExecutableSpec
    executor_spec: ExecutorSpec
    args: Any = None
    env_vars: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.executable_spec, ExecutableSpec):
            raise ValueError(f"Packageable.executable_spec must be an xm executable spec, got {self.executable_spec!r}")
        if not isinstance(self.executor_spec, ExecutorSpec):
            raise ValueError(f"Packageable.executor_spec must be an ExecutorSpec (e.g. Local.Spec()), got {self.executor_spec!r}")
        self.args = SequentialArgs.from_collection(self.args)
        self.env_vars = validate_env_vars(self.env_vars, "Packageable.env_vars")


@dataclasses.dataclass
class Executable:
    """A packaged executable: what the job-runner flow runs (kind + static args/env).

    kind: "command" (argv), "module" (python -m), "commands" (CommandList via sh -c),
    "container" (apptainer run image).
    """

    name: str
    kind: str = "command"
    command: Optional[list[str]] = None
    module: Optional[str] = None
    commands: Optional[list[str]] = None
    image: Optional[str] = None
    path: Optional[str] = None
    args: SequentialArgs = dataclasses.field(default_factory=SequentialArgs)
    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)

    def runner_parameters(self, job_args: SequentialArgs, job_env: Mapping[str, str]) -> dict[str, Any]:
        """Parameters of the job-runner flow (prefect_xm.job_runner.run_job)."""
        spec: dict[str, Any] = {"kind": self.kind}
        if self.command is not None:
            spec["command"] = list(self.command)
        if self.module is not None:
            spec["module"] = self.module
        if self.commands is not None:
            spec["commands"] = list(self.commands)
        if self.image is not None:
            spec["image"] = self.image
        if self.path is not None:
            spec["path"] = self.path
        env = dict(self.env_vars)
        env.update(job_env)
        return {
            "executable": spec,
            "args": merge_args(self.args, job_args).to_list(),
            "env": env,
            "working_dir": self.path,
        }


def package_spec(packageable: Packageable) -> Executable:
    spec = packageable.executable_spec
    if isinstance(spec, (BazelBinary, BazelContainer)):
        raise no_build_step("bazel_binary" if isinstance(spec, BazelBinary) else "bazel_container", repr(spec.label))
    common = dict(name=spec.name, args=packageable.args, env_vars=dict(packageable.env_vars))
    if isinstance(spec, Dockerfile):
        if not getattr(packageable.executor_spec, "builds_images", False):
            raise NotImplementedError(
                f"xm.dockerfile_container({spec.path!r}): a Dockerfile is built into an image for the container "
                f"executors (xm_local.Docker, Kubernetes, Vertex), not for "
                f"{type(packageable.executor_spec).__name__}; build the image yourself and use "
                f"xm.container(image_path=...)")
        from prefect_xm.core.images import build_dockerfile_image

        built = build_dockerfile_image(_resolve_path(spec.path), spec.dockerfile and _resolve_path(spec.dockerfile),
                                       spec.name, packageable.executor_spec.image_destination(spec.path))
        if built.entrypoint:  # `docker run IMAGE ARGS`: the entrypoint with the job's args
            return Executable(kind="command", command=built.entrypoint, image=built.reference, **common)
        return Executable(kind="container", image=built.reference, **common)  # the args are the command
    if isinstance(spec, Binary):
        path = spec.path
        if os.sep in path and not os.path.isabs(path):
            path = _resolve_path(path)
        return Executable(kind="command", command=[path], **common)
    if isinstance(spec, Command):
        return Executable(kind="command", command=list(spec.command), **common)
    if isinstance(spec, Container):
        return Executable(kind="container", image=spec.image_path, **common)
    if isinstance(spec, PythonContainer):
        path = _resolve_path(spec.path)
        # On this machine (Local) the code runs with the local Python; base_image is used
        # where an executor runs containers (batch nodes with apptainer).
        image = None if getattr(packageable.executor_spec, "runs_locally", False) else spec.base_image
        if not os.path.isdir(path):
            raise ValueError(f"PythonContainer.path: {spec.path!r} (resolved to {path}) is not a directory")
        if getattr(packageable.executor_spec, "builds_images", False):
            # Docker, Kubernetes, Vertex AI: the code goes into an image built now, as XManager does
            from prefect_xm.core.images import WORKDIR, build_image

            image = build_image(spec, path, spec.name, packageable.executor_spec.image_destination(spec.path))
            path = WORKDIR
        elif spec.use_deep_module:
            # XManager's deep module: `<code dir name>.module` imports, from the code's parent
            path = os.path.dirname(path)
        if isinstance(spec.entrypoint, ModuleName):
            return Executable(kind="module", module=spec.entrypoint.module_name, path=path, image=image, **common)
        return Executable(kind="commands", commands=list(spec.entrypoint.commands), path=path, image=image, **common)
    raise ValueError(f"Packageable.executable_spec: unsupported spec {spec!r}")


# ---------------------------------------------------------------------- jobs


class JobConfig(abc.ABC):
    """XManager's common base of Job and JobGroup."""


@dataclasses.dataclass
class Job(JobConfig):
    """A unit of computation: an executable on an executor, with args and env vars."""

    executable: Executable
    executor: Executor
    name: Optional[str] = None
    args: Any = None
    env_vars: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.executable, Executable):
            raise ValueError(
                f"Job.executable must come from experiment.package(...), got {self.executable!r}"
            )
        if not isinstance(self.executor, Executor):
            raise ValueError(f"Job.executor must be an executor (e.g. xm_local.Local()), got {self.executor!r}")
        self.args = SequentialArgs.from_collection(self.args)
        self.env_vars = validate_env_vars(self.env_vars, "Job.env_vars")


JobGeneratorType = Callable[..., Optional[Awaitable[Any]]]
JobType = Union[Job, "JobGroup", JobGeneratorType]


class Constraint(abc.ABC):
    """A condition on how a JobGroup's members are scheduled (XManager's marker class)."""


#: Seconds a gang may stay half started (some members running, others still queued)
#: before every member is cancelled: a JobGroup without its own StartDeadline gets this.
DEFAULT_START_DEADLINE_SECONDS = float(os.environ.get("PREFECT_XM_GANG_START_DEADLINE", "1800"))


class StartDeadline(Constraint):
    """How long a JobGroup may wait, once its first member runs, for every other member
    to run: past it every member is cancelled and the work unit fails naming the members
    that never started, so a half-started group does not hold its resources.
    ``JobGroup(trainer=..., evaluator=..., constraints=[xm_local.StartDeadline(minutes=10)])``."""

    def __init__(self, seconds: float = 0.0, *, minutes: float = 0.0, hours: float = 0.0) -> None:
        import datetime

        if isinstance(seconds, datetime.timedelta):
            seconds = seconds.total_seconds()
        for name, value in (("seconds", seconds), ("minutes", minutes), ("hours", hours)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"StartDeadline.{name} must be a number >= 0, got {value!r}")
        self.seconds = float(seconds) + 60.0 * minutes + 3600.0 * hours
        if self.seconds <= 0:
            raise ValueError(f"StartDeadline must be longer than 0 s, got {self.seconds!r}")

    def __repr__(self) -> str:
        return f"StartDeadline({self.seconds:g})"


def start_deadline_of(job: Any) -> float:
    """The seconds a work unit's gang may stay half started (StartDeadline, or the default)."""
    constraints = getattr(job, "constraints", None) or []
    deadlines = [c.seconds for c in constraints if isinstance(c, StartDeadline)]
    return min(deadlines) if deadlines else DEFAULT_START_DEADLINE_SECONDS


class JobGroup(JobConfig):
    """Jobs scheduled together (a gang): ``JobGroup(learner=Job(...), actor=Job(...))``."""

    def __init__(self, *, constraints: Optional[Sequence[Any]] = None, **jobs: Union[Job, "JobGroup"]) -> None:
        # (empty is allowed, as in XManager: `group.jobs[key] = job` fills it; add() checks)
        for key, job in jobs.items():
            if not isinstance(job, (Job, JobGroup)):
                raise ValueError(f"JobGroup member {key!r} must be a Job or a JobGroup, got {job!r}")
        self.jobs: dict[str, Union[Job, JobGroup]] = dict(jobs)
        self.constraints = list(constraints) if constraints else []
        for c in self.constraints:
            if not isinstance(c, Constraint):
                raise ValueError(f"JobGroup.constraints must be xm.Constraint objects "
                                 f"(e.g. xm_local.StartDeadline(minutes=10)), got {c!r}")

    def __repr__(self) -> str:
        return f"JobGroup({', '.join(self.jobs)})"


def _check_args_keys(args: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    unknown = [k for k in args if k not in allowed]
    if unknown:
        raise ValueError(f"args {unknown!r} are not supported by {what}; allowed: {list(allowed)!r}")


def apply_args(job: Union[Job, JobGroup], args: Optional[Mapping[str, Any]]) -> Union[Job, JobGroup]:
    """XManager's work-unit args: {'args': ..., 'env_vars': ...} for a Job, {member: ...} for a group."""
    if not args:
        return job
    if not isinstance(args, Mapping):
        raise ValueError(f"experiment.add args must be a dict, got {args!r}")
    if isinstance(job, Job):
        _check_args_keys(args, ("args", "env_vars"), "xm.Job")
        job = copy.copy(job)
        if "args" in args:
            job.args = merge_args(job.args, args["args"])
        if "env_vars" in args:
            env = dict(job.env_vars)
            env.update(validate_env_vars(args["env_vars"], "env_vars"))
            job.env_vars = env
        return job
    _check_args_keys(args, list(job.jobs), "xm.JobGroup")
    group = copy.copy(job)
    group.jobs = {k: apply_args(v, args.get(k, {})) for k, v in job.jobs.items()}
    return group


def flatten_jobs(job: Union[Job, JobGroup], prefix: str = "") -> dict[str, Job]:
    """{'key': Job} for a Job or a (nested) JobGroup; nested keys are joined with '.'."""
    if isinstance(job, Job):
        return {prefix or (job.name or job.executable.name): job}
    if not job.jobs:
        raise ValueError(f"JobGroup {prefix or '(the work unit)'} has no jobs: it needs at least one")
    out: dict[str, Job] = {}
    for key, member in job.jobs.items():
        if not isinstance(member, (Job, JobGroup)):
            raise ValueError(f"JobGroup member {key!r} must be a Job or a JobGroup, got {member!r}")
        out.update(flatten_jobs(member, f"{prefix}.{key}" if prefix else key))
    return out


def get_args_for_all_jobs(job: Union[Job, JobGroup], args: Mapping[str, Any]) -> dict[str, Any]:
    """Work-unit args applying `args` to every job of a (nested) group (as XManager)."""
    if isinstance(job, Job):
        return {"args": dict(args)}
    return {key: get_args_for_all_jobs(member, args) for key, member in job.jobs.items()}
