"""What Prefect's server spends checking job variables each time a flow run is created from
a deployment, for each of our five pools' default base job templates and for Prefect's
own process pool. In-process, with Prefect's own functions; prints figures, asserts nothing.

    PYTHONPATH=. .venv/bin/python bench/job_variable_check_bench.py [--rounds 7] [--shapes]

Every `POST /deployments/{id}/create_flow_run` (and each run of the bulk route) calls
`validate_job_variables_for_deployment_flow_run` (prefect/server/api/validation.py), which
calls `_validate_work_pool_job_variables(..., ignore_required=False,
ignore_invalid_defaults=True)`. That is, per flow run:

  1. meta      `is_valid_schema(variables, preprocess=False)`: the pool's variables schema
               checked against the Draft 2020-12 metaschema;
  2. defaults  `_get_base_config_defaults`: for every variable with a "default", one
               `validate({name: default}, variables, preprocess=False, ignore_required=True)`,
               which first copies the whole schema without its "required" keys
               (`remove_nested_keys`) and builds a new validator;
  3. final     `validate(all_values, variables, raise_on_error=True, preprocess=True,
               allow_none_with_default=True)`: `preprocess_schema` (a deepcopy that turns
               every optional property with a "type" into anyOf[type, null]), then
               `jsonschema.validate`, which runs the metaschema check AGAIN, on the
               preprocessed schema, before it validates the values.

What is cached (prefect/utilities/schema_tools/validation.py, jsonschema 4.x): only the
validator *class* (`_VALIDATOR = _build_validator()`, built once at import). Nothing per
schema: no check_schema result, no validator instance, no preprocessed copy. Patterns are
strings in JSON Schema; jsonschema's `pattern` keyword and the metaschema's `format: regex`
go through `re.search`/`re.compile`, i.e. Python's own cache of compiled patterns, so a
pattern costs the same whether or not it was compiled before.

The metaschema check costs about the same for every subschema it meets (each one is
matched against the seven vocabularies of 2020-12 through `$dynamicRef`): `subschemas`
counts them as the check sees them, in the schema as stored (meta) and after Prefect's
preprocessing (final). `--shapes` prints the metaschema cost of one property by shape.

The deployment's job variables are those of prefect-xm's job-runner deployment
({"execution": "direct"} where the pool has it); the run's own are none.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any, Callable

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import jsonschema  # noqa: E402
from prefect._internal.schemas._registry import non_fetching_registry  # noqa: E402
from prefect.server.api.validation import _validate_work_pool_job_variables  # noqa: E402
from prefect.utilities.schema_tools.validation import (  # noqa: E402
    _VALIDATOR,
    is_valid_schema,
    preprocess_schema,
    validate,
)

# keywords whose value is one subschema / a list of subschemas / a map of subschemas
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties")
_LIST = ("anyOf", "allOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def subschemas(schema: Any) -> int:
    """How many (sub)schemas the metaschema check walks through in `schema`."""
    if not isinstance(schema, dict):
        return 1 if isinstance(schema, bool) else 0
    n = 1
    for key in _ONE:
        if key in schema:
            n += subschemas(schema[key])
    for key in _LIST:
        for sub in schema.get(key) or []:
            n += subschemas(sub)
    for key in _MAP:
        for sub in (schema.get(key) or {}).values():
            n += subschemas(sub)
    return n


def features(variables: dict[str, Any]) -> dict[str, Any]:
    properties = variables.get("properties") or {}
    defaults = [p.get("default") for p in properties.values() if "default" in p]

    def walk(schema: Any, key: str) -> int:
        if isinstance(schema, dict):
            return (key in schema) + sum(walk(v, key) for v in schema.values())
        if isinstance(schema, list):
            return sum(walk(v, key) for v in schema)
        return 0

    return {
        "variables": len(properties),
        "defaults": len(defaults),
        "null defaults": sum(d is None for d in defaults),
        "anyOf": walk(variables, "anyOf"),
        "patterns": walk(variables, "pattern"),
        "$defs": len(variables.get("$defs") or {}) + len(variables.get("definitions") or {}),
        "$refs": walk(variables, "$ref"),
        "subschemas meta": subschemas(variables),
        "subschemas final": subschemas(preprocess_schema(variables, allow_none_with_default=True)),
    }


def timed(fn: Callable[[], Any], rounds: int, min_seconds: float = 0.2) -> float:
    """The best over `rounds` of the mean CPU ms per call, each round at least min_seconds.
    CPU time of this process, not wall time, and the best round: on a machine whose cores
    others are using, a round that shared its core runs slower even in CPU time (the
    check is single-threaded and does no I/O)."""
    fn()
    t0 = time.process_time()
    fn()
    once = max(time.process_time() - t0, 1e-4)
    n = max(1, int(min_seconds / once))
    results = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        results.append((time.process_time() - t0) / n * 1000)
    return min(results)


def templates() -> dict[str, dict[str, Any]]:
    from prefect.workers.process import ProcessWorker

    from prefect_xm.workers.htcondor import HTCondorWorker
    from prefect_xm.workers.lsf import LsfWorker
    from prefect_xm.workers.pbs import PbsWorker
    from prefect_xm.workers.sge import SgeWorker
    from prefect_xm.workers.slurm import SlurmWorker

    return {w.type: w.get_default_base_job_template()
            for w in (SlurmWorker, SgeWorker, PbsWorker, LsfWorker, HTCondorWorker, ProcessWorker)}


def measure(name: str, template: dict[str, Any], rounds: int) -> dict[str, float]:
    variables = template["variables"]
    properties = variables.get("properties") or {}
    deployment_vars = {"execution": "direct"} if "execution" in properties else {}
    run_vars: dict[str, Any] = {}

    def whole() -> None:
        # exactly the server's call for a flow run created from a deployment (no DB
        # access: only a default that is a block reference would read one)
        asyncio.run(_validate_work_pool_job_variables(
            None, name, template, deployment_vars, run_vars,  # type: ignore[arg-type]
            ignore_required=False, ignore_invalid_defaults=True))

    # the steps one by one, as _validate_work_pool_job_variables runs them
    defaults = {k: p["default"] for k, p in properties.items() if "default" in p}

    def per_default() -> None:
        for key, value in defaults.items():
            validate({key: value}, variables, raise_on_error=False, preprocess=False,
                     ignore_required=True, allow_none_with_default=False)

    all_vars = {**defaults, **deployment_vars, **run_vars}
    preprocessed = preprocess_schema(variables, allow_none_with_default=True)

    def final_instance() -> None:
        validator = _VALIDATOR(preprocessed, registry=non_fetching_registry())
        assert jsonschema.exceptions.best_match(validator.iter_errors(all_vars)) is None

    out = {
        "meta": timed(lambda: is_valid_schema(variables, preprocess=False), rounds),
        "defaults": timed(per_default, rounds) if defaults else 0.0,
        "preprocess": timed(lambda: preprocess_schema(variables, allow_none_with_default=True), rounds),
        "final meta": timed(lambda: _VALIDATOR.check_schema(preprocessed), rounds),
        "final values": timed(final_instance, rounds),
    }
    out["sum"] = sum(out.values())
    # what a run would cost if the pool's schema were checked once, when the pool is saved
    out["w/o meta"] = out["sum"] - out["meta"] - out["final meta"]
    # asyncio.run() adds ~0.1 ms of event loop to every call of the whole check
    out["whole"] = timed(whole, rounds) - timed(lambda: asyncio.run(asyncio.sleep(0)), rounds)
    return out


def shapes(rounds: int) -> None:
    """Metaschema cost of one variable, by how it is written (30 of them, minus an empty schema)."""
    text = {"title": "A title", "description": "A sentence or two about the variable."}
    cases = {
        "str": {"type": "string"},
        "str + default": {"type": "string", "default": "x"},
        "str + pattern": {"type": "string", "pattern": "^[0-9]+[KMGT]?$"},
        "Optional[str] (anyOf + null)": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "int + minimum": {"type": "integer", "minimum": 1},
        "enum": {"type": "string", "enum": ["a", "b"]},
        "list[str]": {"type": "array", "items": {"type": "string"}},
        "$ref to a definition": {"$ref": "#/definitions/S"},
    }
    empty = timed(lambda: is_valid_schema({"type": "object", "properties": {}}, preprocess=False), rounds)
    print("\nmetaschema check, ms per variable (the same again in the final check after preprocessing):")
    for label, shape in cases.items():
        schema: dict[str, Any] = {"type": "object",
                                  "properties": {f"v{i}": {**shape, **text} for i in range(30)}}
        if "$ref" in shape:
            schema["definitions"] = {"S": {"type": "string"}}
        ms = (timed(lambda: is_valid_schema(schema, preprocess=False), rounds) - empty) / 30
        print(f"  {label:32s} {ms:6.3f}   ({subschemas(schema['properties']['v0'])} subschema(s), "
              f"{subschemas(preprocess_schema(schema, allow_none_with_default=True)['properties']['v0'])} "
              f"after preprocessing)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", action="store_true", help="also the cost of one variable by shape")
    args = parser.parse_args()

    from importlib.metadata import version

    print(f"prefect {version('prefect')}, jsonschema {version('jsonschema')}; CPU ms per flow-run check, "
          f"best of {args.rounds} rounds; load average {os.getloadavg()[0]:.1f}")
    steps = ["meta", "defaults", "preprocess", "final meta", "final values", "sum", "whole", "w/o meta"]
    feats = ["variables", "defaults", "null defaults", "anyOf", "patterns", "$defs", "$refs",
             "subschemas meta", "subschemas final"]
    rows = []
    for name, template in templates().items():
        rows.append((name, measure(name, template, args.rounds), features(template["variables"])))
    print(f"\n{'pool type':12s}" + "".join(f"{s:>13s}" for s in steps))
    for name, ms, _ in rows:
        print(f"{name:12s}" + "".join(f"{ms[s]:13.2f}" for s in steps))
    print(f"\n{'pool type':12s}" + "".join(f"{f:>17s}" for f in feats))
    for name, _, feat in rows:
        print(f"{name:12s}" + "".join(f"{feat[f]:17d}" for f in feats))
    print("\nmeta/final meta: metaschema checks; defaults: all per-default validations together; "
          "whole: _validate_work_pool_job_variables itself; w/o meta: sum without both metaschema checks")
    if args.shapes:
        shapes(args.rounds)


if __name__ == "__main__":
    main()
