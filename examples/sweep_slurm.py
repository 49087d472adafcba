"""The same sweep as sweep_local.py, on Slurm through an ``xm-slurm`` work pool.

    prefect work-pool create hpc --type xm-slurm      # once
    prefect worker start --pool hpc                    # on the login node
    python examples/sweep_slurm.py --pool hpc --partition debug

This repository (and the output directory) must be on a filesystem the compute nodes
see: each job is a flow run of prefect-xm's job-runner deployment ``xm-job-runner/<pool>``
(created automatically) that the worker submits with sbatch.
"""

import argparse
import os

from prefect_xm import hyper, xm, xm_local

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", default=os.environ.get("XM_SLURM_POOL", "xm-slurm"))
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--time", default="10:00")
    parser.add_argument("--output_dir", default=os.path.join(HERE, "..", ".xm-sweep-slurm"))
    flags = parser.parse_args()
    output_dir = os.path.abspath(flags.output_dir)

    executor = xm_local.Slurm(
        requirements=xm.JobRequirements(cpu=1, memory=1 * xm.GiB),
        partition=flags.partition,
        account=flags.account,
        time=flags.time,
        work_pool=flags.pool,
    )
    trials = hyper.product(
        hyper.sweep("learning_rate", [0.1, 0.01, 0.001]),
        hyper.sweep("batch_size", [32, 64]),
    )
    with xm_local.create_experiment(experiment_title="sweep-slurm") as experiment:
        [trainer] = experiment.package([
            xm.Packageable(
                executable_spec=xm.PythonContainer(entrypoint=xm.ModuleName("train"), path=HERE),
                executor_spec=xm_local.Slurm.Spec(),
                args={"output_dir": output_dir, "steps": 5},
            ),
        ])
        for hparams in trials:
            experiment.add(xm.Job(trainer, executor, args=hparams))

    from sweep_local import print_results

    print_results(experiment, output_dir)


if __name__ == "__main__":
    main()
