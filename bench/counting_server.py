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
