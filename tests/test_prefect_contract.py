"""What prefect-xm takes from Prefect beyond its public API, checked by name on the
installed Prefect (test.sh runs this on the newest and the oldest supported release): a
Prefect that renames one of these fails here, saying which, instead of silently turning
an override into dead code or a bulk call into a 404 at a user's first sweep."""

from __future__ import annotations

import inspect

import pytest


def _source(obj) -> str:
    return inspect.getsource(obj)


def test_the_worker_hooks_prefect_xm_overrides_are_still_called_by_prefects_worker():
    from prefect.workers.base import BaseWorker

    submit_run = _source(BaseWorker._submit_run)
    capture = _source(BaseWorker._submit_run_and_capture_errors)
    for hook, caller in (("_propose_pending_state", submit_run), ("_propose_submitting_state", capture),
                         ("_give_worker_labels_to_flow_run", capture)):
        assert hasattr(BaseWorker, hook), f"Prefect's BaseWorker has no {hook} any more (prefect_xm/workers/base.py overrides it)"
        assert f"self.{hook}(" in caller, f"Prefect's worker no longer calls {hook} where prefect_xm expects it"
    assert "self._client = get_client()" in _source(BaseWorker.setup), \
        "Prefect's worker makes its client elsewhere: BatchWorker.setup wraps self._client after it"


def test_the_job_configuration_reads_its_deployment_and_flow_through_the_client():
    from prefect.workers.base import BaseJobConfiguration

    resolve = _source(BaseJobConfiguration.resolve_for_flow_run)
    assert "client.read_deployment(" in resolve and "client.read_flow(" in resolve, \
        "resolve_for_flow_run reads its deployment or flow another way: api_client.read_once_per_batch no longer applies"


def test_the_client_keeps_an_httpx_client_whose_transport_can_be_wrapped():
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        client = get_client()
    assert isinstance(client._client, httpx.AsyncClient), "PrefectClient._client is not an httpx client"
    assert hasattr(client._client, "_transport") and hasattr(client._client, "_mounts"), \
        "httpx's client keeps its transports elsewhere: api_client.absorb_busy_answers cannot wrap them"


@pytest.mark.parametrize("method,path", [
    ("POST", "/deployments/{id}/create_flow_run/bulk"),
    ("POST", "/flow_runs/bulk_set_state"),
])
def test_the_bulk_routes_prefect_xm_calls_are_served(method, path):
    from prefect.server.api import deployments, flow_runs

    served = {(m, r.path.replace("{id:uuid}", "{id}")) for router in (deployments.router, flow_runs.router)
              for r in router.routes for m in getattr(r, "methods", ())}
    assert (method, path) in served, \
        f"Prefect's server has no {method} {path} (prefect_xm/api_client.py calls it)"


def test_the_bulk_limits_prefect_xm_assumes():
    from prefect.server.api import deployments, flow_runs

    from prefect_xm import api_client

    assert deployments.BULK_CREATE_LIMIT >= api_client.CREATE_BULK_LIMIT
    assert flow_runs.BULK_OPERATION_LIMIT >= api_client.SET_STATE_BULK_LIMIT


def test_the_ui_route_the_launcher_polls_states_with_is_served_and_answers_state_types():
    """core/store.read_state_types polls watched runs' state types through the UI's
    history route (columns, not whole runs); it falls back to whole runs on a 404."""
    from prefect.server.api.ui import flow_runs

    paths = {(m, r.path) for r in flow_runs.router.routes for m in getattr(r, "methods", ())}
    assert ("POST", "/ui/flow_runs/history") in paths, paths
    fields = flow_runs.SimpleFlowRun.model_fields
    assert {"id", "state_type"} <= set(fields), fields
    from prefect.server.schemas.sorting import FlowRunSort

    assert "ID_DESC" in FlowRunSort.__members__
