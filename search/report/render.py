"""A report as sections (paragraphs, a table, a picture, a code block), rendered as Markdown and as one
self-contained HTML page."""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fika.search.trials import split_key


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}" if abs(value) >= 1e-2 or value == 0 else f"{value:.1e}"
    return str(value)


def short_key(key: str) -> str:
    """`train.learning_rate` -> `learning_rate`, `data.sources.ultrachat.weight` -> `ultrachat.weight`."""

    def short(part: str) -> str:
        pieces = part.split(".")
        return ".".join(pieces[-2:]) if part.startswith("data.sources.") else pieces[-1]

    return ", ".join(short(part) for part in split_key(key))


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    classes: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)  # paragraphs; `code` is kept as code in both renderings
    table: Table | None = None
    image: str | None = None
    code: str | None = None
    note: bool = False  # a highlighted remark


def render_markdown(title: str, sections: list[Section]) -> str:
    md = [f"# {title}", ""]
    for s in sections:
        if s.title:
            md += [f"## {s.title}", ""]
        md += [(f"> {line}" if s.note else line) for line in s.lines] + ([""] if s.lines else [])
        if s.table:
            md.append("| " + " | ".join(s.table.headers) + " |")
            md.append("|" + "|".join("---" for _ in s.table.headers) + "|")
            md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in s.table.rows]
            md.append("")
        if s.image:
            md += [f"![{s.title}]({s.image})", ""]
        if s.code:
            md += ["```yaml", s.code.strip(), "```", ""]
    return "\n".join(md)


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1600px;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;font-size:.8rem}th,td{border-bottom:1px solid #ddd;padding:.3rem .5rem;"
    "text-align:right;white-space:nowrap}th{background:#f4f4f4;position:sticky;top:0}td:nth-child(2){text-align:left}"
    "td.text{text-align:left;white-space:normal;min-width:8rem}tr.pruned{color:#777}tr.failed,tr.diverged{color:#a00}"
    "tr.baseline{font-style:italic;background:#fffbe6}tr.best{font-weight:600}"
    ".note{border-left:4px solid #e0a800;margin:1rem 0;padding:.5rem 1rem;background:#fffbe6}"
    "img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:1rem;overflow:auto}"
    ".wrap{overflow-x:auto}code{background:#f4f4f4;padding:0 .2rem}"
)


def inline_html(text: str) -> str:
    """Escapes text and turns `code` spans into <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(title: str, sections: list[Section], images: dict[str, bytes]) -> str:
    """The same report as one self-contained HTML page (plots inline as data URIs)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for s in sections:
        if s.title:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
        lines = [line.removeprefix("- ") for line in s.lines]
        if s.lines and all(line.startswith("- ") for line in s.lines):
            parts.append("<ul>" + "".join(f"<li>{inline_html(line)}</li>" for line in lines) + "</ul>")
        else:
            parts += [f"<p{' class=note' if s.note else ''}>{inline_html(line)}</p>" for line in lines]
        if s.table:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in s.table.headers)
            body = []
            for i, row in enumerate(s.table.rows):
                css = s.table.classes[i] if i < len(s.table.classes) else ""
                cells = "".join(
                    f"<td{' class=text' if j == len(row) - 1 else ''}>{html.escape(c)}</td>" for j, c in enumerate(row)
                )
                body.append(f"<tr class='{css}'>{cells}</tr>")
            parts.append(
                f"<div class='wrap'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            )
        if s.image and s.image in images:
            data = base64.b64encode(images[s.image]).decode()
            parts.append(f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,{data}'>")
        if s.code:
            parts.append(f"<pre>{html.escape(s.code)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
