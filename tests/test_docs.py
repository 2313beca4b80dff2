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


# ------------------------------------------------------------------------- the commands of docs/reproduce.md
REPRODUCE = os.path.join(ROOT, "docs", "reproduce.md")
SCRIPTS = ("agft.py", "tecoa.py", "advflyp.py", "fare.py", "evaluate.py", "figures.py")


def shell_commands(path):
    """The project's commands in the bash blocks of a Markdown page, as (script, argv), shell as a reader runs it:
    continuation lines joined, comments dropped, a `for V in a b c; do` loop's variable set to its first value (other
    variables, set by the shell, to 'x'), `torchrun ...` and `python` before the script dropped."""
    import shlex
    text, commands, fence, variables = "", [], False, {}
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fence = line.strip() == "```bash"
            continue
        if fence:
            text += line
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        for var, values in re.findall(r"for (\w+) in ([^;]+); do", line):
            variables[var] = shlex.split(values)[0]
        line = re.sub(r"for \w+ in [^;]+; do", ";", line)
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), "x"), line)
        for part in re.split(r";|&&", line):
            words = shlex.split(part, comments=True)
            scripts = [k for k, w in enumerate(words) if w in SCRIPTS]
            if scripts:
                commands.append((words[scripts[0]], words[scripts[0] + 1:]))
    return commands


def test_reproduce_page_covers_every_table_and_figure():
    """A section for each numbered table and figure of both papers (AGFT: Tables 1-15, Figures 1-4; AdvFLYP: Tables
    1-14, Figures 1-5; a diagram's section says so), each heading naming its paper, and the commands in them."""
    covered = set()
    for line in open(REPRODUCE, encoding="utf-8"):
        paper = re.match(r"### (AGFT|AdvFLYP) ", line)
        if paper:
            covered |= {(paper.group(1), kind, int(n)) for kind, n in re.findall(r"(Table|Figure) (\d+)", line)}
    wanted = ({("AGFT", "Table", n) for n in range(1, 16)} | {("AGFT", "Figure", n) for n in range(1, 5)}
              | {("AdvFLYP", "Table", n) for n in range(1, 15)} | {("AdvFLYP", "Figure", n) for n in range(1, 6)})
    assert sorted(wanted - covered) == []
    assert len(shell_commands(REPRODUCE)) >= 60


@pytest.mark.parametrize("page", ["reproduce.md", "figures.md"])
def test_reproduce_commands_parse_with_each_scripts_own_parser(page, tmp_path, monkeypatch):
    """Every command of docs/reproduce.md (and figures.md) goes through its script's parse_args, checks included, in
    a folder where the data paths it names exist (an empty folder or file: what parse_args looks at)."""
    import importlib
    monkeypatch.chdir(tmp_path)
    commands = shell_commands(os.path.join(ROOT, "docs", page))
    assert commands
    for script, argv in commands:
        for flag in ("--data", "--val-data", "--class-names"):
            if flag in argv and argv[argv.index(flag) + 1] not in ("synthetic", "demo", "TinyImageNet"):
                path = argv[argv.index(flag) + 1]
                if os.path.splitext(path)[1] or flag == "--class-names":
                    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                    open(path, "a").close()
                else:
                    os.makedirs(path, exist_ok=True)
        module = importlib.import_module(script[:-3])
        try:
            module.parse_args(argv)
        except SystemExit as e:  # argparse: an unknown flag or a bad value
            pytest.fail(f"{script} {' '.join(argv)}: argparse exit {e.code}")
        except Exception as e:
            pytest.fail(f"{script} {' '.join(argv)}: {type(e).__name__}: {e}")


def project_imports(path):
    """The project files that `path` imports (any import statement, at any depth of the file)."""
    import ast
    project = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & project


def test_the_layout_of_imports():
    """common.py imports no other file of the project (the ground floor reaches up to nothing: the demo's picture is
    figures.py in a process of its own); each method script imports common.py alone; figures.py is the only importer
    of matplotlib and scikit-learn."""
    assert project_imports(os.path.join(ROOT, "common.py")) == set()
    for script in ("agft.py", "tecoa.py", "advflyp.py", "fare.py"):
        assert project_imports(os.path.join(ROOT, script)) == {"common"}, script
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        if os.path.basename(path) != "figures.py":
            text = open(path).read()
            assert not re.search(r"^\s*(import|from)\s+(matplotlib|sklearn)", text, re.M), path
