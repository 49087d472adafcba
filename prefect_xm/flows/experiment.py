"""The experiment and work-unit flows.

Their runs are created and driven by prefect_xm's experiment orchestrator (in the
process running the launch script) through the Prefect API: the experiment run is the
parent, each work unit a subflow run (linked through a task run in the experiment run,
as ``run_deployment`` links its runs) whose parameters are the work unit's args, and each
job a flow run of ``xm-job-runner`` linked into its work-unit run the same way. The
functions below are the flows' identities (name, description) in Prefect; they are not
called directly.
"""

from __future__ import annotations

from prefect import flow

EXPERIMENT_FLOW_NAME = "xm-experiment"
WORK_UNIT_FLOW_NAME = "xm-work-unit"


@flow(name=EXPERIMENT_FLOW_NAME, description="An XManager-style experiment (prefect-xm).")
def xm_experiment() -> None:
    """An experiment: parent of its work-unit runs. Driven by prefect_xm.xm_local."""
    raise RuntimeError("xm-experiment runs are driven by prefect_xm.xm_local.create_experiment")


@flow(name=WORK_UNIT_FLOW_NAME, description="One trial of an experiment: a Job or a gang-scheduled JobGroup.")
def xm_work_unit() -> None:
    """A work unit: parent of its job runs; parameters are the work unit's args."""
    raise RuntimeError("xm-work-unit runs are driven by prefect_xm.xm_local experiments")
