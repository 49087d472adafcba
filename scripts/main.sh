#!/usr/bin/env bash
# The main job: an example run on this machine, printing its results.
# Installs what it needs (venv, single-node Slurm) on a fresh Debian machine, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
bash scripts/bootstrap.sh
bash scripts/slurm-cluster.sh start >/dev/null
exec .venv/bin/python examples/slurm_worker_demo.py
