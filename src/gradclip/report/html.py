"""A self-contained HTML page: text, tables and PNG images embedded as base64 data URIs.

No script, no external resource: the page opens from a file, offline, in any browser.

Example:
    >>> from gradclip.report.html import Section, page
    >>> text = page("run", [Section("Summary", paragraphs=["3 steps"],
    ...                             links=[("the log", "runs/a.jsonl")])])
    >>> "<h2>Summary</h2>" in text, '<a href="runs/a.jsonl">the log</a>' in text
    (True, True)
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Section", "img_tag", "page"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; }
pre { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.25em 1em;
     font-size: 0.9em; margin: 0.8em 0; } dt { font-weight: 600; } dd { margin: 0; }
"""


@dataclass(frozen=True)
class Section:
    """One titled part of a page; every text is escaped.

    Attributes:
        heading: the section title.
        paragraphs: plain paragraphs.
        warnings: paragraphs shown highlighted.
        table: rows of cells; the first row is the header.
        images: ``(alt text, PNG bytes)`` pairs, embedded.
        preformatted: text shown as is, in a monospace block.
        definitions: ``(term, meaning)`` pairs, shown as a glossary after the table.
        links: ``(text, relative URL)`` pairs, one paragraph each (for pages that come with
            files beside them; a page that must stand alone has none).
    """

    heading: str
    paragraphs: Sequence[str] = ()
    warnings: Sequence[str] = ()
    table: Sequence[Sequence[object]] = ()
    images: Sequence[tuple[str, bytes]] = ()
    preformatted: str | None = None
    definitions: Sequence[tuple[str, str]] = ()
    links: Sequence[tuple[str, str]] = ()


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` holding ``png`` as a base64 data URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _section(s: Section) -> str:
    parts = [f"<section><h2>{html.escape(s.heading)}</h2>"]
    parts += [f'<p class="warning">{html.escape(w)}</p>' for w in s.warnings]
    parts += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
    parts += [f'<p><a href="{html.escape(url)}">{html.escape(text)}</a></p>' for text, url in s.links]
    if s.table:
        head, *rows = s.table
        cells = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
        )
        parts.append(f"<table><tr>{cells}</tr>{body}</table>")
    if s.definitions:
        items = "".join(f"<dt>{html.escape(term)}</dt><dd>{html.escape(meaning)}</dd>"
                        for term, meaning in s.definitions)  # fmt: skip
        parts.append(f"<dl>{items}</dl>")
    if s.preformatted is not None:
        parts.append(f"<pre>{html.escape(s.preformatted)}</pre>")
    parts += [img_tag(png, alt) for alt, png in s.images]
    parts.append("</section>")
    return "\n".join(parts)


def page(title: str, sections: Sequence[Section]) -> str:
    """A complete HTML document with ``sections`` in order."""
    body = "\n".join(_section(s) for s in sections)
    # the empty icon keeps the browser from requesting /favicon.ico (an error offline)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><link rel=\"icon\" href=\"data:,\">"
        f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n"
        "</body></html>\n"
    )
