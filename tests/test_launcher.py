"""Telling a dead launcher from a live one (end to end, with SIGKILL and a re-run, in
test_experiment_slurm.py)."""

from __future__ import annotations

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
