"""``keystile.management``: the JSON API a customer manages their own keys with.

::

    from keystile.management import KeyPolicy, management_app

    app.mount("/account/keys", management_app(
        database_url="postgresql://...",
        owner=lambda request: request.session.get("org_id"),
        policy=KeyPolicy(grantable_scopes={"items:read", "items:write"}, max_keys=20,
                         max_lifetime="366d", default_expires_in="90d"),
    ))

See ``docs/integration.md`` ("An API keys page for your customers") for the endpoints,
the policy, and what protects them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette

from .api import ActorOf, ManagementAPI, ManagementOptions, OwnerOf
from .document import management_document
from .policy import KeyPolicy

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ActorOf",
    "KeyPolicy",
    "ManagementAPI",
    "ManagementOptions",
    "OwnerOf",
    "management_app",
    "management_document",
]


def management_app(**options: Unpack[ManagementOptions]) -> Starlette:
    """A Starlette app of the management endpoints, to mount where the customer's account
    pages are. The options are those of :meth:`ManagementAPI.build`: ``owner``, and
    ``database_url`` or ``manager`` (keys live in ``manager``'s store, or the one
    ``database_url`` names, ``KEYSTILE_DATABASE_URL`` or the CLI's default when neither is
    given: the database the middleware reads, so a key made here works at once),
    ``policy``, ``actor``, ``argon2``, ``max_body``.

    ``owner(request)`` (sync or async) says whose keys a request may touch, ``None`` for
    nobody (401); ``actor(request)`` the audit actor, ``owner:<owner>`` by default.
    """
    api = ManagementAPI.build(**options)
    app = Starlette(routes=api.routes)
    app.state.management = api
    return app
