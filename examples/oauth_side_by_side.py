"""API keys for machines, OAuth for people, on the same FastAPI route.

keystile runs with ``required=False``. A request with a keystile key has it verified by
the middleware. A request with any other bearer token (an OAuth access token, say a JWT)
reaches the app untouched, as an anonymous request, and the app's ``caller`` dependency
validates it. From the repository root::

    python examples/oauth_side_by_side.py     # mints a demo key on the first run and prints it

then::

    curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/reports
    curl -H "Authorization: Bearer oauth-token-ada" http://127.0.0.1:8000/reports

The OAuth validator is a stand-in (a dict of known tokens), so the example runs offline.
The database is ``KEYSTILE_DATABASE_URL``, else ``sqlite:///keystile.db``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, NamedTuple

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from keystile import APIKeyMiddleware, APIKeyUser

DATABASE_URL = os.environ.get("KEYSTILE_DATABASE_URL", "sqlite:///keystile.db")

#: Stand-in for your OAuth provider: access token -> the person's e-mail. A real app
#: validates a JWT here (signature against the provider's keys, issuer, audience,
#: expiry) or asks the provider's token introspection endpoint.
OAUTH_TOKENS = {"oauth-token-ada": "ada@example.com"}

# Reads "Authorization: Bearer ..." for the OAuth case and documents it in OpenAPI.
oauth_bearer = HTTPBearer(
    scheme_name="oauth", description="An OAuth access token.", auto_error=False
)


def validate_oauth_token(token: str) -> str | None:
    """The e-mail of the person ``token`` was issued to, or ``None`` if it is not valid."""
    return OAUTH_TOKENS.get(token)


class Caller(NamedTuple):
    via: str  # "apikey" or "oauth"
    audit_name: str  # "apikey:<key name>" or the person's e-mail


async def caller(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(oauth_bearer)],
) -> Caller:
    """Who is calling: a verified API key, else a valid OAuth token, else 401."""
    # 1. An API key the middleware verified (it has removed the key from the headers).
    if isinstance(request.user, APIKeyUser):
        return Caller("apikey", request.user.display_name)
    # 2. An OAuth access token: keystile passed it on untouched, as an anonymous request.
    if bearer is not None:
        email = validate_oauth_token(bearer.credentials)
        if email is None:
            raise HTTPException(
                401,
                "The OAuth access token is not valid.",
                headers={"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'},
            )
        return Caller("oauth", email)
    # 3. Neither.
    raise HTTPException(
        401,
        "Send an API key or an OAuth access token.",
        headers={"WWW-Authenticate": 'Bearer realm="api"'},
    )


CurrentCaller = Annotated[Caller, Depends(caller)]


def create_app(database_url: str = DATABASE_URL, **options: Any) -> FastAPI:
    app = FastAPI(title="keystile: API keys beside OAuth")
    app.add_middleware(APIKeyMiddleware, database_url=database_url, required=False, **options)

    @app.get("/reports")
    async def reports(who: CurrentCaller) -> dict[str, str]:
        return {"caller": who.audit_name, "via": who.via}

    return app


app = create_app()

DEMO_OWNER, DEMO_NAME = "demo", "reports-bot"


async def ensure_demo_key(database_url: str) -> str | None:
    """Mint the demo key on the first run and return it; ``None`` if it already exists."""
    from keystile import KeyManager

    async with KeyManager.from_url(database_url) as manager:
        keys = await manager.list(DEMO_OWNER)
        if any(k.name == DEMO_NAME and k.is_active() for k in keys):
            return None
        created = await manager.create(owner=DEMO_OWNER, name=DEMO_NAME)
        return created.key


if __name__ == "__main__":
    import asyncio

    import uvicorn

    demo_key = asyncio.run(ensure_demo_key(DATABASE_URL))
    if demo_key is None:
        print(f"Using the {DEMO_NAME!r} key printed when it was made ({DATABASE_URL}).")
        demo_key = "$KEY"
    else:
        print(f"Demo key (shown once):\n\n    {demo_key}\n")
    base = "http://127.0.0.1:8000/reports"
    tries = [
        (demo_key, "an API key: caller apikey:reports-bot"),
        ("oauth-token-ada", "an OAuth token: caller ada@example.com"),
        ("some-other-token", "an unknown OAuth token: 401 from the app"),
        ("ks_garbage", "a malformed keystile key: 401 from keystile"),
    ]
    print("Try it:\n")
    for token, what in tries:
        print(f"    # {what}")
        print(f'    curl {base} -H "Authorization: Bearer {token}"\n')
    uvicorn.run(app, host="127.0.0.1", port=8000)
