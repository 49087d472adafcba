"""Flows the examples deploy to batch work pools."""

import os
import platform

from prefect import flow, get_run_logger


@flow(persist_result=True, log_prints=True)
def train(learning_rate: float = 0.1, batch_size: int = 64) -> dict:
    """A stand-in for a training step: reports where it ran and a fake loss."""
    logger = get_run_logger()
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("JOB_ID") or "-"
    logger.info(f"training with lr={learning_rate} batch_size={batch_size} on {platform.node()} (batch job {job})")
    loss = round(1.0 / (1.0 + learning_rate * batch_size), 4)
    return {"learning_rate": learning_rate, "batch_size": batch_size, "loss": loss, "batch_job": job}
