"""A job's program, as its flow run's parameters carry it: written once
(`Executable.runner_parameters` in job_blocks.py), read here for every place that starts
it (the job-runner flow, a Local job run without the engine, a batch worker's direct
script on a compute node).

The parameters: ``executable`` (``{"kind": "command", "command": [...]}``, ``{"kind":
"module", "module": "pkg.mod", "path": "/code", "image": optional}``, ``{"kind":
"commands", "commands": ["bash line", ...], "path": ..., "image": optional}`` or ``{"kind":
"container", "image": "docker://alpine:3"}``), ``args`` (the argv tail, already rendered),
``env`` (the job's environment variables) and ``working_dir``.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional


class JobSpecError(ValueError):
    """The executable parameter does not describe a runnable program."""


def _container_runtime() -> Optional[str]:
    for name in ("apptainer", "singularity"):
        path = shutil.which(name)
        if path:
            return path
    return None


def build_argv(executable: dict[str, Any], args: list[str], *, on_node: bool = False) -> tuple[list[str], dict[str, str]]:
    """The program's argv and extra env for an executable spec. Pure but for PATH lookups.

    on_node: the argv is for a batch script on a compute node (direct execution), not for
    this process: programs are named for the node's PATH (python3, apptainer) and
    nothing is taken from this machine's environment."""
    kind = executable.get("kind", "command")
    extra_env: dict[str, str] = {}
    image = executable.get("image")
    path = executable.get("path")
    args = [str(a) for a in args]
    if kind == "command":
        command = executable.get("command")
        if not command or isinstance(command, str):
            raise JobSpecError(f"executable.command must be a non-empty argv list, got {command!r}")
        return [str(c) for c in command] + args, extra_env
    runtime = ("apptainer" if on_node else _container_runtime()) if image else None
    if kind == "container":
        if not image:
            raise JobSpecError("executable.image is required for kind 'container'")
        if runtime is None:
            raise JobSpecError(f"container {image!r}: neither apptainer nor singularity is installed here")
        return [runtime, "run", image] + args, extra_env
    if kind in ("module", "commands"):
        if path:
            inherited = "" if on_node else os.environ.get("PYTHONPATH", "")
            extra_env["PYTHONPATH"] = path + (os.pathsep + inherited if inherited else "")
        if kind == "module":
            module = executable.get("module")
            if not module:
                raise JobSpecError("executable.module is required for kind 'module'")
            inner = ["python3" if runtime or on_node else sys.executable, "-m", module]
        else:
            commands = executable.get("commands")
            if not commands:
                raise JobSpecError("executable.commands is required for kind 'commands'")
            # The user's own bash lines, as XManager's entrypoint.sh runs them: the job's
            # args appended to the last command. They are positional parameters ("$@",
            # quoted: each arg one word), never text the shell reads.
            inner = ["bash", "-c", "\n".join(commands) + ' "$@"', "xm-entrypoint"]
        if runtime:
            bind = ["--bind", path, "--pwd", path] if path else []
            return [runtime, "exec", *bind, image, *inner] + args, extra_env
        return inner + args, extra_env
    raise JobSpecError(f"unknown executable kind {kind!r}")


@dataclass(frozen=True)
class JobProgram:
    """What starts a job: its argv (never a shell string), the variables it adds to the
    environment it starts in, and its working directory."""

    argv: list[str]
    env: dict[str, str]
    working_dir: Optional[str]


def job_program(parameters: Mapping[str, Any], *, on_node: bool = False) -> JobProgram:
    """The program of a job-runner run's parameters (see build_argv for `on_node`)."""
    executable = parameters.get("executable")
    if not isinstance(executable, dict):
        raise JobSpecError(f"executable must describe the program (a dict with a 'kind'), got {executable!r}")
    argv, env = build_argv(executable, list(parameters.get("args") or []), on_node=on_node)
    env.update({str(k): str(v) for k, v in (parameters.get("env") or {}).items()})
    return JobProgram(argv, env, parameters.get("working_dir") or None)
