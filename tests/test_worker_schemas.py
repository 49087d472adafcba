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


# -- the variables schema as stored is compacted (prefect_xm/workers/schema.py) -----------------------------------

def _workers():
    from prefect_xm.workers.htcondor import HTCondorWorker
    from prefect_xm.workers.lsf import LsfWorker
    from prefect_xm.workers.pbs import PbsWorker
    from prefect_xm.workers.sge import SgeWorker
    from prefect_xm.workers.slurm import SlurmWorker

    return {w.type: w for w in (SlurmWorker, SgeWorker, PbsWorker, LsfWorker, HTCondorWorker)}


def _pydantic_variables(worker) -> dict:
    """The variables schema as Prefect's BaseVariables writes it, before `compact`."""
    from prefect.workers.base import BaseVariables

    return BaseVariables.model_json_schema.__func__(worker.job_configuration_variables)


@pytest.mark.parametrize("worker_type", TYPES)
def test_each_variable_resolves_to_what_pydantic_wrote(worker_type):
    # What both UIs show: a $ref'd property is its definition merged with its own keys.
    # So the form, its titles and its checks (minimum, pattern, enum) are the ones the
    # fields declare; only `"default": null` is gone.
    worker = _workers()[worker_type]
    variables = worker.get_default_base_job_template()["variables"]
    written = _pydantic_variables(worker)["properties"]
    definitions = variables.get("definitions", {})
    assert list(variables["properties"]) == list(written)
    for name, prop in variables["properties"].items():
        if "$ref" in prop:
            ref = prop["$ref"].removeprefix("#/definitions/")
            prop = {**definitions[ref], **{k: v for k, v in prop.items() if k != "$ref"}}
        expected = {k: v for k, v in written[name].items() if not (k == "default" and v is None)}
        assert prop == expected, name


@pytest.mark.parametrize("worker_type", TYPES)
def test_prefects_preprocessing_leaves_shared_types_alone(worker_type):
    # The server's final check runs the metaschema over the schema after
    # preprocess_schema, which turns an optional property with a "type" into
    # anyOf[type, null]: a variable that refers to its type stays one subschema there.
    from prefect.utilities.schema_tools.validation import preprocess_schema

    variables = _workers()[worker_type].get_default_base_job_template()["variables"]
    preprocessed = preprocess_schema(variables, allow_none_with_default=True)["properties"]
    referring = [name for name, prop in variables["properties"].items() if "$ref" in prop]
    assert len(referring) >= 20, referring
    assert all(preprocessed[name] == variables["properties"][name] for name in referring)
    assert not [n for n, p in variables["properties"].items() if p.get("default", 0) is None]


@pytest.mark.parametrize("values", [
    {}, {"partition": "gpu", "nodes": 2, "time_limit": "1:00:00", "modules": ["cuda"], "het_job": False},
    {"run_dir": "/scratch/runs", "array_size_limit": 10, "execution": "direct", "env": {"A": "1"}},
    {"partition": None, "nodes": None},
])
def test_the_worker_gets_the_same_configuration(values):
    # Prefect's worker fills the configuration from the variables' non-null defaults
    # and the values; a placeholder without either is dropped and the configuration
    # field's own default applies: the same configuration as from Pydantic's schema.
    import asyncio

    worker = _workers()["xm-slurm"]
    template = worker.get_default_base_job_template()
    as_written = {**template, "variables": _pydantic_variables(worker)}

    def configuration(t):
        config = asyncio.run(worker.job_configuration.from_template_and_values(t, values, client=object()))
        return config.model_dump(mode="json")

    assert configuration(template) == configuration(as_written)


@pytest.mark.parametrize("variables,field,reason", [
    ({"nodes": 0}, "nodes", "less than the minimum of 1"),
    ({"nodes": "two"}, "nodes", "is not valid under any of the given schemas"),
    ({"time_limit": "1h"}, "time_limit", "does not match"),
    ({"execution": "both"}, "execution", "is not one of"),
    ({"modules": "cuda"}, "modules", "is not of type 'array'"),
    ({"array_size_limit": 0}, "array_size_limit", "less than the minimum of 1"),
])
def test_a_wrong_job_variable_is_named_by_the_server_and_before_submitting(variables, field, reason):
    import asyncio

    from prefect.server.api.validation import _validate_work_pool_job_variables
    from prefect.utilities.schema_tools import ValidationError

    from prefect_xm.core.deployments import validate_job_variables

    template = _workers()["xm-slurm"].get_default_base_job_template()
    # the server's check when a run is created from a deployment (no block reference
    # among the defaults, so no database session is needed)
    with pytest.raises(ValidationError) as server:
        asyncio.run(_validate_work_pool_job_variables(None, "hpc", template, {}, variables,
                                                      ignore_required=False, ignore_invalid_defaults=True))
    assert f"Validation failed for field '{field}'" in str(server.value)
    assert reason in str(server.value)
    # prefect-xm's own check, before anything of the work unit is submitted
    with pytest.raises(ValueError) as client:
        validate_job_variables("hpc", variables, template["variables"]["properties"],
                               template["variables"].get("definitions"))
    assert f"job variable {field!r}=" in str(client.value) and "'hpc'" in str(client.value)


def test_an_optional_job_variable_may_be_none():
    import asyncio

    from prefect.server.api.validation import _validate_work_pool_job_variables

    from prefect_xm.core.deployments import validate_job_variables

    template = _workers()["xm-slurm"].get_default_base_job_template()
    values = {"partition": None, "nodes": None, "gpus": None, "time_limit": None, "array_throttle": None}
    asyncio.run(_validate_work_pool_job_variables(None, "hpc", template, {}, values,
                                                  ignore_required=False, ignore_invalid_defaults=True))
    validate_job_variables("hpc", values, template["variables"]["properties"], template["variables"]["definitions"])
