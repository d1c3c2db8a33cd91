"""The machinery of d2merge's HTML pages: one self-contained file, inline CSS, inline SVG charts.

Why SVG written here rather than matplotlib: the charts are bars, a heatmap and a histogram,
a few dozen lines of SVG each; matplotlib would be a 40 MB import (an optional extra), carry
backend and font state, and embed each chart as a base64 PNG (tens of kB each, blurry when
zoomed, text not searchable). SVG text stays selectable, scales, and a 7B verify page stays
far below its 2 MB budget.

Every page carries a Content-Security-Policy that allows nothing to be fetched and no script
to run (``default-src 'none'``; inline styles only): the page is readable without JavaScript,
and a page that tried to load anything would be blocked by the browser, not silently phone
home. Values are escaped here, once: report fields hold paths and tensor names from the user.

Torch-free and I/O-free except :func:`write_page`, which writes through ``d2merge.io.output``.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

# What the page may load: nothing (no fetch, no font, no script); inline <style> and style="" only.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

# Series colours (Okabe-Ito: distinguishable with the common colour-vision deficiencies).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
PASS_COLOUR, FAIL_COLOUR = "#1a7f37", "#cf222e"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;background:#fff}
main{max-width:1180px;margin:0 auto;padding:0 20px 40px}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#59636e;margin:0 0 12px}
.banner{padding:14px 20px;color:#fff;font-size:18px}.banner b{font-size:24px;margin-right:10px}
.banner.pass{background:#1a7f37}.banner.fail{background:#cf222e}.banner.info{background:#0969da}
.banner ul{margin:6px 0 0;padding-left:22px;font-size:14px}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
td.pass,span.pass{color:#1a7f37;font-weight:600}td.fail,span.fail{color:#cf222e;font-weight:600}
td.name{white-space:nowrap}
td.sub{color:#59636e;padding-left:22px}td.text,th.text{text-align:left}
.note{color:#59636e;font-size:13px;max-width:900px}svg{display:block;margin:6px 0 12px;max-width:100%;height:auto}
details{margin:8px 0}summary{cursor:pointer;color:#0969da}pre{background:#f6f8fa;padding:10px;overflow:auto;
font-size:12px;max-height:520px}code{background:#f6f8fa;padding:0 3px}
.grid{display:flex;flex-wrap:wrap;gap:18px}.grid>div{flex:1 1 520px;min-width:0}
"""


class Raw(str):
    """Text that is already HTML (a link, a chart): :func:`cell` and :func:`table` leave it as is."""


def esc(value: object) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value), quote=True)


def link(href: str, text: str) -> Raw:
    return Raw(f'<a href="{esc(href)}">{esc(text)}</a>')


@dataclass(frozen=True)
class Verdict:
    """The banner at the top: PASS / FAIL (or a neutral headline) and, for a failure, what failed, in words."""

    headline: str
    passed: bool | None = None  # None: a page with no verdict (a benchmark)
    details: Sequence[str] = ()

    def html(self) -> str:
        kind = "info" if self.passed is None else ("pass" if self.passed else "fail")
        word = "" if self.passed is None else f"<b>{'PASS' if self.passed else 'FAIL'}</b> "
        items = "".join(f"<li>{esc(d)}</li>" for d in self.details)
        return (f'<div class="banner {kind}" role="status">{word}{esc(self.headline)}'
                + (f"<ul>{items}</ul>" if items else "") + "</div>")


@dataclass(frozen=True)
class Cell:
    """A table cell with a CSS class (``pass``, ``fail``, ``sub``, ``text``) and an optional tooltip."""

    text: object
    css: str = ""
    title: str = ""


def table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> Raw:
    """An HTML table; cells are plain values (escaped), :class:`Cell` or :class:`Raw`."""

    def cell(tag: str, value: object) -> str:
        if isinstance(value, Cell):
            css = f' class="{value.css}"' if value.css else ""
            tip = f' title="{esc(value.title)}"' if value.title else ""
            return f"<{tag}{css}{tip}>{esc(value.text)}</{tag}>"
        return f"<{tag}>{esc(value)}</{tag}>"

    head = "".join(cell("th", h) for h in header)
    body = "".join("<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows)
    return Raw(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def section(title: str, *parts: str, note: str = "") -> Raw:
    return Raw(f"<section><h2>{esc(title)}</h2>" + (f'<p class="note">{esc(note)}</p>' if note else "")
               + "".join(parts) + "</section>")


def details(summary: str, body: str) -> Raw:
    return Raw(f"<details><summary>{esc(summary)}</summary>{body}</details>")


# The JSON report rides in the page (folded) up to this size; past it the page points at the file.
JSON_EMBEDDED_BYTES = 600_000


def json_details(data: object, what: str = "The JSON report", flag: str = "--report") -> Raw:
    """The report's JSON, folded: the numbers a reviewer sees are those a script reads."""
    import json

    text = json.dumps(data, indent=1, sort_keys=True)
    if len(text) > JSON_EMBEDDED_BYTES:
        return Raw(f'<p class="note">{esc(what)} ({len(text) / 1e6:.1f} MB) is too large to carry in this page: '
                   f"write it beside the page with {esc(flag)}.</p>")
    return details(what, f"<pre>{esc(text)}</pre>")


def page(title: str, *, subtitle: str = "", verdict: Verdict | None = None, sections: Sequence[str] = ()) -> str:
    """The whole document: CSP, inline CSS, the banner, the sections. No script anywhere."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            + (verdict.html() if verdict is not None else "")
            + f"<main><h1>{esc(title)}</h1>" + (f'<p class="sub">{esc(subtitle)}</p>' if subtitle else "")
            + "".join(sections) + "</main></body></html>\n")


def write_page(path: str | Path, text: str) -> Path:
    """Write a page atomically (temp file beside it, renamed into place)."""
    from d2merge.io.output import save_text

    return save_text(Path(path), text)


def render_table_page(title: str, header: Sequence[object], rows: Sequence[Sequence[object]], *,
                      path: str | Path | None = None, subtitle: str = "", notes: Sequence[str] = (),
                      chart: "BarChart | None" = None) -> str:
    """A page from plain rows (a benchmark's table): the table, an optional bar chart, notes.

    Returns the HTML; with ``path`` also writes it atomically. For scripts such as
    ``benchmarks/paper_table.py`` that have rows, not a d2merge report object.
    """
    parts = [chart.svg()] if chart is not None else []
    parts.append(table(header, rows))
    parts += [f'<p class="note">{esc(n)}</p>' for n in notes]
    text = page(title, subtitle=subtitle, sections=[section(title, *parts)])
    if path is not None:
        write_page(path, text)
    return text


# ----- charts -------------------------------------------------------------------------------


def fmt(value: float) -> str:
    """Short numbers for axes and labels: 3 significant digits, scientific when small or large."""
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.2g}"
    return f"{value:.3g}"


def _text(x: float, y: float, text: str, *, anchor: str = "middle", size: int = 11, colour: str = "#1f2328",
          rotate: bool = False, weight: str = "normal") -> str:
    turn = f' transform="rotate(-35 {x:.1f} {y:.1f})"' if rotate else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{colour}" '
            f'font-weight="{weight}" font-family="system-ui,sans-serif"{turn}>{esc(text)}</text>')


def _nice_ticks(top: float, count: int = 5) -> list[float]:
    if top <= 0:
        return [0.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]  # up to the first tick at or above top


@dataclass
class BarChart:
    """Grouped bars: one group per label, one bar per series; optional whiskers, log scale and a limit line.

    ``whiskers[series][i] = (low, high)`` draws the spread of a bar (bench's min-max);
    ``limit`` draws a dashed horizontal line (a threshold).
    """

    title: str
    labels: Sequence[str]
    series: dict[str, Sequence[float | None]]
    y_label: str = ""
    log: bool = False
    whiskers: dict[str, Sequence[tuple[float, float] | None]] = field(default_factory=dict)
    limit: tuple[float, str] | None = None  # (value, label)
    x_marker: tuple[float, str] | None = None  # (position in groups from the left edge, label): a vertical line
    y_max: float | None = None  # the top of a linear axis (1 for shares)
    width: int = 760
    height: int = 300

    def svg(self) -> Raw:
        left, right, top, bottom = 64, 14, 30, 74
        plot_w, plot_h = self.width - left - right, self.height - top - bottom
        values = [v for s in self.series.values() for v in s if v is not None]
        values += [hi for w in self.whiskers.values() for pair in w if pair for hi in pair]
        if self.limit:
            values.append(self.limit[0])
        positive = [v for v in values if v > 0]
        if self.log:
            low_exp = math.floor(math.log10(min(positive))) if positive else 0
            high_exp = math.ceil(math.log10(max(positive))) if positive else 1
            high_exp = max(high_exp, low_exp + 1)
            ticks = [10.0 ** e for e in range(low_exp, high_exp + 1)]

            def y_of(v: float) -> float:
                v = max(v, 10.0 ** low_exp)
                return top + plot_h * (1 - (math.log10(v) - low_exp) / (high_exp - low_exp))
        else:
            high = self.y_max or max(values, default=1.0) or 1.0
            ticks = _nice_ticks(high * (1.0 if self.y_max else 1.05))
            y_top = max(ticks[-1], high)

            def y_of(v: float) -> float:
                return top + plot_h * (1 - max(v, 0.0) / y_top)
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.width} {self.height}" '
               f'width="{self.width}" height="{self.height}" role="img" aria-label="{esc(self.title)}">',
               _text(left, 16, self.title, anchor="start", size=13, weight="600")]
        for t in ticks:
            y = y_of(t)
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>')
            out.append(_text(left - 6, y + 4, fmt(t), anchor="end", size=10))
        if self.y_label:
            out.append(f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="11" text-anchor="middle" fill="#59636e" '
                       f'font-family="system-ui,sans-serif" transform="rotate(-90 14 {top + plot_h / 2:.1f})">'
                       f"{esc(self.y_label)}</text>")
        names = list(self.series)
        group_w = plot_w / max(len(self.labels), 1)
        bar_w = group_w * 0.8 / max(len(names), 1)
        base_y = top + plot_h
        for g, label in enumerate(self.labels):
            x0 = left + g * group_w + group_w * 0.1
            for s, name in enumerate(names):
                value = self.series[name][g]
                if value is None:
                    continue
                x = x0 + s * bar_w
                y = y_of(value)
                out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                           f'height="{max(base_y - y, 0.5):.1f}" fill="{PALETTE[s % len(PALETTE)]}">'
                           f"<title>{esc(name)} {esc(label)}: {esc(fmt(value))}</title></rect>")
                pair = self.whiskers.get(name, [None] * len(self.labels))[g]
                if pair:
                    cx, y_lo, y_hi = x + bar_w / 2, y_of(pair[0]), y_of(pair[1])
                    out.append(f'<path d="M{cx:.1f} {y_lo:.1f}V{y_hi:.1f}M{cx - 3:.1f} {y_lo:.1f}h6M{cx - 3:.1f} '
                               f'{y_hi:.1f}h6" stroke="#1f2328" stroke-width="1"/>')
            out.append(_text(left + (g + 0.5) * group_w, base_y + 14, label, size=10,
                             rotate=len(self.labels) > 8 or len(label) > group_w / 6, anchor="middle"))
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{base_y}" y2="{base_y}" stroke="#59636e"/>')
        if self.limit:
            y = y_of(self.limit[0])
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{FAIL_COLOUR}" '
                       'stroke-dasharray="5 4"/>')
            out.append(_text(left + plot_w - 2, y - 4, self.limit[1], anchor="end", size=10, colour=FAIL_COLOUR))
        if self.x_marker:
            x = left + self.x_marker[0] * group_w
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{base_y}" stroke="{FAIL_COLOUR}" '
                       'stroke-dasharray="5 4"/>')
            out.append(_text(x - 3, top + 10, self.x_marker[1], anchor="end", size=10, colour=FAIL_COLOUR))
        out.append(_legend(names, left, self.height - 12))
        out.append("</svg>")
        return Raw("".join(out))


def _legend(names: Sequence[str], x: float, y: float) -> str:
    parts = []
    for i, name in enumerate(names):
        parts.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>')
        parts.append(_text(x + 14, y, name, anchor="start", size=11))
        x += 24 + 7 * len(name)
    return "".join(parts)


def heat_colour(ratio: float) -> str:
    """0 (no error) white, 1 (at the limit) deep blue, above the limit red: within limits never looks alarming."""
    if ratio > 1:
        return FAIL_COLOUR
    ratio = max(ratio, 0.0)
    r, g, b = (int(255 + (end - 255) * ratio) for end in (0x08, 0x51, 0x9c))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(title: str, rows: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[float | None]],
            *, limit: float, unit: str = "") -> Raw:
    """A grid of cells coloured by value / limit, each with its value written in it and as a tooltip."""
    cell_w, cell_h, left, top = max(54, 8 * max((len(c) for c in columns), default=4)), 17, 92, 44
    width, height = left + cell_w * len(columns) + 10, top + cell_h * len(rows) + 28
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="{esc(title)}">',
           _text(4, 16, title, anchor="start", size=13, weight="600")]
    for c, name in enumerate(columns):
        out.append(_text(left + (c + 0.5) * cell_w, top - 6, name, size=10))
    for r, name in enumerate(rows):
        y = top + r * cell_h
        out.append(_text(left - 6, y + 12, name, anchor="end", size=10))
        for c in range(len(columns)):
            value = values[r][c]
            x = left + c * cell_w
            if value is None:
                out.append(f'<rect x="{x}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" fill="#f6f8fa"/>')
                continue
            ratio = value / limit if limit > 0 else 0.0
            fill = heat_colour(ratio)
            out.append(f'<rect x="{x}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" fill="{fill}">'
                       f"<title>{esc(name)} {esc(columns[c])}: {esc(fmt(value))} {esc(unit)}</title></rect>")
            out.append(_text(x + cell_w / 2, y + 12, fmt(value), size=9, colour="#fff" if ratio > 0.55 else "#1f2328"))
    y = height - 10
    out.append(_text(4, y, f"colour: value / limit ({fmt(limit)} {unit}); white 0, blue up to the limit, red above it",
                     anchor="start", size=10, colour="#59636e"))
    out.append("</svg>")
    return Raw("".join(out))
