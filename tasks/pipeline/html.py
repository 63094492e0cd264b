"""Building blocks of the project's offline HTML pages (data report, run dashboard).

Every page is one self-contained file: CSS inlined, charts as inline SVG, no script, no
font, no image from anywhere. A Content-Security-Policy in the page forbids any request,
so a page that would reach for a CDN shows it at once instead of silently rendering blank
(as Great Expectations' Data Docs and MLflow's artifact preview do offline).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

# The page may load nothing: no script, no stylesheet, no font, images only as data: URIs.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430; margin: 0; background: #f6f7f9; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 10px; border-bottom: 1px solid #d9dde3; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
p.sub { color: #5b6575; margin: 0 0 16px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; font-weight: 600; font-size: 13px; }
.ok { background: #dff3e4; color: #17642e; } .bad { background: #fbe0e0; color: #9b1c1c; } .warn { background: #fff1d6; color: #8a5300; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #d9dde3; border-radius: 6px; padding: 10px 14px; min-width: 120px; }
.card .n { font-size: 22px; font-weight: 600; } .card .l { color: #5b6575; font-size: 13px; }
table { border-collapse: collapse; background: #fff; width: 100%; margin: 6px 0 8px; }
th, td { border: 1px solid #d9dde3; padding: 5px 9px; text-align: left; vertical-align: top; font-size: 14px; }
th { background: #eef0f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; background: #eef0f3; padding: 1px 4px; border-radius: 3px; word-break: break-all; }
svg { background: #fff; border: 1px solid #d9dde3; border-radius: 6px; }
.empty { color: #5b6575; font-style: italic; }
"""


def text(value: object) -> str:
    """`value` as escaped HTML text; None shows as a dash."""
    return "–" if value is None else escape(str(value))


def page(title: str, body: str) -> str:
    """A whole HTML document around `body`, with the inline style and the no-request policy."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{text(title)}</title><style>{STYLE}</style></head>\n<body><main>\n{body}\n</main></body></html>\n"
    )


def badge(label: str, kind: str) -> str:
    """A coloured label; `kind` is ok, bad or warn."""
    return f'<span class="badge {kind}">{text(label)}</span>'


def cards(items: Iterable[tuple[str, object]]) -> str:
    """A row of big numbers with their labels."""
    inner = "".join(f'<div class="card"><div class="n">{text(v)}</div><div class="l">{text(k)}</div></div>' for k, v in items)
    return f'<div class="cards">{inner}</div>'


class Raw(str):
    """A cell that is already HTML (a badge, code) and must not be escaped again."""

    @property
    def html(self) -> str:
        return str(self)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], empty: str = "none") -> str:
    """A table of escaped cells; numbers are right-aligned. `empty` shows when there are no rows."""
    rows = list(rows)
    if not rows:
        return f'<p class="empty">{text(empty)}</p>'
    head = "".join(f"<th>{text(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{text(_fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
                         else f"<td>{c.html if isinstance(c, Raw) else text(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: float | int) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


# Legend text is laid out without a browser: a generous width per character of 12 px
# sans-serif (DejaVu Sans, Chromium's fallback on Linux, averages about 6.6 px), so a label
# is never placed where it would run past the chart; the browser test measures the real text.
LEGEND_CHAR_W = 7.4
LEGEND_ROW_H = 18


def _legend(names: Sequence[str], colours: Sequence[str], width: int) -> tuple[list[str], int]:
    """Legend items left to right, wrapping onto a new row before one would pass `width`.

    Returns:
        The SVG parts and the y just below the last row.
    """
    parts, x, y, left = [], 4.0, 8, 4.0
    for i, name in enumerate(names):
        item_w = 14 + LEGEND_CHAR_W * len(name) + 16
        if x > left and x + item_w > width - 4:
            x, y = left, y + LEGEND_ROW_H
        parts.append(f'<rect x="{x:.0f}" y="{y}" width="10" height="10" fill="{colours[i % len(colours)]}"/>'
                     f'<text x="{x + 14:.0f}" y="{y + 9}" font-size="12">{text(name)}</text>')
        x += item_w
    return parts, y + LEGEND_ROW_H


def bar_chart(groups: Sequence[str], series: dict[str, Sequence[float | None]], title: str, width: int = 640) -> str:
    """Horizontal bars: for each group (a metric), one bar per series (a model), scaled per group.

    Each metric has its own scale (exact match is 0..1, perplexity may be 1000), so bars
    compare models within a metric; the value is written next to each bar. The legend
    wraps onto as many rows as the series need (feedback and preference roles add some).
    """
    colours = ["#3b6fd8", "#9aa5b5", "#c48a1c", "#2e9b5a", "#8b5cc4", "#c4453b", "#1f8a8a", "#b5527f"]
    names = list(series)
    bar_h, gap, label_w = 14, 10, 150
    legend, below_legend = _legend(names, colours, width)
    height = below_legend + 4 + len(groups) * (len(names) * bar_h + gap) + 20
    parts = [f'<svg role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>{text(title)}</title>', *legend]
    y = below_legend + 4
    for g, group in enumerate(groups):
        values = [series[n][g] for n in names]
        top = max((abs(v) for v in values if v is not None), default=0) or 1
        parts.append(f'<text x="4" y="{y + len(names) * bar_h / 2 + 4}" font-size="12">{text(group)}</text>')
        for i, value in enumerate(values):
            if value is not None:
                w = (width - label_w - 90) * abs(value) / top
                parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                             f'fill="{colours[i % len(colours)]}"><title>{text(names[i])}: {_fmt(value)}</title></rect>'
                             f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 4}" font-size="11">{_fmt(value)}</text>')
            y += bar_h
        y += gap
    parts.append("</svg>")
    return "".join(parts)


def line_chart(xs: Sequence[float], ys: Sequence[float], title: str, x_label: str, y_label: str,
               width: int = 640, height: int = 260) -> str:
    """A polyline of `ys` over `xs` with min/max labels on both axes."""
    if len(xs) < 2:
        return f'<p class="empty">{text(title)}: fewer than two points</p>'
    left, right, top, bottom = 56, 16, 24, 36
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span_x, span_y = (x1 - x0) or 1, (y1 - y0) or 1
    pts = " ".join(f"{left + (x - x0) / span_x * (width - left - right):.1f},"
                   f"{top + (y1 - y) / span_y * (height - top - bottom):.1f}" for x, y in zip(xs, ys))
    return (
        f'<svg role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f"<title>{text(title)}</title>"
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#5b6575"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#5b6575"/>'
        f'<polyline fill="none" stroke="#3b6fd8" stroke-width="2" points="{pts}"/>'
        f'<text x="{left - 4}" y="{top + 4}" font-size="11" text-anchor="end">{_fmt(y1)}</text>'
        f'<text x="{left - 4}" y="{height - bottom}" font-size="11" text-anchor="end">{_fmt(y0)}</text>'
        f'<text x="{left}" y="{height - bottom + 16}" font-size="11">{_fmt(x0)}</text>'
        f'<text x="{width - right}" y="{height - bottom + 16}" font-size="11" text-anchor="end">{_fmt(x1)}</text>'
        f'<text x="{(width + left) / 2}" y="{height - 6}" font-size="12" text-anchor="middle">{text(x_label)}</text>'
        f'<text x="12" y="{top + (height - top - bottom) / 2}" font-size="12" '
        f'transform="rotate(-90 12 {top + (height - top - bottom) / 2})" text-anchor="middle">{text(y_label)}</text>'
        "</svg>"
    )
