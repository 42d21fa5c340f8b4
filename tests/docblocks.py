"""The Markdown docs' fenced code blocks, for the tests that compile and run them.

``project/test_docs.py`` checks every block; the adapter tests run the block that shows
their framework (``block_under``) against a key made as the CLI makes it (``mint``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keystile import CHEAPEST_PARAMETERS, KeyManager

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INTEGRATION = ROOT / "docs" / "integration.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").rglob("*.py"))
FRAGMENT_MARK = "<!-- fragment -->"


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


async def mint(*, scopes: list[str] | None = None) -> str:
    """A key in the default database, as ``keystile create`` in the same directory makes it."""
    async with KeyManager.from_url(argon2=CHEAPEST_PARAMETERS) as manager:
        created = await manager.create(owner="acme", name="laptop", scopes=scopes or [])
    return created.key


def run_block(block: Block) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"snippet_{block.line}"}
    exec(compile(block.code, block.where, "exec", dont_inherit=True), namespace)  # noqa: S102
    return namespace
