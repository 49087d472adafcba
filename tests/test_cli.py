"""The prefect-xm CLI, end to end against the real Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import wait_for

pytestmark = pytest.mark.e2e

CLI = str(Path(sys.executable).parent / "prefect-xm")


@pytest.fixture(scope="module")
def api(prefect_server):
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    return prefect_server


def _cli(api, *args, timeout=300):
    proc = subprocess.run([CLI, *args], env=api.env(COLUMNS="200"), capture_output=True, text=True, timeout=timeout)
    return proc


#: runs the CLI's main() on each argv in one interpreter (importing Prefect once, not per
#: command) and prints each exit code and output as JSON
_MAIN_ON_EACH = """
import contextlib, io, json, sys
from prefect_xm.cli import main
answers = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    answers.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(answers))
"""


def _cli_each(api, *argvs: list[str]) -> list[SimpleNamespace]:
    """The answers of `prefect-xm <argv>` for each argv, as _cli's (returncode, stdout,
    stderr), from one interpreter: the installed command is run as a program by _cli."""
    import json

    proc = subprocess.run([sys.executable, "-c", _MAIN_ON_EACH, json.dumps([list(a) for a in argvs])],
                          env=api.env(COLUMNS="200"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [SimpleNamespace(**answer) for answer in json.loads(proc.stdout)]


def _runs(*tags):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=list(tags))))


def test_launch_twice_with_identity_adds_no_duplicate_work_units(api, tmp_path):
    identity = f"idem-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(f"""
        import argparse, sys
        from prefect_xm import hyper, xm, xm_local

        flags = argparse.ArgumentParser()
        flags.add_argument("--note", required=True)
        note = flags.parse_args().note

        with xm_local.create_experiment(experiment_title="idempotent", identity={identity!r}) as experiment:
            [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", "print('ran')"]),
                                                       xm_local.Local.Spec())])
            for hp in hyper.sweep("lr", [0.1, 0.2]):
                wu = experiment.add(xm.Job(exe, xm_local.Local(), args=hp), identity=f"lr={{hp['lr']}}")
        print("EXPERIMENT", experiment.experiment_id, "NOTE", note, "WUS", len(experiment.work_units))
    """))
    first = _cli(api, "launch", str(script), "--", "--note", "first run")
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    exp_id = first.stdout.split("EXPERIMENT", 1)[1].split()[0]
    assert "NOTE first run WUS 2" in first.stdout.replace("  ", " ") or "NOTE first run WUS 2" in first.stdout
    assert "idempotent" in first.stdout and "Completed" in first.stdout  # the results table
    assert "work units done" in first.stderr  # progress while waiting

    second = _cli(api, "launch", str(script), "--", "--note", "second")
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    assert second.stdout.split("EXPERIMENT", 1)[1].split()[0] == exp_id
    assert "WUS 2" in second.stdout
    wus = _runs("xm-kind:work-unit", f"xm-experiment:{exp_id}")
    jobs = _runs("xm-kind:job", f"xm-experiment:{exp_id}")
    assert len(wus) == 2 and len(jobs) == 2
    assert sorted(r.parameters["lr"] for r in wus) == [0.1, 0.2]

    # list and show read it back from Prefect.
    listed, shown, missing = _cli_each(api, ["list"], ["show", exp_id], ["show", "nosuchid"])
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert exp_id in listed.stdout and "idempotent" in listed.stdout
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "lr=0.1" in shown.stdout and "lr=0.2" in shown.stdout and "Completed" in shown.stdout
    assert missing.returncode == 2 and "nosuchid" in missing.stderr


def test_stop_cancels_a_running_experiment(api, tmp_path):
    from prefect_xm import xm, xm_local

    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)"
    with xm_local.create_experiment(experiment_title="cli-stop") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", code]), xm_local.Local.Spec())])
        wu = experiment.add(xm.Job(exe, xm_local.Local(), args=[str(tmp_path / "pid")]))
        wait_for(lambda: wu.get_status().is_running, timeout=120, what="the work unit to run")
        stopped = _cli(api, "stop", str(experiment.experiment_id))
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert "Cancelled" in stopped.stdout
        # the launcher ended its job itself, while the stop waited (not the stop's fallback
        # for a launcher that is gone: the job left Cancelling, the stop a minute long)
        [job] = _runs("xm-kind:job", f"xm-experiment:{experiment.experiment_id}")
        assert job.state.type.value == "CANCELLED" and "the program was killed" in job.state.message, job.state
    assert wu.get_status().is_cancelled
    pid = int((tmp_path / "pid").read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
             timeout=30, what="the job's process to be gone")
    assert experiment.get_status().is_cancelled


def test_an_absl_launch_script_takes_xmanagers_xm_flags_and_its_own(api, tmp_path):
    """XManager's launch scripts run under absl and are launched with XManager's --xm_*
    flags: with only its imports changed, such a script parses them and its own."""
    out = tmp_path / "seen"
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from absl import app
        from absl import flags
        from prefect_xm import xm  # was: from xmanager import xm
        from prefect_xm import xm_local  # was: from xmanager import xm_local

        _LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.1, "The trainer's learning rate.")

        def main(argv):
            del argv
            with xm_local.create_experiment(experiment_title="absl-launcher") as experiment:
                [executable] = experiment.package([xm.Packageable(
                    executable_spec=xm.Command([sys.executable, "-c",
                        "import sys; open({str(out)!r}, 'w').write(' '.join(sys.argv[1:]))"]),
                    executor_spec=xm_local.Local.Spec())])
                experiment.add(xm.Job(executable=executable, executor=xm_local.Local(),
                                      args={{"learning_rate": _LEARNING_RATE.value}}))
            print("LAUNCH MODE", flags.FLAGS.xm_launch_mode.value, "WRAP", flags.FLAGS.xm_wrap_late_bindings)

        if __name__ == "__main__":
            app.run(main)
    """))
    result = _cli(api, "launch", str(script), "--", "--xm_launch_mode=local", "--xm_wrap_late_bindings",
                  "--learning_rate=0.01")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "LAUNCH MODE local WRAP True" in result.stdout
    assert out.read_text() == "--learning_rate=0.01"


def test_local_jobs_stream_their_output_to_the_terminal_unless_told_not_to(api, tmp_path):
    """xm_local.Local(experimental_stream_output=...) as in XManager (on by default): a
    job's lines reach the launcher's terminal, prefixed with its unit and name; its
    run's logs have them either way."""
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent("""
        import sys
        from prefect_xm import xm, xm_local

        with xm_local.create_experiment(experiment_title="streams") as experiment:
            [say] = experiment.package([xm.Packageable(
                xm.Command([sys.executable, "-c", "import sys; print(sys.argv[1]); print('err-' + sys.argv[1], file=sys.stderr)"]),
                xm_local.Local.Spec())])
            experiment.add(xm.JobGroup(loud=xm.Job(say, xm_local.Local(), args=["marker-loud"]),
                                       quiet=xm.Job(say, xm_local.Local(
                                           docker_options=xm_local.DockerOptions(ports={8080: 8080}),
                                           experimental_stream_output=False), args=["marker-quiet"])))
        print("EXPERIMENT", experiment.experiment_id)
    """))
    result = _cli(api, "launch", str(script))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "[wu1/loud] marker-loud" in result.stdout and "[wu1/loud] err-marker-loud" in result.stderr
    assert "[wu1/quiet]" not in result.stdout + result.stderr  # (its args are in the results table)
    exp_id = result.stdout.split("EXPERIMENT", 1)[1].split()[0]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    [quiet] = _runs("xm-kind:job", f"xm-experiment:{exp_id}", "xm-job:quiet")
    with get_client(sync_client=True) as c:
        lines = [log.message for log in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[quiet.id])))]
    assert "marker-quiet" in lines and "[stderr] err-marker-quiet" in lines, lines


# ------------------------------------------------------------- help, JSON, logs, exit codes


def test_help_names_the_commands_and_the_exit_codes_and_usage_errors_exit_2(api):
    helped = _cli(api, "--help")  # the installed command itself, once
    assert helped.returncode == 0, helped.stderr[-2000:]
    for command in ("launch", "list", "show", "logs", "stop"):
        assert command in helped.stdout
    assert "Exit codes: 0 ok; 1 a work unit failed" in " ".join(helped.stdout.split())
    usages = [[], ["bogus"], ["show"], ["logs", "123"], ["list", "--bogus"], ["list", "--limit", "many"]]
    logs_help, show_help, *answers = _cli_each(api, ["logs", "--help"], ["show", "--help"], *usages)
    assert "--follow" in logs_help.stdout and "--json" in show_help.stdout
    for usage, answer in zip(usages, answers):
        assert answer.returncode == 2, answer
        assert not usage or usage[-1] in answer.stderr or "EXPERIMENT" in answer.stderr or (
            "UNIT" in answer.stderr), answer  # (it says what was wrong)


def test_launch_exits_1_when_a_work_unit_failed_and_list_show_and_logs_tell_it(api, tmp_path):
    import json

    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent("""
        import sys
        from prefect_xm import xm, xm_local

        code = "import sys; print('marker-' + sys.argv[1][-1]); sys.exit(int(sys.argv[1][-1]))"
        with xm_local.create_experiment(experiment_title="cli-json") as experiment:
            [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", code]),
                                                       xm_local.Local.Spec())])
            for c in (0, 3):
                experiment.add(xm.Job(exe, xm_local.Local(experimental_stream_output=False), name="trainer",
                                      args={"code": c}))
        print("EXPERIMENT", experiment.experiment_id)
        print("AFTER THE EXPERIMENT")
    """))
    launched = _cli(api, "launch", str(script))
    # (the whole script runs, then its experiments' ends decide the exit code)
    assert launched.returncode == 1, launched.stdout + launched.stderr[-3000:]
    assert "AFTER THE EXPERIMENT" in launched.stdout and "cli-json" in launched.stdout
    exp_id = launched.stdout.split("EXPERIMENT", 1)[1].split()[0]

    listed, shown, logs, failed, followed, missing = _cli_each(
        api, ["list", "--json"], ["show", exp_id, "--json"], ["logs", exp_id, "1"], ["logs", exp_id, "2", "--follow"],
        ["logs", exp_id, "wu1", "-f"], ["logs", exp_id, "9"])
    assert listed.returncode == 0, listed.stderr[-2000:]
    [entry] = [e for e in json.loads(listed.stdout)["experiments"] if str(e["id"]) == exp_id]
    assert entry["title"] == "cli-json" and entry["state"] == "Failed" and entry["state_type"] == "FAILED"
    assert entry["work_unit_count"] == 2 and entry["work_unit_states"] == {"Completed": 1, "Failed": 1}
    assert entry["created"] and entry["flow_run_id"]

    assert shown.returncode == 0, shown.stderr[-2000:]
    doc = json.loads(shown.stdout)
    assert (doc["id"], doc["state"]) == (int(exp_id), "Failed")
    units = {u["id"]: u for u in doc["work_units"]}
    assert sorted(units) == [1, 2] and doc["auxiliary_units"] == []
    assert units[1]["args"] == {"code": 0} and units[1]["state"] == "Completed"
    assert units[2]["args"] == {"code": 3} and units[2]["state_type"] == "FAILED" and "code 3" in units[2]["message"]
    [job] = units[2]["jobs"]
    assert job["name"] == "trainer" and job["state"] == "Failed" and job["flow_run_id"] and job["work_pool"] is None
    [runner] = _runs("xm-kind:job", f"xm-experiment:{exp_id}", "xm-work-unit:2")
    assert job["flow_run_id"] == str(runner.id)

    assert logs.returncode == 0, logs.stderr[-2000:]
    lines = logs.stdout.splitlines()
    assert "[wu1/trainer] marker-0" in lines and "marker-3" not in logs.stdout
    assert lines.index("[wu1/trainer] marker-0") < len(lines) - 1  # (its end follows: oldest first)
    assert failed.returncode == 1 and "[wu2/trainer] marker-3" in failed.stdout, failed.stdout + failed.stderr
    assert followed.returncode == 0, followed
    assert missing.returncode == 2 and "no work unit 9" in missing.stderr


def test_logs_follow_prints_a_running_units_lines_until_it_ends(api, tmp_path):
    from prefect_xm import xm, xm_local

    code = "import time; print('line-one', flush=True); time.sleep(4); print('line-two')"
    with xm_local.create_experiment(experiment_title="cli-follow") as experiment:
        [exe] = experiment.package([xm.Packageable(xm.Command([sys.executable, "-c", code]), xm_local.Local.Spec())])
        wu = experiment.add(xm.Job(exe, xm_local.Local(experimental_stream_output=False), name="talker"))
        wait_for(lambda: wu.get_status().is_running, timeout=120, what="the work unit to run")
        follow = subprocess.Popen([CLI, "logs", str(experiment.experiment_id), "1", "--follow"],
                                  env=api.env(COLUMNS="200"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
    out, err = follow.communicate(timeout=120)
    assert follow.returncode == 0, out + err
    lines = out.splitlines()
    assert lines.index("[wu1/talker] line-one") < lines.index("[wu1/talker] line-two"), lines


def test_a_launch_refused_at_add_says_so_and_leaves_no_experiment_listed(api, tmp_path):
    import json

    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent("""
        from prefect_xm import xm, xm_local

        with xm_local.create_experiment(experiment_title="cli-refused") as experiment:
            [exe] = experiment.package([xm.Packageable(xm.Binary("/bin/true"), xm_local.Local.Spec())])
            experiment.add(xm.Job(exe, xm_local.Local()), args="lr=0.1")
    """))
    refused = _cli(api, "launch", str(script))
    assert refused.returncode == 1, refused.stdout + refused.stderr[-3000:]
    said = next((line for line in refused.stderr.splitlines() if "launch refused" in line), "")
    assert said.startswith("prefect-xm: experiment ") and "(cli-refused): launch refused before any work unit was " \
        "added: ValueError: experiment.add args must be a dict, got 'lr=0.1'; its run was deleted" in said, refused.stderr
    exp_id = said.split()[2]
    assert f"experiment {exp_id} \u2014 cli-refused: launch refused" in refused.stdout  # (instead of its table)
    assert "Still processing items" not in refused.stderr
    listed, shown = _cli_each(api, ["list", "--json"], ["show", exp_id])
    assert exp_id not in {str(e["id"]) for e in json.loads(listed.stdout)["experiments"]}
    assert shown.returncode == 2
