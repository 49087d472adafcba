#!/usr/bin/env bash
# The main job: a 3x2 hyperparameter sweep (examples/sweep_local.py) on the embedded
# default (local processes and Prefect's embedded server; no cluster needed), printing
# a results table. Installs what it needs (the venv) on a fresh Debian machine, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
bash scripts/bootstrap.sh
# No PREFECT_API_URL: Prefect starts its embedded server for the run.
unset PREFECT_API_URL
exec .venv/bin/python examples/sweep_local.py "$@"
