"""What a run directory holds besides the batch script and the job's output, read and
written by the worker on the login node and by the batch script on the node: the run's
environment, the count of its script's starts, and which array task or heterogeneous
job component it is (written before the submit, so a worker that died in between finds
the job)."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Optional

from prefect_xm.workers.scheduler import SubmissionError

if TYPE_CHECKING:
    from prefect_xm.workers.transport import Transport

#: the run's environment, beside job.sh in the run directory (mode 0600)
ENV_FILE = "job.env"
#: in an array task's run directory: "<array job name> <task index>"
ARRAY_TASK_FILE = "array-task"
#: in a run directory: how many times the job's script has started (a requeued job's
#: script starts again); the program sees it as ATTEMPT_VARIABLE
ATTEMPT_FILE = "attempt"
ATTEMPT_VARIABLE = "PREFECT_XM_ATTEMPT"


def environment_file(env: dict[str, str], run_dir: str) -> str:
    """The run's environment as a file the batch script sources (`. job.env`), and the
    count of the script's starts: each start is one attempt (POSIX sh, as SGE may use)."""
    attempts = shlex.quote(f"{run_dir}/{ATTEMPT_FILE}")
    return "".join(f"export {name}={shlex.quote(str(value))}\n" for name, value in env.items()) + (
        f"{ATTEMPT_VARIABLE}=$(( $(cat {attempts} 2>/dev/null || echo 0) + 1 ))\n"
        f'echo "${ATTEMPT_VARIABLE}" > {attempts}\n'
        f"export {ATTEMPT_VARIABLE}\n")


async def read_place_file(transport: Transport, run_dir: str, name: str) -> Optional[tuple[str, int]]:
    """A run directory's "<job name> <index>" file (its array task, its heterogeneous
    job's component), written before the submit; None if there is none."""
    text = await transport.read_tail(f"{run_dir}/{name}")
    if not text:
        return None
    try:
        job_name, index = text.split()
        return job_name, int(index)
    except ValueError:
        raise SubmissionError(f"unreadable {name} file: {text!r}") from None
