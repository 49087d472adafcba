"""The ``prefect-xm`` command line, on the conventions of Prefect's own (cyclopts, which
Prefect's CLI is built on, and rich tables).

    prefect-xm launch SCRIPT [-- SCRIPT FLAGS]    run a launch script, show progress and results
    prefect-xm list [--limit N] [--json]          experiments, newest first
    prefect-xm show EXPERIMENT [--json]           work units, args, states, jobs
    prefect-xm logs EXPERIMENT UNIT [--follow]    a unit's job logs, in order
    prefect-xm stop EXPERIMENT                    cancel every work unit of an experiment

Exit codes: EXIT_CODES below (the help's epilogue says them).

Without PREFECT_API_URL, Prefect's embedded server is used (its database is in
PREFECT_HOME, ~/.prefect by default, so `list` and `show` find earlier experiments).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from typing import Annotated, Any, Optional, Sequence

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import cyclopts  # noqa: E402  (Prefect's CLI is built on it: a dependency of Prefect's)
from cyclopts import Parameter  # noqa: E402
from prefect.client.schemas.objects import StateType  # noqa: E402

#: 0 ok; 1 a work unit failed; 2 a usage error or something not found; 130 interrupted
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130

EXIT_CODES = (
    "Exit codes: 0 ok; 1 a work unit failed, crashed or was cancelled (launch, logs --follow), or the launch "
    "script raised; 2 usage error, or no such script, experiment or unit; 130 interrupted (Ctrl-C)."
)

_STATE_STYLES = {
    StateType.COMPLETED: "green", StateType.FAILED: "red", StateType.CRASHED: "red", StateType.CANCELLED: "yellow",
    StateType.CANCELLING: "yellow", StateType.RUNNING: "cyan", StateType.PENDING: "dim", StateType.SCHEDULED: "dim",
}


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(file=stream, width=None if tty else 200, highlight=False, soft_wrap=not tty)


def _style(state: str) -> str:
    """The style of a state, by its name (Cancelling, Late, AwaitingRetry...): that of
    the state type its name begins like."""
    key = state.upper()
    for k, v in _STATE_STYLES.items():
        if key.startswith(k.value[:6]):
            return v
    return ""


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, default=str), flush=True)


def _error(command: str, message: str) -> None:
    print(f"prefect-xm {command}: {message}", file=sys.stderr, flush=True)


def results_table(overview: dict[str, Any]):
    from rich.table import Table

    title = (f"experiment {overview['experiment_id']} \u2014 {overview['title']}: "
             f"{overview['state']} ({overview['duration']})")
    table = Table(title=title, title_justify="left")
    table.add_column("WU", justify="right")
    table.add_column("args")
    table.add_column("state")
    table.add_column("duration", justify="right")
    table.add_column("jobs")
    table.add_column("message", overflow="fold")
    for row in overview["work_units"]:
        table.add_row(str(row["work_unit"]), row["args"], f"[{_style(row['state'])}]{row['state']}[/]",
                      row["duration"], row.get("jobs", ""), row.get("message", ""))
    return table


def _overview(experiment) -> dict[str, Any]:
    from prefect_xm.core import store
    from prefect_xm.core.runtime import Runtime
    from prefect_xm.core.summary import experiment_overview, job_states_by_work_unit

    async def go():
        ov = await experiment_overview(experiment)
        per_wu = await job_states_by_work_unit(await store.client(), experiment.experiment_id)
        for row in ov["work_units"]:
            row["jobs"] = " ".join(per_wu.get(str(row["work_unit"]), []))
        return ov

    return Runtime.get().run(go())


def _progress(experiment, counts: dict[str, int]) -> None:
    from prefect_xm.core.summary import work_units_done

    total = sum(counts.values())
    done = work_units_done(counts)
    parts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    _console(stderr=True).print(
        f"[bold]{experiment.experiment_title}[/] ({experiment.experiment_id}): {done}/{total} work units done \u2014 {parts}")


def _experiment(command: str, experiment_id: str):
    """The experiment of that id, or None (said on stderr)."""
    from prefect_xm.core.api import get_experiment

    try:
        return get_experiment(experiment_id)
    except ValueError as e:
        _error(command, str(e))
        return None


# ------------------------------------------------------------------------ commands


def cmd_launch(script: str, script_args: Sequence[str]) -> int:
    from prefect_xm.core import api, experiment as experiment_module, summary

    path = os.path.abspath(script)
    if not os.path.isfile(path):
        _error("launch", f"no such file: {script}")
        return USAGE
    summary.PROGRESS_HOOK = _progress
    # The whole script runs; its exit code is decided here, from every experiment's end.
    experiment_module.END_PROGRAM_THAT_FAILED = False
    old_argv = sys.argv
    sys.argv = [path, *script_args]
    sys.path.insert(0, os.path.dirname(path))
    code = OK
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (OK if e.code is None else FAILED)
    except KeyboardInterrupt:
        _error("launch", "interrupted; the experiment's work units were stopped")
        code = INTERRUPTED
    except Exception:
        import traceback

        traceback.print_exc()
        _error("launch", f"{script} raised; its experiments' work units were stopped")
        code = FAILED
    finally:
        sys.argv = old_argv
        summary.PROGRESS_HOOK = None
        experiment_module.END_PROGRAM_THAT_FAILED = True
    console = _console()
    ends = []
    for experiment in api.OPENED:
        if experiment.refused:  # (its run is not kept: nothing to show)
            console.print(f"experiment {experiment.experiment_id} \u2014 {experiment.experiment_title}: "
                          f"[yellow]{experiment.refused}[/]")
            continue
        ov = _overview(experiment)
        console.print(results_table(ov))
        ends.append(ov["state_type"])
    return code or summary.launch_exit_code(ends)


def cmd_list(limit: Optional[int], as_json: bool = False) -> int:
    from rich.table import Table

    from prefect_xm.core.api import list_experiments
    from prefect_xm.core.launcher import GONE_MESSAGE
    from prefect_xm.core.runtime import Runtime
    from prefect_xm.core.summary import experiment_document, experiment_overview

    experiments = list_experiments(limit=limit)
    if as_json:
        async def documents():
            return [await experiment_document(e, with_units=False) for e in experiments]

        _print_json({"experiments": Runtime.get().run(documents())})
        return OK
    table = Table(title="experiments", title_justify="left")
    for col in ("ID", "title", "state", "work units", "created", "duration"):
        table.add_column(col)
    for e in experiments:
        ov = Runtime.get().run(experiment_overview(e))
        counts: dict[str, int] = {}
        for row in ov["work_units"]:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        wu_text = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "-"
        created = ov["created"].strftime("%Y-%m-%d %H:%M:%S") if ov["created"] else "-"
        state = ov["state"] + (" (launcher gone)" if ov["message"].startswith(GONE_MESSAGE) else "")
        table.add_row(str(e.experiment_id), e.experiment_title, f"[{_style(ov['state'])}]{state}[/]",
                      wu_text, created, ov["duration"])
    _console().print(table)
    return OK


def cmd_show(experiment_id: str, as_json: bool = False) -> int:
    from prefect_xm.core.runtime import Runtime
    from prefect_xm.core.summary import experiment_document

    experiment = _experiment("show", experiment_id)
    if experiment is None:
        return USAGE
    if as_json:
        _print_json(Runtime.get().run(experiment_document(experiment, with_units=True)))
        return OK
    ov = _overview(experiment)
    console = _console()
    console.print(results_table(ov))
    console.print(f"flow run: {ov['flow_run_id']}" + (f" \u2014 {ov['message']}" if ov["message"] else ""))
    return OK


def cmd_stop(experiment_id: str) -> int:
    experiment = _experiment("stop", experiment_id)
    if experiment is None:
        return USAGE
    _console(stderr=True).print(f"stopping experiment {experiment.experiment_id} ({experiment.experiment_title})...")
    experiment.stop()
    _console().print(results_table(_overview(experiment)))
    return OK


#: logs read per request; seconds a log may reach the server after a later one (re-read
#: while following, for a job whose logs are shipped in batches)
LOG_PAGE = 200
LOG_LATENESS_SECONDS = 30.0


def _unit_ref(unit: str) -> Optional[tuple[str, int]]:
    """(kind, id) of UNIT: `3` is work unit 3, `aux1` auxiliary unit 1; None otherwise."""
    from prefect_xm.core import store

    text = unit.strip().lower()
    for prefix, kind in (("aux", store.KIND_AUXILIARY_UNIT), ("wu", store.KIND_WORK_UNIT), ("", store.KIND_WORK_UNIT)):
        rest = text[len(prefix):]
        if text.startswith(prefix) and rest.isdigit():
            return kind, int(rest)
    return None


async def _print_unit_logs(experiment, kind: str, unit_id: int, follow: bool) -> int:
    """Prints the logs of a unit's job runs, oldest first, each line as its launcher
    streams it (`[wu1/train] ...`); following, until the unit and its jobs have ended
    (then its end decides the exit code)."""
    import asyncio
    import datetime

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort

    from prefect_xm.core import store, summary
    from prefect_xm.core.orchestration import POLL_SECONDS

    client = await store.client()
    tag = store.unit_tag(kind, unit_id)
    label = f"{'aux' if kind == store.KIND_AUXILIARY_UNIT else 'wu'}{unit_id}"
    seen: dict[Any, datetime.datetime] = {}  # log id -> its timestamp
    after: Optional[datetime.datetime] = None
    ended_before = False
    while True:
        units = await store.experiment_runs(client, experiment.experiment_id, kind, tag)
        if not units:
            what = "auxiliary unit" if kind == store.KIND_AUXILIARY_UNIT else "work unit"
            _error("logs", f"experiment {experiment.experiment_id} has no {what} {unit_id}")
            return USAGE
        jobs = await store.experiment_runs(client, experiment.experiment_id, store.KIND_JOB, tag)
        ended = store.state_type(units[0]) in store.FINAL and all(store.state_type(j) in store.FINAL for j in jobs)
        names = {j.id: store.job_key_of(j) or j.name for j in jobs}
        offset = 0
        while names:
            page = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(names)),
                                     timestamp=LogFilterTimestamp(after_=after) if after else None),
                limit=LOG_PAGE, offset=offset, sort=LogSort.TIMESTAMP_ASC)
            for entry in page:
                if entry.id not in seen:
                    seen[entry.id] = entry.timestamp
                    print(f"[{label}/{names.get(entry.flow_run_id, '?')}] {entry.message}", flush=True)
            if len(page) < LOG_PAGE:
                break
            offset += len(page)
        if not follow:
            return OK
        if ended_before:
            return summary.launch_exit_code([store.state_type(units[0])])
        ended_before = ended  # (one more read a poll later: a job's last logs may follow its end)
        if seen:
            after = max(seen.values()) - datetime.timedelta(seconds=LOG_LATENESS_SECONDS)
            seen = {i: t for i, t in seen.items() if t >= after}
        await asyncio.sleep(POLL_SECONDS)


def cmd_logs(experiment_id: str, unit: str, follow: bool = False) -> int:
    from prefect_xm.core.runtime import Runtime

    ref = _unit_ref(unit)
    if ref is None:
        _error("logs", f"UNIT is a work unit id (3) or an auxiliary unit's (aux1), not {unit!r}")
        return USAGE
    experiment = _experiment("logs", experiment_id)
    if experiment is None:
        return USAGE
    return Runtime.get().run(_print_unit_logs(experiment, ref[0], ref[1], follow))


# ------------------------------------------------------------------------ the app

app = cyclopts.App(
    name="prefect-xm",
    help="XManager-style experiments on Prefect: run launch scripts, list, show, follow and stop experiments.",
    help_epilogue=EXIT_CODES,
    version_flags=[],
    exit_on_error=False,  # (usage errors exit 2, said in main)
    result_action="return_value",
    suppress_keyboard_interrupt=False,
)

_JSON = Parameter(name="--json", negative="", help="Print a JSON document (stable keys, for scripts).")


@app.command
def launch(script: str, /, *script_args: Annotated[str, Parameter(allow_leading_hyphen=True, name="SCRIPT-FLAGS")]
           ) -> int:
    """Run a launch script, show its progress, then its experiments' results.

    Its exit code is 1 when a work unit did not complete.

    Parameters
    ----------
    script
        The launch script (Python file).
    script_args
        Flags for the script, after `--` (as `prefect-xm launch sweep.py -- --lr=0.1`).
    """
    args = list(script_args)
    return cmd_launch(script, args[1:] if args[:1] == ["--"] else args)


@app.command(name="list")
def list_(*, limit: int = 50, as_json: Annotated[bool, _JSON] = False) -> int:
    """List experiments, newest first.

    Parameters
    ----------
    limit
        At most this many experiments.
    """
    return cmd_list(limit, as_json)


@app.command
def show(experiment: str, /, *, as_json: Annotated[bool, _JSON] = False) -> int:
    """Show an experiment's work units: args, states, jobs.

    Parameters
    ----------
    experiment
        The experiment's id (or its flow run's id).
    """
    return cmd_show(experiment, as_json)


@app.command
def logs(experiment: str, unit: str, /, *, follow: Annotated[bool, Parameter(alias="-f", negative="")] = False) -> int:
    """Print the logs of a unit's jobs, oldest first.

    Parameters
    ----------
    experiment
        The experiment's id (or its flow run's id).
    unit
        The work unit's id (3), or an auxiliary unit's (aux1).
    follow
        Keep printing new logs until the unit and its jobs have ended; exit 1 when it did not complete.
    """
    return cmd_logs(experiment, unit, follow)


@app.command
def stop(experiment: str, /) -> int:
    """Cancel every work unit of an experiment.

    Parameters
    ----------
    experiment
        The experiment's id (or its flow run's id).
    """
    return cmd_stop(experiment)


def main(argv: Optional[Sequence[str]] = None) -> int:
    tokens = list(sys.argv[1:] if argv is None else argv)
    if not tokens:  # (a command is required)
        app.help_print([])
        return USAGE
    try:
        code = app(tokens)
    except cyclopts.CycloptsError:  # (cyclopts has said what was wrong)
        return USAGE
    except KeyboardInterrupt:
        return INTERRUPTED
    return code if isinstance(code, int) else OK


if __name__ == "__main__":
    sys.exit(main())
