"""The documentation: the site builds with ``mkdocs build --strict`` (a broken link, a missing anchor or a page
left out of the nav fails it, see mkdocs.yml's ``validation``), every page of docs/ is in the nav, and README.md
stays a front door whose relative links all lead somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_extra

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 250

# [text](target) and ![alt](target); the target ends at the first space (a title may follow) or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def nav_pages(nav) -> list[str]:
    """Every page a mkdocs nav names, depth first: entries are "page.md", {title: "page.md"} or {title: [...]}."""
    pages: list[str] = []
    for entry in nav if isinstance(nav, list) else [nav]:
        if isinstance(entry, str):
            pages.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                pages.extend(nav_pages(value))
    return pages


def mkdocs_config() -> dict:
    # mkdocs.yml uses no Python tags, so a safe load reads all of it.
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def markdown_text(path: Path) -> str:
    """The file without its fenced code blocks (a link or heading inside one is code, not Markdown)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return "\n".join(lines)


def slug(heading: str) -> str:
    """A heading's anchor as both GitHub and mkdocs' default toc make it for plain headings: markup dropped,
    lower case, everything but word characters, spaces and hyphens removed, spaces turned into hyphens."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"\s+", "-", text)


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown_text(path), re.MULTILINE)}


def relative_links(path: Path) -> list[str]:
    """The links of a Markdown file that point into the repository (no scheme, no mailto, no bare #anchor)."""
    targets = LINK.findall(markdown_text(path))
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_site_builds_with_strict(tmp_path):
    """The same build as `make docs`: any warning (a broken link or anchor, a page not in the nav, a nav entry
    without its page) fails it."""
    require_extra("mkdocs", "dev")
    require_extra("material", "dev")
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert (site / "index.html").is_file()
    for page in nav_pages(mkdocs_config()["nav"]):
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), f"{page} was not built as {built}"


def test_every_docs_page_is_in_the_nav():
    config = mkdocs_config()
    assert config.get("strict") is True
    validation = config["validation"]
    assert validation["nav"]["omitted_files"] == "warn" and validation["nav"]["not_found"] == "warn"
    assert validation["links"]["not_found"] == "warn" and validation["links"]["anchors"] == "warn"
    in_nav = nav_pages(config["nav"])
    assert len(in_nav) == len(set(in_nav)), f"pages listed twice: {sorted(p for p in in_nav if in_nav.count(p) > 1)}"
    pages = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
    missing = sorted(set(pages) - set(in_nav))
    assert not missing, f"docs pages not in mkdocs.yml's nav: {missing}"
    absent = sorted(set(in_nav) - set(pages))
    assert not absent, f"mkdocs.yml's nav names pages that do not exist: {absent}"


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): " \
                                           "move the detail into a page of docs/"
    # The quickstart: what users and CI (.ci/run) run, worded as before.
    assert "make run    # creates .venv, installs flowvae (CPU build of torch), trains the default experiment once" \
        in lines
    assert "make test   # creates .venv if needed, installs flowvae with its test tools, runs the test suite" in lines


@pytest.mark.parametrize("document", ["README.md", "CONTRIBUTING.md"])
def test_relative_links_point_to_existing_files(document):
    """Every relative link (and picture) of the top-level documents leads to a file of the repository, and a
    link to a heading of a Markdown file to a heading that is there."""
    path = ROOT / document
    links = relative_links(path)
    if document == "README.md":
        assert any(t.startswith("docs/") for t in links), "README.md links into docs/"
    broken = []
    for target in links:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve()
        if not resolved.is_file():
            broken.append(f"{target}: no file {file}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: {file} has no heading #{anchor}")
    assert not broken, f"broken links in {document}: {broken}"
