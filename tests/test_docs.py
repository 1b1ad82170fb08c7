"""README.md is the front page; docs/*.md hold the reference. Every link between them resolves.

A relative link names an existing file, and a ``#fragment`` a heading of that file (GitHub's
anchors: lower case, punctuation dropped, spaces as hyphens). Every page is linked from the
README, so none is an orphan.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO_ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file (fenced code skipped)."""
    out, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+://", t)]


@pytest.mark.parametrize("path", [REPO_ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    found = links(path)
    for target in found:
        file, _, fragment = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: {target} names a missing file"
        if fragment:
            assert fragment in anchors(dest), f"{path.name}: {target} names a missing heading"


def test_readme_is_a_front_page_linking_every_page() -> None:
    readme = REPO_ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 300
    linked = {(REPO_ROOT / t.partition("#")[0]).resolve() for t in links(readme)}
    assert len(PAGES) >= 10
    assert [p.name for p in PAGES if p.resolve() not in linked] == []
