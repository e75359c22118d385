"""README.md and docs/*.md: every relative link and anchor resolves, README stays a two-minute read, and
the generated sections are what tools/update_readme.py makes from the committed JSON."""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE = re.compile(r"(`+).*?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def _prose(text: str) -> str:
    """The page without fenced blocks and inline code, where a bracket is not a link."""
    return _CODE.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set(_HTML_ANCHOR.findall(text))
    for _, heading in _HEADING.findall(_FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """Each relative link of `page` whose file or anchor does not exist, as `target: why`."""
    problems = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = page if not path_part else (page.parent / path_part).resolve()
        if not dest.exists():
            problems.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
        elif anchor and dest.suffix != ".md":
            problems.append(f"{target}: an anchor into a file that is not Markdown")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_checker_finds_broken_links(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "other.md").write_text("# Other page\n\n## A `code` heading: twice\n\n## A `code` heading: twice\n")
    page = tmp_path / "README.md"
    page.write_text("# Top\n\n## llama.cpp's tools (ours)\n\n"
                    "[fine](docs/other.md) [fine](docs/other.md#other-page) [fine](#llamacpps-tools-ours)\n"
                    "[fine](docs/other.md#a-code-heading-twice-1) ![img](docs/other.md) [web](https://example.com/x)\n"
                    "`[not a link](nowhere.md)`\n```\n[not a link either](nowhere.md)\n```\n"
                    "[missing file](docs/nowhere.md) [missing anchor](docs/other.md#no-such-heading)\n"
                    "[missing here](#top-1) [third twin](docs/other.md#a-code-heading-twice-2)\n")
    assert [p.split(":")[0] for p in broken_links(page)] == [
        "docs/nowhere.md", "docs/other.md#no-such-heading", "#top-1", "docs/other.md#a-code-heading-twice-2"]


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_keeps_the_fresh_machine_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "bash tools/demo.sh" in readme and "bash tools/test.sh" in readme


def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "tools" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_sections_match_the_committed_json():
    """Numbers are never typed by hand: each page's generated sections are what the script renders now."""
    update_readme = _update_readme()
    for page in update_readme.PAGES:
        text = (REPO / page).read_text(encoding="utf-8")
        assert update_readme.render(page, text) == text, f"{page} is stale: run python tools/update_readme.py"


def test_a_benchmark_not_run_yet_says_how_to_run_it(monkeypatch):
    update_readme = _update_readme()
    monkeypatch.setattr(update_readme, "_tool_result", lambda name: None)
    body = update_readme.context_shift_section()
    assert body.startswith("_Not measured yet") and "tools/bench_context_shift.py" in body
    page = "<!-- generated:context_shift -->\nold\n<!-- /generated:context_shift -->\n"
    monkeypatch.setattr(update_readme, "PAGES", {"x.md": {"context_shift": update_readme.context_shift_section}})
    assert update_readme.render("x.md", page) == f"<!-- generated:context_shift -->\n{body}<!-- /generated:context_shift -->\n"
