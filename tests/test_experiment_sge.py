"""A launch script's sweep on the real Son of Grid Engine through xm_local.SGE: the
requirements become SGE's own requests (slots in the parallel environment, h_vmem per
slot, h_rt) and each job runs with them."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import require_service
from test_sge_worker_e2e import sge_is_up

pytestmark = [pytest.mark.sge, pytest.mark.e2e]


@pytest.fixture(scope="module")
def sge_pool(prefect_server, tmp_path_factory):
    from e2e import worker_pool

    require_service("sge", sge_is_up(), "start it with `bash scripts/sge-cluster.sh start`")
    root = tmp_path_factory.mktemp("xm-sge-sweep")
    with worker_pool(prefect_server, root, "xm-sge") as pool:
        yield pool, root


def test_a_sweep_with_job_requirements_runs_on_sge_as_asked(sge_pool, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from prefect_xm import hyper, xm, xm_local

    pool, root = sge_pool
    out = tmp_path / "out"
    out.mkdir()
    # what SGE granted the job, seen from inside it (the sweep goes as one array: a task each)
    code = ("import json, os, resource, sys; "
            "open(os.path.join(sys.argv[1], os.environ['JOB_ID'] + '.' + os.environ['SGE_TASK_ID']), 'w')"
            ".write(json.dumps("
            "{'argv': sys.argv[2:], 'slots': os.environ['NSLOTS'], "
            "'vmem': resource.getrlimit(resource.RLIMIT_AS)[0]}))")
    executor = xm_local.SGE(requirements=xm.JobRequirements(cpu=2, memory=4 * xm.GiB), time=10,
                            work_pool=pool, job_variables={"run_dir": str(root / "runs")})
    with xm_local.create_experiment(experiment_title="sge-sweep") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", code, str(out)]),
                                                   xm_local.SGE.Spec())])
        for hp in hyper.sweep("lr", [0.1, 0.01]):
            experiment.add(xm.Job(exe, executor, args=hp))
    statuses = [wu.get_status() for wu in experiment.work_units.values()]
    assert len(statuses) == 2 and all(s.is_completed for s in statuses), statuses

    tags = [f"xm-experiment:{experiment.experiment_id}", "xm-kind:job"]
    with get_client(sync_client=True) as c:
        jobs = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)))
    assert len(jobs) == 2 and all(j.state.is_completed() for j in jobs)
    assert all(j.job_variables["slots"] == 2 and j.job_variables["memory"] == "2G" for j in jobs)
    written = [json.loads(p.read_text()) for p in out.iterdir()]
    assert sorted(w["argv"] for w in written) == [["--lr=0.01"], ["--lr=0.1"]]
    # two slots in the parallel environment, and h_vmem (per slot) times the slots as the
    # job's address-space limit: SGE's shepherd sets it
    assert all(w["slots"] == "2" and w["vmem"] == 4 * xm.GiB for w in written), written
    # the batch script (the array's: both tasks in one submit)
    scripts = [p.read_text().splitlines() for p in (root / "runs").glob("*/job.sh")]
    assert scripts and all({"#$ -l h_rt=0:10:00", "#$ -l h_vmem=2G", "#$ -pe smp 2"} <= set(s)
                           for s in scripts), scripts
