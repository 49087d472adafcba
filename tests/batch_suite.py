"""The batch-worker end-to-end suite, shared by every scheduler: a real Prefect server,
`prefect worker start`, and the scheduler (real where one runs here, a faithful fake CLI
where none can). Each scheduler's test module subclasses BatchWorkerSuite with a
SchedulerHarness saying only what differs (how to hold a job, its queue-name variable...).

Waits are on conditions with generous deadlines; nothing asserts how fast anything is."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelling

from conftest import require_service, wait_for
from e2e import (
    CountingWrappers,
    WorkerProcess,
    create_pool,
    deploy,
    read_run,
    read_runs,
    run,
    start_run,
    start_runs,
    start_runs_together,
    state_of,
    wait_final,
)
from prefect_xm.workers.scheduler import CommandResult, JobState, Scheduler


@dataclass
class SchedulerHarness:
    """What the shared suite needs to know about one scheduler."""

    scheduler: Scheduler
    worker_type: str
    #: True when the scheduler's commands answer here; how_to says how to start it
    available: Callable[[], bool]
    how_to: str
    #: the submit, status and cancel commands (wrapped to count calls)
    submit_command: str
    status_command: str
    cancel_command: str
    #: job variables that keep a job queued however idle the cluster is, and the reason shown
    hold_variables: dict
    hold_reason: str
    #: job variables for a 3-minute wall-clock limit, and the word the crash message must carry
    #: (long enough that the flow engine has started, however busy the machine, before the
    #: kill: an engine still starting when its job is killed can report after the worker)
    time_limit_variables: dict
    time_limit_word: str
    #: job variables naming a queue/partition the scheduler refuses, and the refusal's text
    bad_queue_variables: dict
    bad_queue_error: str
    #: [(job variables, the field the error must name)] for values the worker must refuse
    malformed_variables: list = field(default_factory=list)
    #: directories put first on PATH (fake CLIs)
    path_prefix: list[str] = field(default_factory=list)
    #: a status-call argv that names individual jobs is per-job polling
    status_call_is_batched: Callable[[str], bool] = lambda call: True
    #: the command that shows a queued job's record as other users could read it, and
    #: whether that record lists the environment qsub -V / getenv copied into the job
    job_record_argv: Optional[Callable[[str], list[str]]] = None
    #: a requeue of a running job, as an admin (or a preemption) does it; and what lets a
    #: requeued job start at once where the scheduler holds it a while
    requeue_argv: Optional[Callable[[str], list[str]]] = None
    release_requeued_argv: Optional[Callable[[str], list[str]]] = None
    job_record_shows_environment: bool = False
    #: job variables a direct (job-runner) run needs here, e.g. a memory request
    direct_variables: dict = field(default_factory=dict)
    #: False where no exit code comes back (Slurm's Torque wrappers): an ended direct run
    #: is then Crashed "no exit_status reported", with its stderr
    reports_exit_codes: bool = True

    @property
    def has_arrays(self) -> bool:
        return bool(self.scheduler.array_index_variable)

    def env_path(self) -> str:
        return os.pathsep.join([*self.path_prefix, os.environ["PATH"]])

    def _run(self, argv) -> CommandResult:
        out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PATH": self.env_path()})
        return CommandResult(argv, out.returncode, out.stdout, out.stderr)

    def job_state(self, job_id: str) -> Optional[JobState]:
        """The job's state as the scheduler's own status query shows it (None: not listed)."""
        statuses = self.scheduler.parse_status(self._run(self.scheduler.status_argv([job_id])))
        status = self.scheduler.lookup(job_id, statuses)
        return status.state if status else None

    def final_or_gone(self, job_id: str) -> bool:
        state = self.job_state(job_id)
        return state is None or state.is_final

    def jobs_named(self, name: str) -> list[str]:
        # as the worker does it (base._find_by_name): the scheduler filters by name
        return self.scheduler.jobs_named(name, self._run(self.scheduler.find_by_name_argv(name)).stdout)


WORKER_CREDENTIAL = f"xm-worker-credential-{uuid.uuid4().hex}"


def job_id_of(fr) -> str:
    assert fr.infrastructure_pid, f"no infrastructure pid on {fr.id}"
    return Scheduler.parse_infrastructure_pid(fr.infrastructure_pid)[2]


def logs_of(run_id) -> str:
    async def read():
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        return "\n".join(log.message for log in logs)

    return run(read())


def state_history(run_id) -> str:
    """Every state the run went through, for failure messages."""
    async def read():
        async with get_client() as client:
            return await client.read_flow_run_states(run_id)

    return "\n".join(f"{s.timestamp} {s.type.value} {s.name}: {s.message}" for s in run(read()))


def request_cancel(*run_ids) -> None:
    """One request at a time, as a stopped experiment sends them: the worker hears of
    each run turning Cancelling before the next one does."""
    async def cancel():
        async with get_client() as client:
            for run_id in run_ids:
                await client.set_flow_run_state(run_id, Cancelling(message="cancelled by the test"))

    run(cancel())


def wait_state(run_id, *types: StateType, timeout: float = 180, name: str | None = None):
    def reached():
        fr = run(read_run(run_id))
        ok = fr.state and fr.state.type in types and (name is None or fr.state.name == name)
        return fr if ok else None

    return wait_for(reached, timeout, interval=1, what=f"run {run_id} to reach {types} {name or ''}")


def _job_runner_deployment(pool: str):
    """Created on prefect-xm's runtime loop, where its client lives (asyncio.run's loop
    would leave that client bound to a closed loop)."""
    from prefect_xm.core.deployments import ensure_job_runner_deployment
    from prefect_xm.core.runtime import Runtime

    return Runtime.get().run(ensure_job_runner_deployment(pool))


def trial(command: list[str], env: dict | None = None) -> dict:
    """A job-runner run's parameters: a command, as a sweep's trial is."""
    return {"executable": {"kind": "command", "command": command}, "args": [], "env": env or {}}


class BatchWorkerSuite:
    """Subclass with `harness = SchedulerHarness(...)`."""

    harness: SchedulerHarness

    @pytest.fixture(scope="class")
    @classmethod
    def env(cls, prefect_server, tmp_path_factory):
        """One pool of this worker type, its worker (behind command-counting wrappers)
        and deployments of tests/flows/slurm_flows.py."""
        h = cls.harness
        # A loaded 2-core machine can leave a daemon briefly unanswering (SGE's execd
        # unheard, a slow qstat): give the service a generous while before judging.
        deadline = time.monotonic() + 90
        while not (up := h.available()) and time.monotonic() < deadline:
            time.sleep(3)
        require_service(h.worker_type, up, h.how_to)
        root = tmp_path_factory.mktemp(h.worker_type)
        pool = f"{h.worker_type}-{uuid.uuid4().hex[:6]}"
        create_pool(prefect_server, pool, h.worker_type)
        # The wrappers and this class's tests find the fakes too; restored afterwards, or a
        # fake qstat (PBS) would shadow the real one (SGE) for the classes that follow.
        saved_path = os.environ["PATH"]
        os.environ["PATH"] = h.env_path()
        wrappers = CountingWrappers(root, [h.submit_command, h.status_command, h.cancel_command])
        extra_variables, worker_path = cls.prepare(root, wrappers)
        # A credential of the worker's own (as PREFECT_API_KEY would be) and a harmless
        # marker: scheduler commands get the marker, never the credential.
        worker = WorkerProcess(prefect_server, pool, h.worker_type, root, path_prefix=worker_path,
                               XM_SUITE_WORKER_API_KEY=WORKER_CREDENTIAL,
                               XM_SUITE_WORKER_MARKER="xm-suite-marker").start()
        run_dir = str(root / "runs")
        names = ("double", "boom", "sleeper", "environ")

        async def deploy_all():
            return await asyncio.gather(*(
                deploy(f"slurm_flows.py:{name}", pool, f"e2e-{name}", {"run_dir": run_dir, **extra_variables})
                for name in names))

        deployments = dict(zip(names, run(deploy_all())))
        deployments["job"] = _job_runner_deployment(pool)

        class Env:
            pass

        e = Env()
        e.pool, e.worker, e.wrappers, e.deployments, e.server, e.run_dir, e.h = (
            pool, worker, wrappers, deployments, prefect_server, run_dir, h)
        #: job variables of a direct job-runner run on this pool (its deployment has none)
        e.job_variables = {"run_dir": run_dir, **extra_variables, **h.direct_variables}
        # Slow scenarios start first and are checked later, so their waits overlap.
        e.timeout_run = run(start_run(deployments["sleeper"], {"seconds": 600}, h.time_limit_variables)) \
            if cls.test_time_limit_crashes_with_timeout else None
        e.worker_path = worker_path
        e.cluster = extra_variables.get("cluster") or extra_variables.get("ssh_block") or "local"
        try:
            yield e
        finally:
            e.worker.stop()
            cls.cleanup()
            os.environ["PATH"] = saved_path

    @classmethod
    def prepare(cls, root, wrappers) -> tuple[dict, object]:
        """Hook for variants (e.g. over SSH): job variables every deployment gets, and the
        directory put first on the worker's PATH."""
        return {}, wrappers.dir

    @classmethod
    def cleanup(cls) -> None:
        pass

    def test_flow_completes_with_result_and_logs(self, env):
        fr = run(start_run(env.deployments["double"], {"x": 21}))
        fr = wait_final(fr.id)
        assert fr.state.type == StateType.COMPLETED, fr.state
        assert run(fr.state.aresult()) == 42
        name = env.h.scheduler.name
        scheduler_name, cluster, _ = Scheduler.parse_infrastructure_pid(fr.infrastructure_pid)
        assert (scheduler_name, cluster) == (name, env.cluster)
        logs = wait_for(lambda: (lambda t: t if "doubling 21" in t else None)(logs_of(fr.id)), 60, what="flow logs")
        assert f"Submitted {name} job {job_id_of(fr)}" in logs
        assert "Rendered batch script" in logs

    def test_flow_that_raises_ends_failed(self, env):
        fr = wait_final(run(start_run(env.deployments["boom"])).id)
        assert fr.state.type == StateType.FAILED, fr.state
        assert "raised on purpose" in (fr.state.message or "")

    def test_script_failing_before_python_crashes_with_its_stderr(self, env):
        fr = run(start_run(env.deployments["double"], {"x": 1}, {
            "setup_commands": ["echo 'module: cuda/12.2 not found' >&2", "exit 3"],
        }))
        fr = wait_final(fr.id)
        assert fr.state.type == StateType.CRASHED, fr.state
        assert "exit code 3" in fr.state.message
        assert "module: cuda/12.2 not found" in fr.state.message

    def test_missing_python_on_the_node_crashes_with_its_stderr(self, env):
        fr = run(start_run(env.deployments["double"], {"x": 1}, {"command": "/opt/no-such-python -m prefect flow-run execute"}))
        fr = wait_final(fr.id)
        assert fr.state.type == StateType.CRASHED, fr.state
        assert "exit code 127" in fr.state.message
        assert "/opt/no-such-python" in fr.state.message

    def test_run_environment_reaches_the_flow_through_an_owner_only_file(self, env):
        secret = f"xm-run-token-{uuid.uuid4().hex}"
        fr = run(start_run(env.deployments["environ"], {"name": "XM_SUITE_RUN_TOKEN"},
                           {"env": {"XM_SUITE_RUN_TOKEN": secret}}))
        fr = wait_final(fr.id)
        assert fr.state.type == StateType.COMPLETED, fr.state
        assert run(fr.state.aresult()) == secret
        run_dir = Path(env.run_dir) / str(fr.id)
        env_file = run_dir / "job.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert secret in env_file.read_text() and str(fr.id) in env_file.read_text()
        assert secret not in (run_dir / "job.sh").read_text()
        assert secret not in logs_of(fr.id) and WORKER_CREDENTIAL not in logs_of(fr.id)

    def test_queued_jobs_record_holds_no_credential(self, env):
        """What other users of the cluster can read of a job (qstat -j, qstat -f,
        condor_q) carries neither the run's credentials nor the worker's."""
        h = env.h
        secret = f"xm-run-token-{uuid.uuid4().hex}"
        fr = run(start_run(env.deployments["sleeper"], {"seconds": 1},
                           {**h.hold_variables, "env": {"XM_SUITE_RUN_TOKEN": secret}}))
        fr = wait_state(fr.id, StateType.PENDING, name="InfrastructurePending")
        job_id = job_id_of(fr)
        try:
            if h.job_record_argv is not None:
                record = h._run(h.job_record_argv(job_id))
                text = record.stdout + record.stderr
                assert record.returncode == 0 and job_id.split(".")[0] in text, text
                assert secret not in text and WORKER_CREDENTIAL not in text
                if h.job_record_shows_environment:
                    # the record does list the copied environment: the check above means something
                    assert "xm-suite-marker" in text, text
            assert secret not in "\n".join(env.wrappers.calls(h.submit_command))
        finally:
            request_cancel(fr.id)
            wait_state(fr.id, StateType.CANCELLED)

    def test_cancel_while_pending(self, env):
        # a held job stays queued however idle the cluster is
        h = env.h
        fr = run(start_run(env.deployments["sleeper"], {"seconds": 1}, h.hold_variables))
        fr = wait_state(fr.id, StateType.PENDING, name="InfrastructurePending")
        wait_for(lambda: h.hold_reason in (run(read_run(fr.id)).state.message or "") + logs_of(fr.id),
                 60, what="the hold reason in the run")
        job_id = job_id_of(fr)
        assert h.job_state(job_id) == JobState.PENDING
        request_cancel(fr.id)
        wait_state(fr.id, StateType.CANCELLED)
        wait_for(lambda: h.final_or_gone(job_id), 60, what=f"job {job_id} to be gone")
        assert any(job_id in c for c in env.wrappers.calls(h.cancel_command))

    def test_cancel_while_running(self, env):
        fr = run(start_run(env.deployments["sleeper"], {"seconds": 600}))
        fr = wait_state(fr.id, StateType.RUNNING, timeout=240)
        job_id = job_id_of(fr)
        assert env.h.job_state(job_id) == JobState.RUNNING
        request_cancel(fr.id)
        try:
            wait_state(fr.id, StateType.CANCELLED, timeout=120)
        except AssertionError as late:
            worker_log = env.worker.logs[-1].read_text()[-6000:]
            raise AssertionError(f"{late}\n{state_history(fr.id)}\nworker log:\n{worker_log}") from None
        # The grace signal ends the flow process: the job ends cancelled, or failed if the
        # engine exits on its own first; it must not be left queued or running.
        wait_for(lambda: env.h.final_or_gone(job_id), 60, what=f"job {job_id} to end")
        assert any(job_id in c for c in env.wrappers.calls(env.h.cancel_command))

    def test_time_limit_crashes_with_timeout(self, env):
        fr = wait_final(env.timeout_run.id, timeout=540)
        # The engine inside the job may report Crashed itself at the limit's signal
        # ("aborted by a termination signal"); the worker then ends the run with the
        # scheduler's reason, seconds later.
        deadline = time.monotonic() + 90
        while env.h.time_limit_word not in (fr.state.message or "") and time.monotonic() < deadline:
            time.sleep(1)
            fr = run(read_run(fr.id))
        assert fr.state.type == StateType.CRASHED, fr.state
        assert env.h.time_limit_word in fr.state.message, state_history(fr.id)

    def test_bad_partition_is_refused_verbatim_and_nothing_is_submitted(self, env):
        fr = run(start_run(env.deployments["double"], {"x": 1}, env.h.bad_queue_variables))
        fr = wait_final(fr.id)
        assert fr.state.type == StateType.CRASHED, state_history(fr.id)
        assert env.h.bad_queue_error in fr.state.message, state_history(fr.id)
        assert not fr.infrastructure_pid
        assert env.h.jobs_named(f"{fr.name}-{fr.id}") == []

    def test_undefined_template_variable_names_it(self, env):
        fr = run(start_run(env.deployments["double"], {"x": 1}, {
            "script_template": "#!/bin/bash\n# queue {{ partiton }}\nexec {{ command_argv | join(' ') }}\n",
        }))
        fr = wait_final(fr.id)
        assert fr.state.type == StateType.CRASHED
        assert "partiton" in fr.state.message and "undefined" in fr.state.message
        assert not any(str(fr.id) in c for c in env.wrappers.calls(env.h.submit_command))

    def test_malformed_time_limit_and_memory_name_the_field(self, env):
        for variables, field_name in env.h.malformed_variables:
            try:
                fr = run(start_run(env.deployments["double"], {"x": 1}, variables))
            except Exception as exc:  # refused by the server's check of the pool's schema
                assert field_name in str(exc) and list(variables.values())[0] in str(exc)
                continue
            fr = wait_final(fr.id)
            assert fr.state.type == StateType.CRASHED
            assert field_name in fr.state.message and list(variables.values())[0] in fr.state.message
            assert not any(str(fr.id) in c for c in env.wrappers.calls(env.h.submit_command))

    def test_many_runs_in_flight_one_status_query_per_poll(self, env):
        h = env.h
        many = 12
        # counted from the first submission: each submit asks for an early poll, and 12
        # of them must not turn into 12 queries
        before = len(env.wrappers.calls(h.status_command))
        started = time.monotonic()
        runs = run(start_runs(env.deployments["sleeper"], many, {"seconds": 1}, h.hold_variables))
        ids = [r.id for r in runs]

        def all_in(*names):
            frs = run(read_runs(ids))
            return frs if len(frs) == many and all(f.state.name in names for f in frs) else None

        wait_for(lambda: all_in("InfrastructurePending"), 300, interval=2, what=f"{many} runs queued")
        queued = len(env.wrappers.calls(h.status_command))
        wait_for(lambda: len(env.wrappers.calls(h.status_command)) >= queued + 10, 120, what="10 more polls")
        elapsed = time.monotonic() - started
        window_calls = env.wrappers.calls(h.status_command)[before:]
        # Poll interval is 1 s: per-job polling would make ~12 calls a second.
        assert len(window_calls) <= elapsed / 1.0 + 3, (len(window_calls), elapsed)
        assert all(h.status_call_is_batched(c) for c in window_calls), window_calls[:3]
        request_cancel(*ids)
        wait_for(lambda: all_in("Cancelled"), 300, interval=2, what=f"{many} runs cancelled")

    def test_worker_killed_as_a_submit_answers_with_five_jobs_in_flight(self, env):
        """The worker dies as its submit of a 3-trial sweep answers, before it records any
        of the sweep's job ids, with five jobs in flight.

        The five: two flows report Completed themselves; the other three end in states
        only a worker can give them, so they prove the replacement found and followed the
        jobs: two fail before Python starts (Crashed), one is held in the queue and
        cancelled after the restart (its job removed by the replacement).
        The sweep: the replacement finds its jobs (an array's tasks through their run
        directories, a single job by its name) and follows them to the end; a run the dead
        worker had not begun submitting goes back to the queue, and one it was submitting
        that got no job is Crashed, saying so. Nothing is submitted twice."""
        h = env.h
        # The failing jobs wait for a gate the test opens only once the replacement
        # follows them, so they are certainly in flight when the worker dies.
        gate = Path(env.run_dir).parent / f"gate-{uuid.uuid4().hex[:8]}"
        failing = {"setup_commands": [
            f"for i in $(seq 600); do [ -e {gate} ] && break; sleep 1; done",
            "echo 'xm-suite: failing before python' >&2", "exit 3",
        ]}
        # (the class's long run, submitted as the class starts, must not take the kill)
        if env.timeout_run:
            wait_for(lambda: run(read_run(env.timeout_run.id)).infrastructure_pid, 120, what="the long run submitted")
        submits_before = len(env.wrappers.calls(h.submit_command))
        # picked up together: the completing pair and the crashing pair are arrays where
        # the scheduler has them, and the replacement must re-attach to their tasks
        completing = run(start_runs_together(env.deployments["double"], [{"x": i} for i in range(2)]))
        crashing = run(start_runs_together(env.deployments["double"], [{"x": 9}] * 2, failing))
        held = run(start_run(env.deployments["sleeper"], {"seconds": 1}, h.hold_variables))
        runs = completing + crashing + [held]
        wait_for(lambda: all(run(read_run(r.id)).infrastructure_pid for r in runs), 120, what="5 jobs submitted")
        in_flight_submits = len(env.wrappers.calls(h.submit_command)) - submits_before
        env.wrappers.kill_after(h.submit_command, env.worker.proc.pid)
        try:
            command = ["sh", "-c", 'echo "trial $0 ran"']
            sweep = run(start_runs_together(env.deployments["job"], [trial([*command, str(i)]) for i in range(3)],
                                            env.job_variables))
            wait_for(lambda: env.worker.proc.poll() is not None, 180, what="the worker to die after its submit")
            if h.has_arrays:  # every trial reached its submit, none has its job id
                frs = [run(read_run(r.id)) for r in sweep]
                assert all(fr.state.name == "Submitting" and not fr.infrastructure_pid for fr in frs), frs
            sweep_submits = len(env.wrappers.calls(h.submit_command)) - submits_before - in_flight_submits
            replacement = WorkerProcess(env.server, env.pool, h.worker_type, env.worker.workdir, name=env.worker.name,
                                        path_prefix=env.worker_path,
                                        XM_SUITE_WORKER_API_KEY=WORKER_CREDENTIAL,
                                        XM_SUITE_WORKER_MARKER="xm-suite-marker",
                                        PREFECT_XM_PENDING_GRACE="10").start()
        except BaseException:
            # the class's later scenarios need a worker, whatever failed here
            if not env.wrappers.disarm(h.submit_command):
                deadline = time.monotonic() + 120
                while env.worker.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(1)
            if env.worker.proc.poll() is not None:
                env.worker = WorkerProcess(env.server, env.pool, h.worker_type, env.worker.workdir,
                                           name=env.worker.name, path_prefix=env.worker_path,
                                           XM_SUITE_WORKER_API_KEY=WORKER_CREDENTIAL,
                                           XM_SUITE_WORKER_MARKER="xm-suite-marker").start()
            raise
        env.worker = replacement
        # (a quick flow may finish before the replacement looks: nothing left to follow)
        for r in crashing + [held]:
            wait_for(lambda: "resumes following" in logs_of(r.id), 180, what=f"the new worker to follow run {r.id}")
        gate.touch()
        held_job = job_id_of(run(read_run(held.id)))
        assert h.job_state(held_job) == JobState.PENDING
        request_cancel(held.id)
        assert wait_state(held.id, StateType.CANCELLED).state.type == StateType.CANCELLED
        wait_for(lambda: h.final_or_gone(held_job), 60, what=f"job {held_job} to be removed")
        for r in completing:
            fr = wait_final(r.id, timeout=300)
            assert fr.state.type == StateType.COMPLETED, fr.state
            assert run(fr.state.aresult()) == 2 * r.parameters["x"]
        for r in crashing:
            fr = wait_final(r.id, timeout=300)
            assert fr.state.type == StateType.CRASHED, fr.state
            assert "xm-suite: failing before python" in fr.state.message

        found, rescheduled = [], []
        for i, fr in enumerate([wait_final(r.id, timeout=300) for r in sweep]):
            if "knows no job of it" in (fr.state.message or ""):
                assert fr.state.type == StateType.CRASHED, fr.state
                continue

            def told(fr=fr, i=i):
                text = logs_of(fr.id)
                # found by name (its id unrecorded), scheduled again (never submitted), or
                # followed on by its recorded id (where submits run one per trial, another
                # trial's submit may have answered, and its id been recorded, before the kill)
                return f"trial {i} ran" in text and (
                    "submitted by a worker that died" in text or "scheduled again" in text
                    or "resumes following" in text) and text

            try:
                text = wait_for(told, 60, what=f"trial {i}'s logs")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nstates:\n{state_history(fr.id)}\nlogs:\n{logs_of(fr.id)}") from None
            (rescheduled if "scheduled again" in text else found).append(fr.id)
            assert fr.state.type == StateType.COMPLETED or (
                not h.reports_exit_codes and "no exit_status reported" in fr.state.message), fr.state
        if h.has_arrays:
            assert len(found) == 3 and sweep_submits == 1, (found, rescheduled, sweep_submits)
        else:  # the submits in flight when the worker died may or may not have gone through
            assert found

        # nothing submitted twice: one submit per job or array, whatever the restart did;
        # the replacement submitted only the trials that went back to the queue
        frs = [run(read_run(r.id)) for r in runs]
        jobs = {h.scheduler.array_of(job_id_of(fr)) or job_id_of(fr) for fr in frs}
        assert in_flight_submits == len(jobs), jobs
        assert len(env.wrappers.calls(h.submit_command)[submits_before:]) == (
            in_flight_submits + sweep_submits + len(rescheduled))
        for fr in frs:
            if h.scheduler.array_of(job_id_of(fr)):
                continue
            named = h.jobs_named(f"{fr.name}-{fr.id}")
            # (a removed job may already have left the scheduler's listing)
            assert len(named) == 1 or (fr.id == held.id and not named), named

    # -- sweeps as arrays --------------------------------------------------------------
    def test_sweep_goes_as_one_array_each_task_its_own_run(self, env):
        """Where the scheduler has arrays: one submit for the sweep. Where not (Torque
        through Slurm's wrappers): one job per run. Either way each run its own output."""
        h = env.h
        before = len(env.wrappers.calls(h.submit_command))
        command = ["sh", "-c", 'echo "trial [$0] seed=$SEED"; echo "trial $0 err" >&2; exit "$1"']
        args = [("a b", 0), ("$(touch /tmp/xm-array-pwned)", 0), ("c", 5), ("d;e", 0)]
        runs = run(start_runs_together(env.deployments["job"], [
            trial([*command, arg, str(code)], {"SEED": str(i)}) for i, (arg, code) in enumerate(args)],
            env.job_variables))
        frs = [wait_final(r.id, timeout=300) for r in runs]
        for fr, (arg, code) in zip(frs, args):
            if h.reports_exit_codes:
                expected = StateType.FAILED if code else StateType.COMPLETED
                assert fr.state.type == expected, (fr.state, state_history(fr.id))
            elif fr.state.type != StateType.COMPLETED:
                assert fr.state.type == StateType.CRASHED, fr.state
                assert "no exit_status reported" in fr.state.message and f"trial {arg} err" in fr.state.message
        if h.reports_exit_codes:
            assert "exited with code 5" in frs[2].state.message and "trial c err" in frs[2].state.message
        jobs = [job_id_of(fr) for fr in frs]
        assert len(set(jobs)) == 4, jobs
        # (another scenario's submit may land in this window)
        submits = env.wrappers.calls(h.submit_command)[before:]
        if h.has_arrays:
            assert len({h.scheduler.array_of(j) for j in jobs} - {None}) == 1, jobs
            assert len([c for c in submits if "-array-" in c]) == 1, submits
            assert not any(str(r.id) in c for c in submits for r in runs), submits
        else:
            assert not any(h.scheduler.array_of(j) for j in jobs), jobs
            assert all(len([c for c in submits if str(fr.id) in c]) == 1 for fr in frs), submits
        for i, (fr, (arg, _)) in enumerate(zip(frs, args)):
            logs = wait_for(lambda: (lambda t: t if "seed=" in t else None)(logs_of(fr.id)), 60, what="task output")
            assert f"trial [{arg}] seed={i}" in logs and f"trial {arg} err" in logs, logs
        assert not os.path.exists("/tmp/xm-array-pwned")

    def test_cancelling_one_task_leaves_the_others_and_a_stopped_array_goes_in_one_command(self, env):
        h = env.h
        runs = run(start_runs_together(env.deployments["job"], [trial(["sleep", "600"])] * 3,
                                       {**env.job_variables, **h.hold_variables}))
        frs = [wait_state(r.id, StateType.PENDING, name="InfrastructurePending", timeout=240) for r in runs]
        jobs = [job_id_of(fr) for fr in frs]
        array = h.scheduler.array_of(jobs[0])
        if h.has_arrays:
            assert array and all(h.scheduler.array_of(j) == array for j in jobs), jobs
        else:
            assert len(set(jobs)) == 3 and not any(h.scheduler.array_of(j) for j in jobs), jobs
        cancels = len(env.wrappers.calls(h.cancel_command))
        request_cancel(frs[0].id)
        wait_state(frs[0].id, StateType.CANCELLED)
        wait_for(lambda: h.final_or_gone(jobs[0]), 60, what=f"task {jobs[0]} to be removed")
        assert all(h.job_state(j) == JobState.PENDING for j in jobs[1:])
        assert all(state_of(fr.id) == StateType.PENDING for fr in frs[1:])
        one_task = env.wrappers.calls(h.cancel_command)[cancels:]
        task_cancel = " ".join(h.scheduler.cancel_argvs(jobs[0], 30)[-1])
        assert task_cancel in one_task, one_task
        cancels = len(env.wrappers.calls(h.cancel_command))
        request_cancel(*(fr.id for fr in frs[1:]))
        for fr in frs[1:]:
            wait_state(fr.id, StateType.CANCELLED)
        for job in jobs[1:]:
            wait_for(lambda: h.final_or_gone(job), 60, what=f"task {job} to be removed")
        calls = env.wrappers.calls(h.cancel_command)[cancels:]
        if h.has_arrays:
            assert calls == [" ".join(h.scheduler.cancel_argvs(array, 30)[-1])], calls
        else:
            assert all(" ".join(h.scheduler.cancel_argvs(j, 30)[-1]) in calls for j in jobs[1:]), calls


class RequeueScenario:
    """For a BatchWorkerSuite whose harness can requeue a running job (requeue_argv)."""

    def test_a_requeued_job_goes_back_to_pending_and_runs_again_as_its_next_attempt(self, env):
        """The scheduler's requeue of running jobs (an admin's, as a preemption's): a run
        goes back to Pending (named Requeued, saying which requeue of how many), then to
        Completed, on its one submit, and its program knows its attempt (the first
        attempt's output stays in the logs, though Slurm starts job.out anew); past
        max_requeues the job is removed and the run ends Crashed, saying so."""
        h = env.h
        program = ["sh", "-c", 'echo "attempt $PREFECT_XM_ATTEMPT"; [ "$PREFECT_XM_ATTEMPT" -gt 1 ] || exec sleep 600']
        variables = {**env.job_variables, "requeue": True}
        resumed = run(start_run(env.deployments["job"], trial(program), {**variables, "max_requeues": 2}))
        limited = run(start_run(env.deployments["job"], trial(program), {**variables, "max_requeues": 0}))
        jobs = []
        for r in (resumed, limited):
            jobs.append(job_id_of(wait_state(r.id, StateType.RUNNING, timeout=240)))
            wait_for(lambda: "attempt 1" in logs_of(r.id), 120, what=f"run {r.id}'s first attempt")
        for job in jobs:
            subprocess.run(h.requeue_argv(job), check=True)
        if h.release_requeued_argv:
            wait_state(resumed.id, StateType.PENDING, name="Requeued", timeout=120)
            subprocess.run(h.release_requeued_argv(jobs[0]), check=True)
        fr = wait_final(resumed.id, timeout=300)
        history = state_history(fr.id)
        assert fr.state.type == StateType.COMPLETED, history
        # (on an idle cluster the job may run again before anyone looks at the run)
        requeued = [ln for ln in history.splitlines() if " PENDING Requeued: " in ln]
        assert len(requeued) == 1 and "requeue 1 of 2" in requeued[0], history
        assert "PREFECT_XM_ATTEMPT=2" in requeued[0], history
        assert " RUNNING " in history.split(requeued[0], 1)[1], history  # its next attempt runs again
        assert job_id_of(fr) == jobs[0]
        logs = wait_for(lambda: (lambda t: t if "attempt 2" in t else None)(logs_of(resumed.id)), 60,
                        what="the second attempt's output")
        assert "attempt 1" in logs, logs
        assert len([c for c in env.wrappers.calls(h.submit_command) if str(resumed.id) in c]) == 1
        fr = wait_final(limited.id, timeout=120)
        assert fr.state.type == StateType.CRASHED and "more than max_requeues=0" in fr.state.message, fr.state
        wait_for(lambda: h.final_or_gone(jobs[1]), 60, what=f"job {jobs[1]} to be removed")
