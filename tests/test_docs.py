"""The documentation: every relative link in README.md and docs/ resolves (file and heading), and nothing in the
repository points at files outside it."""
import glob
import os
import re
import subprocess

import pytest

from conftest import ROOT

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def headings(path):
    """GitHub's anchors of a Markdown file's headings (outside code fences): lower case, punctuation other than '-'
    and '_' dropped, spaces to '-', repeats numbered -1, -2, ..."""
    anchors, seen, fence = set(), {}, False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def links(path):
    """(line number, target) of every Markdown link in `path` outside code fences and inline code."""
    out, fence = [], False
    for number, line in enumerate(open(path, encoding="utf-8"), 1):
        if line.startswith("```"):
            fence = not fence
            continue
        if not fence:
            out += [(number, t) for t in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line))]
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
    broken = []
    for number, target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not os.path.exists(path):
            broken.append(f"line {number}: {target} (no such file)")
        elif anchor and (not path.endswith(".md") or anchor not in headings(path)):
            broken.append(f"line {number}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_docs_are_reachable_from_the_readme():
    """Every page of docs/ is linked from the README or from another page."""
    linked = {os.path.normpath(os.path.join(os.path.dirname(p), t.partition("#")[0]))
              for p in PAGES for _, t in links(p) if t.partition("#")[0] and not re.match(r"[a-z]+:", t)}
    assert [os.path.relpath(p, ROOT) for p in PAGES[1:] if p not in linked] == []


def test_nothing_points_outside_the_repository():
    """Users have the repository alone: no path into a folder beside it, no file name of a paper's private copy."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    tracked = [f for f in tracked if os.path.exists(os.path.join(ROOT, f))]
    pattern = re.compile(r"\.\./shared|SPEC\.md|SPEC §|papers/00\d_|seed 00\d")
    hits = [f"{f}:{n}" for f in tracked if f.endswith((".py", ".md", ".txt", ".tsv", ".cfg", ".ini"))
            and f != "tests/test_docs.py"
            for n, line in enumerate(open(os.path.join(ROOT, f), encoding="utf-8"), 1) if pattern.search(line)]
    assert hits == []
