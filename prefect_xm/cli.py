"""The ``prefect-xm`` command line.

    prefect-xm launch script.py [-- script flags]   run a launch script, show progress and results
    prefect-xm list [--limit N]                     experiments, newest first
    prefect-xm show EXPERIMENT_ID                   work units, args, states, jobs
    prefect-xm stop EXPERIMENT_ID                   cancel every work unit of an experiment

Without PREFECT_API_URL, Prefect's embedded server is used (its database is in
PREFECT_HOME, ~/.prefect by default, so `list` and `show` find earlier experiments).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Any, Optional, Sequence

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.client.schemas.objects import StateType  # noqa: E402

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


def cmd_launch(script: str, script_args: Sequence[str]) -> int:
    from prefect_xm.core import api, summary

    path = os.path.abspath(script)
    if not os.path.isfile(path):
        print(f"prefect-xm launch: no such file: {script}", file=sys.stderr)
        return 2
    summary.PROGRESS_HOOK = _progress
    old_argv = sys.argv
    sys.argv = [path, *script_args]
    sys.path.insert(0, os.path.dirname(path))
    code = 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("prefect-xm launch: interrupted; the experiment's work units were stopped", file=sys.stderr)
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"prefect-xm launch: {script} raised; its experiments were stopped", file=sys.stderr)
        code = 1
    finally:
        sys.argv = old_argv
        summary.PROGRESS_HOOK = None
    console = _console()
    failed = False
    for experiment in api.OPENED:
        ov = _overview(experiment)
        console.print(results_table(ov))
        failed = failed or ov["state_type"] != StateType.COMPLETED
    return code or (1 if failed else 0)


def cmd_list(limit: Optional[int]) -> int:
    from rich.table import Table

    from prefect_xm.core.api import list_experiments
    from prefect_xm.core.launcher import GONE_MESSAGE
    from prefect_xm.core.runtime import Runtime
    from prefect_xm.core.summary import experiment_overview

    table = Table(title="experiments", title_justify="left")
    for col in ("ID", "title", "state", "work units", "created", "duration"):
        table.add_column(col)
    for e in list_experiments(limit=limit):
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
    return 0


def cmd_show(experiment_id: str) -> int:
    from prefect_xm.core.api import get_experiment

    try:
        experiment = get_experiment(experiment_id)
    except ValueError as e:
        print(f"prefect-xm show: {e}", file=sys.stderr)
        return 2
    ov = _overview(experiment)
    console = _console()
    console.print(results_table(ov))
    console.print(f"flow run: {ov['flow_run_id']}" + (f" \u2014 {ov['message']}" if ov["message"] else ""))
    return 0


def cmd_stop(experiment_id: str) -> int:
    from prefect_xm.core.api import get_experiment

    try:
        experiment = get_experiment(experiment_id)
    except ValueError as e:
        print(f"prefect-xm stop: {e}", file=sys.stderr)
        return 2
    _console(stderr=True).print(f"stopping experiment {experiment.experiment_id} ({experiment.experiment_title})...")
    experiment.stop()
    _console().print(results_table(_overview(experiment)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefect-xm", description="XManager-style experiments on Prefect.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("launch", help="run a launch script (flags after -- go to the script)")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("list", help="list experiments")
    p.add_argument("--limit", type=int, default=50)
    p = sub.add_parser("show", help="show an experiment's work units")
    p.add_argument("experiment_id")
    p = sub.add_parser("stop", help="cancel an experiment's work units")
    p.add_argument("experiment_id")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "launch":
        script_args = list(args.script_args)
        if script_args and script_args[0] == "--":
            script_args = script_args[1:]
        return cmd_launch(args.script, script_args)
    if args.command == "list":
        return cmd_list(args.limit)
    if args.command == "show":
        return cmd_show(args.experiment_id)
    if args.command == "stop":
        return cmd_stop(args.experiment_id)
    return 2


if __name__ == "__main__":
    sys.exit(main())
