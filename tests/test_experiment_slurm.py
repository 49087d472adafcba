"""JobGroups on the real (two-node) Slurm through an xm-slurm work pool: sweeps of groups,
gangs started together as one heterogeneous job, gangs that fail or never start whole."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import cluster_is_up, require_service

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]


def _job_tag(run) -> str:
    """The run's xm-job:<key> tag (a run made from a deployment holds its tags unordered)."""
    return next(t for t in run.tags if t.startswith("xm-job:"))


def _slurm_is_up() -> bool:
    return cluster_is_up("slurm-cluster.sh")


@pytest.fixture(scope="module")
def slurm_pool(prefect_server, tmp_path_factory):
    from e2e import worker_pool

    require_service("slurm", _slurm_is_up(), "start it with `bash scripts/slurm-cluster.sh start`")
    root = tmp_path_factory.mktemp("xm-slurm-sweep")
    with worker_pool(prefect_server, root, "xm-slurm") as pool:
        yield pool, root


def test_product_sweep_of_job_groups_on_slurm(slurm_pool, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from prefect_xm import hyper, xm, xm_local

    pool, root = slurm_pool
    out = tmp_path / "out"
    out.mkdir()
    code = ("import json, os, sys; "
            "open(os.path.join(sys.argv[1], sys.argv[2] + '-' + os.environ['SLURM_JOB_ID']), 'w')"
            ".write(json.dumps(sys.argv[3:]))")
    executor = xm_local.Slurm(requirements=xm.JobRequirements(cpu=1, memory=256 * xm.MiB), partition="debug",
                              time="10:00", work_pool=pool, job_variables={"run_dir": str(root / "runs")})
    trials = hyper.product(hyper.sweep("lr", [0.1, 0.01, 0.001]), hyper.sweep("bs", [16, 32]))
    with xm_local.create_experiment(experiment_title="slurm-sweep") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", code, str(out)]),
                                                   xm_local.Slurm.Spec())])
        for hp in trials:
            group = xm.JobGroup(train=xm.Job(exe, executor, args=["train"]),
                                evaluate=xm.Job(exe, executor, args=["eval"]))
            experiment.add(group, args=xm.get_args_for_all_jobs(group, hp))
    statuses = {wid: wu.get_status() for wid, wu in experiment.work_units.items()}
    assert len(statuses) == 6 and all(s.is_completed for s in statuses.values()), statuses

    tags = [f"xm-experiment:{experiment.experiment_id}"]
    with get_client(sync_client=True) as c:
        jobs = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags + ["xm-kind:job"])))
        wus = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags + ["xm-kind:work-unit"])))
    assert len(jobs) == 12 and all(j.state.is_completed() for j in jobs)
    assert all(j.work_pool_name == pool and j.job_variables["memory"] == "256M" for j in jobs)
    assert sorted((w.parameters["train"]["args"]["lr"], w.parameters["train"]["args"]["bs"]) for w in wus) == sorted(
        (t["lr"], t["bs"]) for t in trials)
    written = [json.loads(p.read_text()) for p in out.iterdir()]
    assert len(written) == 12  # each job ran under its own Slurm job id
    assert sorted(written) == sorted([f"--lr={t['lr']}", f"--bs={t['bs']}"] for t in trials for _ in (0, 1))


def test_a_gang_on_one_pool_runs_as_one_heterogeneous_job_its_members_together(slurm_pool, tmp_path):
    """Two members with their own requirements: one Slurm job, a component each (their
    own job ids, states, logs), running at the same time on nodes of their own."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from prefect_xm import xm, xm_local

    pool, root = slurm_pool
    out = tmp_path / "out"
    out.mkdir()
    code = ("import json, os, sys, time; start = time.time(); print('member', sys.argv[2], 'says hello'); "
            "sys.stdout.flush(); time.sleep(4); "
            "open(os.path.join(sys.argv[1], sys.argv[2]), 'w').write(json.dumps("
            "[start, time.time(), os.environ['SLURM_JOB_ID'], os.environ.get('SLURMD_NODENAME'), "
            "os.environ.get('SLURM_CPUS_PER_TASK')]))")
    variables = {"run_dir": str(root / "runs")}
    small = xm_local.Slurm(requirements=xm.JobRequirements(cpu=1, memory=200 * xm.MiB), time="10:00",
                           work_pool=pool, job_variables=variables)
    big = xm_local.Slurm(requirements=xm.JobRequirements(cpu=2, memory=300 * xm.MiB), time="10:00",
                         work_pool=pool, job_variables=variables)
    with xm_local.create_experiment(experiment_title="slurm-hetjob") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", code, str(out)]),
                                                   xm_local.Slurm.Spec())])
        wu = experiment.add(xm.JobGroup(trainer=xm.Job(exe, small, args=["trainer"]),
                                        evaluator=xm.Job(exe, big, args=["evaluator"])))
    assert wu.get_status().is_completed, wu.get_status()
    with get_client(sync_client=True) as c:
        runs = {next(t.split(":", 1)[1] for t in r.tags if t.startswith("xm-job:")): r for r in c.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(
                all_=[f"xm-experiment:{experiment.experiment_id}", "xm-kind:job"])))}
        logs = {key: " ".join(line.message for line in c.read_logs(log_filter=_logs_of(r.id))) for key, r in runs.items()}
    assert set(runs) == {"trainer", "evaluator"} and all(r.state.is_completed() for r in runs.values()), runs
    het_id = runs["trainer"].infrastructure_pid.rsplit(":", 1)[1].split("+")[0]
    assert runs["trainer"].infrastructure_pid.endswith(f":{het_id}+0"), runs["trainer"].infrastructure_pid
    assert runs["evaluator"].infrastructure_pid.endswith(f":{het_id}+1"), runs["evaluator"].infrastructure_pid
    assert "member trainer says hello" in logs["trainer"] and "evaluator says" not in logs["trainer"], logs
    assert "member evaluator says hello" in logs["evaluator"], logs
    written = {name: json.loads((out / name).read_text()) for name in ("trainer", "evaluator")}
    (t_start, t_end, *_), (e_start, e_end, *_) = written["trainer"], written["evaluator"]
    assert t_start < e_end and e_start < t_end, written  # they ran at the same time
    assert written["trainer"][3] != written["evaluator"][3], written  # each component on its own node
    assert written["evaluator"][4] == "2", written  # its own requirements


def test_cancelling_a_gang_that_is_one_heterogeneous_job_ends_the_whole_job(slurm_pool, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from conftest import wait_for
    from prefect_xm import xm, xm_local
    from prefect_xm.workers.scheduler import Scheduler

    pool, root = slurm_pool
    code = "import os, sys, time; open(sys.argv[1], 'w').write(os.environ['SLURM_JOB_ID']); time.sleep(300)"
    executor = xm_local.Slurm(time="10:00", work_pool=pool, job_variables={"run_dir": str(root / "runs")})
    marks = [tmp_path / "a", tmp_path / "b"]
    with xm_local.create_experiment(experiment_title="slurm-hetjob-cancel") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", code]), xm_local.Slurm.Spec())])
        wu = experiment.add(xm.JobGroup(a=xm.Job(exe, executor, args=[str(marks[0])]),
                                        b=xm.Job(exe, executor, args=[str(marks[1])])))
        wait_for(lambda: all(m.exists() for m in marks), timeout=180, what="both members running")
        wu.stop()
    assert wu.get_status().state_type == "CANCELLED", wu.get_status()
    tags = [f"xm-experiment:{experiment.experiment_id}", "xm-kind:job"]
    with get_client(sync_client=True) as c:
        def members():
            return c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)))
        wait_for(lambda: all(r.state.is_cancelled() for r in members()), timeout=120, what="both members Cancelled")
        job_ids = {Scheduler.parse_infrastructure_pid(r.infrastructure_pid)[2] for r in members()}
    het_id = next(iter(job_ids)).split("+")[0]
    assert job_ids == {f"{het_id}+0", f"{het_id}+1"}, job_ids

    def gone():
        q = subprocess.run(["squeue", "-h", "-j", het_id, "-o", "%T"], capture_output=True, text=True)
        return not set(q.stdout.split()) - {"CANCELLED", "COMPLETED", "FAILED"}
    wait_for(gone, timeout=60, what=f"heterogeneous job {het_id} to leave the queue")


def _logs_of(flow_run_id):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))


def test_gang_failure_on_slurm_cancels_the_sleeper(slurm_pool, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from conftest import wait_for
    from prefect_xm import xm, xm_local

    pool, root = slurm_pool
    started = tmp_path / "sleeper-started"
    sleeper = f"import os, time; open({str(started)!r}, 'w').write(os.environ['SLURM_JOB_ID']); time.sleep(300)"
    failer = (f"import os, sys, time\n"
              f"while not os.path.exists({str(started)!r}): time.sleep(0.2)\n"
              f"sys.exit(1)")
    executor = xm_local.Slurm(partition="debug", time="10:00", work_pool=pool,
                              job_variables={"run_dir": str(root / "runs")})
    with xm_local.create_experiment(experiment_title="slurm-gang") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Binary(sys.executable), xm_local.Slurm.Spec())])
        wu = experiment.add(xm.JobGroup(sleeper=xm.Job(exe, executor, args=["-c", sleeper]),
                                        failer=xm.Job(exe, executor, args=["-c", failer])))
    status = wu.get_status()
    assert status.is_failed and "failer" in status.message, status
    with get_client(sync_client=True) as c:
        members = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(
            all_=[f"xm-experiment:{experiment.experiment_id}", "xm-kind:job"])))
    # both members were components of one heterogeneous job (the failer's exit code is its own)
    assert sorted(r.infrastructure_pid.rsplit("+", 1)[1] for r in members) == ["0", "1"], members
    assert len({r.infrastructure_pid.rsplit("+", 1)[0] for r in members}) == 1, members
    failer_run = next(r for r in members if "xm-job:failer" in r.tags)
    assert failer_run.state.is_failed() and "exited with code 1" in failer_run.state.message, failer_run.state
    tags = [f"xm-experiment:{experiment.experiment_id}", "xm-kind:job", "xm-job:sleeper"]
    # scancel's grace SIGTERM can make Prefect's engine in the job write Crashed ("aborted
    # by Python system exit") first; the worker that cancelled the job then sets Cancelled
    # once the job has left the queue. The final word is the worker's: wait for it.
    def sleeper_run():
        with get_client(sync_client=True) as c:
            [run] = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)))
        return run

    wait_for(lambda: sleeper_run().state.is_cancelled(), timeout=120,
             what="the sleeper's run to be Cancelled (the worker's final word)")
    job_id = started.read_text()

    def gone():
        q = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        return q.returncode != 0 or not q.stdout.strip() or q.stdout.strip() in ("CANCELLED", "COMPLETED", "FAILED")
    wait_for(gone, timeout=60, what=f"Slurm job {job_id} to leave the queue")



LAUNCHER = '''
import sys
from prefect_xm import xm, xm_local

pool, run_dir, identity = sys.argv[1:4]
# held in the queue (released by the test): in flight without taking the node's CPUs
executor = xm_local.Slurm(time="10:00", work_pool=pool,
                          job_variables={"run_dir": run_dir, "extra_directives": ["--hold"]})
with xm_local.create_experiment(experiment_title="reattach", identity=identity) as experiment:
    print("EXPERIMENT", experiment.experiment_id, flush=True)
    [exe] = experiment.package([xm.Packageable(xm.Command(["sh", "-c", 'echo "trial $0 ran"']),
                                               xm_local.Slurm.Spec())])
    for i in range(1, 21):
        experiment.add(xm.Job(exe, executor, args=[str(i)]), identity=f"trial-{i}")
print("DONE", experiment.experiment_id, len(experiment.work_units), flush=True)
'''


def test_a_killed_launcher_is_shown_gone_its_jobs_go_on_and_a_rerun_reattaches(slurm_pool, prefect_server, tmp_path):
    """SIGKILL the launch script with 20 jobs in flight: the server marks the experiment
    Crashed (no heartbeat), the worker still takes every job to its end, and running the
    same script again re-attaches (nothing added or submitted twice) and ends it."""
    import os
    import signal

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from conftest import wait_for
    from prefect_xm.core.launcher import GONE_MESSAGE
    from prefect_xm.workers.scheduler import Scheduler

    pool, root = slurm_pool
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    argv = [sys.executable, str(script), pool, str(root / "runs"), f"reattach-{uuid.uuid4().hex[:8]}"]
    env = prefect_server.env(PREFECT_XM_HEARTBEAT_SECONDS="4")  # gone after 12 s without one
    exp_id = None

    def launch(name):
        log = tmp_path / f"{name}.log"
        return subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), log

    def runs(kind):
        with get_client(sync_client=True) as c:
            return c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(
                all_=[f"xm-experiment:{exp_id}", f"xm-kind:{kind}"])))

    def experiment_run():
        [run] = runs("experiment")
        return run

    def release(jobs):
        ids = [Scheduler.parse_infrastructure_pid(j.infrastructure_pid)[2] for j in jobs]
        subprocess.run(["scontrol", "release", ",".join(ids)], check=True, capture_output=True, timeout=60)

    def work_unit(job):
        return int(next(t for t in job.tags if t.startswith("xm-work-unit:")).split(":")[1])

    first, log = launch("first")
    launchers = [first]
    try:
        exp_id = wait_for(lambda: (lambda t: t.split("EXPERIMENT", 1)[1].split()[0] if "EXPERIMENT" in t else None)(
            log.read_text()), 180, what="the launcher to create its experiment")
        wait_for(lambda: len([j for j in runs("job") if j.infrastructure_pid]) == 20, 300, what="20 jobs submitted")
        pids = {j.id: j.infrastructure_pid for j in runs("job")}
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)

        gone = wait_for(lambda: (lambda r: r if r.state.is_crashed() else None)(experiment_run()), 180,
                        what="the experiment marked Crashed (its launcher gone)")
        assert gone.state.message.startswith(GONE_MESSAGE), gone.state
        listed = subprocess.run([sys.executable, "-m", "prefect_xm.cli", "list"], env=env, capture_output=True,
                                text=True, timeout=120)
        assert "launcher gone" in listed.stdout and exp_id in listed.stdout, listed.stdout + listed.stderr

        # with no launcher at all, the worker takes jobs to their end
        release([j for j in runs("job") if work_unit(j) <= 10])
        wait_for(lambda: sum(j.state.is_completed() for j in runs("job")) == 10, 300, what="10 jobs completed")
        assert not any(w.state.is_final() for w in runs("work-unit"))

        second, log = launch("second")
        launchers.append(second)
        wait_for(lambda: "re-attached" in (experiment_run().state.message or ""), 180,
                 what="the second launcher to re-attach")
        release([j for j in runs("job") if work_unit(j) > 10])
        assert second.wait(300) == 0, log.read_text()[-5000:]
        assert f"DONE {exp_id} 20" in log.read_text()
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
        for j in runs("job") if exp_id else []:  # a failed check must not leave held jobs behind
            if j.infrastructure_pid and not j.state.is_final():
                subprocess.run(["scancel", Scheduler.parse_infrastructure_pid(j.infrastructure_pid)[2]],
                               capture_output=True, timeout=60)

    jobs, wus = runs("job"), runs("work-unit")
    assert len(jobs) == 20 and {j.id: j.infrastructure_pid for j in jobs} == pids  # nothing submitted again
    assert all(j.state.is_completed() for j in jobs), [(j.name, j.state) for j in jobs]
    assert len(wus) == 20 and all(w.state.is_completed() for w in wus), [(w.name, w.state) for w in wus]
    assert experiment_run().state.is_completed(), experiment_run().state


def test_a_gang_not_started_within_its_deadline_is_cancelled_whole_naming_who_never_started(slurm_pool, tmp_path):
    """One member runs, the other stays queued (held): past the group's StartDeadline,
    counted from the first member's start, both are cancelled (the runner freed) and the
    work unit fails naming the member that never started."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from conftest import wait_for
    from prefect_xm import xm, xm_local
    from prefect_xm.workers.scheduler import Scheduler

    pool, root = slurm_pool
    # separate jobs (not one heterogeneous job): the deadline is what holds them together
    variables = {"run_dir": str(root / "runs"), "het_job": False}
    runner = xm_local.Slurm(time="10:00", work_pool=pool, job_variables=variables)
    queued = xm_local.Slurm(time="10:00", work_pool=pool, job_variables={**variables, "extra_directives": ["--hold"]})
    with xm_local.create_experiment(experiment_title="slurm-gang-deadline") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command(["sleep", "300"]), xm_local.Slurm.Spec())])
        wu = experiment.add(xm.JobGroup(runner=xm.Job(exe, runner), queued=xm.Job(exe, queued),
                                        constraints=[xm_local.StartDeadline(seconds=5)]))
    status = wu.get_status()
    assert status.is_failed and "'queued' never started" in status.message and "'runner'" in status.message, status
    with get_client(sync_client=True) as c:
        def jobs():
            tags = [f"xm-experiment:{experiment.experiment_id}", "xm-kind:job"]
            return {_job_tag(r): r for r in c.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=tags)))}
        wait_for(lambda: all(r.state.is_cancelled() for r in jobs().values()), timeout=120,
                 what="both members' runs Cancelled")
        job_ids = [Scheduler.parse_infrastructure_pid(r.infrastructure_pid)[2] for r in jobs().values()]

    def gone():
        q = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%T"], capture_output=True, text=True)
        return not q.stdout.strip()
    wait_for(gone, timeout=60, what=f"Slurm jobs {job_ids} to leave the queue")



def test_an_xmanager_style_launch_script_runs_on_slurm_with_only_its_imports_changed(
        slurm_pool, prefect_server, tmp_path):
    pool, root = slurm_pool
    code = tmp_path / "code"
    out = tmp_path / "out"
    code.mkdir(), out.mkdir()
    # (a file each: the sweep's tasks share an array, the gang's members one heterogeneous job)
    (code / "train.py").write_text(
        "import json, os, sys, uuid\n"
        f"open(os.path.join({str(out)!r}, uuid.uuid4().hex), 'w').write(json.dumps(sys.argv[1:]))\n")
    script = Path(__file__).parent / "xmanager_style_launcher.py"
    cli = str(Path(sys.executable).parent / "prefect-xm")
    result = subprocess.run([cli, "launch", str(script), "--", "--xm_launch_mode=local", "--xm_wrap_late_bindings",
                             f"--pool={pool}", f"--code={code}", f"--run_dir={root / 'runs'}"],
                            env=prefect_server.env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    completed = sorted(line.split(" ", 2)[1:] for line in result.stdout.splitlines() if line.startswith("COMPLETED"))
    assert completed == [["1", "['train']"], ["2", "['train']"], ["3", "['evaluator', 'learner']"],
                         ["4", "['train']"]], result.stdout
    argvs = sorted(json.loads(p.read_text()) for p in out.iterdir())
    assert argvs == sorted([
        ["--steps=2", "--role=sweep", "--lr=0.1"], ["--steps=2", "--role=sweep", "--lr=0.01"],
        ["--steps=2", "--role=gang"], ["--steps=2", "--role=gang"],
        ["--steps=2", "--role=generated", "--lr=0.5"]]), argvs
