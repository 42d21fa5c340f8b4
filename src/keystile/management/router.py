"""The management endpoints as a FastAPI router, so they show in the app's own ``/docs``:
``keystile.fastapi.key_management_router``. The endpoints are the Starlette ones of
:class:`ManagementAPI`; each is declared with its part of the management OpenAPI document
(schemas written out, since the app's document has its own components)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .api import ManagementAPI, ManagementOptions
from .document import OPERATIONS, operation

if TYPE_CHECKING:
    from fastapi import APIRouter
    from typing_extensions import Unpack

__all__ = ["management_router"]


def management_router(
    *, prefix: str = "", tags: Sequence[str] = ("API keys",), **options: Unpack[ManagementOptions]
) -> APIRouter:
    """The endpoints of ``management_app`` (same options: ``ManagementAPI.build``) on a
    FastAPI ``APIRouter`` with ``prefix`` and ``tags``."""
    from fastapi import APIRouter

    api = ManagementAPI.build(**options)
    router = APIRouter(prefix=prefix, tags=list(tags))
    for route in api.routes:
        for method in sorted(route.methods or ()):
            if (method.lower(), route.path) not in OPERATIONS:
                continue
            spec = operation(method.lower(), route.path, inline=True)
            success = next(iter(spec["responses"]))
            router.add_api_route(
                route.path,
                route.endpoint,
                methods=[method],
                name=spec["operationId"],
                summary=spec["summary"],
                status_code=int(success),
                response_model=None,
                openapi_extra=spec,
            )
    return router
