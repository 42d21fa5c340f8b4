"""A Postgres URL as the store reads it: what asyncpg is given, which database it names,
and the password it carries, kept out of every message."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ...errors import ConfigurationError

__all__ = ["PostgresURL"]


@dataclass(frozen=True)
class PostgresURL:
    #: The URL asyncpg connects with: keystile's own ``schema`` parameter removed, since
    #: asyncpg passes unknown query parameters to the server as settings, where it would
    #: be rejected.
    dsn: str
    #: The URL's ``schema`` parameter, if any.
    schema: str | None
    #: ``host:port/database``: the database, whatever the URL's spelling.
    server: str
    password: str | None = field(repr=False)

    @classmethod
    def parse(cls, url: str) -> PostgresURL:
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigurationError(f"invalid Postgres URL: {exc}") from None
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ConfigurationError(
                f"a Postgres URL starts with postgresql:// or postgres://, not {parts.scheme!r}"
            )
        query = parse_qsl(parts.query, keep_blank_values=True)
        host = parts.hostname or next((v for k, v in query if k == "host"), "localhost")
        try:
            port: int | str = parts.port or 5432
        except ValueError:  # a multi-host URL; asyncpg parses it, the identity need not
            port = parts.netloc.rsplit("@", 1)[-1]
        database = parts.path.lstrip("/") or parts.username or ""
        return cls(
            dsn=urlunsplit(parts._replace(query=urlencode([q for q in query if q[0] != "schema"]))),
            schema=next((v for k, v in query if k == "schema"), None),
            server=f"{host}:{port}/{database}",
            password=parts.password or next((v for k, v in query if k == "password"), None),
        )

    def redact(self, text: str) -> str:
        """``text`` with the password masked: URLs and error messages pass through here
        before they reach a log, an exception or a terminal."""
        with contextlib.suppress(ValueError):  # not a URL after all: the rules below apply
            parts = urlsplit(text)
            if parts.scheme and parts.password is not None:
                user = parts.username or ""
                host = parts.netloc.rsplit("@", 1)[1]
                text = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
        text = re.sub(r"(?i)(password=)[^&\s]*", r"\1***", text)
        if self.password:
            for form in {self.password, unquote(self.password)}:
                text = text.replace(form, "***")
        return text
