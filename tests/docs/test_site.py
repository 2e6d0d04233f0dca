"""The documentation site builds with no warning, fetches nothing, and documents the public API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import choreograph

ROOT = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).parent / "mkdocs"
#: Elements whose URL a browser fetches when it shows a page (links a reader follows are fine).
FETCHED = re.compile(
    r"<(?:script|img|iframe|audio|video|source)\b[^>]*\bsrc=\"(https?:)?//[^\"]*\""
    r"|<link\b[^>]*\bhref=\"(https?:)?//[^\"]*\""
    r"|url\(['\"]?(https?:)?//",
    re.I,
)


def test_the_site_builds_strictly_and_fetches_nothing_when_read(tmp_path: Path) -> None:
    # given the docs as they are
    site = tmp_path / "site"
    # when the site is built with warnings as errors (what `make docs` and CI run)
    build = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    # then it succeeds without a warning
    assert build.returncode == 0, build.stdout + build.stderr
    assert "WARNING" not in build.stderr, build.stderr
    # and no page or stylesheet makes the browser fetch anything from elsewhere
    pages = [*site.rglob("*.html"), *site.rglob("*.css")]
    assert len([p for p in pages if p.suffix == ".html"]) > 20
    for page in pages:
        text = page.read_text(errors="replace")
        found = [m.group(0) for m in FETCHED.finditer(text)]
        assert not found, f"{page.relative_to(site)} fetches {found[:3]}"
        # Material's script would load mermaid from a CDN for a mermaid diagram
        assert 'class="mermaid"' not in text, f"{page.relative_to(site)} has a mermaid diagram"


def test_every_public_name_is_in_the_api_reference() -> None:
    reference = "\n".join(p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: choreograph\.(\w+)\s*$", reference, re.M))
    missing = sorted(set(choreograph.__all__) - documented - {"__version__"})
    assert not missing, f"add '::: choreograph.NAME' to a page of docs/reference/ for {missing}"
