"""``keystile.admin``: the operators' page over every owner's keys, rendered by the server.

::

    from keystile.admin import admin_app

    app.mount("/admin/keys", admin_app(database_url=..., authorize=staff_actor))

``authorize(request)`` (sync or async) is the app's decision, asked on every request: the
actor to audit (``alice@example.com``), or ``None`` (403). The pages list keys (filtered by
owner, state, name and expiry, a page at a time), show one (state, scopes, limits,
allowlist, last use, a usage chart over 24 hours, 7 or 30 days, its events), and create,
update, rotate, disable, enable and revoke (after a confirmation) keys. They work without
JavaScript; a few lines of it, allowed by the CSP's nonce, add the copy buttons. Needs
Jinja2: ``pip install 'keystile[admin]'``. What protects it: ``docs/security.md``.
"""

from __future__ import annotations

from starlette.applications import Starlette

from ..hashing import DEFAULT_PARAMETERS, Argon2Parameters
from ..manager import KeyManager
from .csrf import DEFAULT_CSRF_TTL, CSRFTokens
from .pages import DEFAULT_PAGE_SIZE, AdminPages, Authorize

__all__ = ["AdminPages", "Authorize", "CSRFTokens", "admin_app"]


def admin_app(
    *,
    authorize: Authorize,
    database_url: str | None = None,
    manager: KeyManager | None = None,
    argon2: Argon2Parameters = DEFAULT_PARAMETERS,
    csrf_secret: bytes | None = None,
    csrf_ttl: float = DEFAULT_CSRF_TTL,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> Starlette:
    """The admin pages as a Starlette app, to mount under the app's own staff area.

    Keys live in ``manager``'s store or the one ``database_url`` names (the CLI's order of
    defaults). ``csrf_secret`` signs the forms' CSRF tokens: give every process the same
    one (16 bytes or more); without it each process makes its own, and a form is good
    only in the process that served it.
    """
    if manager is not None and database_url is not None:
        raise TypeError("give database_url or manager, not both")
    if manager is None:
        manager = KeyManager.from_url(database_url, argon2=argon2)
    pages = AdminPages(
        manager,
        authorize=authorize,
        csrf=CSRFTokens(csrf_secret, ttl=csrf_ttl),
        page_size=page_size,
    )
    app = Starlette(routes=pages.routes)
    app.state.admin = pages
    return app
