"""The README and docs/*.md: their Python compiles, they name one database, their snippets run.

A fenced ``python`` block must be a complete module: it is compiled as one, which catches
what ``ast.parse`` alone lets through (``async with`` or ``await`` outside a function).
A block that really is a fragment says so on the line before its fence with
``<!-- fragment -->``; it must still parse.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from apps import client, installed_middleware
from keystile import CHEAPEST_PARAMETERS, KeyManager
from keystile.config import DEFAULT_DATABASE_URL

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
INTEGRATION = ROOT / "docs" / "integration.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").rglob("*.py"))
FRAGMENT_MARK = "<!-- fragment -->"
SQLITE_URL = re.compile(r"sqlite:///[^\s\"'`)\]>]*")
ORIGIN = "https://app.example.com"


@dataclass(frozen=True)
class Block:
    """A fenced code block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    heading: str  # the nearest heading above it, without the #s
    language: str
    code: str
    fragment: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, with the heading it sits under."""
    blocks: list[Block] = []
    heading = ""
    previous = ""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            indent = len(line) - len(line.lstrip())
            fence = stripped[: len(stripped) - len(stripped.lstrip("`"))]
            language = stripped[len(fence) :].strip().split(" ")[0]
            body: list[str] = []
            j = i + 1
            while j < len(lines) and lines[j].strip() != fence:
                body.append(lines[j][indent:])
                j += 1
            assert j < len(lines), f"{path.name}:{i + 1}: unclosed code fence"
            code = "\n".join(body) + "\n"
            blocks.append(Block(path, i + 1, heading, language, code, previous == FRAGMENT_MARK))
            i = j + 1
            previous = ""
            continue
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if stripped:
            previous = stripped
        i += 1
    return blocks


def python_blocks(*paths: Path) -> list[Block]:
    return [b for path in paths for b in code_blocks(path) if b.language == "python"]


def block_under(path: Path, heading: str, *, containing: str = "") -> Block:
    """The one Python block of ``path`` under ``heading`` (and containing ``containing``)."""
    found = [b for b in python_blocks(path) if b.heading == heading and containing in b.code]
    assert len(found) == 1, f"{path.name}: {len(found)} python blocks under {heading!r}"
    return found[0]


# -- every block ------------------------------------------------------------------------


def test_the_parser_finds_the_blocks() -> None:
    """The block parser sees the README's Python blocks (so the checks below are not vacuous)."""
    blocks = python_blocks(README)
    assert len(blocks) >= 5
    assert any("Starlette(" in b.code for b in blocks)
    assert all(b.code.strip() for b in blocks)


def test_the_parser_reads_headings_and_fragment_marks(tmp_path: Path) -> None:
    """A block knows its heading, and only the mark right above its fence makes a fragment."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Use\n\n<!-- fragment -->\n\n```python\nawait x\n```\n\n"
        "Text.\n\n```python\nx = 1\n```\n\n```bash\necho\n```\n",
        encoding="utf-8",
    )
    blocks = code_blocks(page)
    assert [(b.heading, b.language, b.fragment) for b in blocks] == [
        ("Use", "python", True),
        ("Use", "python", False),
        ("Use", "bash", False),
    ]
    assert blocks[0].code == "await x\n"


@pytest.mark.parametrize("block", python_blocks(*DOCS), ids=lambda b: b.where)
def test_python_block_compiles(block: Block) -> None:
    """Each ```python block compiles as a module; a marked fragment at least parses."""
    if block.fragment:
        ast.parse(block.code, filename=block.where)
    else:
        compile(block.code, block.where, "exec", dont_inherit=True)


def test_compiling_catches_top_level_async_with() -> None:
    """The check is stricter than ast.parse: a top-level ``async with`` fails it."""
    snippet = "async with manager as keys:\n    await keys.list('acme')\n"
    ast.parse(snippet)
    with pytest.raises(SyntaxError, match="outside async function"):
        compile(snippet, "<snippet>", "exec", dont_inherit=True)


# -- one database URL -------------------------------------------------------------------


def sqlite_urls(path: Path) -> set[str]:
    return set(SQLITE_URL.findall(path.read_text(encoding="utf-8")))


def test_readme_names_one_database() -> None:
    """Every sqlite:/// URL in the README is the CLI's and the middleware's default."""
    urls = sqlite_urls(README)
    assert urls == {DEFAULT_DATABASE_URL}, urls


@pytest.mark.parametrize("path", DOCS[1:] + EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_and_examples_name_the_same_database(path: Path) -> None:
    """docs/ and examples/ use no other SQLite file than the README's."""
    assert sqlite_urls(path) <= {DEFAULT_DATABASE_URL}


# -- the snippets run -------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory without KEYSTILE_DATABASE_URL: the snippets' defaults apply."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYSTILE_DATABASE_URL", raising=False)
    return tmp_path


async def mint(*, scopes: list[str] | None = None) -> str:
    """A key in the default database, as ``keystile create`` in the same directory makes it."""
    async with KeyManager.from_url(argon2=CHEAPEST_PARAMETERS) as manager:
        created = await manager.create(owner="acme", name="laptop", scopes=scopes or [])
    return created.key


def run_block(block: Block) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"snippet_{block.line}"}
    exec(compile(block.code, block.where, "exec", dont_inherit=True), namespace)  # noqa: S102
    return namespace


@pytest.mark.anyio
async def test_readme_starlette_snippet_runs(workdir: Path) -> None:
    """The README's Starlette app: /health without a key, a CLI-default key on /whoami."""
    key = await mint(scopes=["items:write"])
    app = run_block(block_under(README, "Starlette"))["app"]
    auth = {"Authorization": f"Bearer {key}"}
    async with client(app) as c:
        health = await c.get("/health")
        whoami = await c.get("/whoami", headers=auth)
        anonymous = await c.get("/whoami")
        created = await c.post("/items", headers=auth)
    await installed_middleware(app).aclose()
    assert (health.status_code, health.text) == (200, "ok")
    assert whoami.json() == {"key": "apikey:laptop", "scopes": ["authenticated", "items:write"]}
    assert anonymous.status_code == 401
    assert created.json() == {"created": True}


@pytest.mark.anyio
async def test_readme_fastapi_snippet_runs(workdir: Path) -> None:
    """The README's FastAPI app: Swagger UI without a key, whoami and a scope check with one."""
    key = await mint(scopes=["items:read"])
    app = run_block(block_under(README, "FastAPI"))["app"]
    auth = {"X-API-Key": key}
    async with client(app) as c:
        docs = await c.get("/docs")
        whoami = await c.get("/whoami", headers=auth)
        refused = await c.post("/items", headers=auth)
    await installed_middleware(app).aclose()
    assert docs.status_code == 200
    assert whoami.json()["scopes"] == ["items:read"]
    assert refused.status_code == 403


def test_readme_key_manager_snippet_runs(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's KeyManager script runs as it stands, in the default database."""
    run_block(block_under(README, "Managing keys", containing="KeyManager"))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("ks_")
    assert printed[1] == "0 stale keys"
    assert (workdir / "keystile.db").exists()


@pytest.mark.anyio
@pytest.mark.parametrize("framework", ["FastAPI", "Starlette"])
async def test_cors_snippets_put_cors_outermost(workdir: Path, framework: str) -> None:
    """The CORS snippets: the preflight is CORSMiddleware's, keystile's 401 carries CORS headers."""
    key = await mint()
    blocks = [b for b in python_blocks(INTEGRATION) if b.heading == "CORS"]
    block = next(b for b in blocks if f"from {framework.lower()}" in b.code)
    app = run_block(block)["app"]
    preflight_headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, x-api-key",
    }
    async with client(app) as c:
        preflight = await c.options("/whoami", headers=preflight_headers)
        refused = await c.get("/whoami", headers={"Origin": ORIGIN})
        allowed = await c.get("/whoami", headers={"Origin": ORIGIN, "X-API-Key": key})
    await installed_middleware(app).aclose()
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    assert "WWW-Authenticate" in refused.headers["access-control-expose-headers"]
    assert allowed.json() == {"key": "apikey:laptop"}
    assert allowed.headers["access-control-allow-origin"] == ORIGIN


# -- the OAuth example in the docs ------------------------------------------------------


def test_oauth_docs_block_is_the_example() -> None:
    """The code in "API keys for machines, OAuth for people" is the example file, verbatim."""
    example = (ROOT / "examples" / "oauth_side_by_side.py").read_text(encoding="utf-8")
    block = block_under(INTEGRATION, "API keys for machines, OAuth for people")
    assert "async def caller(" in block.code
    assert "def create_app(" in block.code
    assert block.code in example, (
        "docs/integration.md's OAuth block differs from examples/oauth_side_by_side.py; "
        "copy the example's code (from `from __future__` to `return app`) into the docs"
    )


@pytest.mark.parametrize("reason", ["malformed", "expired", "revoked"])
def test_readme_error_table_quotes_the_real_descriptions(reason: str) -> None:
    """The README's error table gives each invalid-key row the description keystile sends."""
    from keystile import InvalidToken

    description = InvalidToken(reason).description
    label = {"malformed": "malformed key", "expired": "expired key", "revoked": "revoked key"}
    rows = [
        line for line in README.read_text().splitlines() if line.startswith(f"| {label[reason]}")
    ]
    assert len(rows) == 1
    assert f'error_description="{description}"' in rows[0]
