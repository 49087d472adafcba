"""Create the work pools declared in prefect.yaml (`definitions.work_pools`) that do not exist.

Existing pools are never changed: not their type, not their base job template, not
their settings. So running this again (each `prefect deploy --all` does) is cheap (one
read per pool) and keeps whatever you changed in a pool.

How `prefect deploy --all` runs this: for each deployment, Prefect 3.8 loads the flow
from the entrypoint, then checks that the work pool exists (and fails if not), and only
after that runs the `build` steps. A build step would therefore run too late for the
first deployment. So the first deployment in prefect.yaml, `xm-work-pools/ensure`, uses
this file as its entrypoint. Loading this module creates the pools, before Prefect checks
the first pool. Running that deployment later (or `python work_pools.py`) re-creates any
declared pool that has been deleted; `prefect deploy -n NAME` alone does not run it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

HERE = Path(__file__).resolve().parent
PREFECT_YAML = HERE / "prefect.yaml"


class PoolSetupError(Exception):
    pass


def declared_pools(prefect_yaml: Path = PREFECT_YAML) -> dict[str, dict[str, Any]]:
    """{name: {"type": ..., "base_job_template": path or None}}. Every pool that a
    deployment (or a `work_pool` parameter) uses must be declared here."""
    config = yaml.safe_load(prefect_yaml.read_text()) or {}
    pools = (config.get("definitions") or {}).get("work_pools") or {}
    if not isinstance(pools, dict) or not pools:
        raise PoolSetupError(f"{prefect_yaml}: no work pools under definitions.work_pools")
    declared: dict[str, dict[str, Any]] = {}
    for name, spec in pools.items():
        if not isinstance(spec, dict) or not spec.get("type"):
            raise PoolSetupError(f"{prefect_yaml}: work pool {name!r} needs a type")
        template = spec.get("base_job_template")
        declared[name] = {"type": spec["type"],
                          "base_job_template": prefect_yaml.parent / template if template else None}
    used = set()
    for deployment in config.get("deployments") or []:
        used.add((deployment.get("work_pool") or {}).get("name"))
        used.add((deployment.get("parameters") or {}).get("work_pool"))
    missing = sorted(name for name in used - {None} if name not in declared)
    if missing:
        raise PoolSetupError(f"{prefect_yaml}: deployments use work pools {missing} that "
                             "definitions.work_pools does not declare")
    return declared


async def _ensure(declared: dict[str, dict[str, Any]]) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    outcome: dict[str, str] = {}
    async with get_client() as client:
        for name, spec in declared.items():
            try:
                pool = await client.read_work_pool(name)
            except ObjectNotFound:
                pass
            else:
                outcome[name] = "exists"
                if pool.type != spec["type"]:
                    outcome[name] += f" with type {pool.type!r}, not {spec['type']!r}"
                continue
            if spec["base_job_template"] is not None:
                template = json.loads(spec["base_job_template"].read_text())
            else:
                template = await get_default_base_job_template_for_infrastructure_type(spec["type"])
                if template is None:
                    raise PoolSetupError(
                        f"work pool {name!r}: no default base job template for type "
                        f"{spec['type']!r}; install its worker (pip install 'prefect-xm[all]')")
            try:
                await client.create_work_pool(
                    WorkPoolCreate(name=name, type=spec["type"], base_job_template=template),
                    overwrite=False)
                outcome[name] = "created"
            except ObjectAlreadyExists:  # made meanwhile by someone else: theirs stays
                outcome[name] = "exists"
    return outcome


def ensure_declared_pools(prefect_yaml: Path = PREFECT_YAML) -> dict[str, str]:
    """Create the missing declared pools; returns {name: "created" | "exists ..."}."""
    declared = declared_pools(prefect_yaml)
    # `prefect deploy` imports this module from inside its own event loop: run ours in a
    # thread of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(asyncio.run, _ensure(declared)).result()
    for name, what in outcome.items():
        print(f"work pool {name!r} ({declared[name]['type']}): {what}")
    return outcome


@flow(name="xm-work-pools", log_prints=True)
def ensure_work_pools() -> dict[str, str]:
    """Create the work pools declared in prefect.yaml that are missing; leave the others."""
    return ensure_declared_pools()


def _ensure_or_exit() -> None:
    # Any error must stop `prefect deploy`: an exception would be caught by its flow
    # loader (which falls back to reading the file without running it), SystemExit is not.
    try:
        ensure_declared_pools()
    except Exception as exc:  # noqa: BLE001 - reported, then exit
        sys.exit(f"{Path(__file__).name}: could not make the work pools: {type(exc).__name__}: {exc}")


# Loading this file is what creates the pools during `prefect deploy` (see above). In a
# run of the deployment (a worker set PREFECT__FLOW_RUN_ID), the flow does it, logged.
if not os.environ.get("PREFECT__FLOW_RUN_ID"):
    _ensure_or_exit()
