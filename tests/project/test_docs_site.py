"""The documentation site builds with MkDocs in strict mode: no broken link, no missing page."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` succeeds and renders every page; the API reference starts
    with APIKeyMiddleware and shows no reStructuredText ``::`` marker."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    for page in ("integration", "operations", "security", "architecture", "benchmarks"):
        assert (site / page / "index.html").is_file()
    reference = (site / "reference" / "index.html").read_text(encoding="utf-8")
    assert "APIKeyMiddleware" in reference and "KeyManager" in reference
    objects = re.findall(r'<h\d id="(keystile\.[\w.]+)"', reference)
    assert objects[0] == "keystile.APIKeyMiddleware"  # the public API first
    assert objects.index("keystile.KeyManager") < objects.index("keystile.cache.VerifiedKeyCache")
    article = reference[reference.index("<article") : reference.index("</article>")]
    text = [line.strip() for line in html.unescape(re.sub(r"<[^>]+>", "\n", article)).splitlines()]
    assert [line for line in text if line == "::" or re.search(r"\w::$", line)] == []
    overview = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="integration/' in overview  # README links point at the site's pages
