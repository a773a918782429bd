"""User text made inert inside Markdown that the Kubeflow UI, model registries and GitHub render.

Class names, column names, sources and settings come from users' data: left
as they are, ``<script>`` or ``[x](javascript:...)`` would run or link in a
reader's browser, and a newline could forge a section or a table row.
"""

from __future__ import annotations

import html
import re
from typing import Any

_MARKDOWN = re.compile(r"[\\`*\[\]()!|~{}#]")
# '_' only emphasises at a word boundary, so `learning_rate` stays readable as is.
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md_text(value: Any) -> str:
    """``value`` on one line, HTML-escaped, with Markdown syntax backslash-escaped."""
    text = " ".join(str(value).split())
    text = html.escape(text, quote=False)
    text = _MARKDOWN.sub(lambda m: "\\" + m.group(0), text)
    return _EDGE_UNDERSCORE.sub(r"\\_", text)
