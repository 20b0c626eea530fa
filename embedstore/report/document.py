"""A report as a list of blocks, written as one self-contained HTML file and a Markdown twin.

The HTML embeds every figure as a base64 PNG data URI and its CSS inline: it
opens offline, needs no JavaScript, and can be mailed as one file. The Markdown
file references the same PNGs under ``figures/`` so it renders on GitHub and
pastes into notes. Both are written to a temporary folder first and moved into
place, so an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

from embedstore.atomic import replacing_folder, write_file, write_text, written_by_embedstore


@dataclass(frozen=True)
class Cell:
    """A table cell; ``bold`` marks e.g. the best value of a column; ``note`` (e.g. a CI) follows
    the text in smaller type on its own line in HTML, after a space in Markdown."""

    text: str
    bold: bool = False
    note: str = ""


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Note:
    """A highlighted remark: something skipped, and why."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table that fits the page: text cells wrap, numbers never do. ``wide`` puts a table whose
    columns the user's data decides (as many as a trial recorded) in a horizontally scrolling box."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Union[str, Cell]]]
    caption: str = ""
    wide: bool = False


@dataclass(frozen=True)
class Figure:
    """A PNG figure; ``name`` becomes ``figures/<name>.png`` in the Markdown twin."""

    name: str
    png: bytes
    caption: str
    alt: str = ""


Block = Union[Heading, Paragraph, Note, Table, Figure]


@dataclass
class Report:
    """An ordered list of blocks under a title."""

    title: str
    subtitle: str = ""
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> "Report":
        self.blocks.extend(blocks)
        return self

    def figures(self) -> list[Figure]:
        return [block for block in self.blocks if isinstance(block, Figure)]

    def write(self, out: Path, stem: str = "report") -> Path:
        """Write ``<stem>.html``, ``<stem>.md`` and ``figures/`` into ``out``; return the HTML path."""
        names = [figure.name for figure in self.figures()]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate figure names in report: {duplicates}")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self._write_figures(out / "figures", replace=stem == "report")
        write_text(out / f"{stem}.md", render_markdown(self))
        write_text(out / f"{stem}.html", render_html(self))  # the HTML last: its presence means the report is complete
        return out / f"{stem}.html"

    def _write_figures(self, folder: Path, replace: bool) -> None:
        """The PNGs into ``folder``: a report's own figures replace the previous report's in one step
        (:func:`embedstore.atomic.replacing_folder`); a comparison written beside a report, or a figures folder
        that an older embedstore wrote without the marker, gets its PNGs added one by one, each atomically."""
        if replace and (written_by_embedstore(folder) or not folder.exists()):
            with replacing_folder(folder, overwrite=True, kind="report-figures", what="figures folder") as staging:
                for figure in self.figures():
                    (staging / f"{figure.name}.png").write_bytes(figure.png)
            return
        for figure in self.figures():
            write_file(folder / f"{figure.name}.png", lambda tmp, png=figure.png: tmp.write_bytes(png))


# --------------------------------------------------------------------------- HTML

CSS = """
:root { --ink:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg-note:#fff8e6; --accent:#0072B2; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.55 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: var(--ink); background: #f6f8fa; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 32px 48px; background: #fff; min-height: 100vh; }
h1, h2, h3, h4, p, figcaption, .caption { overflow-wrap: anywhere; }
h1 { font-size: 26px; margin: 0 0 4px; }
.subtitle { color: var(--muted); margin: 0 0 18px; }
h2 { font-size: 20px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
p { margin: 8px 0; }
.note { background: var(--bg-note); border-left: 4px solid #E69F00; padding: 8px 12px; margin: 10px 0; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 13.5px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
td.num { white-space: nowrap; }
.ci { color: var(--muted); font-size: 12px; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid var(--ink); font-weight: 600; }
tbody tr:nth-child(even) { background: #f6f8fa; }
.scroll-x { overflow-x: auto; }
figure { margin: 16px 0 22px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eef0f2; }
figcaption, .caption { color: var(--muted); font-size: 13px; margin-top: 6px; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; border-top: 1px solid var(--line); padding-top: 8px; }
"""


def render_html(report: Report) -> str:
    """The report as one self-contained HTML document (inline CSS, data-URI images, no scripts)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing in the page may load from elsewhere: the report must work offline.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{_esc(report.title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body><main>",
        f"<h1>{_esc(report.title)}</h1>",
    ]
    if report.subtitle:
        parts.append(f'<p class="subtitle">{_inline_html(report.subtitle)}</p>')
    for block in report.blocks:
        parts.append(_block_html(block))
    parts.append("<footer>Written by embedstore report from the files on disk; no model was re-run.</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _block_html(block: Block) -> str:
    if isinstance(block, Heading):
        level = min(max(block.level, 2), 4)
        return f'<h{level} id="{_slug(block.text)}">{_esc(block.text)}</h{level}>'
    if isinstance(block, Paragraph):
        return f"<p>{_inline_html(block.text)}</p>"
    if isinstance(block, Note):
        return f'<p class="note">{_inline_html(block.text)}</p>'
    if isinstance(block, Table):
        head = "".join(f"<th>{_esc(c)}</th>" for c in block.columns)
        body = "\n".join(
            "<tr>" + "".join(_cell_html(cell) for cell in row) + "</tr>" for row in block.rows
        )
        caption = f'<p class="caption">{_inline_html(block.caption)}</p>' if block.caption else ""
        table = f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
        return (f'<div class="scroll-x">{table}</div>' if block.wide else table) + caption
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        alt = _esc(block.alt or block.caption)
        return (
            f'<figure id="fig-{block.name}"><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>"
        )
    raise TypeError(f"unknown report block: {block!r}")


_NUMBER = re.compile(r"^[-+]?(\d[\d.,]*(e[-+]?\d+)?|–)( ± [\d.]+)?$")


def _cell_html(cell: Union[str, Cell]) -> str:
    """A number never wraps; a text (a path, a date, a long name) may wrap after ``/ _ - +``, so a
    table of them fits the page without breaking words anywhere else."""
    cell = cell if isinstance(cell, Cell) else Cell(str(cell))
    number = bool(_NUMBER.match(cell.text))
    text = _esc(cell.text) if number else re.sub(r"([/_+-])", r"\1<wbr>", _esc(cell.text))
    text = f"<strong>{text}</strong>" if cell.bold else text
    if cell.note:
        text += f'<br><span class="ci">{_esc(cell.note)}</span>'
    return f'<td class="num">{text}</td>' if number else f"<td>{text}</td>"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _inline_html(text: str) -> str:
    """Escape ``text`` and turn Markdown ``**bold**`` and ```code``` spans into HTML."""
    escaped = _esc(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------- Markdown


def render_markdown(report: Report) -> str:
    """The report as Markdown; figures are referenced as ``figures/<name>.png``.

    Text is escaped as in the HTML twin (``<``, ``>``, ``&``): a class name or id such as
    ``<script>...</script>`` shows as text in a Markdown viewer and is never run as HTML.
    """
    lines = [f"# {_md(report.title)}", ""]
    if report.subtitle:
        lines += [_md(report.subtitle), ""]
    for block in report.blocks:
        lines += _block_markdown(block) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _block_markdown(block: Block) -> list[str]:
    if isinstance(block, Heading):
        return ["#" * min(max(block.level, 2), 4) + " " + _md(block.text)]
    if isinstance(block, Paragraph):
        return [_md(block.text)]
    if isinstance(block, Note):
        return [f"> **Note:** {_md(block.text)}"]
    if isinstance(block, Table):
        header = "| " + " | ".join(_md_cell(c) for c in block.columns) + " |"
        rule = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(block.columns))) + "|"
        rows = ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return [header, rule, *rows] + ([""] + [f"*{_md(block.caption)}*"] if block.caption else [])
    if isinstance(block, Figure):
        alt = _md(block.alt or block.name).replace("[", "\\[").replace("]", "\\]")
        return [f"![{alt}](figures/{block.name}.png)", "", f"*{_md(block.caption)}*"]
    raise TypeError(f"unknown report block: {block!r}")


def _md(text: str) -> str:
    """Markdown text with HTML's special characters escaped (Markdown passes raw HTML through)."""
    return html.escape(str(text), quote=False)


def _md_cell(cell: Union[str, Cell]) -> str:
    cell = cell if isinstance(cell, Cell) else Cell(str(cell))
    text = _md(" ".join(cell.text.split())).replace("|", "\\|")
    text = f"**{text}**" if cell.bold and text else text
    return f"{text} {_md(cell.note)}" if cell.note else text
