"""An "API keys" page for your customers and an admin page for your staff, on FastAPI.

Your customers sign in to your app as they always do (here a session cookie); the
management API at ``/account/keys`` lets each manage the keys of their own organisation,
within the policy you set, and lists itself in your ``/docs``. Your staff see and change
every key at ``/admin/keys``. The API itself (``/items``) takes the keys.

    uvicorn examples.customer_keys_fastapi:app

``demo_sign_in=True`` adds ``POST /demo/sign-in?org_id=...&staff=...``, a stand-in for
your real sign-in, so the example can be tried with curl; never ship it.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.middleware.sessions import SessionMiddleware

from keystile.admin import admin_app
from keystile.fastapi import CurrentKey, key_management_router, protect, require_scopes
from keystile.management import KeyPolicy

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


def create_app(
    database_url: str = DATABASE_URL, *, demo_sign_in: bool = False, **options: Any
) -> FastAPI:
    app = FastAPI(title="Items API")

    @app.get("/items", dependencies=[Depends(require_scopes("items:read"))])
    async def items(key: CurrentKey) -> dict[str, Any]:
        return {"owner": key.owner, "key": key.display_name, "items": []}

    if demo_sign_in:

        @app.post("/demo/sign-in", include_in_schema=False)
        async def sign_in(request: Request, org_id: str, staff: str | None = None) -> None:
            request.session.update({"org_id": org_id, "staff": staff})

    app.include_router(
        key_management_router(
            database_url=database_url,
            owner=signed_in_org,
            policy=POLICY,
            prefix="/account/keys",
            **options,
        )
    )
    app.mount(
        "/admin/keys", admin_app(database_url=database_url, authorize=staff_member, **options)
    )
    protect(
        app,
        database_url=database_url,
        exempt_paths=["/demo/*", "/account/*", "/admin/*"],
        **options,
    )
    # Outermost: the session is read before keystile and the key pages see the request.
    app.add_middleware(SessionMiddleware, secret_key=SESSION_SECRET, same_site="lax")
    return app


app = create_app()
