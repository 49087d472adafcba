"""The worker reference, generated at build time (an mkdocs hook, see mkdocs.yml).

Every job variable of every batch worker type is declared once, on its job configuration
(prefect_xm/workers/*.py), with its title and description; the pool's JSON schema is made
from it. This hook renders that schema as one table per worker type, so the reference
cannot drift from the code and nothing in it is written by hand.

The directive column is read from the code as well:

- the batch-script template's lines that use the variable (`{{ name }}`, or an enclosing
  `{% if name %}` / `{% for x in name %}`), as the template writes them;
- for a scheduler whose submission is more than the script (HTCondor's submit
  description, sent on stdin), the lines that setting the variable adds to what
  `Scheduler.submit_stdin` sends.

tests/test_docs.py imports this module: the reference must name every variable.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional

#: where the reference goes: a page holding this line gets the tables in its place
MARKER = "<!-- worker-reference -->"

_COMMENT = re.compile(r"{#.*?#}", re.S)
_TAG = re.compile(r"{%-?\s*(.*?)\s*-?%}")
_EXPRESSION = re.compile(r"{{-?\s*(.*?)\s*-?}}")
_STRING = re.compile(r"'[^']*'|\"[^\"]*\"")
_FILTER = re.compile(r"\|\s*[A-Za-z_]\w*")
_NAME = re.compile(r"[A-Za-z_]\w*")

#: names the worker puts in the template's context beside the job variables
#: (submission.py, render_script), and the variable each is made from
DERIVED = {
    "stdout_path": "run_dir",
    "stderr_path": "run_dir",
    "env_file": "run_dir",
    "command_argv": "command",
}


def worker_types() -> list[type]:
    """Every batch worker type the package defines (a new scheduler's worker shows up here
    without a change)."""
    from prefect_xm.workers import batch_worker_types

    return batch_worker_types()


def variables_schema(worker: type) -> dict[str, Any]:
    """The pool's variables schema, as `prefect work-pool create --type ...` stores it."""
    return worker.get_default_base_job_template()["variables"]


def _resolved(prop: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    ref = prop.get("$ref")
    if not ref:
        return prop
    base = definitions[ref.rsplit("/", 1)[-1]]
    return {**base, **{k: v for k, v in prop.items() if k != "$ref"}}


def type_text(prop: dict[str, Any], definitions: dict[str, Any]) -> str:
    prop = _resolved(prop, definitions)
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    if "anyOf" in prop:
        options = [o for o in prop["anyOf"] if o.get("type") != "null"]
        text = " or ".join(type_text(o, definitions) for o in options)
        return f"{text}, or empty" if len(options) < len(prop["anyOf"]) else text
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {type_text(prop.get('items') or {}, definitions)}"
    if kind == "object":
        return "mapping"
    if "minimum" in prop:
        return f"{kind} ≥ {prop['minimum']}"
    return str(kind)


def _pattern(prop: dict[str, Any], definitions: dict[str, Any]) -> Optional[str]:
    prop = _resolved(prop, definitions)
    for option in [prop, *prop.get("anyOf", [])]:
        if option.get("pattern"):
            return option["pattern"]
    return None


def default_text(name: str, prop: dict[str, Any], configuration: type) -> str:
    """The default the form shows; else the configuration's own (the schema leaves out
    None and the defaults made by a factory)."""
    if "default" in prop:
        value = prop["default"]
    elif name in configuration.model_fields:
        value = configuration.model_fields[name].get_default(call_default_factory=True)
    else:
        value = None
    if value is None or value == "":
        return ""
    return f"`{json.dumps(value)}`"


# -- the directive each variable becomes ------------------------------------------------


def _names(expression: str) -> set[str]:
    expression = _FILTER.sub(" ", _STRING.sub(" ", expression))
    return set(_NAME.findall(expression))


def template_lines(template: str, templates: Path) -> list[tuple[str, set[str]]]:
    """The template's output lines as it writes them, each with the names it depends on:
    those it uses, those of the `if`/`for` blocks around it, through `set` and loop
    variables, and through `include`d templates."""
    aliases: dict[str, set[str]] = {}
    out: list[tuple[str, set[str]]] = []

    def expand(names: Iterable[str]) -> set[str]:
        result: set[str] = set()
        for n in names:
            result |= aliases.get(n, {n})
        return result

    def walk(text: str, outer: set[str]) -> None:
        blocks: list[set[str]] = []
        for raw in _COMMENT.sub("", text).splitlines():
            line = raw.strip()
            tag = _TAG.fullmatch(line)
            if tag:
                words = tag.group(1).split(None, 1)
                keyword, rest = words[0], words[1] if len(words) > 1 else ""
                if keyword == "if":
                    blocks.append(expand(_names(rest)))
                elif keyword == "elif":
                    blocks[-1] = blocks[-1] | expand(_names(rest))
                elif keyword == "for":
                    target, _, source = rest.partition(" in ")
                    names = expand(_names(source))
                    aliases[target.strip()] = names
                    blocks.append(names)
                elif keyword in ("endif", "endfor"):
                    blocks.pop()
                elif keyword == "set":
                    target, _, value = rest.partition("=")
                    aliases[target.strip()] = expand(_names(value))
                elif keyword == "include":
                    walk((templates / rest.strip().strip("'\"")).read_text(),
                         outer.union(*blocks) if blocks else set(outer))
                continue
            if not line:
                continue
            used: set[str] = set()
            for expression in _EXPRESSION.findall(line) + _TAG.findall(line):
                used |= expand(_names(expression))
            out.append((line, used | outer | (set().union(*blocks) if blocks else set())))

    walk(template, set())
    return out


def script_directives(worker: type) -> dict[str, list[str]]:
    """Per variable: the lines of the worker's default batch script(s) that use it."""
    import prefect_xm.workers

    templates = Path(prefect_xm.workers.__file__).parent / "templates"
    names = {worker.scheduler.template_name}
    # a worker type with dialects (xm-pbs) may use one template per dialect
    dialect = worker.job_configuration.model_fields.get("dialect")
    if dialect is not None:
        import typing

        for choice in typing.get_args(dialect.annotation):
            scheduler = worker.scheduler_for(worker, worker.job_configuration.model_construct(dialect=choice))
            names.add(scheduler.template_name)
    found: dict[str, list[str]] = {}
    for template in sorted(names):
        for line, used in template_lines((templates / template).read_text(), templates):
            if line.startswith("#!") or line.startswith("# prefect flow run"):
                continue
            for name in used:
                variable = DERIVED.get(name, name)
                if line not in found.setdefault(variable, []):
                    found[variable].append(line)
    return found


def _samples(prop: dict[str, Any], name: str) -> Iterable[Any]:
    """Values to set a variable to, to see what it adds; the first the scheduler takes is used."""
    kinds = {o.get("type") for o in [prop, *prop.get("anyOf", [])]}
    if "boolean" in kinds:
        yield True
    elif "array" in kinds:
        yield [f"<{name}>"]
    else:
        yield f"<{name}>"
        # a value the scheduler computes with (a duration, a count), in its own syntax
        yield from ("1:30:00", "90", "16GB", 4)


#: stand-ins for the worker's own names in a submission (SubmitRequest): the job name
#: (made from job_name) and the run's directory (made from run_dir)
JOB_NAME, RUN_DIR = "<job name>", "<run dir>"


def _request(variables: dict[str, Any], array_size: int = 0, array_throttle: Optional[int] = None,
             job_name: str = JOB_NAME):
    from prefect_xm.workers.scheduler import SubmitRequest

    return SubmitRequest(script_path=f"{RUN_DIR}/job.sh", script="", job_name=job_name, run_dir=RUN_DIR,
                         variables=variables, array_size=array_size, array_throttle=array_throttle)


def submission_directives(worker: type, schema: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Per variable: (line, note) pairs: what setting it adds to what the submit command
    reads on stdin, when that is more than the script (HTCondor's submit description);
    and for array_throttle, what it adds to an array's submission."""
    scheduler = worker.scheduler
    base = worker.job_configuration.model_construct().model_dump(exclude={"env"})

    def stdin(variables: dict[str, Any], **array: Any) -> list[str]:
        text = scheduler.submit_stdin(_request(variables, **array))
        return [] if not text else text.splitlines()

    found: dict[str, list[tuple[str, str]]] = {}
    baseline = stdin(base)
    for line in baseline:
        # the job name and the run's directory come from job_name and run_dir
        for name, sentinel in (("job_name", JOB_NAME), ("run_dir", RUN_DIR)):
            if sentinel in line and name in schema["properties"]:
                found.setdefault(name, []).append((line, "submit description"))
    definitions = schema.get("definitions") or {}
    # (a scheduler that reads only the script on stdin, or nothing, adds no lines of its own)
    for name, prop in (schema["properties"].items() if baseline else ()):
        for value in _samples(_resolved(prop, definitions), name):
            try:
                lines = stdin({**base, name: value})
            except (ValueError, TypeError):
                continue
            added = [line for line in lines if line not in baseline]
            if added:
                note = f"for `{value}`" if value not in (True, f"<{name}>", [f"<{name}>"]) else ""
                found.setdefault(name, []).extend(
                    (line, ("submit description, " + note) if note else "submit description") for line in added)
            break
    # array_throttle: the worker passes it to the array's submission (submission.py)
    if "array_throttle" in schema["properties"] and getattr(scheduler, "array_throttles", False):
        size, throttle = 10, 4
        # (a plain name: LSF puts it into the array's -J spec)
        argv = scheduler.array_submit_argv(_request(base, size, job_name="NAME"), size, None)
        throttled = scheduler.array_submit_argv(_request(base, size, throttle, job_name="NAME"), size, throttle)
        note = f"an array of {size}, array_throttle {throttle}"
        if throttled != argv:
            found.setdefault("array_throttle", []).append((" ".join(throttled), "array submit command, " + note))
        added = [line for line in stdin(base, array_size=size, array_throttle=throttle)
                 if line not in stdin(base, array_size=size)]
        found.setdefault("array_throttle", []).extend((line, "submit description, " + note) for line in added)
    return found


# -- the page ------------------------------------------------------------------------------


_CODE_SPAN = re.compile(r"(`+).+?\1")


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line; outside code spans, no bare pipe and no
    `<...>` that Markdown would take for an HTML tag ("-pe <pe> N"). Code spans stay as
    they are: Markdown escapes them itself, and the table extension leaves their pipes
    alone (it would show a backslash there)."""
    def plain(part: str) -> str:
        return html.escape(part, quote=False).replace("|", "\\|")

    text = " ".join(str(text).split())
    out, at = [], 0
    for span in _CODE_SPAN.finditer(text):
        out.append(plain(text[at:span.start()]))
        out.append(span.group(0))
        at = span.end()
    out.append(plain(text[at:]))
    return "".join(out)


def _code(line: str) -> str:
    # a code span holding backticks needs a longer fence
    fence = "``" if "`" in line else "`"
    return f"{fence}{line}{fence}"


def worker_table(worker: type) -> str:
    schema = variables_schema(worker)
    definitions = schema.get("definitions") or {}
    script = script_directives(worker)
    submission = submission_directives(worker, schema)
    prefix = worker.scheduler.directive_prefix
    rows = [
        "| variable | title | type | default | description | becomes |",
        "|---|---|---|---|---|---|",
    ]
    for name, prop in schema["properties"].items():
        title, description = prop.get("title"), prop.get("description")
        if not str(title or "").strip() or not str(description or "").strip():
            # the pool's form would show a bare name: every variable is documented where declared
            raise ValueError(f"{worker.type}: job variable {name!r} has no title or description")
        pattern = _pattern(prop, definitions)
        if pattern:
            description = f"{description} Pattern: {_code(pattern)}"
        becomes = [_code(line) for line in script.get(name, [])]
        becomes += [f"{_code(line)} ({note})" for line, note in submission.get(name, [])]
        rows.append("| " + " | ".join([
            f"`{name}`", _cell(title), _cell(type_text(prop, definitions)),
            _cell(default_text(name, prop, worker.job_configuration)), _cell(description),
            "<br>".join(_cell(b) for b in becomes) or "—",
        ]) + " |")
    script_is_all = not submission or set(submission) == {"array_throttle"}
    intro = (
        f"{html.escape(getattr(worker, '_display_name', '') or worker.__name__)}: "
        f"`{worker.__module__}.{worker.__qualname__}`, its variables declared on "
        f"`{worker.job_configuration.__name__}`. Batch script: "
        f"`prefect_xm/workers/templates/{worker.scheduler.template_name}`"
        + (f", directives `{prefix}`." if script_is_all else
           "; the worker generates the submit description from the variables and sends it on stdin.")
    )
    return f"## `{worker.type}`\n\n{intro}\n\n" + "\n".join(rows) + "\n"


def reference_markdown() -> str:
    """One table per worker type: variable, title, type, default, description, and the
    script or submit-description lines it becomes."""
    workers = worker_types()
    index = "Worker types: " + ", ".join(f"[`{w.type}`](#{w.type})" for w in workers) + ".\n\n"
    return index + "\n".join(worker_table(worker) for worker in workers)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """mkdocs hook: the reference in place of the marker."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference_markdown())
