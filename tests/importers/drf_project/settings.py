"""A Django project with djangorestframework-api-key, on SQLite or Postgres.

``DRF_PROJECT_DATABASE`` is ``sqlite:///path`` or ``postgresql://user@host:port/db?schema=S``
(the tables go in schema ``S``, which must exist). Run by ``mint.py`` in a process of its
own, so its settings never meet the suite's other Django project.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

SECRET_KEY = "keystile-import-tests-only"
INSTALLED_APPS = ["rest_framework", "rest_framework_api_key"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _database(url: str) -> dict[str, Any]:
    if url.startswith("sqlite:///"):
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": url[len("sqlite:///") :]}
    parts = urlsplit(url)
    schema = parse_qs(parts.query)["schema"][0]
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": parts.username or "",
        "PASSWORD": parts.password or "",
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": {"options": f"-c search_path={schema}"},
    }


DATABASES = {"default": _database(os.environ["DRF_PROJECT_DATABASE"])}
