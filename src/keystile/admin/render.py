"""Pages out, forms in: the admin page's HTML responses and the forms it reads.

Every page is rendered by Jinja2 from the templates in this package with autoescaping on,
so a key's name, metadata or an event's detail is text, never markup. Each response
carries a fresh nonce and a Content-Security-Policy that allows nothing but the page's own
``<style>`` and ``<script>`` elements with that nonce, form posts to the admin itself,
and no framing; it is never cached. Forms are read as
``application/x-www-form-urlencoded`` (what an HTML form sends), with a size cap.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import HTMLResponse

from ..errors import ConfigurationError, RequestRefused

try:
    import jinja2
except ImportError as exc:  # pragma: no cover - exercised where jinja2 is missing
    raise ConfigurationError(
        "keystile.admin renders its pages with Jinja2: pip install 'keystile[admin]'"
    ) from exc

__all__ = ["MAX_FORM", "PageRenderer", "read_form"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: The largest form read, in bytes.
MAX_FORM = 64 * 1024
#: At most this many fields in one form.
MAX_FIELDS = 50


def content_security_policy(nonce: str) -> str:
    return (
        "default-src 'none'; "
        f"style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


class PageRenderer:
    """The package's templates, autoescaped, rendered into locked-down responses."""

    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def page(
        self, request: Request, template: str, *, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        nonce = secrets.token_urlsafe(18)
        base = request.scope.get("root_path", "").rstrip("/")
        html = self.env.get_template(template).render(nonce=nonce, base=base, **context)
        headers = {
            "Content-Security-Policy": content_security_policy(nonce),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
        }
        return HTMLResponse(html, status_code=status_code, headers=headers)


async def read_form(request: Request) -> dict[str, str]:
    """The fields of an HTML form post (the last value of a repeated field); 415 for
    another body type, 413 past ``MAX_FORM`` bytes."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise RequestRefused(415, "unsupported_media_type", "Send the form as a web form.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise RequestRefused(413, "body_too_large", "The form is too large.")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise RequestRefused(400, "malformed_form", "The form could not be read.") from None
    return dict(pairs)
