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
bash scripts/postgres-cluster.sh start
# tests/test_production_topology.py starts Prefect's multi-process topology (scripts/prefect-server.sh
# start --workers 2), which runs a redis-server of its own: only the package is needed here.
if ! command -v redis-server >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
# The Docker-compatible engine tests/test_images_engine.py builds python_container images in
# (podman's API), with its local base image (made once per machine: no registry here).
# The newest of these services: if it cannot start, the suite still runs, and the image
# test fails (with CI=true) saying the engine is missing.
bash scripts/podman-engine.sh start || echo "test.sh: podman engine did not start; tests/test_images_engine.py will say so" >&2
# Each test process's Prefect server gets a PostgreSQL database of its own (a copy of a
# migrated template: tests/conftest.py). On SQLite, servers whose workers submit while
# tests create runs answer `database is locked` and clients back off for seconds.
export PREFECT_XM_TEST_POSTGRES=${PREFECT_XM_TEST_POSTGRES-$(bash scripts/postgres-cluster.sh url)}
# Side by side: most of the suite waits on polls and process starts, not on the CPU.
# Each pytest-xdist process has its own Prefect server; they share Slurm, SGE and sshd.
# A class or module runs on one process (loadscope): its pool, worker or browser is shared.
exec .venv/bin/python -m pytest -ra -n "${PREFECT_XM_TEST_PROCESSES:-6}" --dist loadscope --durations=25 "$@"
