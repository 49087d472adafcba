"""The job-runner flows (prefect_xm/job_runner.py) under the entrypoint deployments name:
``prefect_xm/flows/job_runner.py:run_job`` and ``prefect_xm.flows.job_runner:run_job``
are stored in every job-runner deployment made so far, so they stay valid here."""

from prefect_xm.job_runner import _main, run_direct, run_job

__all__ = ["run_direct", "run_job"]

if __name__ == "__main__":
    _main()
