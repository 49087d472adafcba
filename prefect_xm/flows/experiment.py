"""The experiment flow a deployment runs: a sweep of one program.

An experiment's runs are created and driven by prefect_xm's experiment orchestrator (in
the process running the launch script) through the Prefect API: the experiment run is
the parent, each work unit a subflow run (linked through a task run in the experiment
run, as ``run_deployment`` links its runs) whose parameters are the work unit's args, and
each job a flow run of ``xm-job-runner`` linked into its work-unit run the same way
(the flows a launch script creates runs of are in ``core/declarations.py``).

``xm_experiment`` is the deployable entrypoint (``deployments/prefect.yaml``): a run of
it started from the UI or ``prefect deployment run 'xm-experiment/<name>' --param ...``
becomes the experiment itself and runs a sweep of one program, one work unit per trial.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

from prefect import flow, get_run_logger

# (xm_work_unit is named here too, where it was declared before)
from prefect_xm.core.declarations import EXPERIMENT_FLOW_NAME, WORK_UNIT_FLOW_NAME, xm_work_unit  # noqa: F401


def sweep_trials(sweep: Optional[list[dict[str, Any]]] = None,
                 hyper: Optional[dict[str, list[Any]]] = None) -> list[dict[str, Any]]:
    """The trials of a sweep: the explicit arg dicts in `sweep`, then the product of
    `hyper`'s value lists ({"lr": [0.1, 0.01], "bs": [32]} -> 2 trials); one empty trial
    when both are empty."""
    trials: list[dict[str, Any]] = []
    for i, trial in enumerate(sweep or []):
        if not isinstance(trial, dict):
            raise ValueError(f"sweep[{i}] must be a dict of args, got {trial!r}")
        trials.append(dict(trial))
    if hyper:
        names = list(hyper)
        for name in names:
            if isinstance(hyper[name], (str, bytes)) or not isinstance(hyper[name], (list, tuple)):
                raise ValueError(f"hyper[{name!r}] must be a list of values, got {hyper[name]!r}")
        for values in itertools.product(*(hyper[n] for n in names)):
            trials.append(dict(zip(names, values)))
    return trials or [{}]


@flow(name=EXPERIMENT_FLOW_NAME, description="An XManager-style experiment (prefect-xm).")
async def xm_experiment(
    title: str = "experiment",
    command: Optional[list[str]] = None,
    module: Optional[str] = None,
    path: Optional[str] = None,
    args: Optional[dict[str, Any]] = None,
    sweep: Optional[list[dict[str, Any]]] = None,
    hyper: Optional[dict[str, list[Any]]] = None,
    work_pool: Optional[str] = None,
    job_variables: Optional[dict[str, Any]] = None,
):
    """Runs a sweep of one program as an experiment: one work unit per trial.

    Args:
        title: the experiment's title (this run is renamed to it).
        command: the program as an argv list, e.g. ["python3", "train.py"]; or
        module: a Python module run with ``python -m`` from `path`.
        args: args every trial gets (XManager style: {"steps": 100} -> --steps=100).
        sweep: a list of arg dicts, one work unit each.
        hyper: {name: [values]}: one work unit per combination (added after `sweep`).
        work_pool: the work pool the jobs run on (its job-runner deployment is made
            automatically); none = this flow run's own process (the Local executor).
        job_variables: the pool's job variables for every job.
    """
    from prefect.context import FlowRunContext

    from prefect_xm import xm, xm_local
    from prefect_xm.core.api import adopt_flow_run, drive_adopted
    from prefect_xm.core.runtime import Runtime

    logger = get_run_logger()
    if bool(command) == bool(module):
        raise ValueError("give exactly one of command (an argv list) or module (a Python module name)")
    trials = sweep_trials(sweep, hyper)
    if work_pool:
        executor: Any = xm_local.WorkPool(work_pool, job_variables=job_variables or {})
        spec: Any = xm_local.WorkPool.Spec()
    else:
        if job_variables:
            raise ValueError("job_variables need a work_pool")
        executor, spec = xm_local.Local(), xm_local.Local.Spec()
    if command:
        executable_spec: Any = xm.Command(list(command))
    else:
        executable_spec = xm.PythonContainer(entrypoint=xm.ModuleName(module), path=path or ".")

    runtime = Runtime.get()
    ctx = FlowRunContext.get()
    experiment = await runtime.arun(adopt_flow_run(ctx.flow_run.id, title))
    logger.info("experiment %s: %d work unit(s) on %s", experiment.experiment_id, len(trials),
                work_pool or "this process (Local)")

    async def add_trials(experiment) -> None:
        [executable] = experiment.package([xm.Packageable(executable_spec, spec, args=args or {})])
        for trial in trials:
            await experiment.add_async(xm.Job(executable, executor, args=trial))

    statuses, state = await drive_adopted(experiment, add_trials)
    logger.info("experiment %s: %s", experiment.experiment_id, state.message)
    if state.is_completed():
        return {"experiment_id": experiment.experiment_id,
                "work_units": {wid: s.state_name for wid, s in statuses.items()}}
    return state

