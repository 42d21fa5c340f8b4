"""The app uvicorn serves in the server benchmark (``uvicorn --factory server_app:create``).

Configured by environment variables, set by ``server.py``:

* ``KEYSTILE_BENCH_FRAMEWORK``: ``starlette`` or ``fastapi``;
* ``KEYSTILE_BENCH_KEYS``: 0 for the bare app, else the number of cached keys;
* ``KEYSTILE_BENCH_TOKEN_FILE``: where the protected app writes the token to present.
"""

from __future__ import annotations

import os
import pathlib

from starlette.types import ASGIApp

from apps import fastapi_app, protect, starlette_app
from keystile.tokens import generate_key


def create() -> ASGIApp:
    framework = os.environ.get("KEYSTILE_BENCH_FRAMEWORK", "starlette")
    n_keys = int(os.environ.get("KEYSTILE_BENCH_KEYS", "0"))
    token_file = pathlib.Path(os.environ["KEYSTILE_BENCH_TOKEN_FILE"])
    app: ASGIApp = fastapi_app() if framework == "fastapi" else starlette_app()
    if n_keys > 0:
        app, token = protect(app, n_keys)
    else:
        token = generate_key()[0].encode()  # the bare app ignores it; same header size
    tmp = token_file.with_suffix(".tmp")
    tmp.write_bytes(token)
    tmp.replace(token_file)
    return app
