"""An "API keys" page for your customers and an admin page for your staff, on Starlette.

The same app as ``customer_keys_fastapi.py``: the management API mounted at
``/account/keys`` (its OpenAPI document at ``/account/keys/openapi.json``), the admin page
at ``/admin/keys``, and the API (``/items``) behind ``APIKeyMiddleware``.

    uvicorn examples.customer_keys_starlette:app
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from keystile import APIKeyMiddleware
from keystile.admin import admin_app
from keystile.management import KeyPolicy, management_app

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "sqlite:///keystile.db")
SESSION_SECRET = os.environ.get("SESSION_SECRET", "change me: a long random secret")

#: What a customer may give their own keys.
POLICY = KeyPolicy(
    grantable_scopes={"items:read", "items:write"},
    max_keys=20,
    max_lifetime="366d",
    default_expires_in="90d",
    rate_limit="100/minute",
)


def signed_in_org(request: Request) -> str | None:
    """Whose keys this request may manage: the organisation your sign-in put in the
    session, or None (401). Never read an owner from the request itself."""
    return request.session.get("org_id")


def staff_member(request: Request) -> str | None:
    """Who may use the admin page, as the actor its changes are audited with; None: 403."""
    return request.session.get("staff")


@requires("items:read")
async def items(request: Request) -> JSONResponse:
    key = request.user
    return JSONResponse({"owner": key.owner, "key": key.display_name, "items": []})


async def demo_sign_in(request: Request) -> Response:
    """A stand-in for your real sign-in, so the example can be tried; never ship it."""
    query = request.query_params
    request.session.update({"org_id": query["org_id"], "staff": query.get("staff")})
    return Response(status_code=204)


def create_app(
    database_url: str = DATABASE_URL, *, demo_sign_in_route: bool = False, **options: Any
) -> Starlette:
    routes = [
        Route("/items", items),
        Mount(
            "/account/keys",
            management_app(
                database_url=database_url, owner=signed_in_org, policy=POLICY, **options
            ),
        ),
        Mount(
            "/admin/keys", admin_app(database_url=database_url, authorize=staff_member, **options)
        ),
    ]
    if demo_sign_in_route:
        routes.append(Route("/demo/sign-in", demo_sign_in, methods=["POST"]))
    app = Starlette(routes=routes)
    app.add_middleware(
        APIKeyMiddleware,
        database_url=database_url,
        exempt_paths=["/demo/*", "/account/*", "/admin/*"],
        **options,
    )
    # Outermost: the session is read before keystile and the key pages see the request.
    app.add_middleware(SessionMiddleware, secret_key=SESSION_SECRET, same_site="lax")
    return app


app = create_app()
