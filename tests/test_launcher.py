"""Telling a dead launcher from a live one (end to end, with SIGKILL and a re-run, in
test_experiment_slurm.py)."""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import subprocess
import sys

from prefect_xm.core import launcher


def _ago(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)


def test_a_beat_within_the_window_from_a_live_process_is_alive():
    assert launcher.LastBeat(_ago(5), socket.gethostname(), os.getpid()).is_alive(90)
    assert launcher.LastBeat(_ago(5), "another-host", 1234).is_alive(90)


def test_a_beat_older_than_the_window_is_gone():
    assert not launcher.LastBeat(_ago(120), "another-host", 1234).is_alive(90)


def test_a_dead_pid_on_this_host_is_gone_at_once():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not launcher.LastBeat(_ago(1), socket.gethostname(), dead.pid).is_alive(90)


def test_three_missed_beats_and_never_under_prefects_minimum_window(monkeypatch):
    monkeypatch.setenv("PREFECT_XM_HEARTBEAT_SECONDS", "30")
    assert launcher.gone_after_seconds() == 90
    assert launcher.gone_after_seconds(2) == 10  # a proactive trigger's shortest window


def test_the_automation_waits_for_a_beat_or_an_end_and_never_overrides_an_end():
    automation = launcher._gone_automation(launcher.automation_name(90), 90)
    trigger, [action] = automation.trigger, automation.actions
    assert trigger.after == {launcher.heartbeat_event(90)}
    assert {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
            "prefect.flow-run.Crashed", launcher.heartbeat_event(90)} <= trigger.expect
    assert trigger.within == datetime.timedelta(seconds=90) and trigger.for_each == {"prefect.resource.id"}
    assert action.state.value == "CRASHED" and not action.force  # Completed stays Completed
    assert action.message.startswith(launcher.GONE_MESSAGE)
    # launchers beating at another rhythm are judged by their own automation
    assert launcher.heartbeat_event(12) not in trigger.expect


# ------------------------------------------------------------- how a launch ends


def test_a_launch_fails_when_an_experiment_did_not_complete():
    from prefect.client.schemas.objects import StateType

    from prefect_xm.core.summary import launch_exit_code

    assert launch_exit_code([StateType.COMPLETED, StateType.COMPLETED]) == 0
    assert launch_exit_code([]) == 0  # (no experiment: the script's own code decides)
    for end in (StateType.FAILED, StateType.CRASHED, StateType.CANCELLED, StateType.RUNNING):
        assert launch_exit_code([StateType.COMPLETED, end]) == 1, end


def test_only_a_script_run_as_a_program_is_ended_by_its_experiment(tmp_path):
    """A failed experiment ends the script (SystemExit) only where its `with` is the
    `__main__` module of a file: not a test, not `python -c`, not a library's module."""
    from prefect_xm.core.experiment import _left_in_a_program

    assert not _left_in_a_program()  # (a test)
    (tmp_path / "helper.py").write_text(
        "from prefect_xm.core.experiment import _left_in_a_program\n"
        "def ask():\n    return _left_in_a_program()\n")
    (tmp_path / "launcher.py").write_text(
        "import helper\nfrom prefect_xm.core.experiment import _left_in_a_program\n"
        "print(_left_in_a_program(), helper.ask())\n")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    script = subprocess.run([sys.executable, str(tmp_path / "launcher.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert script.stdout.split() == ["True", "False"], script.stderr[-2000:]
    inline = subprocess.run([sys.executable, "-c", "from prefect_xm.core.experiment import _left_in_a_program; "
                             "print(_left_in_a_program())"], env=env, capture_output=True, text=True, timeout=120)
    assert inline.stdout.split() == ["False"], inline.stderr[-2000:]


# ------------------------------------------------------------- pools no worker serves


class _Worker:
    def __init__(self, status: str, beat_ago: float | None, interval: int | None = 30):
        from prefect.client.schemas.objects import WorkerStatus

        self.status = WorkerStatus(status)
        self.last_heartbeat_time = _ago(beat_ago) if beat_ago is not None else None
        self.heartbeat_interval_seconds = interval


def test_a_worker_serves_its_pool_while_online_or_beating():
    from prefect_xm.core.pool_workers import is_serving

    now = datetime.datetime.now(datetime.timezone.utc)
    assert is_serving(_Worker("ONLINE", None), now)
    assert is_serving(_Worker("OFFLINE", 20), now)  # (Prefect has not noticed it yet)
    assert not is_serving(_Worker("OFFLINE", 100), now)  # three 30 s beats missed
    assert is_serving(_Worker("OFFLINE", 100, interval=60), now)
    assert not is_serving(_Worker("OFFLINE", None), now)


async def test_a_pool_no_worker_serves_is_reported_once_and_read_sparingly(monkeypatch):
    from prefect_xm.core import pool_workers

    class Pool:
        type = "xm-slurm"

    class Client:
        def __init__(self):
            self.reads: list[str] = []
            self.workers = {"idle": [_Worker("OFFLINE", 600)], "served": [_Worker("ONLINE", 5)]}

        async def read_workers_for_work_pool(self, pool):
            self.reads.append(pool)
            return self.workers[pool]

        async def read_work_pool(self, pool):
            return Pool()

    monkeypatch.setattr(pool_workers, "CHECK_SECONDS", 0.5)
    said: list[str] = []
    client, watch = Client(), pool_workers.PoolWatch(said.append)
    await watch.check(client, ["idle", "served"])
    assert said == ["no worker is serving work pool 'idle': start one with: "
                    "prefect worker start --pool idle --type xm-slurm"]
    assert client.reads == ["idle", "served"]
    for _ in range(3):  # (polls within CHECK_SECONDS: no read; the reported pool never again)
        await watch.check(client, ["idle", "served"])
    assert client.reads == ["idle", "served"] and len(said) == 1
    client.workers["served"] = []  # its worker went away
    await asyncio.sleep(0.6)
    await watch.check(client, ["idle", "served"])
    await watch.check(client, [])  # (nothing waits: nothing read)
    assert client.reads == ["idle", "served", "served"]
    assert said[1:] == ["no worker is serving work pool 'served': start one with: "
                        "prefect worker start --pool served --type xm-slurm"]


# ------------------------------------------------------------- Prefect's events, flushed


async def test_an_experiments_end_waits_for_prefects_events_worker_to_send_its_events(monkeypatch):
    import threading

    from prefect.events.worker import EventsWorker

    from prefect_xm.core.runtime import flush_prefect_events

    class Sending:
        def __init__(self, seconds):
            self.seconds, self.sent = seconds, threading.Event()

        def wait_until_empty(self):
            if self.seconds is None:
                threading.Event().wait()  # (a worker that can no longer send)
            self.sent.wait(self.seconds)
            self.sent.set()

    busy = Sending(0.3)
    monkeypatch.setattr(EventsWorker, "_instances", {1: busy})
    assert await flush_prefect_events(timeout=10) and busy.sent.is_set()
    monkeypatch.setattr(EventsWorker, "_instances", {1: Sending(None)})
    assert not await flush_prefect_events(timeout=0.3)  # it gives up, and does not hang
    monkeypatch.setattr(EventsWorker, "_instances", {})
    assert await flush_prefect_events(timeout=0.3)
