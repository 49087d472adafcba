"""A hyperparameter sweep on this machine: no cluster, no server to start.

    python examples/sweep_local.py          # or: prefect-xm launch examples/sweep_local.py

Six work units (3 learning rates x 2 batch sizes), each a job running the toy trainer
``examples/train.py``. Without PREFECT_API_URL, Prefect's embedded server is used; with
it set (``prefect server start`` in another terminal), the experiment, its work units
and their logs show up in the Prefect UI. Prints a results table at the end.
"""

import json
import os
import tempfile

from prefect_xm import hyper, xm, xm_local

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    output_dir = tempfile.mkdtemp(prefix="xm-sweep-")
    trials = hyper.product(
        hyper.sweep("learning_rate", [0.1, 0.01, 0.001]),
        hyper.sweep("batch_size", [32, 64]),
    )
    with xm_local.create_experiment(experiment_title="sweep-local") as experiment:
        [trainer] = experiment.package([
            xm.Packageable(
                executable_spec=xm.PythonContainer(entrypoint=xm.ModuleName("train"), path=HERE),
                executor_spec=xm_local.Local.Spec(),
                args={"output_dir": output_dir, "steps": 5},
            ),
        ])
        for hparams in trials:
            experiment.add(xm.Job(trainer, xm_local.Local(), args=hparams))
        # Leaving the `with` block waits for every work unit.

    print_results(experiment, output_dir)


def print_results(experiment, output_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"experiment {experiment.experiment_id}: {experiment.experiment_title}", title_justify="left")
    for column in ("work unit", "learning_rate", "batch_size", "state", "loss"):
        table.add_column(column)
    best = None
    for wid, work_unit in experiment.work_units.items():
        lr, bs = work_unit.args["learning_rate"], work_unit.args["batch_size"]
        path = os.path.join(output_dir, f"lr{float(lr)}-bs{int(bs)}.json")
        loss = json.load(open(path))["loss"] if os.path.exists(path) else None
        if loss is not None and (best is None or loss < best[1]):
            best = (wid, loss)
        table.add_row(str(wid), str(lr), str(bs), work_unit.get_status().state_name,
                      "-" if loss is None else f"{loss:.4f}")
    Console(width=120).print(table)
    if best:
        print(f"best: work unit {best[0]} (loss {best[1]:.4f})")


if __name__ == "__main__":
    main()
