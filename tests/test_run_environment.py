"""How a run's environment reaches its batch job: a 0600 file the script sources, never
the script itself, the submit command's environment or the scheduler's job record."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import uuid
from types import SimpleNamespace

import pytest

from prefect_xm.workers.base import ScriptTemplateError
from prefect_xm.workers.run_directory import environment_file
from prefect_xm.workers.sge import SgeJobConfiguration, SgeWorker
from prefect_xm.workers.transport import LocalTransport, command_environment

AWKWARD = {
    "PLAIN": "value",
    "SPACES": "a b  c",
    "QUOTES": "it's \"quoted\"",
    "SUBSTITUTION": "$(touch /tmp/pwned) `id` ${HOME}",
    "NEWLINE": "line one\nline two",
    "SEMICOLON": "x; rm -rf /",
}


def test_environment_file_round_trips_every_value_through_the_shell(tmp_path):
    run_dir = tmp_path / "run dir $(touch pwned)"
    run_dir.mkdir()
    path = run_dir / "job.env"
    path.write_text(environment_file(AWKWARD, str(run_dir)))
    names = sorted(AWKWARD) + ["PREFECT_XM_ATTEMPT"]
    probe = "import json, os; print(json.dumps({k: os.environ[k] for k in %r}))" % names
    # each start of the script is one attempt (a requeued job's script starts again)
    for attempt, shell in enumerate(("bash", "sh"), start=1):  # SGE's -S may be /bin/sh
        out = subprocess.run([shell, "-c", f'. "$0" && exec python3 -c "$1"', str(path), probe],
                             capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {**AWKWARD, "PREFECT_XM_ATTEMPT": str(attempt)}, shell
    assert (run_dir / "attempt").read_text() == "2\n"
    assert not os.path.exists("/tmp/pwned") and not (tmp_path / "pwned").exists()


def test_environment_file_is_created_owner_only(tmp_path):
    path = tmp_path / "run" / "job.env"
    old = os.umask(0)  # even a permissive umask must not open it up
    try:
        asyncio.run(LocalTransport().write_file(str(path), "export A=1\n", 0o600))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_scheduler_commands_run_without_the_workers_credentials(monkeypatch):
    for name in ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "DB_PASSWORD"):
        monkeypatch.setenv(name, "cr3d-value-9f2")
    monkeypatch.setenv("XM_HARMLESS", "kept")
    env = command_environment()
    assert "XM_HARMLESS" in env and "PATH" in env
    assert "cr3d-value-9f2" not in env.values()
    result = asyncio.run(LocalTransport().run(["env"]))
    assert "XM_HARMLESS=kept" in result.stdout and "cr3d-value-9f2" not in result.stdout


def render(**variables) -> str:
    worker = SgeWorker(work_pool_name="render-only")
    flow_run = SimpleNamespace(id=uuid.UUID(int=9), name="calm-owl")
    return worker.render_script(SgeJobConfiguration(**variables), flow_run, "/runs/x")


def test_default_template_sources_the_env_file_before_setup():
    lines = render(setup_commands=["echo setup"]).splitlines()
    assert lines.index(". /runs/x/job.env") < lines.index("echo setup")


def test_custom_template_that_forgets_the_env_file_is_refused():
    with pytest.raises(ScriptTemplateError, match="script_template: .*env_file"):
        render(script_template="#!/bin/bash\nexec {{ command_argv | join(' ') }}\n")


def test_invalid_environment_variable_name_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"env: 'MY-VAR' is not a valid environment variable name"):
        SgeJobConfiguration(env={"MY-VAR": "1"})


@pytest.mark.parametrize("field", ["working_dir", "run_dir"])
@pytest.mark.parametrize("value", ["/scratch/my dir", "/scratch\necho injected", " "])
def test_paths_that_go_into_directive_lines_must_be_one_word(field, value):
    """A newline in working_dir would make the rest a shell line of the batch script;
    a space would cut `#$ -wd` or `#SBATCH --chdir=` short."""
    with pytest.raises(ValueError) as info:
        SgeJobConfiguration(**{field: value})
    assert field in str(info.value) and repr(value) in str(info.value)


def test_the_base_environment_is_prefects_rendered_once_per_settings_object():
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.base import BaseJobConfiguration

    assert SgeJobConfiguration._base_environment() == BaseJobConfiguration._base_environment()
    with temporary_settings({PREFECT_API_URL: "http://login-node:4200/api"}):
        assert SgeJobConfiguration._base_environment()["PREFECT_API_URL"] == "http://login-node:4200/api"
        # a caller changing its copy changes no other run's
        SgeJobConfiguration._base_environment()["PREFECT_API_URL"] = "changed"
        assert SgeJobConfiguration._base_environment()["PREFECT_API_URL"] == "http://login-node:4200/api"
    assert SgeJobConfiguration._base_environment() == BaseJobConfiguration._base_environment()


def test_a_custom_template_is_rendered_as_written_each_time_it_changes(tmp_path):
    worker = SgeWorker.__new__(SgeWorker)
    flow_run = SimpleNamespace(id=uuid.uuid4(), name="run")
    scripts = []
    for word in ("first", "second", "first"):
        configuration = SgeJobConfiguration(
            script_template=f"#!/bin/bash\n# {word}\n. {{{{ env_file | q }}}}\nexec {{{{ command_argv | join(' ') }}}}\n",
            command="true")
        scripts.append(worker.render_script(configuration, flow_run, str(tmp_path)))
    assert ["# first" in scripts[0], "# second" in scripts[1], "# first" in scripts[2]] == [True] * 3
    with pytest.raises(ScriptTemplateError, match="syntax error"):
        worker.render_script(SgeJobConfiguration(script_template="{% if %}", command="true"), flow_run, str(tmp_path))
