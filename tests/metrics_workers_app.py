"""The app the multi-worker metrics test serves with ``uvicorn --workers 2``: an import
string, since uvicorn's workers each import the app. Configured by the environment:
``KEYSTILE_DATABASE_URL`` and ``KEYSTILE_METRICS_DIR`` (shared by the workers).

``GET /whoami`` answers with the worker's pid; ``GET /metrics`` (exempt) is the scrape.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keystile import CHEAPEST_PARAMETERS, APIKeyMiddleware
from keystile.metrics import PrometheusMetrics, metrics_app


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"key_id": request.user.key_id, "pid": os.getpid()})


registry = CollectorRegistry()
inner = Starlette(routes=[Route("/whoami", whoami), Route("/metrics", metrics_app(registry))])
app = APIKeyMiddleware(
    inner,
    argon2=CHEAPEST_PARAMETERS,
    exempt_paths=["/metrics"],
    metrics=PrometheusMetrics(registry, interval=0.2),
)
