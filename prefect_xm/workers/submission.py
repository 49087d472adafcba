"""Submitting: from a run's configuration to the id of its job. Renders the batch
script (jinja2, sandboxed, StrictUndefined) beside the run's environment file, and hands
the scheduler one job, one array of runs, or a gang as one heterogeneous job; a submit
that may have gone through is looked up by its unique name before it is retried.

A mixin of BatchWorker (it uses the worker's transports and schedulers)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shlex
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import jinja2
import jinja2.sandbox

from prefect_xm.workers.arrays import (
    ARGV_FILE,
    GROUPING_DIR,
    TASK_EXEC,
    ArrayTask,
    ArrayTooLarge,
    argv_file,
    array_directory,
    array_name,
    key_digest,
    task_env,
)
from prefect_xm.workers.configuration import DIRECT, job_name_prefix
from prefect_xm.workers.hetjob import HET_COMPONENT_FILE, HetMember, directives, het_script
from prefect_xm.workers.run_directory import ARRAY_TASK_FILE, ENV_FILE, environment_file
from prefect_xm.workers.scheduler import Scheduler, SubmissionError, SubmitRequest, TransientSchedulerError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from prefect_xm.workers.configuration import BatchJobConfiguration
    from prefect_xm.workers.transport import Transport

TEMPLATES = Path(__file__).parent / "templates"
#: files written at once when an array is prepared (SFTP requests in flight, over SSH)
FILE_WRITES_AT_ONCE = 16


def _script_environment() -> jinja2.sandbox.SandboxedEnvironment:
    env = jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
        # (a template may include the default scripts' run section, run.sh.j2)
        loader=jinja2.FileSystemLoader(TEMPLATES),
    )
    env.filters["q"] = lambda v: shlex.quote(str(v))
    return env


@functools.lru_cache(maxsize=64)
def _compiled_template(text: str) -> jinja2.Template:
    """A batch-script template, compiled once: a sweep renders the same one for each of
    its runs, and compiling it cost the worker more than rendering it. (A template it
    includes by name is read again when its file changes: jinja2's loader checks.)"""
    return _script_environment().from_string(text)


class ScriptTemplateError(ValueError):
    """The batch-script template could not be rendered (names the variable)."""


class BatchSubmission:
    """Rendering and submitting jobs (see the module docstring)."""

    # -- the batch script ---------------------------------------------------------------
    def job_name(self, configuration: "BatchJobConfiguration", flow_run: "FlowRun") -> str:
        # Run names are free text (an experiment's title, "my sweep"): a space would cut
        # `#SBATCH --job-name=` short and a comma breaks `squeue --name`, losing the run id
        # that finding the job by name relies on. Some schedulers want a letter first.
        return f"{job_name_prefix(configuration.job_name or flow_run.name or '', 'prefect')}-{flow_run.id}"

    def load_template(self, configuration: "BatchJobConfiguration") -> str:
        custom = configuration.script_template
        if custom:
            if "\n" not in custom and os.path.isfile(os.path.expanduser(custom)):
                return Path(os.path.expanduser(custom)).read_text()
            return custom
        return (TEMPLATES / self.scheduler_for(configuration).template_name).read_text()

    def render_script(
        self, configuration: "BatchJobConfiguration", flow_run: "FlowRun", run_dir: str,
        command_argv: Optional[list[str]] = None, names: Optional[dict[str, str]] = None,
    ) -> str:
        """The batch script of one run; `names` replaces the run's own names (job name,
        paths, env file) with an array's."""
        context = configuration.model_dump(exclude={"env"})
        context.update(
            job_name=self.job_name(configuration, flow_run),
            run_dir=run_dir,
            stdout_path=f"{run_dir}/job.out",
            stderr_path=f"{run_dir}/job.err",
            command_argv=command_argv if command_argv is not None else shlex.split(configuration.command or ""),
            flow_run_id=str(flow_run.id),
            env_file=f"{run_dir}/{ENV_FILE}",
        )
        context.update(names or {})
        try:
            script = _compiled_template(self.load_template(configuration)).render(context)
        except jinja2.UndefinedError as exc:
            raise ScriptTemplateError(
                f"script_template: the batch-script template uses an undefined variable: {exc.message}"
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise ScriptTemplateError(
                f"script_template: syntax error on line {exc.lineno}: {exc.message}"
            ) from None
        if context["env_file"] not in script:
            # without it the flow would start with neither its API URL nor its run id
            raise ScriptTemplateError(
                "script_template: the batch-script template must source the run's environment "
                "file, e.g. `. {{ env_file | q }}` before the command"
            )
        return script

    # -- one run, one job -------------------------------------------------------------------
    async def submit_single(
        self, flow_run: "FlowRun", configuration: "BatchJobConfiguration", run_dir: str, command_argv: list[str],
        run_env: dict[str, str], logger,
    ) -> str:
        """One run as one job: its own script, its own submit."""
        transport = await self.transport_for(configuration)
        script = self.render_script(configuration, flow_run, run_dir, command_argv)
        # The run's environment (API URL, flow run id, the API key) travels in a file only
        # its owner can read, never in the script, the submit command or the job's record.
        await transport.write_file(f"{run_dir}/{ENV_FILE}", environment_file(run_env, run_dir), 0o600)
        script_path = f"{run_dir}/job.sh"
        await transport.write_file(script_path, script, 0o700)
        logger.info(f"Rendered batch script: {script_path}")
        request = SubmitRequest(
            script_path=script_path,
            script=script,
            job_name=self.job_name(configuration, flow_run),
            run_dir=run_dir,
            variables=configuration.model_dump(exclude={"env"}),
        )
        job_id = await self.submit_job(request, transport, configuration, logger)
        logger.info(f"Submitted {self.scheduler_for(configuration).name} job {job_id} ({request.job_name})")
        return job_id

    # -- gangs as heterogeneous jobs ----------------------------------------------------------
    def forms_het_jobs(self, configuration: "BatchJobConfiguration") -> bool:
        """Whether this pool's gangs go to the scheduler as one heterogeneous job: the
        scheduler has them, the pool (or the member) leaves them on, and the member runs
        its program directly (its exit code is then the member's end)."""
        return (bool(self.scheduler_for(configuration).het_separator) and configuration.execution == DIRECT
                and configuration.gangs_as_one_job())

    async def submit_het_job(self, members: list[HetMember]) -> list[str]:
        """The gang's members as one heterogeneous job, one component each, in order;
        their component ids. Each member keeps its own run directory, batch script
        (its job step), environment file and output."""
        first = members[0]
        configuration = first.configuration
        scheduler = self.scheduler_for(configuration)
        transport = await self.transport_for(configuration)
        base = await transport.expand_path(configuration.run_dir)
        name = f"{job_name_prefix(configuration.job_name or '', 'xm')}-gang-{uuid.uuid4()}"
        het_dir = array_directory(base, name)
        components = []
        for k, m in enumerate(members):
            script = self.render_script(m.configuration, m.flow_run, m.run_dir, m.argv)
            await transport.write_file(f"{m.run_dir}/{ENV_FILE}", environment_file(m.env, m.run_dir), 0o600)
            await transport.write_file(f"{m.run_dir}/job.sh", script, 0o700)
            await transport.write_file(f"{m.run_dir}/{HET_COMPONENT_FILE}", f"{name} {k}\n", 0o600)
            names = dict(job_name=name, stdout_path=f"{het_dir}/job.out", stderr_path=f"{het_dir}/job.err")
            components.append(directives(self.render_script(m.configuration, m.flow_run, m.run_dir, m.argv, names),
                                         scheduler.directive_prefix))
        script = het_script(components, scheduler.het_separator, [m.run_dir for m in members], scheduler.het_launch)
        script_path = f"{het_dir}/job.sh"
        await transport.write_file(script_path, script, 0o700)
        request = SubmitRequest(script_path=script_path, script=script, job_name=name, run_dir=het_dir,
                                variables=configuration.model_dump(exclude={"env"}))
        job_id = await self.submit_job(request, transport, configuration, first.log)
        ids = [scheduler.het_component_id(job_id, i) for i in range(len(members))]
        for i, (m, component) in enumerate(zip(members, ids)):
            m.log.info(f"Submitted as component {i} of {scheduler.name} heterogeneous job {job_id} "
                       f"({len(members)} gang members started together, {name}): job {component}")
        return ids

    # -- arrays -----------------------------------------------------------------------------
    def may_join_array(self, configuration: "BatchJobConfiguration") -> bool:
        scheduler = self.scheduler_for(configuration)
        return bool(scheduler.array_index_variable) and configuration.array_size_limit > 1

    def runs_on_their_way(self) -> bool:
        """Runs Prefect is submitting through this worker that have not reached run() yet
        (they may join the array being collected)."""
        self._entered_run &= self._submitting_flow_run_ids
        return bool(self._submitting_flow_run_ids - self._entered_run)

    def _array_names(self, configuration: "BatchJobConfiguration", array_dir: str, name: str) -> dict[str, str]:
        index = self.scheduler_for(configuration).array_output_index
        return dict(
            job_name=name,
            run_dir=array_dir,
            stdout_path=f"{array_dir}/task-{index}.out",
            stderr_path=f"{array_dir}/task-{index}.err",
            flow_run_id=name,
            env_file=f"{array_dir}/task.env",
        )

    def array_key(self, configuration: "BatchJobConfiguration", flow_run: "FlowRun") -> tuple:
        """Runs with equal keys may share an array: same scheduler, cluster and limits,
        and the same batch script once each run's own names are taken out."""
        scheduler = self.scheduler_for(configuration)
        names = self._array_names(configuration, GROUPING_DIR, "prefect-xm-array")
        script = self.render_script(configuration, flow_run, GROUPING_DIR, [f"{GROUPING_DIR}/task-exec"], names)
        # The job variables too (without what Prefect sets per run): a scheduler may submit
        # some of them beside the script (HTCondor's description, LSF's stdin options).
        variables = configuration.model_dump(mode="json", exclude={"env", "labels", "name"})
        return (id(scheduler), configuration.cluster, configuration.ssh_block, configuration.array_size_limit,
                configuration.array_throttle, key_digest(script), key_digest(json.dumps(variables, sort_keys=True)))

    async def submit_array(self, tasks: list[ArrayTask]) -> list[str]:
        """The tasks as one array; their task ids, in order."""
        first = tasks[0]
        configuration = first.configuration
        scheduler = self.scheduler_for(configuration)
        transport = await self.transport_for(configuration)
        base = await transport.expand_path(configuration.run_dir)
        name = array_name(job_name_prefix(configuration.job_name or "", "xm"))
        array_dir = array_directory(base, name)
        writes = asyncio.Semaphore(FILE_WRITES_AT_ONCE)

        async def write(path: str, text: str) -> None:
            async with writes:
                await transport.write_file(path, text, 0o600)

        # Each run's directory also says which array task it is: a worker that dies
        # between this submit and recording the task ids leaves runs its replacement
        # can only find through it (see _adopt_unrecorded_submission).
        await asyncio.gather(*(
            write(f"{task.run_dir}/{name_}", text)
            for i, task in enumerate(tasks)
            for name_, text in ((ENV_FILE, environment_file(task.env, task.run_dir)), (ARGV_FILE, argv_file(task.argv)),
                                (ARRAY_TASK_FILE, f"{name} {scheduler.array_first_index + i}\n"))))
        await transport.write_file(f"{array_dir}/tasks", "".join(f"{t.run_dir}\n" for t in tasks), 0o600)
        await transport.write_file(
            f"{array_dir}/task.env",
            task_env(array_dir, scheduler.array_index_variable, scheduler.array_first_index), 0o600)
        await transport.write_file(f"{array_dir}/task-exec", TASK_EXEC, 0o700)
        names = self._array_names(configuration, array_dir, name)
        script = self.render_script(configuration, first.flow_run, array_dir, [f"{array_dir}/task-exec"], names)
        script_path = f"{array_dir}/job.sh"
        await transport.write_file(script_path, script, 0o700)
        throttle = configuration.array_throttle
        if throttle and not scheduler.array_throttles:
            first.log.warning(f"array_throttle: {scheduler.name} arrays cannot be throttled; ignored")
            throttle = None
        request = SubmitRequest(script_path=script_path, script=script, job_name=name, run_dir=array_dir,
                                variables=configuration.model_dump(exclude={"env"}),
                                array_size=len(tasks), array_throttle=throttle)
        array_id = await self.submit_job(request, transport, configuration, first.log,
                                         argv=scheduler.array_submit_argv(request, len(tasks), throttle),
                                         parse=scheduler.parse_array_submit)
        ids = [scheduler.array_task_id(array_id, scheduler.array_first_index + i) for i in range(len(tasks))]
        for i, (task, job_id) in enumerate(zip(tasks, ids)):
            task.log.info(f"Submitted as task {scheduler.array_first_index + i} of {scheduler.name} array "
                          f"{array_id} ({len(tasks)} tasks, {name}): job {job_id}")
        return ids

    async def submit_job(
        self, request: SubmitRequest, transport: "Transport", configuration: "BatchJobConfiguration", logger,
        argv: Optional[list[str]] = None, parse: Optional[Callable[[str], str]] = None,
    ) -> str:
        """Submit once. If the submit command fails transiently or times out, the job
        may still have been accepted: look it up by its unique name before retrying.
        `argv` and `parse` replace the scheduler's single-job ones (arrays)."""
        scheduler = self.scheduler_for(configuration)
        is_array = argv is not None
        argv = argv or scheduler.submit_argv(request)
        parse = parse or scheduler.parse_submit
        stdin = scheduler.submit_stdin(request)
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                result = await transport.run(argv, stdin=stdin, timeout=configuration.submit_timeout)
                if result.ok:
                    try:
                        return parse(result.stdout)
                    except ValueError as exc:
                        # accepted, but the id is unreadable (a site wrapper's chatter):
                        # the job exists, so find it rather than leave it untracked
                        existing = await self._find_by_name(request.job_name, transport, scheduler, is_array)
                        if existing:
                            logger.warning(f"{exc}; found the job by its name: {existing}")
                            return existing
                        raise SubmissionError(f"{argv[0]} answered without a job id: {exc}") from None
                error = scheduler.submit_error(result)
            except TransientSchedulerError as exc:
                error = exc
            if not isinstance(error, TransientSchedulerError):
                if is_array and scheduler.array_too_large(error):
                    raise ArrayTooLarge(scheduler.name, str(error))
                raise SubmissionError(f"{argv[0]} refused the job: {error}")
            logger.warning(f"Submission attempt {attempt} did not complete: {error}")
            if getattr(error, "command_ran", True):
                existing = await self._find_by_name(request.job_name, transport, scheduler, is_array)
                if existing:
                    logger.info(f"Job {existing} with this run's name exists already; not submitting again")
                    return existing
            if attempt < attempts:
                await asyncio.sleep(min(2**attempt, 30))
        raise SubmissionError(f"{argv[0]} failed {attempts} times: {error}")

    async def _find_by_name(
        self, job_name: str, transport: "Transport", scheduler: Scheduler, array: bool = False,
    ) -> Optional[str]:
        """The id of the live job by this name; of an array, the array's id."""
        for _ in range(3):
            try:
                result = await transport.run(scheduler.find_by_name_argv(job_name), timeout=30)
            except TransientSchedulerError:
                await asyncio.sleep(2)
                continue
            if scheduler.find_by_name_answered(result):
                ids = scheduler.jobs_named(job_name, result.stdout)
                if not ids:
                    return None
                return (scheduler.array_of(ids[0]) or ids[0]) if array else ids[0]
            await asyncio.sleep(2)
        raise SubmissionError(
            f"could not check whether job {job_name!r} was submitted; not retrying, to avoid a duplicate"
        )
