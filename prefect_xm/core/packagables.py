"""XManager's factory functions: a spec and where it runs, as one Packageable.

Same names and signatures as `xmanager.xm.packagables`; what has no build step here
(Bazel; a Dockerfile outside the container executors) is refused with the reason, not
taken for something else.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Collection, Mapping, Optional, Union

from prefect_xm.core.job_blocks import (
    Binary,
    CommandList,
    Container,
    Dockerfile,
    ExecutorSpec,
    ModuleName,
    Packageable,
    PythonContainer,
    no_build_step,
)

_NO_ENV: Mapping[str, str] = MappingProxyType({})


def binary(executor_spec: ExecutorSpec, path: str, dependencies: Collection[Any] = (), *,
           args: Any = None, env_vars: Mapping[str, str] = _NO_ENV) -> Packageable:
    """A prebuilt program at `path`."""
    return Packageable(Binary(path=path, dependencies=list(dependencies)), executor_spec,
                       args=args, env_vars=dict(env_vars))


def container(executor_spec: ExecutorSpec, image_path: str, *, args: Any = None,
              env_vars: Mapping[str, str] = _NO_ENV) -> Packageable:
    """A prebuilt container image."""
    return Packageable(Container(image_path=image_path), executor_spec, args=args, env_vars=dict(env_vars))


def python_container(executor_spec: ExecutorSpec, entrypoint: Union[ModuleName, CommandList], path: str = ".",
                     base_image: Optional[str] = None, docker_instructions: Optional[list[str]] = None,
                     use_deep_module: bool = False, *, args: Any = None,
                     env_vars: Mapping[str, str] = _NO_ENV) -> Packageable:
    """Python code at `path` with an entrypoint (a module or a list of commands)."""
    spec = PythonContainer(entrypoint=entrypoint, path=path, base_image=base_image,
                           docker_instructions=docker_instructions, use_deep_module=use_deep_module)
    return Packageable(spec, executor_spec, args=args, env_vars=dict(env_vars))


def bazel_binary(executor_spec: ExecutorSpec, label: str, dependencies: Collection[Any] = (),
                 bazel_args: Collection[str] = (), *, args: Any = None,
                 env_vars: Mapping[str, str] = _NO_ENV) -> Packageable:
    raise no_build_step("bazel_binary", repr(label))


def bazel_container(executor_spec: ExecutorSpec, label: str, bazel_args: Collection[str] = (), *,
                    args: Any = None, env_vars: Mapping[str, str] = _NO_ENV) -> Packageable:
    raise no_build_step("bazel_container", repr(label))


def dockerfile_container(executor_spec: ExecutorSpec, path: str = ".", dockerfile: Optional[str] = None, *,
                         args: Any = None, env_vars: Mapping[str, str] = _NO_ENV) -> Packageable:
    """An image built from a Dockerfile at package() (container executors only)."""
    return Packageable(Dockerfile(path=path, dockerfile=dockerfile), executor_spec, args=args,
                       env_vars=dict(env_vars))
