"""Flows the end-to-end tests deploy to xm-slurm pools."""

import os
import time

from prefect import flow, get_run_logger


@flow(persist_result=True)
def double(x: int) -> int:
    logger = get_run_logger()
    logger.info(f"doubling {x} on {os.uname().nodename} in slurm job {os.environ.get('SLURM_JOB_ID')}")
    return 2 * x


@flow
def boom() -> None:
    raise RuntimeError("the flow raised on purpose")


@flow
def sleeper(seconds: float = 300.0) -> str:
    get_run_logger().info(f"sleeping {seconds} s")
    time.sleep(seconds)
    return "slept"


@flow(persist_result=True)
def environ(name: str) -> str:
    """The value of an environment variable in the job (the run's env reaches it)."""
    return os.environ.get(name, "<unset>")
