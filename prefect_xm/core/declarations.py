"""The flows whose runs the launcher creates through the Prefect API, never calling them:
``xm-experiment`` for an experiment a launch script creates, ``xm-work-unit`` for each
work unit.

``prefect_xm.flows.experiment.xm_experiment`` is the same ``xm-experiment`` flow with the
body a deployment runs (a sweep). That body drives the experiment API, which creates
runs of the flows declared here, so the two are declared apart (a run's flow is its
name: both kinds of experiment runs are one flow in the UI).
"""

from __future__ import annotations

from prefect import flow

EXPERIMENT_FLOW_NAME = "xm-experiment"
WORK_UNIT_FLOW_NAME = "xm-work-unit"


@flow(name=EXPERIMENT_FLOW_NAME, description="An XManager-style experiment (prefect-xm).")
def launched_experiment() -> None:
    """An experiment driven by the launch script that created it."""
    raise RuntimeError("this xm-experiment run is driven by its launch script (prefect_xm.xm_local)")


@flow(name=WORK_UNIT_FLOW_NAME, description="One trial of an experiment: a Job or a gang-scheduled JobGroup.")
def xm_work_unit() -> None:
    """A work unit: parent of its job runs; parameters are the work unit's args."""
    raise RuntimeError("xm-work-unit runs are driven by prefect_xm.xm_local experiments")
