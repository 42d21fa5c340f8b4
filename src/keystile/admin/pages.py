"""AdminPages: the operator's pages over every owner's keys.

``authorize(request)`` is asked on every request, GET or POST: it returns the actor to
audit (``alice@example.com``) or ``None``, answered 403 before anything is read. Every
POST carries the CSRF token of its form (``csrf.py``); one without a valid token is 403
and changes nothing. Every change is audited with the actor ``authorize`` returned.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ..durations import parse_duration
from ..errors import KeyManagementError, KeyNotFound, RequestRefused, StoreError
from ..manager import DEFAULT_ROTATION_GRACE, KeyManager
from ..stores.records import KeyRecord, utcnow
from ..tokens import KEY_ID_LENGTH
from ..validation import validate_actor
from .chart import RANGES, chart
from .csrf import CSRFTokens
from .render import PageRenderer, read_form

__all__ = ["AdminPages", "Authorize"]

logger = logging.getLogger("keystile")

#: The app's answer to "may this request use the admin, and who is it": an actor or None.
Authorize = Callable[[Request], "Awaitable[str | None] | str | None"]
Page = Callable[[Request, str, dict[str, str]], Awaitable[Response]]

STATES = ("active", "disabled", "expired", "revoked")
DEFAULT_PAGE_SIZE = 50
_KEY_ID = re.compile(rf"[0-9A-Za-z]{{{KEY_ID_LENGTH}}}")
_SPLIT = re.compile(r"[\s,]+")
#: The fields of the create and edit forms, in their order.
FIELDS = (
    "owner",
    "name",
    "scopes",
    "expires",
    "rate_limit",
    "quota",
    "quota_refill",
    "ip_allowlist",
    "metadata",
)


def _words(text: str) -> list[str]:
    return [word for word in _SPLIT.split(text.strip()) if word]


def _when(moment: datetime | None) -> str:
    return "" if moment is None else f"{moment.astimezone(timezone.utc):%Y-%m-%d %H:%M}"


def _refused(field: str, why: str) -> RequestRefused:
    return RequestRefused(422, "invalid_field", f"{field}: {why}")


class AdminPages:
    """The pages (see the module docstring); ``routes`` for a Starlette app."""

    def __init__(
        self,
        manager: KeyManager,
        *,
        authorize: Authorize,
        csrf: CSRFTokens,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if not callable(authorize):
            raise TypeError("authorize must be a callable: authorize(request) -> actor or None")
        self.manager = manager
        self.authorize = authorize
        self.csrf = csrf
        self.page_size = page_size
        self.render = PageRenderer()

    @property
    def routes(self) -> list[Route]:
        get, post = self._get, self._post
        return [
            Route("/", get(self.keys), methods=["GET"]),
            Route("/new", get(self.new_form), methods=["GET"]),
            Route("/new", post(self.create), methods=["POST"]),
            Route("/{key_id}", get(self.key_page), methods=["GET"]),
            Route("/{key_id}/edit", get(self.edit_form), methods=["GET"]),
            Route("/{key_id}/edit", post(self.update), methods=["POST"]),
            Route("/{key_id}/rotate", post(self.rotate), methods=["POST"]),
            Route("/{key_id}/disable", post(self.disable), methods=["POST"]),
            Route("/{key_id}/enable", post(self.enable), methods=["POST"]),
            Route("/{key_id}/revoke", get(self.confirm_revoke), methods=["GET"]),
            Route("/{key_id}/revoke", post(self.revoke), methods=["POST"]),
        ]

    # -- the guard around every page -----------------------------------------------------

    async def actor_of(self, request: Request) -> str:
        answer = self.authorize(request)
        actor = await answer if inspect.isawaitable(answer) else answer
        if actor is None:
            raise RequestRefused(403, "forbidden", "You may not use this page.")
        try:
            return validate_actor(actor)
        except KeyManagementError:
            logger.warning("keystile: authorize returned an actor that is not valid; refused")
            raise RequestRefused(403, "forbidden", "You may not use this page.") from None

    def _get(self, page: Page) -> Callable[[Request], Awaitable[Response]]:
        return self._guarded(page, post=False)

    def _post(self, page: Page) -> Callable[[Request], Awaitable[Response]]:
        return self._guarded(page, post=True)

    def _guarded(self, page: Page, *, post: bool) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                actor = await self.actor_of(request)
                form: dict[str, str] = {}
                if post:
                    form = await read_form(request)
                    if not self.csrf.check(actor, form.get("csrf")):
                        raise RequestRefused(
                            403, "csrf_failed", "The form has expired or was not sent from here."
                        )
                return await page(request, actor, form)
            except RequestRefused as exc:
                return self.message(request, exc.status_code, exc.error, exc.description)
            except KeyNotFound:
                return self.message(request, 404, "not_found", "No such key.")
            except StoreError as exc:
                logger.warning("keystile: admin page request failed: %s", exc)
                return self.message(request, 503, "unavailable", "The key store is unavailable.")
            except KeyManagementError as exc:
                return self.message(request, 409, "refused", str(exc))

        endpoint.__name__ = page.__name__
        return endpoint

    def message(self, request: Request, status: int, error: str, detail: str) -> Response:
        return self.render.page(
            request, "message.html", status_code=status, error=error, detail=detail
        )

    def _page(self, request: Request, actor: str, template: str, **context: Any) -> Response:
        status = context.pop("status_code", 200)
        return self.render.page(
            request,
            template,
            status_code=status,
            actor=actor,
            csrf=self.csrf.make(actor),
            **context,
        )

    async def _record(self, request: Request) -> KeyRecord:
        key_id = str(request.path_params.get("key_id", ""))
        record = await self.manager.store.get(key_id) if _KEY_ID.fullmatch(key_id) else None
        if record is None:
            raise KeyNotFound(key_id)
        return record

    def _form_again(
        self,
        request: Request,
        actor: str,
        record: KeyRecord | None,
        values: dict[str, str],
        exc: KeyManagementError | RequestRefused,
    ) -> Response:
        """The create or edit form as it was sent, with why it was refused (422)."""
        if isinstance(exc, KeyNotFound):
            raise exc
        detail = exc.description if isinstance(exc, RequestRefused) else str(exc)
        context = {"key": record, "values": values, "error": detail}
        return self._page(request, actor, "form.html", status_code=422, **context)

    def _to_key(self, request: Request, record: KeyRecord) -> Response:
        base = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(f"{base}/{record.id}", status_code=303)

    # -- the pages ---------------------------------------------------------------------

    async def keys(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        """Every key, filtered by owner, state, name and expiry within N days, a page at a time."""
        query = request.query_params
        owner, state = query.get("owner", "").strip(), query.get("state", "")
        name, expiring = query.get("name", "").strip(), query.get("expiring", "").strip()
        if state and state not in STATES:
            raise _refused("state", f"one of {', '.join(STATES)}")
        if expiring and not (expiring.isdigit() and int(expiring) <= 36500):
            raise _refused("expiring", "a number of days")
        records = await (self.manager.list(owner) if owner else self.manager.list_all())
        now = utcnow()
        horizon = int(expiring) * 86400 if expiring else None
        shown = [r for r in records if _matches(r, now, state, name.lower(), horizon)]
        pages = max(1, math.ceil(len(shown) / self.page_size))
        number = query.get("page", "1")
        page = min(max(int(number) if number.isdigit() and len(number) < 7 else 1, 1), pages)
        filters = {"owner": owner, "state": state, "name": name, "expiring": expiring}
        link = {k: v for k, v in filters.items() if v}
        return self._page(
            request,
            actor,
            "keys.html",
            keys=shown[(page - 1) * self.page_size : page * self.page_size],
            total=len(shown),
            page=page,
            pages=pages,
            filters=filters,
            states=STATES,
            previous=urlencode({**link, "page": page - 1}) if page > 1 else None,
            next=urlencode({**link, "page": page + 1}) if page < pages else None,
            now=now,
            when=_when,
        )

    async def key_page(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        """A key: its state, scopes, limits, allowlist, last use, usage chart and events."""
        record = await self._record(request)
        span = request.query_params.get("range", "24h")
        if span not in RANGES:
            span = "24h"
        delta, by = RANGES[span]
        now = utcnow()
        buckets = await self.manager.usage(
            record.id,
            owner=record.owner,
            since=delta,
            by=by,
        )
        events = await self.manager.events(key_id=record.id, limit=100)
        return self._page(
            request,
            actor,
            "key.html",
            key=record,
            status=record.status(now),
            chart=chart(buckets, now - delta, now, by),
            span=span,
            spans=list(RANGES),
            events=list(reversed(events)),
            json=lambda value: json.dumps(value, sort_keys=True, ensure_ascii=False),
            when=_when,
            grace="1h",
        )

    async def new_form(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        values = dict.fromkeys(FIELDS, "")
        values["owner"] = request.query_params.get("owner", "")
        return self._page(request, actor, "form.html", key=None, values=values, error=None)

    async def create(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        values = {name: form.get(name, "") for name in FIELDS}
        try:
            fields = _fields(values)
            expires = fields.pop("expires", None)
            new = await self.manager.create(
                owner=values["owner"].strip(), expires_in=expires, actor=actor, **fields
            )
        except (KeyManagementError, RequestRefused) as exc:
            return self._form_again(request, actor, None, values, exc)
        return self._page(request, actor, "secret.html", key=new.record, secret=new.key)

    async def edit_form(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        record = await self._record(request)
        values = _values_of(record)
        return self._page(request, actor, "form.html", key=record, values=values, error=None)

    async def update(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        record = await self._record(request)
        current = _values_of(record)
        values = {name: form.get(name, current[name]) for name in FIELDS}
        values["owner"] = record.owner
        changed = {name: values[name] for name in FIELDS if values[name] != current[name]}
        try:
            expires = changed.pop("expires", "").strip()
            fields = _fields({**dict.fromkeys(FIELDS, ""), **changed}, only=changed)
            if expires.lower() == "never":
                fields["expires_at"] = None
            elif expires:
                fields["expires_in"] = _duration("expires", expires)
            if fields:
                await self.manager.update(record.id, owner=record.owner, actor=actor, **fields)
        except (KeyManagementError, RequestRefused) as exc:
            return self._form_again(request, actor, record, values, exc)
        return self._to_key(request, record)

    async def rotate(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        record = await self._record(request)
        grace = _duration("grace", form.get("grace", "")) or DEFAULT_ROTATION_GRACE
        new = await self.manager.rotate(record.id, owner=record.owner, grace=grace, actor=actor)
        return self._page(request, actor, "secret.html", key=new.record, secret=new.key)

    async def disable(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        record = await self._record(request)
        await self.manager.disable(record.id, owner=record.owner, actor=actor)
        return self._to_key(request, record)

    async def enable(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        record = await self._record(request)
        await self.manager.enable(record.id, owner=record.owner, actor=actor)
        return self._to_key(request, record)

    async def confirm_revoke(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        record = await self._record(request)
        return self._page(request, actor, "confirm.html", key=record)

    async def revoke(self, request: Request, actor: str, form: dict[str, str]) -> Response:
        record = await self._record(request)
        if form.get("confirm") != record.id:
            raise RequestRefused(400, "not_confirmed", "Type the key's id to confirm.")
        await self.manager.revoke(record.id, owner=record.owner, actor=actor)
        return self._to_key(request, record)


def _matches(record: KeyRecord, now: datetime, state: str, name: str, horizon: int | None) -> bool:
    """Whether ``record`` passes the list's filters (``name`` lowercased)."""
    if state and record.status(now) != state:
        return False
    if name and name not in record.name.lower():
        return False
    if horizon is None:
        return True
    expires = record.expires_at
    return expires is not None and 0 < (expires - now).total_seconds() <= horizon


# -- form fields -------------------------------------------------------------------------


def _duration(field: str, text: str) -> Any:
    if not text.strip():
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise _refused(field, str(exc)) from None


def _values_of(record: KeyRecord) -> dict[str, str]:
    """A key's fields as its edit form shows them."""
    refill = record.quota_refill
    return {
        "owner": record.owner,
        "name": record.name,
        "scopes": " ".join(record.scopes),
        "expires": "",
        "rate_limit": record.rate_limit or "",
        "quota": "" if record.quota is None else str(record.quota),
        "quota_refill": "" if refill is None else f"{int(refill.total_seconds())}s",
        "ip_allowlist": " ".join(record.ip_allowlist),
        "metadata": json.dumps(dict(record.metadata), sort_keys=True) if record.metadata else "",
    }


def _fields(values: dict[str, str], only: dict[str, str] | None = None) -> dict[str, Any]:
    """The manager's arguments from a form's text: every field, or those in ``only``."""
    wanted = FIELDS if only is None else tuple(only)
    fields: dict[str, Any] = {}
    for name in wanted:
        text = values[name]
        if name == "owner":
            continue
        if name in ("scopes", "ip_allowlist"):
            fields[name] = _words(text)
        elif name in ("expires", "quota_refill"):
            fields[name] = _duration(name, text)
        elif name == "quota":
            if text.strip() and not text.strip().isdigit():
                raise _refused("quota", "a whole number of requests")
            fields[name] = int(text) if text.strip() else None
        elif name == "metadata":
            fields[name] = _metadata(text)
        elif name == "rate_limit":
            fields[name] = text.strip() or None
        else:
            fields[name] = text
    return fields


def _metadata(text: str) -> dict[str, Any] | None:
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise _refused("metadata", "a JSON object is expected") from None
    if not isinstance(value, dict):
        raise _refused("metadata", "a JSON object is expected")
    return value
