"""A webhook receiver for the tests: a Starlette app (served by ``loopback.serving``) that
verifies each delivery with the reference ``standardwebhooks`` library and keeps what it
got, and a worker process that runs ``WebhookDelivery`` on a database.

Run as a script, this module is the worker: ``python tests/webhook_receiver.py
--database-url URL --lease SECONDS``; it prints ``ready`` and delivers until killed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import timedelta
from typing import Any

import anyio
from standardwebhooks import Webhook as Verifier
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class Receiver:
    """Verified deliveries by ``webhook-id``; ``status`` is what it answers (a receiver
    that is down answers 503); ``hold`` keeps each request open until it is set, then
    drops it unrecorded (its sender was killed meanwhile)."""

    def __init__(self, secret: str = "") -> None:
        self.secret = secret
        self.received: list[dict[str, Any]] = []
        self.ids: Counter[str] = Counter()
        self.refused = 0
        self.requests = 0
        self.status = 204
        self.hold: anyio.Event | None = None
        self.arrived = anyio.Event()
        self._waiters: list[tuple[int, anyio.Event]] = []

    async def endpoint(self, request: Request) -> Response:
        self.requests += 1
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
            return Response(status_code=503)
        if self.status >= 300:
            return Response(status_code=self.status)
        body = await request.body()
        try:
            message = Verifier(self.secret).verify(body, dict(request.headers))
        except Exception:
            self.refused += 1
            return Response(status_code=400)
        self.received.append(message)
        self.ids[request.headers["webhook-id"]] += 1
        for count, event in self._waiters:
            if len(self.received) >= count:
                event.set()
        return Response(status_code=204)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hook", self.endpoint, methods=["POST"])])

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The first ``count`` deliveries, once they have arrived."""
        event = anyio.Event()
        self._waiters.append((count, event))
        if len(self.received) >= count:
            event.set()
        with anyio.fail_after(timeout):
            await event.wait()
        return self.received[:count]

    def types(self) -> list[str]:
        return [m["type"] for m in self.received]


def main() -> None:
    from keystile.stores import store_from_url
    from keystile.webhooks import WebhookDelivery

    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--lease", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    delivery = WebhookDelivery(
        interval=0.05,
        lease=timedelta(seconds=args.lease),
        timeout=args.timeout,
        allow_private_networks=True,
        schedule=(timedelta(milliseconds=100),) * 3,
    )

    async def run() -> None:
        store = store_from_url(args.database_url)
        await store.open()
        print(json.dumps("ready"), flush=True)
        await delivery.run(store)

    anyio.run(run)


if __name__ == "__main__":
    sys.exit(main())
