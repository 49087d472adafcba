"""The job variables' JSON schema as a pool stores it, written to be cheap for Prefect's server.

Prefect's server checks a flow run's job variables against its pool's variables schema each
time it creates a run from a deployment (prefect/server/api/validation.py). That check runs
the Draft 2020-12 metaschema over the pool's schema twice, once as stored and once after
`preprocess_schema` has turned every optional property with a "type" into anyOf[type, null];
and it validates the whole schema once more for every variable with a "default". The
metaschema pass costs about the same for every subschema it meets, so the cost of a run
grows with how many subschemas the pool's schema has, not with what they say
(bench/job_variable_check_bench.py measures it).

Pydantic writes each variable with its type inline: `Optional[str]` as anyOf[{"type":
"string"}, {"type": "null"}] (three subschemas), and every variable with a default, None
included. `compact` rewrites that, with the same meaning for every value and the same form
in the UI:

- a type that several variables share goes to one definition that each of them refers to
  ($ref). Both of Prefect's UIs show a $ref'd property as the definition merged with the
  property's own keys, which gives back exactly the property Pydantic wrote, so the form
  and its checks (an int's minimum becomes the input's min) are the same. And
  `preprocess_schema` leaves a property without a "type" as it is, so such a variable is
  one subschema in both passes, not one and then three;
- a type only one variable has (an Optional with a pattern of its own) stays inline: a
  definition of its own would cost as much or more;
- `"default": null` is dropped: Prefect's worker never uses a None default (the
  configuration field's own default applies) and the server's one validation of it is all
  it did. A default that is a value stays: the form shows it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

#: what makes a required (not Optional) variable's type, shared in its definition; its
#: checks (minimum, enum...) stay beside the $ref
_SHAPE = ("type", "items", "additionalProperties")
_NULL = {"type": "null"}


def _name(shape: dict[str, Any]) -> str:
    """A definition's name, from what it allows: "string", "string_or_null",
    "array_of_string", "integer_minimum_1_or_null"..."""
    if "anyOf" in shape:
        return "_or_".join(_name(option) for option in shape["anyOf"])
    parts = [str(shape.get("type"))]
    for keyword in ("items", "additionalProperties"):
        if isinstance(shape.get(keyword), dict):
            parts.append(f"of_{_name(shape[keyword])}")
    for keyword in sorted(set(shape) - set(_SHAPE)):
        value = shape[keyword]
        if isinstance(value, (bool, int, float)):
            parts.append(f"{keyword}_{json.dumps(value)}")
        else:
            parts.append(f"{keyword}_{hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]}")
    return "_".join(parts)


def _split(variable: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the variable's type, the rest of it), such that {**type, **rest} is the variable."""
    options = variable.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and _NULL in options:
        # an Optional: its checks stay in the anyOf, where the UIs look for them
        return {"anyOf": options}, {k: v for k, v in variable.items() if k != "anyOf"}
    if isinstance(variable.get("type"), str) and "$ref" not in variable:
        return ({k: variable[k] for k in _SHAPE if k in variable},
                {k: v for k, v in variable.items() if k not in _SHAPE})
    return {}, variable


def compact(schema: dict[str, Any]) -> dict[str, Any]:
    """The variables schema (Prefect's `BaseVariables.model_json_schema()`) with the types
    that variables share in definitions (see the module's docstring)."""
    schema = copy.deepcopy(schema)
    properties: dict[str, Any] = schema.get("properties", {})
    for variable in properties.values():
        if "default" in variable and variable["default"] is None:
            del variable["default"]
    split = {name: _split(variable) for name, variable in properties.items()}
    uses: dict[str, int] = {}
    for shape, _ in split.values():
        if shape:
            uses[_name(shape)] = uses.get(_name(shape), 0) + 1
    definitions: dict[str, Any] = schema.setdefault("definitions", {})
    for name, (shape, rest) in split.items():
        ref = _name(shape) if shape else ""
        # A type only one variable has stays inline: a $ref to a definition of its own
        # costs as much (a required type: 1 + 3 subschemas inline, 2 + 2 so) or more.
        if not shape or uses[ref] < 2:
            continue
        if definitions.get(ref, shape) != shape:
            continue  # a definition by that name says something else: leave it inline
        definitions[ref] = shape
        properties[name] = {"$ref": f"#/definitions/{ref}", **rest}
    if not definitions:
        del schema["definitions"]
    return schema
