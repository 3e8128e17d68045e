"""The code blocks of README.md and of the pages under docs/: each Python block runs (``make test-docs``, with
pytest-markdown-docs and the fixtures of tests/docs_fixtures.py), and every block that does not run says why in the
markdown source, in an HTML comment right above it: ``<!-- not run: <reason> -->``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

markdown_it = pytest.importorskip("markdown_it")

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"python", "python3", "py"}
NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->\s*$", re.S)


def documents() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def fences(text: str):
    """(first line, info words, the HTML comment right above or None) of every fenced block."""
    tokens = markdown_it.MarkdownIt("commonmark").parse(text)
    for i, token in enumerate(tokens):
        if token.type != "fence":
            continue
        info = token.info.strip()
        if info.startswith("{"):  # MkDocs superfences: {.python fixture:x notest}
            words = info.strip("{}").split()
            words = [w[1:] for w in words if w.startswith(".")][:1] + [w for w in words if not w.startswith(".")]
        else:
            words = info.split()
        above = tokens[i - 1] if i else None
        comment = above.content if above is not None and above.type == "html_block" else None
        yield token.map[0] + 1, words, comment


def runs(words: list[str]) -> bool:
    return bool(words) and words[0] in RUNS and "notest" not in words


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_runs_or_says_why_not(path):
    unexplained = []
    for line, words, comment in fences(path.read_text()):
        if runs(words):
            continue
        if comment is None or not NOT_RUN.search(comment.strip()):
            unexplained.append(f"line {line}: ```{' '.join(words)}")
    assert not unexplained, (
        f"{path.name}: blocks that do not run need `<!-- not run: <reason> -->` right above "
        "them: " + "; ".join(unexplained)
    )


def test_the_readme_and_the_pages_have_blocks_that_run_and_few_that_do_not():
    """The README shows the usage, which runs; the other examples live on the pages under docs/, where they run too.
    Across the README and the pages, few blocks do not run (the commands that install, build environments, train for
    minutes, or need GPUs and inference servers: verl's three reward managers each have their command, which
    tests compose with verl's own configuration)."""
    readme = list(fences((ROOT / "README.md").read_text()))
    assert sum(runs(words) for _, words, _ in readme) >= 1
    blocks = [block for path in documents() for block in fences(path.read_text())]
    assert sum(runs(words) for _, words, _ in blocks) >= 6
    assert sum(not runs(words) for _, words, _ in blocks) <= 7


def test_the_rule_itself():
    text = (
        "```python\nx = 1\n```\n\n<!-- not run: needs a GPU -->\n```python notest\nx = 2\n```\n\n"
        "```bash\nmake demo\n```\n\n<!-- a comment that gives no reason -->\n```bash\nls\n```\n"
    )
    found = [(words, comment) for _, words, comment in fences(text)]
    assert [runs(w) for w, _ in found] == [True, False, False, False]
    explained = [c is not None and bool(NOT_RUN.search(c.strip())) for _, c in found]
    assert explained == [False, True, False, False]


def test_sphinx_roles_become_plain_code_spans_on_the_site():
    hooks = Path(__file__).resolve().parents[1] / "docs" / "hooks"
    spec = importlib.util.spec_from_file_location("sphinx_roles", hooks / "sphinx_roles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    html = (
        "see :func:<code>dense_rlhf.dense_rewards</code> and :mod:<code>~dense_rlhf.capture.rows</code>, "
        "not <code>x</code>"
    )
    assert (
        module.strip_roles(html)
        == "see <code>dense_rlhf.dense_rewards</code> and <code>rows</code>, not <code>x</code>"
    )
