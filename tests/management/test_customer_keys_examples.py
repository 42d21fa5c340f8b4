"""examples/customer_keys_fastapi.py and customer_keys_starlette.py, over ASGI, and the
docs blocks that show them: a signed-in customer makes a key on the API keys page and
calls the API with it; staff see it on the admin page; nobody signed in gets neither."""

from __future__ import annotations

import re
from typing import Any

import pytest

from apps import client, load_example
from docblocks import INTEGRATION, ROOT, block_under
from keystile import CHEAPEST_PARAMETERS

pytestmark = pytest.mark.anyio

EXAMPLES = {
    "customer_keys_fastapi": ("On FastAPI", {"demo_sign_in": True}),
    "customer_keys_starlette": ("On Starlette", {"demo_sign_in_route": True}),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
async def test_customer_keys_example(name: str, sqlite_database_url: str) -> None:
    """Create a key as a signed-in customer (the secret once), call /items with it (200);
    another organisation cannot see it (404); staff list it on the admin page."""
    example = load_example(name)
    _, flag = EXAMPLES[name]
    app: Any = example.create_app(sqlite_database_url, argon2=CHEAPEST_PARAMETERS, **flag)
    async with client(app) as http:
        refused = await http.get("/account/keys/")
        assert (refused.status_code, refused.json()["error"]) == (401, "unauthorized")
        assert (await http.get("/admin/keys/")).status_code == 403
        await http.post("/demo/sign-in", params={"org_id": "acme"})
        made = await http.post("/account/keys/", json={"name": "ci", "scopes": ["items:read"]})
        assert made.status_code == 201, made.text
        key, key_id = made.json()["key"], made.json()["id"]
        served = await http.get("/items", headers={"authorization": f"Bearer {key}"})
        assert served.json() == {"owner": "acme", "key": "apikey:ci", "items": []}
        await http.post("/demo/sign-in", params={"org_id": "globex", "staff": "ada@example.com"})
        assert (await http.get(f"/account/keys/{key_id}")).status_code == 404
        admin = await http.get("/admin/keys/")
        assert admin.status_code == 200
        assert re.search(rf'href="/admin/keys/{key_id}"', admin.text)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_docs_show_the_example(name: str) -> None:
    """The code under "An API keys page for your customers" is the example file, verbatim."""
    heading, _ = EXAMPLES[name]
    text = (ROOT / "examples" / f"{name}.py").read_text(encoding="utf-8")
    block = block_under(INTEGRATION, heading, containing="def create_app(")
    assert block.code in text, f"docs/integration.md's {heading} block differs from {name}.py"
