"""MkDocs hook: one site from files written for the repository.

``docs/index.md`` and ``docs/benchmarks.md`` only name the file they show (the README,
``benchmarks/README.md``) with ``<!-- include: PATH -->``; the hook reads it in. Links are
written for the repository (the README links to ``docs/*.md``, the guides to
``../examples/…``), so each is resolved against the file's place in the repository and
pointed at the site's page for it, or, for a file the site does not carry (examples,
sources), turned into plain text naming the path.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

_INCLUDE = re.compile(r"^<!-- include: (\S+) -->\s*$")
_LINK = re.compile(r"(!?)\[([^\]]+)\]\(([^)#\s]+)(#[^)\s]*)?\)")
_SITE_PAGES = {
    "README.md": "index.md",
    "benchmarks/README.md": "benchmarks.md",
}


def on_page_markdown(markdown: str, page: Any, config: Any, **_: Any) -> str:
    root = Path(config["config_file_path"]).parent
    source = "docs/" + page.file.src_uri
    match = _INCLUDE.match(markdown.strip())
    if match is not None:
        source = match.group(1)
        markdown = (root / source).read_text(encoding="utf-8")
    folder = posixpath.dirname(source)

    def rewrite(link: re.Match[str]) -> str:
        bang, text, target, anchor = link.groups()
        anchor = anchor or ""
        if "://" in target or target.startswith("mailto:"):
            return link.group(0)
        path = posixpath.normpath(posixpath.join(folder, target))
        if path in _SITE_PAGES:
            return f"{bang}[{text}]({_SITE_PAGES[path]}{anchor})"
        if path.startswith("docs/"):
            return f"{bang}[{text}]({path[len('docs/') :]}{anchor})"
        return f"{text} (`{path}`)"

    return _LINK.sub(rewrite, markdown)
