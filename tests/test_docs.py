"""The project documents itself: every `docs/<file>.md#<section>` cited in the code, the tests,
the benchmarks and the docs names a heading that exists, and nothing cites documents the
repository does not hold."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("fastbml", "kernels", "csrc", "tests", "benchmarks", "scripts", "docs")
SUFFIXES = {".py", ".h", ".cpp", ".sh", ".md"}
REFERENCE = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")


def _files() -> list[Path]:
    found = [ROOT / "README.md"]
    for top in SOURCES:
        found += [p for p in (ROOT / top).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return found


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} (.+)", line)
        if match:
            slug = _slug(match.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _references() -> list[tuple[str, str, str | None]]:
    return [(str(path.relative_to(ROOT)), doc, anchor)
            for path in _files()
            for doc, anchor in REFERENCE.findall(path.read_text(errors="replace"))]


def test_the_code_cites_sections_of_the_project_docs():
    refs = _references()
    assert len(refs) > 30  # the code does cite the docs
    cited = {doc for _, doc, _ in refs}
    assert {"methods.md", "design.md"} <= cited


@pytest.mark.parametrize("doc", sorted({doc for _, doc, _ in _references()}))
def test_every_cited_section_exists(doc):
    path = ROOT / "docs" / doc
    assert path.is_file(), f"docs/{doc} is cited but does not exist"
    anchors = _anchors(path)
    missing = sorted({(where, anchor) for where, d, anchor in _references()
                      if d == doc and anchor and anchor not in anchors})
    assert not missing, f"sections of docs/{doc} that do not exist: {missing}"


def test_nothing_cites_documents_outside_the_repository():
    outside = re.compile(r"\b(SPEC|DESIGN) (§|P\d)|\.\./shared/|METHODS-WAVE")
    offenders = [str(p.relative_to(ROOT)) for p in _files()
                 if p.name != "test_docs.py" and outside.search(p.read_text(errors="replace"))]
    assert not offenders, offenders
