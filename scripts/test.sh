#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh Debian machine (as root):
# installs the venv and the services the end-to-end tests use, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k slurm -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
bash scripts/bootstrap.sh
# The oldest Prefect we support (pyproject.toml), in a venv of its own: the tests that
# touch Prefect's API shapes run on it too (see the end of this script).
bash scripts/bootstrap.sh .venv-prefect38 constraints-prefect-3.8.txt
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
pytest_args=(-ra --dist loadscope -p no:cacheprovider)
if [ $# -gt 0 ] || [ "${PREFECT_XM_TEST_OLDEST_PREFECT:-1}" = 0 ]; then
    exec .venv/bin/python -m pytest "${pytest_args[@]}" -n "${PREFECT_XM_TEST_PROCESSES:-6}" --durations=25 "$@"
fi
# The whole suite on the current Prefect (.venv, constraints.txt) and, beside it, the
# tests that touch Prefect's API shapes (the workers, the job runner, the experiment on
# the embedded server and on Slurm) on the oldest supported one (.venv-prefect38,
# constraints-prefect-3.8.txt). A Prefect release that breaks us fails here, by name.
oldest_log=$(mktemp /tmp/prefect-xm-oldest-prefect.XXXXXX.log)
.venv-prefect38/bin/python -c 'import prefect; print(f"oldest supported Prefect: {prefect.__version__}")'
# (one test per kind of Prefect call, no more: it shares the two cores with the main suite,
# so every test here lengthens that one too; the scenarios that only repeat a call, as
# the many-runs, requeue and gang sweeps do, run on the current Prefect alone)
s=tests/test_slurm_worker_e2e.py::TestSlurmWorker
.venv-prefect38/bin/python -m pytest "${pytest_args[@]}" -n "${PREFECT_XM_TEST_OLDEST_PROCESSES:-2}" \
    tests/test_prefect_contract.py tests/test_api_client.py tests/test_api_bulk.py tests/test_job_runner.py \
    tests/test_worker_schemas.py "$s::test_flow_completes_with_result_and_logs" \
    "$s::test_flow_that_raises_ends_failed" "$s::test_cancel_while_running" \
    "$s::test_sweep_goes_as_one_array_each_task_its_own_run" \
    "tests/test_worker_recovery.py" \
    "tests/test_embedded_server.py::test_an_xmanager_style_launch_script_on_the_embedded_default" \
    >"$oldest_log" 2>&1 &
oldest=$!
rc=0
.venv/bin/python -c 'import prefect; print(f"current Prefect: {prefect.__version__}")'
.venv/bin/python -m pytest "${pytest_args[@]}" -n "${PREFECT_XM_TEST_PROCESSES:-6}" --durations=25 || rc=$?
oldest_rc=0
wait "$oldest" || oldest_rc=$?
echo "=== the same tests on the oldest supported Prefect ($(.venv-prefect38/bin/python -c 'import prefect; print(prefect.__version__)')): exit $oldest_rc ==="
cat "$oldest_log"
[ "$rc" = 0 ] && [ "$oldest_rc" = 0 ]
