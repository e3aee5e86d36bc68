"""The README is a front door: small, two Quickstart commands, and every link in it and in docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fence = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            out.append(line)
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in _prose(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = _slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def quickstart_commands(text: str) -> list[str]:
    """Non-comment lines of the code blocks under the "Quickstart" heading (as the new-user check reads them)."""
    out, section, fence = [], False, False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fence = not fence
            continue
        if not fence and re.match(r"#+ ", line):
            section = bool(re.search(r"quick ?start", line, re.I))
            continue
        if section and fence and line.strip() and not line.strip().startswith("#"):
            out.append(line.strip().removeprefix("$ "))
    return out


def test_readme_is_at_most_12_kb():
    size = len(README.read_bytes())
    assert size <= 12_000, f"README.md is {size} bytes; move detail into docs/ (limit 12,000)."


def test_quickstart_has_the_run_and_the_test_command():
    cmds = quickstart_commands(README.read_text(encoding="utf-8"))
    assert cmds == ["make demo", "make test"], f"Quickstart command lines: {cmds}"


def test_no_broad_process_killing_advice():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for word in ("pkill", "killall"):
            assert word not in text, f"{page.relative_to(ROOT)} advises `{word}`; stop processes by their ids."


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for line in _prose(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(README.read_text(encoding="utf-8"))}
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_slug_matches_github():
    assert _slug("User level (`--privacy user`)") == "user-level---privacy-user"
    assert _slug("Per-round series (every run, `metrics.jsonl`)") == "per-round-series-every-run-metricsjsonl"
    assert _slug("What no ε here covers") == "what-no-ε-here-covers"
