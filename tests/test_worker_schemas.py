"""The worker types as `prefect work-pool create --type xm-...` sees them: found through
the `prefect.collections` entry point, each with a default base job template whose
variables the UI can show (every one with a title and a description)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

TYPES = ["xm-slurm", "xm-sge", "xm-pbs", "xm-lsf", "xm-htcondor"]

# Run in a fresh interpreter that never imports prefect_xm itself: only Prefect's entry
# point loading can register the types. The template comes from the function the CLI's
# `work-pool create` calls; the registry is asked first, so a missing type fails here
# instead of falling back to Prefect's online collections registry.
_LOAD = """
import asyncio, json, sys
from prefect.workers.base import BaseWorker
from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type
assert not [m for m in sys.modules if m.startswith("prefect_xm")], "imported before the registry"
out = {}
for worker_type in sys.argv[1:]:
    cls = BaseWorker.get_worker_class_from_type(worker_type)
    if cls is None:
        out[worker_type] = None
        continue
    template = asyncio.run(get_default_base_job_template_for_infrastructure_type(worker_type))
    config_fields = sorted(cls.job_configuration.model_fields)
    out[worker_type] = {"class": f"{cls.__module__}.{cls.__qualname__}", "template": template,
                        "config_fields": config_fields}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def registered() -> dict:
    proc = subprocess.run([sys.executable, "-c", _LOAD, *TYPES], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("worker_type,cls", [
    ("xm-slurm", "prefect_xm.workers.slurm.SlurmWorker"),
    ("xm-sge", "prefect_xm.workers.sge.SgeWorker"),
    ("xm-pbs", "prefect_xm.workers.pbs.PbsWorker"),
    ("xm-lsf", "prefect_xm.workers.lsf.LsfWorker"),
    ("xm-htcondor", "prefect_xm.workers.htcondor.HTCondorWorker"),
])
def test_type_is_found_through_the_entry_point(registered, worker_type, cls):
    assert registered[worker_type] is not None, f"{worker_type} is not in Prefect's worker registry"
    assert registered[worker_type]["class"] == cls


@pytest.mark.parametrize("worker_type", TYPES)
def test_every_variable_has_a_title_and_a_description(registered, worker_type):
    properties = registered[worker_type]["template"]["variables"]["properties"]
    missing = {
        name: {k: schema.get(k) for k in ("title", "description")}
        for name, schema in properties.items()
        if not str(schema.get("title") or "").strip() or not str(schema.get("description") or "").strip()
    }
    assert not missing, f"{worker_type}: variables without a title or description: {missing}"


@pytest.mark.parametrize("worker_type", TYPES)
def test_every_configuration_field_is_a_variable_the_template_passes_on(registered, worker_type):
    # a field without a variable cannot be set from a pool or a deployment; a variable
    # the job_configuration does not reference is silently dropped
    template = registered[worker_type]["template"]
    properties = template["variables"]["properties"]
    assert sorted(properties) == registered[worker_type]["config_fields"]
    for name in properties:
        assert template["job_configuration"].get(name) == "{{ %s }}" % name, (worker_type, name)


@pytest.mark.parametrize("worker_type,titles", [
    ("xm-slurm", {"partition": "Partition", "account": "Account", "qos": "QOS", "time_limit": "Time limit",
                  "cpus_per_task": "CPUs per task", "gpu_type": "GPU type", "constraint": "Constraint"}),
    ("xm-sge", {"queue": "Queue", "time_limit": "Time limit", "memory": "Memory per slot", "slots": "Slots (CPUs)",
                "parallel_environment": "Parallel environment", "gpu_resource": "GPU resource name"}),
    ("xm-pbs", {"dialect": "PBS dialect", "account": "Account", "time_limit": "Walltime", "cpus": "CPUs per node",
                "gpus": "GPUs per node", "hold": "Submit held"}),
    ("xm-lsf", {"queue": "Queue", "project": "Project", "time_limit": "Run limit", "slots": "Slots",
                "memory": "Memory limit", "reserve_memory": "Reserve memory", "gpu_model": "GPU model"}),
    ("xm-htcondor", {"universe": "Universe", "request_cpus": "CPUs", "request_memory": "Memory",
                     "request_gpus": "GPUs", "requirements": "Requirements", "accounting_group": "Accounting group"}),
])
def test_scheduler_specific_variables(registered, worker_type, titles):
    properties = registered[worker_type]["template"]["variables"]["properties"]
    assert {name: properties.get(name, {}).get("title") for name in titles} == titles
    # the settings every batch pool shares are there too
    for name in ("modules", "setup_commands", "extra_directives", "working_dir", "ssh_block", "run_dir"):
        assert name in properties, (worker_type, name)


def test_pbs_dialect_is_a_choice_of_the_two(registered):
    dialect = registered["xm-pbs"]["template"]["variables"]["properties"]["dialect"]
    assert dialect["enum"] == ["pbspro", "torque"] and dialect["default"] == "pbspro"


def _pattern(schema: dict) -> str:
    # Optional[str] fields put the string's pattern inside anyOf
    for option in [schema, *schema.get("anyOf", [])]:
        if option.get("pattern"):
            return option["pattern"]
    return ""


@pytest.mark.parametrize("worker_type,good,bad", [
    ("xm-slurm", ["90", "1:00:00", "2-00:00:00"], ["ten minutes", "1h"]),
    ("xm-sge", ["3600", "1:00:00"], ["1h", "ten minutes"]),
    ("xm-pbs", ["01:30:00", "90:00", "5400"], ["1h", "1:30:00:00:00"]),
    ("xm-lsf", ["90", "1:30"], ["1:75", "1:00:00"]),
    ("xm-htcondor", ["90", "1:30:00"], ["1:75:00", "1h"]),
])
def test_time_limit_pattern_in_the_form(registered, worker_type, good, bad):
    # the pool's form checks the value before any flow run is submitted with it
    pattern = _pattern(registered[worker_type]["template"]["variables"]["properties"]["time_limit"])
    assert pattern, f"{worker_type}: time_limit has no pattern"
    assert [v for v in good if not re.search(pattern, v)] == []
    assert [v for v in bad if re.search(pattern, v)] == []
