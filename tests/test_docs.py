"""The documentation, checked without building it: the README stays a front page, every relative link
in the README and in docs/ resolves (to a file, and to a heading where it names one), mkdocs.yml's nav
lists every page, and the user docs carry no issue numbers or commit hashes (those go to CHANGELOG.md).

Leaves out: rendering the site (``make docs`` runs ``mkdocs build --strict``, which CI runs too).
"""

import re
import unicodedata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
#: The README is a front page a newcomer reads in five minutes; the rest lives in docs/.
MAX_README_LINES = 250

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_EXTERNAL = ("http://", "https://", "mailto:")
#: "issue 17", "Issue 18 (part 2)": the project's issue numbers.
_ISSUE = re.compile(r"\bissues? \d+", re.I)
#: A short or full git hash: 7-40 hex digits with at least one letter and one digit.
_HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def prose(text: str) -> str:
    """The Markdown without fenced code blocks and code spans (links inside code are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """A heading's anchor as Python-Markdown's toc extension (mkdocs' default) makes it."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8")))}


def relative_links(page: Path) -> list[str]:
    links = _LINK.findall(prose(page.read_text(encoding="utf-8")))
    return [link for link in links if not link.startswith(_EXTERNAL)]


def nav_pages(nav) -> list[str]:
    """Every page a mkdocs nav names, however deeply its sections nest."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    raise TypeError(f"mkdocs.yml nav: expected a page, list or mapping, got {type(nav).__name__}")


def test_the_readme_is_a_short_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    assert lines[0].startswith("# "), f"README.md must open with its '# ' title, got {lines[0]!r}"


def test_the_readme_starts_with_the_two_commands():
    first_block = _FENCE.search(README.read_text(encoding="utf-8"))
    assert first_block, "README.md has no code block"
    commands = [line.split("#")[0].strip() for line in first_block.group(0).splitlines()[1:-1]]
    assert "make demo" in commands and "make test" in commands, first_block.group(0)


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for link in relative_links(page):
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link}: no heading '#{anchor}' in {path.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_docs_link_to_the_benchmark_plots():
    links = [link for page in doc_pages() for link in relative_links(page)]
    plots = {Path(link).name for link in links if link.endswith(".png")}
    assert (DOCS / "results").resolve() == (REPO / "benchmarks" / "results").resolve()
    assert plots, "docs/ shows no benchmark plot"
    assert plots <= {p.name for p in (REPO / "benchmarks" / "results").glob("*.png")}


def test_the_nav_lists_every_page_and_only_pages_that_exist():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = nav_pages(config["nav"])
    pages = {str(p.relative_to(DOCS)) for p in doc_pages()}
    assert len(listed) == len(set(listed)), f"a page is listed twice: {listed}"
    assert set(listed) == pages, (
        f"missing from nav: {sorted(pages - set(listed))}; not in docs/: {sorted(set(listed) - pages)}"
    )


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: str(p.relative_to(REPO)))
def test_user_docs_carry_no_issue_numbers_or_commit_hashes(page):
    text = page.read_text(encoding="utf-8")
    found = _ISSUE.findall(text) + _HASH.findall(text)
    assert not found, f"{page.relative_to(REPO)}: {found} (history goes to CHANGELOG.md)"
