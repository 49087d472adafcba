"""A launch script as XManager users write them (absl flags, python_container, a sweep
given to add() as a list, a JobGroup, a job generator, completion events), with only
its imports changed."""
import asyncio
import datetime

from absl import app
from absl import flags
from prefect_xm import xm  # was: from xmanager import xm
from prefect_xm import xm_local  # was: from xmanager import xm_local

_POOL = flags.DEFINE_string("pool", None, "The Slurm cluster's work pool; none: this machine (Local).")
_CODE = flags.DEFINE_string("code", None, "The trainer's directory.")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "The worker's run directory.")


async def main_async():
    requirements = xm.JobRequirements(cpu=1, memory=256 * xm.MiB)
    if _POOL.value:
        executor = xm_local.Slurm(requirements=requirements, time=datetime.timedelta(minutes=10),
                                  partition="debug", work_pool=_POOL.value, job_variables={"run_dir": _RUN_DIR.value})
        spec = xm_local.Slurm.Spec()
    else:
        executor, spec = xm_local.Local(requirements=requirements), xm_local.Local.Spec()
    async with xm_local.create_experiment(experiment_title="xmanager-style") as experiment:
        [trainer] = experiment.package([xm.python_container(
            executor_spec=spec, path=_CODE.value, entrypoint=xm.ModuleName("train"),
            args={"steps": 2})])
        sweep = await experiment.add(xm.Job(trainer, executor), args=[
            {"args": {"role": "sweep", "lr": lr}} for lr in (0.1, 0.01)])
        group = xm.JobGroup(learner=xm.Job(trainer, executor), evaluator=xm.Job(trainer, executor))
        gang = await experiment.add(group, args=xm.get_args_for_all_jobs(group, {"role": "gang"}))

        async def make_job(work_unit: xm.WorkUnit, **hparams):
            work_unit.add(xm.Job(trainer, executor, args={"role": "generated", **hparams}))

        generated = await experiment.add(make_job, args={"lr": 0.5})
        events = [wu.wait_until_complete() for wu in (*sweep, gang, generated)]
        for done in asyncio.as_completed(events):
            wu = await done
            print("COMPLETED", wu.work_unit_id, sorted(j.name for j in wu.launched_jobs), flush=True)
    print("EXPERIMENT", experiment.experiment_id, flush=True)


def main(argv):
    del argv
    asyncio.run(main_async())


if __name__ == "__main__":
    app.run(main)
