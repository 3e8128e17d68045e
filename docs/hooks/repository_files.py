"""MkDocs hook: the site carries the study's notes and the committed results, and the pages link them as on GitHub.

The pages under docs/ link the results files with repository-relative links (``../experiments/results/x.md``), which
work when the markdown is read on GitHub or in a clone. MkDocs only knows the files under docs/, so such links would
fail ``mkdocs build --strict``. This hook adds the markdown files and plots of ``experiments/`` and
``benchmarks/results/`` to the site under their repository paths (``on_files``), and rewrites each page's links that
leave docs/ to those paths (``on_page_markdown``), so that MkDocs renders the results as pages and checks every such
link like any other: a link to a repository file the site does not carry, or to none at all, is a warning, which
fails the strict build. Source files are named in code spans, not linked.

The README is the site's home page: docs/index.md is replaced by its text, with its links into docs/ made relative
to docs/, and a link to the README from a page goes to the home page.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.repository_files")

CARRIED = ("experiments", "benchmarks/results")
SUFFIXES = {".md", ".png", ".svg"}
# An inline markdown link or image whose target is a relative path that starts by leaving its folder.
LINK = re.compile(r"(\]\()(\.\./[^)\s#]+)(#[^)\s]*)?(\))")


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files, config):
    root = _root(config)
    for folder in CARRIED:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES:
                files.append(
                    File(
                        path.relative_to(root).as_posix(),
                        src_dir=str(root),
                        dest_dir=config.site_dir,
                        use_directory_urls=config.use_directory_urls,
                    )
                )
    return files


HOME = "index.md"
README_LINK = re.compile(r"(\]\()docs/([^)\s]*\))")


def on_page_markdown(markdown, page, config, files):
    root, docs = _root(config), Path(config.docs_dir).resolve()
    if not Path(page.file.abs_src_path).resolve().is_relative_to(docs):
        return markdown  # a carried repository file: its links stay inside its own folder
    if page.file.src_uri == HOME:
        return README_LINK.sub(r"\1\2", (root / "README.md").read_text(encoding="utf-8"))
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match) -> str:
        target = (docs / here / match.group(2)).resolve()
        if docs in target.parents:
            return match.group(0)  # a page under docs/: MkDocs checks it
        uri = target.relative_to(root).as_posix() if root in target.parents else None
        if uri == "README.md":
            uri = HOME
        if uri is None or files.get_file_from_path(uri) is None:
            log.warning(
                "Doc file '%s' links '%s', a repository file that the site does not carry (%s)",
                page.file.src_uri,
                match.group(2),
                " and ".join(f"{c}/" for c in CARRIED),
            )
            return match.group(0)
        return match.group(1) + posixpath.relpath(uri, here or ".") + (match.group(3) or "") + match.group(4)

    return LINK.sub(rewrite, markdown)
