"""The job variables every batch worker shares, and the checks the schedulers' own
variables use.

Each variable is declared once, on a BatchJobConfiguration subclass: its type, default,
title and description (the pool's form in the UI), and its checks. A check that the form
can make too (a minimum, a pattern) is written into the type's JSON schema
(`AtLeastOne`, `ZeroOrMore`, `in_syntax`) without changing how the worker checks it:
its error names the variable and the value it refused, whichever scheduler's it is. The
pool's variables schema is made from the configuration (`variables_of`), never written by
hand a second time.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from typing import Annotated, Any, Optional

from prefect.workers.base import BaseJobConfiguration, BaseVariables
from pydantic import AfterValidator, Field, ValidationInfo, WithJsonSchema, create_model, field_validator, model_validator

from prefect_xm.workers.schema import compact

def check_format(pattern: "re.Pattern[str]", field: str, value: Optional[str], example: str) -> Optional[str]:
    """A job variable's value against its scheduler's syntax; the error names both."""
    if value is None or value == "":
        return None
    if not pattern.match(str(value)):
        raise ValueError(f"{field}: {value!r} is not valid; expected e.g. {example}")
    return value


def _at_least_one(v: Optional[int], info: ValidationInfo) -> Optional[int]:
    if v is not None and v < 1:
        raise ValueError(f"{info.field_name}: {v!r} must be at least 1")
    return v


def _not_negative(v: Optional[int], info: ValidationInfo) -> Optional[int]:
    if v is not None and v < 0:
        raise ValueError(f"{info.field_name}: {v!r} must be 0 or more")
    return v


#: a job variable counting what a job has at least one of (nodes, CPUs, slots, tasks),
#: its error naming the variable whichever scheduler's it is
AtLeastOne = Annotated[Optional[int], AfterValidator(_at_least_one),
                       WithJsonSchema({"anyOf": [{"minimum": 1, "type": "integer"}, {"type": "null"}]})]
#: a job variable counting what a job may have none of (GPUs, requeues)
ZeroOrMore = Annotated[Optional[int], AfterValidator(_not_negative),
                       WithJsonSchema({"anyOf": [{"minimum": 0, "type": "integer"}, {"type": "null"}]})]
#: a count that has no empty value (array_size_limit)
PositiveCount = Annotated[int, AfterValidator(_at_least_one), WithJsonSchema({"minimum": 1, "type": "integer"})]


def pattern_in_form(pattern: "re.Pattern[str]") -> WithJsonSchema:
    """An optional text variable's pattern, in the pool's form (the UI checks it as the
    user types); the worker checks it with check_format, whose error says what is expected."""
    return WithJsonSchema({"anyOf": [{"pattern": pattern.pattern, "type": "string"}, {"type": "null"}]})


def in_syntax(pattern: "re.Pattern[str]", example: str, *, in_form: bool = True) -> Any:
    """The type of an optional text variable in its scheduler's syntax (a time limit, a
    memory size, a queue name): the pattern is written once, for the worker's check (its
    error names the variable, the value and an example) and, with ``in_form``, for the
    pool's form (``in_form=False``: the form takes any text, the worker still checks it)."""

    def check(value: Optional[str], info: ValidationInfo) -> Optional[str]:
        return check_format(pattern, info.field_name, value, example)

    if in_form:
        return Annotated[Optional[str], AfterValidator(check), pattern_in_form(pattern)]
    return Annotated[Optional[str], AfterValidator(check)]


#: (the settings object, the environment it renders to): BatchJobConfiguration._base_environment
_base_environment_of: Optional[tuple[Any, dict[str, str]]] = None

#: what a batch job name may not hold, whatever the scheduler
JOB_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")
#: `execution` job variable: Prefect's flow engine on the node, or the job's program itself
ENGINE, DIRECT = "engine", "direct"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def job_name_prefix(text: str, empty: str) -> str:
    """`text` made safe to lead a job name: no spaces or commas, a letter first."""
    prefix = JOB_NAME_UNSAFE.sub("-", text).strip("-")[:64]
    if not prefix:
        return empty
    return prefix if prefix[:1].isalpha() else f"xm-{prefix}"


class BatchJobConfiguration(BaseJobConfiguration):
    """Settings common to every batch scheduler; subclasses add their resources."""

    modules: list[str] = Field(
        default_factory=list,
        title="Modules",
        description="Environment modules to load before the flow starts (`module load NAME`).",
    )
    setup_commands: list[str] = Field(
        default_factory=list,
        title="Setup commands",
        description="Shell lines run in the batch script before the flow starts (e.g. activating a venv).",
    )
    extra_directives: list[str] = Field(
        default_factory=list,
        title="Extra directives",
        description="More scheduler options, one per line, written after the scheduler's directive prefix (#SBATCH, #$, #PBS, #BSUB).",
    )
    working_dir: Optional[str] = Field(
        default=None,
        title="Working directory",
        description="Directory the job starts in (a path without spaces: it goes into a directive line).",
    )
    job_name: Optional[str] = Field(
        default=None,
        title="Job name",
        description="Prefix of the scheduler job name; the flow run id is always appended. Defaults to the flow run's name.",
    )
    script_template: Optional[str] = Field(
        default=None,
        title="Script template",
        description="A custom jinja2 batch-script template: a path on the worker's machine, or the template text itself.",
    )
    run_dir: str = Field(
        default="~/.prefect-xm/runs",
        title="Run directory",
        description="Where each run's batch script, stdout and stderr are kept (one subdirectory per flow run); must be visible from the compute nodes.",
    )
    cluster: str = Field(
        default="local",
        title="Cluster name",
        description="A name for the cluster, stored in each run's infrastructure id so a restarted worker finds its jobs. Defaults to the SSH block's name when one is set.",
    )
    ssh_block: Optional[str] = Field(
        default=None,
        title="SSH connection block",
        description="Name of an 'SSH Connection' block: run the scheduler's commands on that login node. Empty: on the worker's machine.",
    )
    submit_timeout: float = Field(
        default=60.0,
        title="Submit timeout (s)",
        description="How long a submission may take before it is checked and retried.",
    )
    execution: Annotated[str, WithJsonSchema({"enum": ["engine", "direct"], "type": "string"})] = Field(
        default=ENGINE,
        title="Execution",
        description=(
            "'engine': the batch script starts Prefect's flow engine (`python -m prefect flow-run execute`), "
            "which needs Prefect installed and a route to the Prefect API on the compute node. 'direct' (for "
            "prefect-xm job-runner runs, the default of their deployments): the script runs the job's program "
            "itself; the worker writes the run's states from the scheduler's and ships the program's output "
            "as the run's logs, so nothing of Prefect runs on the node."
        ),
    )
    array_size_limit: PositiveCount = Field(
        default=1000,
        title="Array size limit",
        description=(
            "Runs of one deployment picked up together whose batch scripts differ only in their program's "
            "arguments and environment (a sweep's trials) go to the scheduler as one array of at most this "
            "many tasks, each task still its own flow run. 1: every run is its own job. Keep it at or below "
            "the site's limit (Slurm MaxArraySize, SGE max_aj_tasks); a refused array is split."
        ),
    )
    array_throttle: AtLeastOne = Field(
        default=None,
        title="Array throttle",
        description=(
            "At most this many tasks of one array run at once (Slurm --array=...%N, SGE -tc, Torque -t ...%N, "
            "LSF [1-N]%M, HTCondor max_materialize). Empty: as many as the scheduler allows."
        ),
    )
    requeue: bool = Field(
        default=False,
        title="Requeue",
        description=(
            "Ask the scheduler to put the job back in its queue when it is preempted or its node fails "
            "(Slurm --requeue, SGE and PBS -r y, LSF -r; HTCondor reschedules evicted jobs by itself). "
            "Whether or not this is set, a job the scheduler requeues keeps its flow run: the run goes back "
            "to Pending (named Requeued) and follows the same job; the program sees which attempt it is "
            "in PREFECT_XM_ATTEMPT (1, 2, ...), to resume from its checkpoint."
        ),
    )
    max_requeues: ZeroOrMore = Field(
        default=None,
        title="Maximum requeues",
        description=(
            "Once the job has been requeued more times than this, the worker removes it and the run ends "
            "Crashed, saying so. Empty: no limit."
        ),
    )

    @field_validator("execution")
    @classmethod
    def _execution(cls, v: str) -> str:
        if v not in (ENGINE, DIRECT):
            raise ValueError(f"execution: {v!r} must be {ENGINE!r} or {DIRECT!r}")
        return v

    @model_validator(mode="after")
    def _cluster_of_ssh_block(self):
        # Jobs on different login nodes must not share infrastructure ids.
        if self.ssh_block and self.cluster == "local":
            self.cluster = self.ssh_block
        return self

    @field_validator("extra_directives", "modules")
    @classmethod
    def _single_lines(cls, v: list[str], info) -> list[str]:
        for item in v:
            if "\n" in item or "\r" in item:
                raise ValueError(f"{info.field_name}: {item!r} must be a single line")
        return v

    @field_validator("env")
    @classmethod
    def _environment_names(cls, v: dict) -> dict:
        for name in v:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"env: {name!r} is not a valid environment variable name")
        return v

    @field_validator("working_dir", "run_dir")
    @classmethod
    def _directive_path(cls, v: Optional[str], info) -> Optional[str]:
        # Both land in directive lines (-wd, --chdir, -o/-e): a newline would start a
        # shell line of its own, a space would cut the directive short.
        if v is not None and (not v.strip() or re.search(r"\s", v)):
            raise ValueError(f"{info.field_name}: {v!r} must be a path without spaces or line breaks")
        return v

    @field_validator("job_name")
    @classmethod
    def _job_name(cls, v: Optional[str]) -> Optional[str]:
        if v and not re.match(r"^[A-Za-z0-9_.+-]+$", v):
            raise ValueError(f"job_name: {v!r} may only hold letters, digits and _ . + -")
        return v

    @field_validator("cluster")
    @classmethod
    def _cluster_name(cls, v: str) -> str:
        if not v or ":" in v:
            raise ValueError(f"cluster: {v!r} must be a non-empty name without ':'")
        return v

    def gangs_as_one_job(self) -> bool:
        """Whether this pool sends a gang to its scheduler as one heterogeneous job (a
        scheduler that has them says so with a job variable of its own)."""
        return False

    @classmethod
    def _base_environment(cls) -> dict[str, str]:
        """Prefect's settings as each run's environment, rendered once per settings object:
        Prefect renders every setting for every run it prepares, which was 40% of the
        worker's CPU in picking up a sweep (15 ms a run); a worker's settings are one
        object for its life (a changed profile or temporary_settings is a new one)."""
        from prefect.settings import get_current_settings

        global _base_environment_of
        settings = get_current_settings()
        if _base_environment_of is None or _base_environment_of[0] is not settings:
            _base_environment_of = (settings, super()._base_environment())
        return dict(_base_environment_of[1])

    def prepare_for_flow_run(self, flow_run, deployment=None, flow=None, work_pool=None, worker_name=None, worker_id=None):
        default_command = self.command is None
        super().prepare_for_flow_run(
            flow_run, deployment=deployment, flow=flow, work_pool=work_pool,
            worker_name=worker_name, worker_id=worker_id,
        )
        if default_command:
            # The same Python as the worker: on a shared filesystem that is the one
            # with prefect installed; a site can override `command` per pool. Not
            # `-m prefect.engine`, which would start one interpreter fewer: the engine
            # alone answers the scheduler's SIGTERM of a cancelled job with Crashed, after
            # and over the worker's Cancelled (seen on Prefect 3.9.1, Torque and HTCondor).
            self.command = f"{shlex.quote(sys.executable)} -m prefect flow-run execute"


class BatchVariables(BaseVariables):
    """The base of every batch pool's variables model (made by variables_of)."""

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # What `prefect work-pool create` and the UI store as the pool's variables: the
        # same fields, written so that Prefect's server checks a run's job variables
        # against them in a fraction of the time (see schema.py).
        return compact(super().model_json_schema(*args, **kwargs))


def variables_of(configuration: type[BatchJobConfiguration]) -> type[BatchVariables]:
    """The pool's variables model of a worker type: the configuration's own variables
    (declared once, there, with their titles, descriptions and form checks) over
    Prefect's BaseVariables (name, env, labels, command)."""
    fields = {name: (info.annotation, copy.deepcopy(info)) for name, info in configuration.model_fields.items()
              if name not in BaseJobConfiguration.model_fields}
    return create_model(configuration.__name__.replace("JobConfiguration", "Variables"), __base__=BatchVariables,
                        __module__=configuration.__module__, **fields)
