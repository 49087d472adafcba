"""End-to-end: experiments on the Local executor through the real Prefect server."""

from __future__ import annotations

import asyncio

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import wait_for

pytestmark = pytest.mark.e2e

PY = sys.executable


@pytest.fixture(scope="module")
def api(prefect_server):
    """The Prefect server, with this process's Prefect settings pointing at it."""
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    return prefect_server


def _job_tag(run) -> str:
    """The run's xm-job:<key> tag (a run made from a deployment holds its tags unordered)."""
    return next(t for t in run.tags if t.startswith("xm-job:"))


def _runs(*tags):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=list(tags))))


def _run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return c.read_flow_run(flow_run_id)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_xmanager_readme_snippet_ports_by_changing_imports(api, tmp_path):
    (tmp_path / "cifar10.py").write_text(textwrap.dedent("""
        import json, os, sys
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, str(os.getpid()) + ".json"), "w") as f:
            json.dump(sys.argv[1:], f)
        print("trained with", sys.argv[1:])
    """))
    # XManager's README launch script; only the import lines and the executor (Vertex ->
    # Local, as the binary path: this machine) changed. Local records the requirements
    # and does not enforce them, so the T4 it asks for need not exist here.
    (tmp_path / "launch.py").write_text(textwrap.dedent("""
        import itertools

        from prefect_xm import xm
        from prefect_xm import xm_local

        with xm_local.create_experiment(experiment_title='cifar10') as experiment:
          spec = xm.PythonContainer(
              # Package the current directory that this script is in.
              path='.',
              base_image='gcr.io/deeplearning-platform-release/pytorch-gpu',
              entrypoint=xm.ModuleName('cifar10'),
          )

          [executable] = experiment.package([
              xm.Packageable(
                  executable_spec=spec,
                  executor_spec=xm_local.Local.Spec(),
                  args={'platform': 'gpu'},
              ),
          ])

          batch_sizes = [64, 1024]
          learning_rates = [0.1, 0.001]
          trials = list(
              dict([('batch_size', bs), ('learning_rate', lr)])
              for (bs, lr) in itertools.product(batch_sizes, learning_rates)
          )

          requirements = xm.JobRequirements(T4=1)
          for hyperparameters in trials:
            experiment.add(xm.Job(
                executable=executable,
                executor=xm_local.Local(requirements=requirements),
                args=hyperparameters,
            ))
        print("EXPERIMENT", experiment.experiment_id)
    """))
    proc = subprocess.run([PY, str(tmp_path / "launch.py")], env=api.env(), cwd="/", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp_id = proc.stdout.split("EXPERIMENT", 1)[1].split()[0]
    argvs = sorted(json.loads(p.read_text()) for p in (tmp_path / "runs").iterdir())
    assert argvs == sorted([
        ["--platform=gpu", f"--batch_size={bs}", f"--learning_rate={lr}"]
        for bs in (64, 1024) for lr in (0.1, 0.001)])
    wus = _runs("xm-kind:work-unit", f"xm-experiment:{exp_id}")
    assert len(wus) == 4 and all(r.state.is_completed() for r in wus)
    assert sorted((r.parameters["batch_size"], r.parameters["learning_rate"]) for r in wus) == sorted(
        [(64, 0.1), (64, 0.001), (1024, 0.1), (1024, 0.001)])


def test_experiment_wait_until_complete_returns_every_work_units_status(api, tmp_path):
    from prefect_xm import xm, xm_local

    marker = tmp_path / "slow-one-finished"
    with xm_local.create_experiment(experiment_title="wait-all") as experiment:
        [sh] = experiment.package([xm.Packageable(xm.Binary("/bin/sh"), xm_local.Local.Spec())])
        experiment.add(xm.Job(sh, xm_local.Local(), args=["-c", f"sleep 1 && touch {marker}"]))
        experiment.add(xm.Job(sh, xm_local.Local(), args=["-c", "exit 4"]))
        statuses = experiment.wait_until_complete()
        # it returned only once the slow work unit had finished its program
        assert marker.exists()
    assert sorted(statuses) == [1, 2]
    assert statuses[1].is_completed, statuses[1]
    assert statuses[2].is_failed and "exited with code 4" in statuses[2].message, statuses[2]
    wus = _runs("xm-kind:work-unit", f"xm-experiment:{experiment.experiment_id}")
    assert len(wus) == 2 and all(r.state.is_final() for r in wus)


def test_product_sweep_of_job_groups(api, tmp_path):
    from prefect.client.orchestration import get_client

    from prefect_xm import hyper, xm, xm_local

    trials = hyper.product(hyper.sweep("lr", [0.1, 0.01, 0.001]), hyper.sweep("bs", [16, 32]))
    code = "import sys; print('member', sys.argv[1], 'args', ' '.join(sys.argv[2:]))"
    with xm_local.create_experiment(experiment_title="product-sweep") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([PY, "-c", code]), xm_local.Local.Spec())])
        for hp in trials:
            group = xm.JobGroup(
                train=xm.Job(exe, xm_local.Local(), args=["train"]),
                evaluate=xm.Job(exe, xm_local.Local(), args=["eval"]),
            )
            experiment.add(group, args=xm.get_args_for_all_jobs(group, hp))
    exp_id = experiment.experiment_id
    assert isinstance(exp_id, int) and xm_local.get_experiment(exp_id).experiment_id == exp_id  # as XManager's
    assert len(experiment.work_units) == 6
    for wid, wu in experiment.work_units.items():
        assert wu.get_status().is_completed, (wid, wu.get_status())

    exp_run = _run(experiment.flow_run_id)
    assert exp_run.state.is_completed() and exp_run.name == "product-sweep"
    wus = _runs("xm-kind:work-unit", f"xm-experiment:{exp_id}")
    jobs = _runs("xm-kind:job", f"xm-experiment:{exp_id}")
    assert len(wus) == 6 and len(jobs) == 12
    assert all(r.state.is_completed() for r in wus + jobs)
    # Args are the work-unit runs' parameters; job runs carry the rendered argv.
    assert sorted((r.parameters["train"]["args"]["lr"], r.parameters["train"]["args"]["bs"]) for r in wus) == sorted(
        (t["lr"], t["bs"]) for t in trials)
    job = next(j for j in jobs if "xm-job:evaluate" in j.tags and "xm-work-unit:1" in j.tags)
    assert job.parameters["args"] == ["eval", "--lr=0.1", "--bs=16"]

    with get_client(sync_client=True) as c:
        # Work units are subflows of the experiment run, jobs subflows of their work unit.
        wu1 = next(r for r in wus if "xm-work-unit:1" in r.tags)
        assert c.read_task_run(wu1.parent_task_run_id).flow_run_id == experiment.flow_run_id
        assert c.read_task_run(job.parent_task_run_id).flow_run_id == wu1.id
        # The program's output is in the job run's logs.
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        # Logs reach the API in batches, after the run's state: wait for them.
        def program_output_logged():
            logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[job.id])))
            return any("member eval args --lr=0.1 --bs=16" in log.message for log in logs)

        wait_for(program_output_logged, 60, what="the program's output in the job run's logs")
        # The summary artifact: one row per work unit, all Completed (its last update may
        # land just after the work units' final states).
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        def summary_complete():
            arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"xm-summary-{exp_id}"])))
            if not arts:
                return None
            rows = json.loads(arts[0].data)
            done = {row["state"] for row in rows} == {"Completed"} and all(row["duration"] != "-" for row in rows)
            return (arts[0], rows) if done else None

        art, rows = wait_for(summary_complete, 60, what="the summary artifact with every work unit Completed")
        assert art.flow_run_id == experiment.flow_run_id
        assert [row["work_unit"] for row in rows] == [1, 2, 3, 4, 5, 6]


def test_gang_member_failure_cancels_the_others(api, tmp_path):
    from prefect_xm import xm, xm_local

    pidfile = tmp_path / "sleeper.pid"
    sleeper = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    failer = (f"import os, sys, time\n"
              f"while not os.path.exists({str(pidfile)!r}): time.sleep(0.1)\n"
              f"print('giving up', flush=True); sys.exit(1)")
    with xm_local.create_experiment(experiment_title="gang") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Binary(PY), xm_local.Local.Spec())])
        wu = experiment.add(xm.JobGroup(
            sleeper=xm.Job(exe, xm_local.Local(), args=["-c", sleeper]),
            failer=xm.Job(exe, xm_local.Local(), args=["-c", failer]),
        ))
    status = wu.get_status()
    assert status.is_failed and "failer" in status.message and "exited with code 1" in status.message, status
    jobs = {_job_tag(j): j for j in _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}")}
    assert jobs["xm-job:failer"].state.is_failed()
    assert jobs["xm-job:sleeper"].state.is_cancelled(), jobs["xm-job:sleeper"].state
    assert "failer" in jobs["xm-job:sleeper"].state.message
    pid = int(pidfile.read_text())
    wait_for(lambda: not _pid_alive(pid), timeout=30, what="the sleeper process to be gone")
    assert _run(experiment.flow_run_id).state.is_failed()


def test_gang_member_whose_run_cannot_be_created_leaves_no_other_member_behind(api, monkeypatch):
    """One member's flow run fails to be created while another's is still being created:
    the work unit crashes with the cause, and the member created last is cancelled too."""
    import asyncio

    from prefect_xm import xm, xm_local
    from prefect_xm.core import orchestration

    real_submit = orchestration.submit
    refused = asyncio.Event()

    async def submit(client, unit, m, *rest):
        if m.key == "refused":
            refused.set()
            raise RuntimeError("injected: the API refused this flow run")
        await refused.wait()  # created only after its gang mate has failed
        await real_submit(client, unit, m, *rest)

    monkeypatch.setattr(orchestration, "submit", submit)
    with xm_local.create_experiment(experiment_title="gang-create") as experiment:
        [true] = experiment.package([xm.Packageable(xm.Binary("/bin/true"), xm_local.Local.Spec())])
        wu = experiment.add(xm.JobGroup(late=xm.Job(true, xm_local.Local()),
                                        refused=xm.Job(true, xm_local.Local())))
    status = wu.get_status()
    assert status.state_type == "CRASHED" and "injected" in status.message, status
    jobs = _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}")
    assert [_job_tag(j) for j in jobs] == ["xm-job:late"], jobs
    assert jobs[0].state.is_cancelled(), jobs[0].state


def test_add_returns_before_the_server_is_asked_and_the_runs_follow(api, monkeypatch):
    """add() checks its input and returns; the work unit's runs are created in the
    background. Here creation is held until every add() has returned."""
    import asyncio

    from prefect_xm import xm, xm_local
    from prefect_xm.core import experiment as core_experiment
    from prefect_xm.task_run_links import TaskRunLinks

    real_link = TaskRunLinks.create
    released = asyncio.Event()
    seen_before_release = []

    async def held_link(self, parent_flow_run_id, name, key, dynamic_key):
        if key == "xm.work_unit":
            seen_before_release.append(name)
            await released.wait()
        return await real_link(self, parent_flow_run_id, name, key, dynamic_key)

    monkeypatch.setattr(TaskRunLinks, "create", held_link)
    monkeypatch.setattr(core_experiment, "CREATION_CONCURRENCY", 8)  # (fewer than the adds: the bound shows)
    with xm_local.create_experiment(experiment_title="quick-adds") as experiment:
        [true] = experiment.package([xm.Packageable(xm.Binary("/bin/true"), xm_local.Local.Spec())])
        wus = [experiment.add(xm.Job(true, xm_local.Local(), args={"seed": i})) for i in range(12)]
        assert [wu.work_unit_id for wu in wus] == list(range(1, 13))
        assert all(wu.flow_run_id is None for wu in wus)  # nothing created yet: add() did not wait
        with pytest.raises(ValueError, match="args"):
            experiment.add(xm.Job(true, xm_local.Local()), args=["not", "a", "dict"])  # bad input still raises
        from prefect_xm.core.runtime import Runtime

        wait_for(lambda: len(seen_before_release) >= core_experiment.CREATION_CONCURRENCY, 60, what="creations to start")
        at_release = len(seen_before_release)
        Runtime.get().run(_set(released))
    assert at_release == core_experiment.CREATION_CONCURRENCY  # created side by side, bounded
    assert all(wu.get_status().is_completed for wu in wus)
    assert len(_runs("xm-kind:work-unit", f"xm-experiment:{experiment.experiment_id}")) == 12


async def _set(event):
    event.set()


def test_a_work_unit_that_cannot_be_created_surfaces_on_it_and_at_the_end(api, monkeypatch):
    from prefect_xm import xm, xm_local
    from prefect_xm.task_run_links import TaskRunLinks

    real_link = TaskRunLinks.create

    async def refusing_link(self, parent_flow_run_id, name, key, dynamic_key):
        if name == "work-unit-2":
            raise RuntimeError("injected: the API refused work unit 2")
        return await real_link(self, parent_flow_run_id, name, key, dynamic_key)

    monkeypatch.setattr(TaskRunLinks, "create", refusing_link)
    experiment = xm_local.create_experiment(experiment_title="creation-error")
    with pytest.raises(RuntimeError, match="work unit 2: RuntimeError: injected"):
        with experiment:
            [true] = experiment.package([xm.Packageable(xm.Binary("/bin/true"), xm_local.Local.Spec())])
            wus = [experiment.add(xm.Job(true, xm_local.Local())) for _ in range(3)]
    with pytest.raises(RuntimeError, match="work unit 2 could not be created: injected"):
        wus[1].get_status()
    assert wus[0].get_status().is_completed and wus[2].get_status().is_completed
    run = _run(experiment.flow_run_id)
    assert run.state.type.value == "FAILED" and "could not be created" in run.state.message, run.state


def test_stopping_a_work_unit_cancels_every_member(api, tmp_path):
    from prefect_xm import xm, xm_local

    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)"
    experiment = xm_local.create_experiment(experiment_title="stop")
    with experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([PY, "-c", code]), xm_local.Local.Spec())])
        wu = experiment.add(xm.JobGroup(a=xm.Job(exe, xm_local.Local(), args=[str(tmp_path / "a")]),
                                        b=xm.Job(exe, xm_local.Local(), args=[str(tmp_path / "b")])))
        wait_for(lambda: wu.get_status().is_running, timeout=120, what="the work unit to run")
        pids = [int((tmp_path / n).read_text()) for n in "ab"]
        wu.stop()
    assert wu.get_status().is_cancelled
    jobs = _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}")
    assert len(jobs) == 2 and all(j.state.is_cancelled() for j in jobs)
    for pid in pids:
        wait_for(lambda: not _pid_alive(pid), timeout=30, what=f"process {pid} to be gone")


def test_wait_until_complete_raises_xmanagers_errors_and_stop_marks_how_a_unit_ends(api, tmp_path):
    """As XManager: a failed unit raises ExperimentUnitFailedError, a stopped one
    ExperimentUnitNotCompletedError (both ExperimentUnitError, naming the unit); stop()
    takes mark_as_failed / mark_as_completed and a message."""
    from prefect_xm import xm, xm_local

    sleep = "import time; time.sleep(300)"
    with xm_local.create_experiment(experiment_title="xm-errors") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Binary(PY), xm_local.Local.Spec())])
        failing = experiment.add(xm.Job(exe, xm_local.Local(), args=["-c", "import sys; sys.exit(3)"]))
        stopped, failed, completed = (experiment.add(xm.Job(exe, xm_local.Local(), args=["-c", sleep]))
                                      for _ in range(3))
        assert experiment.work_unit_count == 4
        for wu in (stopped, failed, completed):
            wait_for(lambda wu=wu: wu.get_status().is_running, timeout=120, what="the sleeper to run")
        with pytest.raises(ValueError, match="exclusive"):
            stopped.stop(mark_as_failed=True, mark_as_completed=True)
        stopped.stop()
        failed.stop(mark_as_failed=True, message="diverged: loss is nan")
        completed.stop(mark_as_completed=True, message="early stopping: good enough")
        with pytest.raises(xm.ExperimentUnitFailedError, match="exited with code 3") as raised:
            failing.wait_until_complete()
        assert raised.value.work_unit is failing and isinstance(raised.value, xm.ExperimentUnitError)
        with pytest.raises(xm.ExperimentUnitNotCompletedError) as raised:
            stopped.wait_until_complete()
        assert raised.value.work_unit is stopped and stopped.get_status().is_cancelled
        with pytest.raises(xm.ExperimentUnitFailedError, match="diverged: loss is nan"):
            failed.wait_until_complete()
        assert completed.wait_until_complete() is completed
        assert completed.get_status().message == "early stopping: good enough"
    jobs = _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}")
    assert sorted(j.state.type.value for j in jobs) == ["CANCELLED"] * 3 + ["FAILED"]


def test_job_finishing_while_its_state_is_read_is_not_taken_for_a_crash(api, monkeypatch):
    """The work unit's watcher reads its jobs' states, then checks whether their in-process
    engines have ended. An engine that ends while the read is in flight is absent from
    that older snapshot: here every read is held until the jobs it saw unfinished have
    ended, as a slow server does, and the work unit must still complete."""
    import asyncio

    from prefect_xm import xm, xm_local
    from prefect_xm.core import store

    real_read_state_types = store.read_state_types
    held = []

    def local_engines():
        return [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "start_local"]

    async def states_delivered_late(client, ids):
        types = await real_read_state_types(client, ids)
        if any(t not in store.FINAL for t in types.values()) and local_engines():
            held.append([t.value for t in types.values()])
            deadline = asyncio.get_running_loop().time() + 120
            while any(not t.done() for t in local_engines()) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        return types

    monkeypatch.setattr(store, "read_state_types", states_delivered_late)
    with xm_local.create_experiment(experiment_title="late-read") as experiment:
        [true] = experiment.package([xm.Packageable(xm.Binary("/bin/true"), xm_local.Local.Spec())])
        wu = experiment.add(xm.Job(true, xm_local.Local()))
    assert held, "no read straddled the job's end: the test proves nothing"
    status = wu.get_status()
    assert status.is_completed, status


def test_args_reach_the_program_byte_for_byte(api, tmp_path):
    from prefect_xm import xm, xm_local

    marker = tmp_path / "marker"
    out = tmp_path / "argv.json"
    code = "import json, sys; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))"
    args = {
        "space": "a b  c",
        "quotes": "it's \"quoted\" 'twice'",
        "subst": f"$(touch {marker})",
        "semi": f"x; touch {marker}",
        "ticks": f"`touch {marker}`",
        "newline": "line1\nline2\n",
        "glob": "*",
        "unicode": "héllo ✓",
        "flag": True,
        "list": ["a b", "$(c)"],
    }
    positional = [f"; touch {marker}", "$HOME", "a\\b"]
    with xm_local.create_experiment(experiment_title="argv") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([PY, "-c", code, str(out)]), xm_local.Local.Spec())])
        wu = experiment.add(xm.Job(exe, xm_local.Local(), args=xm.merge_args(args, positional)))
    assert wu.get_status().is_completed
    expected = xm.merge_args(args, positional).to_list()
    assert json.loads(out.read_text()) == expected
    assert expected[2] == f"--subst=$(touch {marker})"
    assert not marker.exists()


def test_get_and_list_experiments_from_a_fresh_process(api, tmp_path):
    from prefect_xm import xm, xm_local

    with xm_local.create_experiment(experiment_title="fresh-process") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([PY, "-c", "import sys; sys.exit(int(sys.argv[1][-1]))"]),
                                                   xm_local.Local.Spec())])
        experiment.add(xm.Job(exe, xm_local.Local(), args={"code": 0}))
        experiment.add(xm.Job(exe, xm_local.Local(), args={"code": 3}))
    script = textwrap.dedent(f"""
        import json
        from prefect_xm import xm_local
        e = xm_local.get_experiment({experiment.experiment_id!r})
        listed = [x.experiment_id for x in xm_local.list_experiments()]
        print(json.dumps({{
            "title": e.experiment_title,
            "listed": {experiment.experiment_id!r} in listed,
            "wus": {{str(k): [wu.args, wu.get_status().state_name, wu.get_status().message]
                     for k, wu in e.work_units.items()}},
        }}))
    """)
    proc = subprocess.run([PY, "-c", script], env=api.env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["title"] == "fresh-process" and got["listed"]
    assert got["wus"]["1"][:2] == [{"code": 0}, "Completed"]
    assert got["wus"]["2"][:2] == [{"code": 3}, "Failed"] and "exited with code 3" in got["wus"]["2"][2]


def test_bad_input_raises_before_anything_is_submitted(api, tmp_path):
    from prefect_xm import xm, xm_local

    with pytest.raises(ValueError, match="cpu.*-1|-1.*cpu"):
        xm.JobRequirements(cpu=-1)
    experiment = xm_local.create_experiment(experiment_title="bad-input")
    with experiment:
        [exe] = experiment.package([xm.Packageable(xm.Binary("/bin/true"), xm_local.Local.Spec())])
        with pytest.raises(ValueError, match="evaluator"):
            experiment.add(xm.JobGroup(train=xm.Job(exe, xm_local.Local())), args={"evaluator": {}})
        with pytest.raises(ValueError, match="no-such-pool"):
            experiment.add(xm.Job(exe, xm_local.Slurm(work_pool="no-such-pool")))
        with pytest.raises(ValueError, match="args must be a dict, got 'lr=0.1'"):
            experiment.add(xm.Job(exe, xm_local.Local()), args="lr=0.1")
        with pytest.raises(ValueError, match="expected a Job, a JobGroup or a job generator, got 'train.py'"):
            experiment.add("train.py")
    assert experiment.work_units == {}
    assert _runs("xm-kind:work-unit", f"xm-experiment:{experiment.experiment_id}") == []


async def test_bad_input_raises_the_same_in_an_async_launch_script(api, tmp_path):
    """add_async checks what add checks, with the same words, before anything is submitted."""
    from prefect_xm import xm, xm_local

    async with xm_local.create_experiment(experiment_title="bad-input-async") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Binary("/bin/true"), xm_local.Local.Spec())])
        with pytest.raises(ValueError, match="evaluator"):
            await experiment.add_async(xm.JobGroup(train=xm.Job(exe, xm_local.Local())), args={"evaluator": {}})
        with pytest.raises(ValueError, match="args must be a dict, got 'lr=0.1'"):
            await experiment.add_async(xm.Job(exe, xm_local.Local()), args="lr=0.1")
        with pytest.raises(ValueError, match="expected a Job, a JobGroup or a job generator, got 'train.py'"):
            await experiment.add_async("train.py")
    assert experiment.work_units == {}


async def test_async_launch_script_with_a_job_generator(api, tmp_path):
    from prefect_xm import xm, xm_local

    async with xm_local.create_experiment(experiment_title="async") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([PY, "-c", "import sys; print(sys.argv[1:])"]),
                                                   xm_local.Local.Spec())])

        names = []

        async def make_job(work_unit, lr, steps):
            # XManager's job generator: adds the work unit's jobs, given the args as kwargs;
            # names built from its work unit (an empty JobGroup filled afterwards, as XManager allows).
            names.append((work_unit.experiment_id, work_unit.work_unit_id, work_unit.get_full_job_name("trainer")))
            group = xm.JobGroup()
            group.jobs["trainer"] = xm.Job(exe, xm_local.Local(), args={"lr": lr, "steps": steps})
            group.jobs["evaluator"] = xm.Job(exe, xm_local.Local(), args={"lr": lr})
            work_unit.add(group)

        wu = await experiment.add(make_job, args={"lr": 0.5, "steps": 3})
        assert names == [(experiment.experiment_id, wu.work_unit_id, wu.get_full_job_name("trainer"))]
        plain = await experiment.add(xm.Job(exe, xm_local.Local(), args={"lr": 0.1}))
        assert await wu.wait_until_complete() is wu  # XManager's: the unit itself
        assert wu.get_status().is_completed
        assert wu.args == {"lr": 0.5, "steps": 3}
        # XManager's completion events: coroutines that name their work unit
        events = [u.wait_until_complete() for u in (plain, wu)]
        assert all(isinstance(e, xm.WorkUnitCompletedAwaitable) for e in events)
        assert [e.work_unit for e in events] == [plain, wu]
        assert {await done for done in asyncio.as_completed(events)} == {plain, wu}
        launched = wu.launched_jobs
        assert [j.name for j in launched] == ["evaluator", "trainer"]
        assert all(isinstance(j, xm.LaunchedJob) and (j.logs is None or "/runs/flow-run/" in j.logs)
                   for j in launched)
    assert plain.get_status().is_completed
    jobs = _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}", "xm-work-unit:1")
    assert sorted((_job_tag(j), tuple(j.parameters["args"])) for j in jobs) == [
        ("xm-job:evaluator", ("--lr=0.5",)), ("xm-job:trainer", ("--lr=0.5", "--steps=3"))]


def test_terminating_the_launcher_cancels_its_local_jobs(api, tmp_path):
    import signal

    pidfile = tmp_path / "pid"
    (tmp_path / "launch.py").write_text(textwrap.dedent(f"""
        import sys
        from prefect_xm import xm, xm_local
        code = "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
        with xm_local.create_experiment(experiment_title="sigterm") as experiment:
            print("EXPERIMENT", experiment.experiment_id, flush=True)
            [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", code]), xm_local.Local.Spec())])
            experiment.add(xm.Job(exe, xm_local.Local()))
    """))
    launcher = subprocess.Popen([PY, str(tmp_path / "launch.py")], env=api.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    try:
        exp_id = launcher.stdout.readline().split()[1]
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=120, what="the job to start")
        pid = int(pidfile.read_text())
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    wait_for(lambda: not _pid_alive(pid), timeout=30, what="the job's process to be gone")
    [wu] = _runs("xm-kind:work-unit", f"xm-experiment:{exp_id}")
    [job] = _runs("xm-kind:job", f"xm-experiment:{exp_id}")
    assert wu.state.is_cancelled() and job.state.is_cancelled(), (wu.state, job.state)
    assert _runs("xm-kind:experiment", f"xm-experiment:{exp_id}")[0].state.is_cancelled()


def test_auxiliary_units_run_beside_the_trials_do_not_count_and_stop_after_their_delay(api, tmp_path):
    """XManager's AuxiliaryUnitJob (what its contrib TensorBoard adds) and add(role=...):
    an auxiliary unit's failure does not fail the experiment, and one still running when
    the work units end is stopped after its termination delay."""
    from prefect_xm import xm, xm_local

    started = tmp_path / "board-started"
    with xm_local.create_experiment(experiment_title="aux-units") as experiment:
        [board, trial, broken] = experiment.package([
            xm.Packageable(xm.Command([PY, "-c", f"import time; open({str(started)!r}, 'w'); time.sleep(300)"]),
                           xm_local.Local.Spec()),
            xm.Packageable(xm.Command([PY, "-c", "print('trial')"]), xm_local.Local.Spec()),
            xm.Packageable(xm.Command([PY, "-c", "raise SystemExit(3)"]), xm_local.Local.Spec()),
        ])
        tensorboard = experiment.add(xm.AuxiliaryUnitJob(xm.Job(board, xm_local.Local()), termination_delay_secs=2,
                                                         importance=xm.Importance.LOW))
        controller = experiment.add(xm.Job(broken, xm_local.Local()),
                                    role=xm.AuxiliaryUnitRole(termination_delay_secs=0))
        for lr in (0.1, 0.2):
            experiment.add(xm.Job(trial, xm_local.Local(), args={"lr": lr}))
        with pytest.raises(ValueError, match="role"):
            experiment.add(xm.Job(trial, xm_local.Local()), role="auxiliary")
    assert sorted(experiment.work_units) == [1, 2] and experiment.work_unit_count == 2
    assert started.exists()  # the board ran while the trials did
    board_status, controller_status = tensorboard.get_status(), controller.get_status()
    assert board_status.state_type == "CANCELLED" and "termination delay (2 s)" in board_status.message, board_status
    assert controller_status.is_failed, controller_status
    run = _run(experiment.flow_run_id)
    assert run.state.is_completed() and "2 completed" in run.state.message, run.state  # the trials make it
    aux_runs = _runs("xm-kind:auxiliary-unit", f"xm-experiment:{experiment.experiment_id}")
    assert sorted(r.name.rsplit("-", 1)[1] for r in aux_runs) == ["aux1", "aux2"]
    assert any("xm-importance:low" in r.tags for r in aux_runs)
    jobs = _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}", "xm-auxiliary-unit:1")
    assert len(jobs) == 1 and jobs[0].state.is_cancelled(), jobs


def test_metadata_context_titles_are_the_runs_names(api):
    """XManager's experiment.context / work_unit.context: the creator, and a title that
    is what Prefect's UI lists the run by (set_title renames the run)."""
    import getpass

    from prefect_xm import xm, xm_local

    with xm_local.create_experiment(experiment_title="first-title") as experiment:
        context = experiment.context
        assert isinstance(context, xm.MetadataContext) and context.creator == getpass.getuser()
        assert context.annotations.title == "first-title"
        context.annotations.set_title("second-title")
        [true] = experiment.package([xm.Packageable(xm.Binary("/bin/true"), xm_local.Local.Spec())])
        wu = experiment.add(xm.Job(true, xm_local.Local()))
        assert wu.context.annotations.title == "second-title-wu1"
        wu.context.annotations.set_title("the-baseline")
        with pytest.raises(ValueError, match="set_title"):
            wu.context.annotations.set_title("")
    assert experiment.context.annotations.title == "second-title"
    assert _run(experiment.flow_run_id).name == "second-title"
    assert _run(wu.flow_run_id).name == "the-baseline" and wu.context.annotations.title == "the-baseline"


def test_add_with_a_list_of_args_adds_a_work_unit_each_checking_them_all_first(api, tmp_path):
    """`experiment.add(job, args=[{...}, {...}])`, as xm-slurm has it (on a batch pool the
    worker submits the work units as one array)."""
    from prefect_xm import xm, xm_local

    with xm_local.create_experiment(experiment_title="args-list") as experiment:
        [echo] = experiment.package([xm.Packageable(xm.Command([PY, "-c", "import sys; print(sys.argv[1:])"]),
                                                    xm_local.Local.Spec())])
        job = xm.Job(echo, xm_local.Local())
        with pytest.raises(ValueError, match=r"args\[1\]"):
            experiment.add(job, args=[{"args": {"lr": 0.1}}, {"no_such_key": 1}])
        assert experiment.work_unit_count == 0  # nothing added when one is bad
        wus = experiment.add(job, args=[{"args": {"lr": 0.1}}, {"args": {"lr": 0.2}}])
    assert [wu.work_unit_id for wu in wus] == [1, 2] and all(wu.get_status().is_completed for wu in wus)
    assert sorted(_run(wu.flow_run_id).parameters["args"]["lr"] for wu in wus) == [0.1, 0.2]


def test_each_link_task_run_shows_its_runs_end(api):
    """The UI draws a work unit (a job) as the task run it hangs from: the links are sent
    as events and take their runs' states from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter

    from prefect_xm import xm, xm_local

    experiment = xm_local.create_experiment(experiment_title="links")
    with experiment:
        [exe] = experiment.package([xm.Packageable(xm.Binary(PY), xm_local.Local.Spec())])
        experiment.add(xm.Job(exe, xm_local.Local(), args=["-c", "pass"]))
        experiment.add(xm.Job(exe, xm_local.Local(), args=["-c", "raise SystemExit(3)"]))
    units = {wid: wu.flow_run_id for wid, wu in experiment.work_units.items()}

    def links(flow_run_id):
        with get_client(sync_client=True) as c:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                    task_run_filter=TaskRunFilter())
        return {r.name: r.state_type.value for r in runs}

    want = {"work-unit-1": "COMPLETED", "work-unit-2": "FAILED"}
    wait_for(lambda: links(experiment.flow_run_id) == want, 60, what=f"the experiment's links to be {want}")
    # (each unit's one job: its link is named after the job's key)
    assert set(links(units[1]).values()) == {"COMPLETED"} and set(links(units[2]).values()) == {"FAILED"}


# ------------------------------------------------------------- how a launch script ends

_PLAIN_LAUNCHER = textwrap.dedent("""
    import asyncio, sys
    from prefect.events.clients import EventsClient
    from prefect_xm import xm, xm_local

    # A slow link to the events API (0.3 s an event): the events of the experiment's end
    # (its summary artifact's) are still queued when the script ends unless that end sent them.
    emit = EventsClient.emit
    async def slow_emit(self, event):
        await asyncio.sleep(0.3)
        await emit(self, event)
    EventsClient.emit = slow_emit

    codes = [int(c) for c in sys.argv[1:]]
    with xm_local.create_experiment(experiment_title="plain-launcher") as experiment:
        print("EXPERIMENT", experiment.experiment_id, flush=True)
        [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", "import sys; sys.exit(int(sys.argv[1][-1]))"]),
                                                   xm_local.Local.Spec())])
        for code in codes:
            experiment.add(xm.Job(exe, xm_local.Local(), args={"code": code}))
    print("AFTER THE EXPERIMENT")
""")


def _launch_plain(api, script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(script), *args], env=api.env(), cwd="/", capture_output=True, text=True,
                          timeout=300)


def test_a_plain_launch_script_ends_quietly_and_exits_1_when_a_work_unit_failed(api, tmp_path):
    """`python launcher.py` ends as `prefect-xm launch` does: 0 when every work unit
    completed, 1 (said on stderr) when one failed; and without Prefect's "EventsWorker -
    Still processing items" warning (the experiment's end sends the events it emitted)."""
    script = tmp_path / "launcher.py"
    script.write_text(_PLAIN_LAUNCHER)
    ok = _launch_plain(api, script, "0", "0")
    assert ok.returncode == 0, ok.stdout + ok.stderr[-3000:]
    assert "AFTER THE EXPERIMENT" in ok.stdout
    failed = _launch_plain(api, script, "0", "3")
    assert failed.returncode == 1, failed.stdout + failed.stderr[-3000:]
    exp_id = failed.stdout.split("EXPERIMENT", 1)[1].split()[0]
    assert (f"prefect-xm: experiment {exp_id} (plain-launcher) ended Failed: work units: 1 completed, 1 failed; "
            "exiting with code 1") in failed.stderr, failed.stderr[-3000:]
    assert "AFTER THE EXPERIMENT" not in failed.stdout  # (it ended where its `with` did, as XManager's)
    assert "Traceback" not in failed.stderr
    for proc in (ok, failed):
        assert "Still processing items" not in proc.stderr and "EventsWorker" not in proc.stderr, proc.stderr[-3000:]
    [run] = _runs("xm-kind:experiment", f"xm-experiment:{exp_id}")
    assert run.state.is_failed()


def test_a_launch_refused_at_package_leaves_no_empty_experiment(api, tmp_path):
    """package() raising before any work unit exists: the script says so and its
    experiment's run is deleted (no empty Cancelled experiment in `prefect-xm list`)."""
    from prefect_xm import xm_local

    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent("""
        from prefect_xm import xm, xm_local

        with xm_local.create_experiment(experiment_title="refused-at-package") as experiment:
            [exe] = experiment.package([xm.Packageable(
                xm.PythonContainer(path="/no/such/dir", entrypoint=xm.ModuleName("train")), xm_local.Local.Spec())])
            experiment.add(xm.Job(exe, xm_local.Local()))
    """))
    proc = _launch_plain(api, script)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    said = next((line for line in proc.stderr.splitlines() if "launch refused" in line), "")
    assert "(refused-at-package): launch refused before any work unit was added: ValueError:" in said, proc.stderr
    assert "/no/such/dir" in said and said.endswith("its run was deleted"), said
    exp_id = said.split("prefect-xm: experiment ", 1)[1].split()[0]
    assert "ValueError" in proc.stderr.split(said, 1)[1]  # (the script's own error follows, as raised)
    assert "Still processing items" not in proc.stderr
    assert _runs("xm-kind:experiment", f"xm-experiment:{exp_id}") == []
    assert exp_id not in {str(e.experiment_id) for e in xm_local.list_experiments()}
