"""Prefect's server (the app `prefect server start` serves, with its services) behind a
middleware that counts API requests by client role, method and route, for the benchmarks.

    python bench/counting_server.py PORT COUNTS_FILE

A client names its role with the header `X-XM-Bench` (Prefect's client sends it when
PREFECT_CLIENT_CUSTOM_HEADERS='{"X-XM-Bench": "worker"}'); the counts are written to
COUNTS_FILE as JSON every second: {"role method route": n}, ids in routes as {id}.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import threading
from typing import Optional
import time

ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def counting(app, counts: collections.Counter):
    async def counted(scope, receive, send):
        if scope["type"] == "http":
            role = dict(scope.get("headers") or []).get(b"x-xm-bench", b"other").decode()
            counts[f"{role} {scope['method']} {ID.sub('{id}', scope['path'])}"] += 1
        await app(scope, receive, send)

    return counted


def main() -> None:
    import uvicorn

    from prefect.server.api.server import create_app

    port, path = int(sys.argv[1]), sys.argv[2]
    counts: collections.Counter = collections.Counter()

    def dump() -> None:
        while True:
            time.sleep(1)
            with open(path + ".tmp", "w") as f:
                json.dump(dict(counts), f)
            os.replace(path + ".tmp", path)

    threading.Thread(target=dump, daemon=True).start()
    uvicorn.run(counting(create_app(final=True), counts), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()


#: what a request does, by its route (the order matters: the first match wins)
KINDS = (
    ("labels", re.compile(r"^PATCH /api/flow_runs/\{id\}/labels$")),
    ("state", re.compile(r"^POST /api/(flow_runs|task_runs)/(\{id\}/set_state|bulk_set_state)$")),
    ("creation", re.compile(r"^POST /api/(flow_runs/?|task_runs/?|deployments/\{id\}/create_flow_run(/bulk)?)$")),
    ("logs", re.compile(r"^POST /api/logs/?$")),
    ("read", re.compile(r"^(GET .*|POST .*/(filter|count|paginate|history)/?)$")),
)


def by_kind(counts: dict, role: str) -> dict[str, int]:
    """A role's requests by what they do: creation, state, read, logs, labels, other."""
    out = {kind: 0 for kind, _ in KINDS} | {"other": 0}
    for key, n in counts.items():
        who, _, request = key.partition(" ")
        if who != role:
            continue
        kind = next((k for k, pattern in KINDS if pattern.match(request)), "other")
        out[kind] += n
    return out


def per_trial(counts: dict, role: str, trials: int, minus: Optional[dict] = None) -> str:
    kinds = by_kind(counts, role)
    if minus:
        kinds = {k: n - by_kind(minus, role).get(k, 0) for k, n in kinds.items()}
    total = sum(kinds.values())
    return f"{role} {total / trials:.1f} (" + ", ".join(f"{k} {n / trials:.2f}" for k, n in kinds.items()) + ")"


def by_route(counts: dict, role: str, trials: int, minus: Optional[dict] = None, floor: float = 0.05) -> str:
    """A role's requests per trial by route, the costliest first (those under `floor` left out):
    which route the next cut is in."""
    minus = minus or {}
    rows = sorted(((n - minus.get(key, 0)) / trials, key.partition(" ")[2]) for key, n in counts.items()
                  if key.startswith(role + " "))
    return "; ".join(f"{route} {n:.2f}" for n, route in reversed(rows) if n >= floor)
