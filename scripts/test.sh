#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh Debian machine (as root):
# installs the venv and the services the end-to-end tests use, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k slurm -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
bash scripts/bootstrap.sh
bash scripts/slurm-cluster.sh start
bash scripts/torque-wrappers.sh >/dev/null  # Slurm's Torque qsub/qstat/qdel, unpacked beside the system
bash scripts/sge-cluster.sh start
bash scripts/sshd-package.sh
bash scripts/chromium.sh
exec .venv/bin/python -m pytest -ra "$@"
