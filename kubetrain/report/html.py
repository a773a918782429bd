"""Self-contained HTML and Markdown reports built from sections.

A report is a title plus a list of `Section`s; each section has a title and
optionally text, headline numbers (`facts`), tables (lists of dict rows) and
images (PNG bytes from `kubetrain.report.plots`). `html_page` turns them into one
standalone HTML document: images are base64 ``data:`` URIs, the CSS is inline,
and there is no script, font or stylesheet to fetch, so it renders in the
Kubeflow UI's sandboxed iframe and offline. `markdown_page` gives the same
content as Markdown without the images (the KFP Markdown viewer cannot show
embedded ones).

All text that can come from user data (titles, class names, column names,
cell values) is escaped: a class called ``<script>`` shows up as text.

Section text is "markdown-ish": paragraphs separated by blank lines, lines
starting with ``- `` form a bullet list, and ``**bold**`` and `` `code` `` work
inline. Nothing else is interpreted (no links, no raw HTML).
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetrain.data.datasets import write_text

__all__ = [
    "Image",
    "Table",
    "Section",
    "format_value",
    "data_uri",
    "html_table",
    "html_page",
    "markdown_table",
    "markdown_page",
    "write_html",
    "write_markdown",
]


# --------------------------------------------------------------------------- model


@dataclass
class Image:
    """An embedded figure: PNG (or JPEG) bytes and a caption."""

    data: bytes
    caption: str = ""


@dataclass
class Table:
    """Rows of dicts; columns default to every key, in first-seen order."""

    rows: list[Mapping[str, Any]]
    caption: str = ""
    columns: list[str] | None = None


@dataclass
class Section:
    """One titled block of a report.

    `text` is a string (or a list of paragraphs) of markdown-ish text;
    `facts` are headline numbers shown as a compact key/value strip;
    `tables` and `images` accept the `Table`/`Image` types or their plain
    forms: a list of dict rows, PNG bytes, ``(png, caption)`` tuples, or
    dicts with ``rows``/``data`` (``png``) and ``caption`` keys.
    """

    title: str
    text: str | Sequence[str] = ""
    facts: Mapping[str, Any] = field(default_factory=dict)
    tables: list[Any] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)

    @classmethod
    def coerce(cls, value: Section | Mapping[str, Any]) -> Section:
        """A `Section` from itself or from a dict with the same keys."""
        if isinstance(value, Section):
            return value
        if isinstance(value, Mapping):
            keys = ("title", "text", "facts", "tables", "images")
            known = {k: value[k] for k in keys if k in value}
            known.setdefault("title", "")
            return cls(**known)
        raise TypeError(f"a report section must be a Section or a dict, not {type(value).__name__}")

    def table_list(self) -> list[Table]:
        return [_coerce_table(t) for t in (self.tables or [])]

    def image_list(self) -> list[Image]:
        return [_coerce_image(i) for i in (self.images or [])]


def _coerce_table(value: Any) -> Table:
    if isinstance(value, Table):
        return value
    if isinstance(value, Mapping):
        return Table(
            rows=list(value.get("rows") or []),
            caption=str(value.get("caption") or ""),
            columns=value.get("columns"),
        )
    return Table(rows=list(value or []))


def _coerce_image(value: Any) -> Image:
    if isinstance(value, Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image(bytes(value))
    if isinstance(value, Mapping):
        data = value.get("data", value.get("png"))
        return Image(bytes(data), str(value.get("caption") or ""))
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], (bytes, bytearray)):
        return Image(bytes(value[0]), str(value[1]) if len(value) > 1 else "")
    raise TypeError(
        f"a report image must be PNG bytes, (bytes, caption) or Image, not {type(value).__name__}"
    )


# --------------------------------------------------------------------------- values

_MAX_LIST_ITEMS = 8


def format_value(value: Any) -> str:
    """Plain text for a table cell: floats to 4 significant digits, None empty.

    Integers are printed whole, booleans as true/false, and lists/dicts
    (e.g. a trial's params) compactly with their floats formatted too; lists
    longer than 8 items show their first four and last two.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "nan"
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        return f"{number:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if len(value) > _MAX_LIST_ITEMS:  # e.g. a trial's per-epoch values
            head = ", ".join(format_value(v) for v in value[:4])
            tail = ", ".join(format_value(v) for v in value[-2:])
            return f"[{head}, \u2026, {tail}] ({len(value)} values)"
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if hasattr(value, "item") and callable(value.item):  # numpy scalar of another kind
        try:
            return format_value(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> list[str]:
    if columns:
        return [str(c) for c in columns]
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def _cell(row: Mapping[str, Any], column: str) -> Any:
    if column in row:
        return row[column]
    for key, value in row.items():  # non-string keys (e.g. ints) are matched by text
        if str(key) == column:
            return value
    return None


def _timestamp(when: datetime | str | None) -> str:
    if isinstance(when, str):
        return when
    when = when or datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="seconds")


def data_uri(image: bytes) -> str:
    """A ``data:`` URI for PNG or JPEG bytes."""
    image = bytes(image)
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    elif image.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    else:
        raise ValueError("report images must be PNG or JPEG bytes")
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


# --------------------------------------------------------------------------- HTML

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f7f9; color: #1f2328;
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: #24364b; color: #fff; padding: 20px 24px 16px; }
header h1 { margin: 0; font-size: 1.55em; font-weight: 600; }
header .subtitle { margin: 4px 0 0; opacity: .9; }
header .generated { margin: 6px 0 0; font-size: .8em; opacity: .7; }
main { max-width: 1100px; margin: 0 auto; padding: 16px 16px 40px; }
nav.toc { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; padding: 10px 16px;
  margin-bottom: 16px; }
nav.toc ol { margin: 4px 0; padding-left: 22px; columns: 2 220px; }
nav.toc a { color: #0969da; text-decoration: none; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; padding: 4px 20px 16px;
  margin-bottom: 16px; }
section h2 { font-size: 1.2em; margin: 14px 0 8px; padding-bottom: 4px;
  border-bottom: 1px solid #eaeef2; }
p { margin: 6px 0; }
ul { margin: 6px 0; padding-left: 22px; }
code { font: .88em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  background: #eff1f3; padding: 1px 4px; border-radius: 4px; }
.facts { display: flex; flex-wrap: wrap; gap: 8px; margin: 10px 0; padding: 0; }
.fact { margin: 0; background: #f0f4f8; border: 1px solid #d8dee4; border-radius: 6px;
  padding: 6px 12px; min-width: 110px; }
.fact dt { font-size: .75em; color: #57606a; text-transform: uppercase; letter-spacing: .03em; }
.fact dd { margin: 0; font-size: 1.15em; font-weight: 600; font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; margin: 10px 0; }
figure { margin: 0; flex: 1 1 440px; max-width: 100%; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; border-radius: 4px; }
figcaption, .table-caption { font-size: .85em; color: #57606a; margin-top: 4px; }
.table-wrap { overflow-x: auto; margin: 10px 0; }
table { border-collapse: collapse; font-size: .88em; min-width: 40%; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; white-space: nowrap; }
tbody tr:nth-child(even) { background: #f6f8fa; }
tbody tr:hover { background: #eaf2fc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.empty { color: #57606a; font-style: italic; }
footer { text-align: center; font-size: .8em; color: #57606a; padding: 8px; }
@media (max-width: 600px) { main { padding: 8px; } section { padding: 4px 10px 12px; } }
"""

# No network, no scripts: everything must be inline or a data: URI.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_BULLET = re.compile(r"^\s*[-*]\s+")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _inline(text: str) -> str:
    out = _esc(text)  # escaping adds no backticks or asterisks, so markup survives it
    out = _CODE.sub(r"<code>\1</code>", out)
    return _BOLD.sub(r"<strong>\1</strong>", out)


def _blocks(text: str | Sequence[str] | None) -> list[str]:
    if not text:
        return []
    parts = [text] if isinstance(text, str) else [str(t) for t in text]
    blocks: list[str] = []
    for part in parts:
        blocks += [b.strip("\n") for b in re.split(r"\n\s*\n", part) if b.strip()]
    return blocks


def _html_text(text: str | Sequence[str] | None) -> str:
    out = []
    for block in _blocks(text):
        lines = [line for line in block.splitlines() if line.strip()]
        if all(_BULLET.match(line) for line in lines):
            items = "".join(f"<li>{_inline(_BULLET.sub('', line))}</li>" for line in lines)
            out.append(f"<ul>{items}</ul>")
        else:
            out.append(f"<p>{_inline(' '.join(line.strip() for line in lines))}</p>")
    return "\n".join(out)


def html_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, caption: str = ""
) -> str:
    """An HTML ``<table>`` (in a scrolling wrapper) with headers from the row keys."""
    rows = [r for r in (rows or []) if isinstance(r, Mapping)]
    cap = f'<div class="table-caption">{_esc(caption)}</div>' if caption else ""
    if not rows:
        return f'<div class="table-wrap"><p class="empty">no rows</p>{cap}</div>'
    cols = _columns(rows, columns)
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = []
    for row in rows:
        cells = []
        for col in cols:
            value = _cell(row, col)
            css = ' class="num"' if _is_number(value) else ""
            cells.append(f"<td{css}>{_esc(format_value(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>{cap}</div>"
    )


def _html_facts(facts: Mapping[str, Any] | None) -> str:
    if not facts:
        return ""
    items = "".join(
        f'<div class="fact"><dt>{_esc(k)}</dt><dd>{_esc(format_value(v))}</dd></div>'
        for k, v in facts.items()
    )
    return f'<dl class="facts">{items}</dl>'


def _html_images(images: list[Image]) -> str:
    if not images:
        return ""
    figures = []
    for image in images:
        alt = _esc(image.caption or "figure")
        cap = f"<figcaption>{_esc(image.caption)}</figcaption>" if image.caption else ""
        figures.append(f'<figure><img src="{data_uri(image.data)}" alt="{alt}">{cap}</figure>')
    return f'<div class="figures">{"".join(figures)}</div>'


def _html_section(section: Section, anchor: str) -> str:
    parts = [
        f'<section id="{anchor}">',
        f"<h2>{_esc(section.title)}</h2>",
        _html_text(section.text),
        _html_facts(section.facts),
        _html_images(section.image_list()),
    ]
    parts += [html_table(t.rows, t.columns, t.caption) for t in section.table_list()]
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def html_page(
    title: str,
    sections: Iterable[Section | Mapping[str, Any]],
    subtitle: str = "",
    generated_at: datetime | str | None = None,
) -> str:
    """A complete standalone HTML document (inline CSS, images as data URIs).

    A table of contents is added when there are more than three sections.
    `generated_at` defaults to now (UTC, ISO 8601).
    """
    items = [Section.coerce(s) for s in sections]
    anchors = [f"s{i + 1}" for i in range(len(items))]
    toc = ""
    if len(items) > 3:
        links = "".join(
            f'<li><a href="#{a}">{_esc(s.title)}</a></li>'
            for a, s in zip(anchors, items, strict=False)
        )
        toc = f'<nav class="toc"><strong>Contents</strong><ol>{links}</ol></nav>'
    body = "\n".join(_html_section(s, a) for s, a in zip(items, anchors, strict=False))
    stamp = _esc(_timestamp(generated_at))
    sub = f'<p class="subtitle">{_esc(subtitle)}</p>' if subtitle else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{_esc(title)}</h1>
{sub}
<p class="generated">Generated <time datetime="{stamp}">{stamp}</time></p>
</header>
<main>
{toc}
{body}
</main>
<footer>kubetrain report</footer>
</body>
</html>
"""


# --------------------------------------------------------------------------- Markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def _md_escape(value: Any) -> str:
    """Text shown literally in Markdown: no HTML, no emphasis, no table breaks."""
    text = " ".join(str(value).split())  # a newline would end a table row
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-style pipe table; numeric columns are right-aligned."""
    rows = [r for r in (rows or []) if isinstance(r, Mapping)]
    if not rows:
        return "_no rows_"
    cols = _columns(rows, columns)
    numeric = {
        c
        for c in cols
        if all(_is_number(_cell(r, c)) or _cell(r, c) is None for r in rows)
        and any(_is_number(_cell(r, c)) for r in rows)
    }
    lines = [
        "| " + " | ".join(_md_escape(c) for c in cols) + " |",
        "|" + "|".join("---:" if c in numeric else "---" for c in cols) + "|",
    ]
    for row in rows:
        cells = (_md_escape(format_value(_cell(row, c))) for c in cols)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _md_text(text: str | Sequence[str] | None) -> str:
    # The text is already markdown-ish; only raw HTML is neutralized.
    return "\n\n".join(html.escape(block, quote=False) for block in _blocks(text))


def markdown_page(
    title: str,
    sections: Iterable[Section | Mapping[str, Any]],
    subtitle: str = "",
    generated_at: datetime | str | None = None,
) -> str:
    """The report as Markdown: text, facts and tables; images become a one-line note."""
    out = [f"# {_md_escape(title)}"]
    if subtitle:
        out.append(f"_{_md_escape(subtitle)}_")
    out.append(f"Generated {_md_escape(_timestamp(generated_at))}")
    for raw in sections:
        section = Section.coerce(raw)
        out.append(f"## {_md_escape(section.title)}")
        text = _md_text(section.text)
        if text:
            out.append(text)
        if section.facts:
            facts = [{"metric": k, "value": v} for k, v in section.facts.items()]
            out.append(markdown_table(facts))
        for table in section.table_list():
            if table.caption:
                out.append(f"**{_md_escape(table.caption)}**")
            out.append(markdown_table(table.rows, table.columns))
        images = section.image_list()
        if images:
            captions = "; ".join(_md_escape(i.caption) for i in images if i.caption)
            note = f"{len(images)} figure(s) in the HTML report"
            out.append(f"_{note}: {captions}_" if captions else f"_{note}_")
    return "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------- files


def write_html(
    path: str | os.PathLike,
    title: str,
    sections: Iterable[Section | Mapping[str, Any]],
    subtitle: str = "",
    generated_at: datetime | str | None = None,
) -> Path:
    """Render `html_page` and write it atomically to `path`; returns the path."""
    text = html_page(title, sections, subtitle=subtitle, generated_at=generated_at)
    return write_text(path, text)


def write_markdown(
    path: str | os.PathLike,
    title: str,
    sections: Iterable[Section | Mapping[str, Any]],
    subtitle: str = "",
    generated_at: datetime | str | None = None,
) -> Path:
    """Render `markdown_page` and write it atomically to `path`; returns the path."""
    text = markdown_page(title, sections, subtitle=subtitle, generated_at=generated_at)
    return write_text(path, text)
