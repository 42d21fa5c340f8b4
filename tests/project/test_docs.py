"""The README and docs/*.md: their Python compiles, they name one database, their snippets run.

A fenced ``python`` block must be a complete module: it is compiled as one, which catches
what ``ast.parse`` alone lets through (``async with`` or ``await`` outside a function).
A block that really is a fragment says so on the line before its fence with
``<!-- fragment -->``; it must still parse.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from apps import client, installed_middleware
from docblocks import (
    DOCS,
    EXAMPLES,
    INTEGRATION,
    README,
    ROOT,
    Block,
    block_under,
    code_blocks,
    mint,
    python_blocks,
    run_block,
)
from keystile.config import DEFAULT_DATABASE_URL

SQLITE_URL = re.compile(r"sqlite:///[^\s\"'`)\]>]*")
ORIGIN = "https://app.example.com"


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
    from keystile.errors import InvalidToken

    description = InvalidToken(reason).description
    label = {"malformed": "malformed key", "expired": "expired key", "revoked": "revoked key"}
    rows = [
        line for line in README.read_text().splitlines() if line.startswith(f"| {label[reason]}")
    ]
    assert len(rows) == 1
    assert f'error_description="{description}"' in rows[0]


# -- numbers and lists that must agree --------------------------------------------------

BENCHMARKS_README = ROOT / "benchmarks" / "README.md"
RUN_PY = ROOT / "benchmarks" / "run.py"
SOURCES = sorted((ROOT / "src" / "keystile").rglob("*.py"))
#: A list of HTTP statuses written with slashes: 400/401/403/503.
STATUS_LIST = re.compile(r"\b[45]\d\d(?:/[45]\d\d){2,}\b")
#: "about 4 ms", "~4 ms": a cost said in words.
ABOUT_MS = re.compile(r"(?:~|about )(\d+(?:\.\d+)?) ms")


def measured_argon2_ms() -> float:
    """keystile's argon2id verify time, from the README's benchmark table."""
    rows = [
        line
        for line in README.read_text(encoding="utf-8").splitlines()
        if line.startswith("| argon2id verify at keystile's parameters")
    ]
    assert len(rows) == 1
    found = re.search(r"\| (\d+(?:\.\d+)?) ms / \d+ ms \|$", rows[0])
    assert found is not None, rows[0]
    return float(found.group(1))


@pytest.mark.parametrize(
    "path", [*DOCS, BENCHMARKS_README, *SOURCES], ids=lambda p: str(p.relative_to(ROOT))
)
def test_argon2_cost_is_the_measured_one_everywhere(path: Path) -> None:
    """Every argon2 cost given in words ("argon2 verification (about 4 ms)") is the
    benchmark's number, rounded; no text names a 10-100 ms range."""
    text = " ".join(path.read_text(encoding="utf-8").split())
    assert not re.search(r"10\s*(?:-|\u2013|to)\s*100 ms", text)
    expected = round(measured_argon2_ms())
    for said in ABOUT_MS.finditer(text):
        clause = re.split(r"[.;,] ", text[max(0, said.start() - 60) : said.start()])[-1]
        if "argon2" in clause.lower():
            assert round(float(said.group(1))) == expected, clause + said.group()


def test_failure_status_lists_include_429() -> None:
    """Every list of the statuses keystile fails with (400/401/403/…/503) includes 429,
    the answer of a key's rate limit or quota."""
    lists = [
        (path.name, found.group())
        for path in DOCS
        for found in STATUS_LIST.finditer(path.read_text(encoding="utf-8"))
        if "503" in found.group()
    ]
    assert lists
    assert [item for item in lists if "429" not in item[1]] == []


def run_time_claims(path: Path) -> dict[str, set[str]]:
    """What ``path`` says a benchmark run takes: {"quick": {...}, "full": {...}}, from the
    comments of the ``run.py`` command lines, the ``--quick`` option's description and
    the full run's description."""
    claims: dict[str, set[str]] = {"quick": set(), "full": set()}
    command: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if "run.py" in line or command:
            command.append(line)
            if line.rstrip().endswith("\\"):
                continue
            text = " ".join(command)
            command = []
        else:
            text = line
        for said in re.findall(r"(?:under |about |a few |~)\w*\s?minutes\b", text):
            kind = "quick" if "--quick" in text and "--only" not in text else "full"
            if kind == "full" and "full run" not in text and "run.py" not in text:
                continue
            claims[kind].add(said)
    return claims


def test_benchmark_run_times_agree() -> None:
    """The README, benchmarks/README.md and run.py promise the same time for the quick run
    (run.py's --quick help) and for the full run."""
    paths = (README, BENCHMARKS_README, RUN_PY)
    claims = {str(path.relative_to(ROOT)): run_time_claims(path) for path in paths}
    assert all(c["quick"] for c in claims.values()), claims
    assert len({said for c in claims.values() for said in c["quick"]}) == 1, claims
    assert len({said for c in claims.values() for said in c["full"]}) == 1, claims


# -- the API reference ------------------------------------------------------------------

REFERENCE = ROOT / "docs" / "reference.md"
FRAMEWORK_MODULES = (
    "keystile.fastapi",
    "keystile.litestar",
    "keystile.django",
    "keystile.quart",
    "keystile.adapters",
)


def test_reference_lists_every_public_name_once_the_middleware_first() -> None:
    """docs/reference.md renders each name of keystile.__all__ once, APIKeyMiddleware first,
    the framework modules, and each name that left ``keystile`` once, under its module."""
    import importlib
    import inspect
    import warnings

    import keystile

    shown = re.findall(r"^::: ([\w.]+)\s*$", REFERENCE.read_text(encoding="utf-8"), re.M)
    assert shown[0] == "keystile.APIKeyMiddleware"
    assert set(FRAMEWORK_MODULES) <= set(shown)
    names = [name for name in shown if name not in FRAMEWORK_MODULES]
    public = [name.removeprefix("keystile.") for name in names if name.count(".") == 1]
    assert sorted(public) == sorted(keystile.__all__)
    qualified = [name for name in names if name.count(".") > 1]
    assert len(set(qualified)) == len(qualified)
    for name in qualified:
        module, _, attribute = name.rpartition(".")
        value = getattr(importlib.import_module(module), attribute)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert getattr(keystile, attribute) is value, name  # a name that moved
        assert [w.category for w in caught] == [DeprecationWarning], name
    tree = ast.parse(inspect.getsource(keystile))
    (attach,) = (
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "_lazy.attach"
    )
    moved = ast.literal_eval(attach.args[2])
    assert sorted(name.rpartition(".")[2] for name in qualified) == sorted(moved)


def rendered_docstrings() -> list[tuple[str, str]]:
    """(where, docstring) of every object the reference page renders: the public names,
    the names shown under their modules, the framework modules and their public members,
    with their methods."""
    import importlib
    import inspect

    import keystile

    objects: list[tuple[str, Any]] = [
        (f"keystile.{n}", getattr(keystile, n)) for n in keystile.__all__
    ]
    for name in re.findall(r"^::: keystile\.(\w+\.\w+)\s*$", REFERENCE.read_text(), re.M):
        module, _, attribute = name.rpartition(".")
        objects.append(
            (f"keystile.{name}", getattr(importlib.import_module(f"keystile.{module}"), attribute))
        )
    for module_name in FRAMEWORK_MODULES:
        module = importlib.import_module(module_name)
        objects.append((module_name, module))
        objects += [(f"{module_name}.{n}", getattr(module, n)) for n in module.__all__]
    found: list[tuple[str, str]] = [(keystile.__name__, keystile.__doc__ or "")]
    for where, obj in objects:
        found.append((where, inspect.getdoc(obj) or ""))
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if not name.startswith("_") and callable(member):
                    found.append((f"{where}.{name}", inspect.getdoc(member) or ""))
    return found


def test_rendered_docstrings_have_no_rst_literal_markers() -> None:
    """No docstring the reference page renders ends a line with reStructuredText's ``::``,
    which the Markdown site would show as is."""
    marked = [where for where, doc in rendered_docstrings() if re.search(r"::\s*$", doc, re.M)]
    assert marked == []


# -- what the install lines install -----------------------------------------------------


def _project() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _name(requirement: str) -> str:
    found = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert found is not None
    return re.sub(r"[-_.]+", "-", found.group()).lower()


def test_readme_demo_line_installs_the_demo_extra() -> None:
    """The README's first command installs the demo extra and runs the demo."""
    first_screen = README.read_text(encoding="utf-8").split("\n---\n")[0]
    assert 'python -m pip install -e ".[demo]" && keystile demo' in first_screen


def test_readme_says_how_to_turn_on_every_service_test() -> None:
    """Every KEYSTILE_TEST_* and KEYSTILE_REQUIRE_* variable the tests read for a service
    is named on the README's first screen, with how to start the service."""
    tests_text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").rglob("*.py"))
    variables = set(re.findall(r"KEYSTILE_(?:TEST|REQUIRE)_[A-Z_]+", tests_text))
    variables -= {"KEYSTILE_REQUIRE_SPEEDUPS"}  # the compiled path, not a service
    assert {"KEYSTILE_TEST_POSTGRES_URL", "KEYSTILE_TEST_REDIS_URL"} <= variables
    first_screen = README.read_text(encoding="utf-8").split("\n---\n")[0]
    assert [v for v in sorted(variables) if v not in first_screen] == []
    for start in ("pg_ctlcluster", "redis-server", "apt-get install chromium", "/usr/bin/chromium"):
        assert start in first_screen, start


#: Run in a subprocess: keystile demo --self-test with every distribution outside
#: ``sys.argv[1]`` (a JSON list) made unimportable, as in a venv with only those installed.
ONLY_THESE_DISTRIBUTIONS = """
import importlib.abc, importlib.metadata, json, re, sys
allowed = set(json.loads(sys.argv[1]))
owners = importlib.metadata.packages_distributions()
class OnlyAllowed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        dists = owners.get(name.partition(".")[0], [])
        if dists and not any(re.sub(r"[-_.]+", "-", d).lower() in allowed for d in dists):
            raise ModuleNotFoundError(f"not installed here: {name}", name=name)
        return None
sys.meta_path.insert(0, OnlyAllowed())
from keystile.cli import main
sys.exit(main(["demo", "--self-test", "--port", "0"]))
"""


def test_demo_runs_with_only_the_demo_extra(tmp_path: Path) -> None:
    """keystile demo --self-test passes with nothing importable but keystile, its
    dependencies, the demo extra and what those require (as after
    ``pip install -e ".[demo]"`` in a fresh venv)."""
    import importlib.metadata
    import subprocess
    import sys

    project = _project()
    wanted = [*project["dependencies"], *project["optional-dependencies"]["demo"]]
    allowed = {"keystile", *(_name(r) for r in wanted)}
    todo = list(allowed)
    while todo:
        try:
            requires = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            name = _name(requirement)
            if "extra ==" not in requirement and name not in allowed:
                allowed.add(name)
                todo.append(name)
    assert "uvicorn" in allowed and "fastapi" not in allowed and "httptools" not in allowed
    done = subprocess.run(
        [sys.executable, "-c", ONLY_THESE_DISTRIBUTIONS, json.dumps(sorted(allowed))],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("(expected 200)") == 2


def test_every_dev_dependency_is_used() -> None:
    """Each package of the dev extra is imported or named somewhere in the project (code,
    tests, benchmarks, examples, the docs site's configuration); a types-X stub package
    goes with X."""
    import importlib.metadata

    texts = [ROOT / "mkdocs.yml", ROOT / ".ci" / "run"]
    for folder in ("src", "tests", "benchmarks", "examples", "docs"):
        texts += (ROOT / folder).rglob("*.py")
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in texts)
    import_names: dict[str, set[str]] = {}
    for top, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            import_names.setdefault(_name(dist), set()).add(top)
    dev = [_name(r) for r in _project()["optional-dependencies"]["dev"]]
    unused = []
    for name in dev:
        target = name.removeprefix("types-")
        names = import_names.get(target, set()) | {target.replace("-", "_")}
        if not any(re.search(rf"\b{re.escape(n)}\b", text) for n in names if not n.startswith("_")):
            unused.append(name)
    assert unused == []
