"""The job runner's deployments, and the checks of jobs against their pools' schemas.

A job on a work pool is a flow run of the ``xm-job-runner/<pool>`` deployment, made here
the first time an experiment sends a job to that pool.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Mapping, Optional
from uuid import UUID

from prefect_xm.core import store
from prefect_xm.core.job_blocks import Job

_deployment_ids: dict[str, UUID] = {}
_deployment_locks: dict[str, asyncio.Lock] = {}
#: Pool types whose jobs run in a container image (the stock workers prefect-xm maps onto).
CONTAINER_POOL_TYPES = frozenset({"docker", "kubernetes", "vertex-ai", "cloud-run", "cloud-run-v2", "ecs"})
_pool_schemas: dict[str, dict[str, Any]] = {}


async def pool_variables_schema(pool_name: str) -> dict[str, Any]:
    """The pool's whole job-variable schema (properties and definitions), read from the
    Prefect API (cached)."""
    if pool_name in _pool_schemas:
        return _pool_schemas[pool_name]
    from prefect.exceptions import ObjectNotFound

    client = await store.client()
    try:
        pool = await client.read_work_pool(pool_name)
    except ObjectNotFound:
        raise ValueError(f"work pool {pool_name!r} does not exist in the Prefect API ({client.api_url})") from None
    schema = (pool.base_job_template or {}).get("variables") or {}
    _pool_schemas[pool_name] = schema
    return schema


def validate_job_variables(
    pool_name: str,
    variables: Mapping[str, Any],
    properties: Mapping[str, Any],
    definitions: Optional[Mapping[str, Any]] = None,
) -> None:
    """Raises ValueError naming the variable, its value and the pool if a variable is
    unknown to the pool's schema or breaks it (type, pattern, minimum, enum...), as the
    Prefect server would when the job's run is created: here, before anything is submitted."""
    import jsonschema

    unknown = [k for k in variables if k not in properties]
    if unknown:
        raise ValueError(
            f"job variable(s) {', '.join(f'{k!r}={variables[k]!r}' for k in unknown)} are not defined "
            f"by work pool {pool_name!r}; " + (f"it accepts: {', '.join(sorted(properties))}" if properties
                                               else "it declares no job variables")
        )
    for key, value in variables.items():
        schema = {**(properties[key] or {}), "definitions": dict(definitions or {}), "$defs": dict(definitions or {})}
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema).iter_errors(value)
        )
        if error is not None:
            raise ValueError(f"job variable {key!r}={value!r} for work pool {pool_name!r}: {error.message}")


async def check_pool_jobs(members: Mapping[str, Job]) -> None:
    """Raises ValueError, naming the job, when a job's pool is out of reach or refuses
    its job variables; before anything of its work unit is submitted."""
    for key, job in members.items():
        pool = job.executor.work_pool_name
        if pool is None:
            continue
        from prefect.settings import get_current_settings

        from prefect_xm.core import embedded_server

        if not get_current_settings().api.url or embedded_server.in_use():
            raise ValueError(
                f"job {key!r} runs on work pool {pool!r}, whose workers need a Prefect server they "
                f"can reach: set PREFECT_API_URL (the embedded server only serves the Local executor)"
            )
        schema = await pool_variables_schema(pool)
        try:
            validate_job_variables(pool, job.executor.job_variables_for(job.executable),
                                   schema.get("properties") or {}, schema.get("definitions"))
        except ValueError as e:
            raise ValueError(f"job {key!r}: {e}") from None


def job_runner_source_dir() -> str:
    """The directory holding the installed prefect_xm package (the deployment's source)."""
    import prefect_xm

    return str(Path(prefect_xm.__file__).resolve().parent.parent)


async def ensure_job_runner_deployment(pool_name: str) -> UUID:
    """Makes sure deployment ``xm-job-runner/<pool>`` exists on the pool; returns its id.

    The deployment loads ``prefect_xm/flows/job_runner.py:run_job`` from the directory of
    the installed prefect_xm package, which must be visible to the pool's workers (a
    filesystem shared with the cluster, or the same installation path on the nodes).
    """
    if pool_name in _deployment_ids:
        return _deployment_ids[pool_name]
    # Work units are created side by side: one creation per pool, the others wait for it
    # (concurrent creations of one deployment make the server answer 500).
    lock = _deployment_locks.setdefault(pool_name, asyncio.Lock())
    async with lock:
        if pool_name not in _deployment_ids:
            _deployment_ids[pool_name] = await _create_job_runner_deployment(pool_name)
    return _deployment_ids[pool_name]


async def _create_job_runner_deployment(pool_name: str) -> UUID:
    from prefect.utilities.callables import parameter_schema

    from prefect_xm.job_runner import run_job

    client = await store.client()
    source = job_runner_source_dir()
    flow_id = await client.create_flow(run_job)
    pool = await client.read_work_pool(pool_name)
    if pool.type in CONTAINER_POOL_TYPES:
        # The job runs in an image with prefect-xm installed: load the flow by module
        # name there; this machine's source directory does not exist in the container.
        where: dict[str, Any] = dict(entrypoint="prefect_xm.flows.job_runner:run_job", path=None, pull_steps=[])
    else:
        where = dict(entrypoint="prefect_xm/flows/job_runner.py:run_job", path=source,
                     pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": source}}])
    if "execution" in ((pool.base_job_template or {}).get("variables") or {}).get("properties", {}):
        # Batch pools run the job's program itself on the node: no Prefect, no API route
        # there (a run's own job variables may still choose the engine).
        where["job_variables"] = {"execution": "direct"}
    deployment_id = await client.create_deployment(
        flow_id=flow_id,
        name=pool_name,
        work_pool_name=pool_name,
        **where,
        parameter_openapi_schema=parameter_schema(run_job.fn).model_dump_for_openapi(),
        description="prefect-xm job runner (created automatically by prefect_xm experiments)",
        tags=[store.TAG_XM],
    )
    return deployment_id


#: the deployment, on no pool, of the runs a launcher drives itself
IN_LAUNCHER = "in-launcher"


async def ensure_in_launcher_deployment(client, flow) -> UUID:
    """Deployment ``<flow>/in-launcher``, on no work pool: the runs the launching process
    drives itself (work units; Local jobs) are created from it, because Prefect creates
    runs 100 to a request only from a deployment. No worker or runner picks its runs up
    (no pool, no queue); they start Pending and the launcher moves them on. Made once per
    server (cached on the client)."""
    from prefect.utilities.callables import parameter_schema

    ids = client.__dict__.setdefault("_xm_in_launcher_deployments", {})
    lock = client.__dict__.setdefault("_xm_in_launcher_lock", asyncio.Lock())
    async with lock:  # (side-by-side creations of one deployment make the server answer 500)
        if flow.name not in ids:
            ids[flow.name] = await client.create_deployment(
                flow_id=await client.create_flow(flow),
                name=IN_LAUNCHER,
                # a work unit's parameters are its args, whatever they are
                enforce_parameter_schema=False,
                parameter_openapi_schema=parameter_schema(flow.fn).model_dump_for_openapi(),
                description=("Runs prefect-xm launchers create and drive themselves (made automatically). "
                             "Running it from here starts nothing: launch an experiment instead."),
                paused=True,
            )
    return ids[flow.name]
