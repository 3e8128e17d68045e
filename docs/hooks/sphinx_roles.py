"""The docstrings' Sphinx roles (``:func:`dense_rewards` ``) shown on the site as the code spans they name.

The docstrings serve ``help()`` and editors as well as the site, so they keep Sphinx's roles. mkdocstrings renders
their Markdown and leaves a role's prefix as text (":func:" before the code span): this hook drops the prefix and,
as Sphinx does, shortens a name written ``~dense_rlhf.capture.attention`` to ``attention``.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def strip_roles(html: str) -> str:
    """``html`` with each role prefix before a code span removed (and ``~`` names shortened)."""
    return ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html)


def on_page_content(html, page, config, files):
    return strip_roles(html)
