#!/usr/bin/env bash
# The xm-slurm worker on this machine: starts the single-node Slurm, a Prefect server,
# an xm-slurm pool and worker, runs examples/flows.py:train three times and prints results.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
bash scripts/bootstrap.sh
bash scripts/slurm-cluster.sh start >/dev/null
exec .venv/bin/python examples/slurm_worker_demo.py
