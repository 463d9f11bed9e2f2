"""The docs stay true to the tree: every relative link and #anchor in README.md and docs/*.md
resolves (GitHub's anchor rule), every repository path they name exists, every `python -m`
module they show runs something, and the README stays short."""
from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose(path: Path) -> list[str]:
    """The page's lines with fenced code blanked (line numbers kept)."""
    out, fence = [], False
    for line in path.read_text().split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
            out.append("")
        else:
            out.append("" if fence else line)
    return out


def anchors(path: Path) -> set[str]:
    seen, out = collections.Counter(), set()
    for line in prose(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page):
    broken = []
    for i, line in enumerate(prose(page), 1):
        line = re.sub(r"`[^`]*`", lambda m: m.group(0) if "](" in m.group(0) else "", line)
        for m in re.finditer(r"\]\(([^)\s]+)\)", line):
            target = m.group(1)
            if re.match(r"^[a-z]+://|^mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{i}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{i}: {target} (no such heading)")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_paths_and_modules_exist(page):
    text = page.read_text()
    missing = [p for p in re.findall(r"(?<![\w./-])((?:tools|train|pipelines|tests|configs)/[\w./-]+\.(?:py|yaml|sh))",
                                     text) if not (REPO / p).exists() and "/x." not in p]
    for module in re.findall(r"python -m ([\w.]+)", text):
        base = REPO / module.replace(".", "/")
        if not (base.with_suffix(".py").exists() or (base / "__main__.py").exists()):
            missing.append(f"python -m {module}")
    assert not missing, missing


def test_readme_is_short_and_maps_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in (REPO / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, page.name
