"""HTML building blocks for the self-contained report.

Everything that is not markup we wrote ourselves passes through `esc` (html.escape with quotes):
model responses, sample ids, file paths, command lines, parameters, category names. Snippets
that are already safe are wrapped in `Raw` so helpers do not escape them twice. Figures are
embedded as base64 PNG data URIs; the page has inline CSS, no JavaScript and no external URLs,
so it opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

from vlmcredit.reports.figures import Figure

SHADES = 10  # opacity buckets for per-token shading: s0 (none) ... s9 (strongest)


class Raw(str):
    """A string of trusted HTML (built here from escaped parts)."""


def esc(value: Any) -> str:
    """Escape text for element content and quoted attribute values."""
    if isinstance(value, Raw):
        return value
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for tables: ints as-is, floats with `digits` significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}"
    try:  # numpy scalars
        return fmt(value.item(), digits)
    except AttributeError:
        return str(value)


def cell(value: Any) -> str:
    """A table cell: Raw stays markup, numbers are formatted, everything else escaped."""
    if isinstance(value, Raw):
        return value
    if isinstance(value, (int, float)) or hasattr(value, "item"):
        return f'<span class="num">{esc(fmt(value))}</span>'
    return esc("–" if value is None else value)


def table(
    headers: Sequence[Any], rows: Iterable[Sequence[Any]], cls: str = "", caption: str = ""
) -> Raw:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    cls_attr = f' class="{esc(cls)}"' if cls else ""
    return Raw(f"<table{cls_attr}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def key_values(pairs: Iterable[tuple[str, Any]]) -> Raw:
    """A compact two-column table of facts."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{cell(v)}</td></tr>" for k, v in pairs)
    return Raw(f'<table class="kv"><tbody>{rows}</tbody></table>')


def code(text: Any) -> Raw:
    return Raw(f"<code>{esc(text)}</code>")


def details(summary: str, body: str, open_: bool = False) -> Raw:
    flag = " open" if open_ else ""
    return Raw(f"<details{flag}><summary>{esc(summary)}</summary>{body}</details>")


def figure(fig: Figure) -> Raw:
    """The figure's PNG as a data URI, with its title as alt text and caption."""
    data = base64.b64encode(fig.png).decode("ascii")
    return Raw(
        f'<figure><img class="fig" alt="{esc(fig.title)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{esc(fig.title)}</figcaption></figure>'
    )


def note(text: str, cls: str = "note") -> Raw:
    return Raw(f'<p class="{esc(cls)}">{esc(text)}</p>')


def section(anchor: str, title: str, body: Iterable[str], level: int = 2) -> Raw:
    return Raw(
        f'<section id="{esc(anchor)}"><h{level}>{esc(title)}</h{level}>{"".join(body)}</section>'
    )


def _shade_css() -> str:
    # One rule per bucket; the colour comes from the container (--rgb), so the same classes
    # serve connectivity (orange) and weights (blue). m<k> = marked token (anchor / selected).
    rules = []
    for k in range(1, SHADES):
        alpha = round(0.08 + 0.72 * k / (SHADES - 1), 2)
        rules.append(f".s{k},.m{k}{{background:rgba(var(--rgb),{alpha})}}")
    marked = ",".join(f".m{k}" for k in range(SHADES))
    rules.append(f"{marked}{{border-bottom:2px solid #111;font-weight:600}}")
    return "".join(rules)


CSS = (
    "body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1b1b1b;"
    "background:#fafafa}"
    "main{max-width:1180px;margin:0 auto;padding:1em 1.5em 4em}"
    "nav{background:#fff;border:1px solid #ddd;padding:.5em 1em;margin:1em 0}"
    "nav a{margin-right:1.2em;white-space:nowrap}"
    "h1{font-size:1.6em}h2{border-bottom:2px solid #333;padding-bottom:.2em;margin-top:2em}"
    "h3{margin-top:1.6em}h4{margin:1.2em 0 .4em}"
    "table{border-collapse:collapse;margin:.6em 0;background:#fff;font-size:.92em}"
    "th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}"
    "thead th{background:#eee}table.kv th{background:#f3f3f3;font-weight:600}"
    "caption{text-align:left;font-weight:600;padding:.3em 0}"
    ".num{font-variant-numeric:tabular-nums}tr.crit td{background:#fde2e1}"
    "figure{margin:.8em 0}img.fig{max-width:100%;height:auto;border:1px solid #ddd;"
    "background:#fff}figcaption{font-size:.85em;color:#555}"
    "code{font:.88em ui-monospace,Menlo,Consolas,monospace;background:#f0f0f0;padding:0 .2em;"
    "word-break:break-all}"
    "details{margin:.4em 0}summary{cursor:pointer;color:#234}"
    ".note{color:#8a4b00;background:#fff4e0;border-left:3px solid #e8a33a;padding:.3em .6em}"
    ".sample{background:#fff;border:1px solid #ddd;padding:.4em 1em 1em;margin:1.2em 0}"
    ".tokens{--rgb:230,85,13;white-space:pre-wrap;word-wrap:break-word;"
    "font:13px/1.7 ui-monospace,Menlo,Consolas,monospace;max-height:26em;overflow:auto;"
    "border:1px solid #e3e3e3;padding:.5em;background:#fff}"
    ".tokens.weights{--rgb:33,113,181}.tokens i{font-style:normal}"
    ".legend{--rgb:230,85,13;font-size:.85em;margin:.3em 0}.legend.weights{--rgb:33,113,181}"
    ".legend i{font-style:normal;display:inline-block;padding:0 .45em;margin-right:1px;"
    "border:1px solid #ddd}"
    ".warning{background:#fff4e5;border-left:4px solid #e6550d;padding:.4em .7em}" + _shade_css()
)


# In the head of every report: `report --out` replaces a file only when it carries this mark.
GENERATOR = '<meta name="generator" content="vlmcredit report">'


def page(title: str, nav: Sequence[tuple[str, str]], body: Iterable[str], footer: str) -> str:
    """The whole document: one file, inline CSS, no scripts, no external resources."""
    links = "".join(f'<a href="#{esc(a)}">{esc(label)}</a>' for a, label in nav)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">{GENERATOR}'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        # An empty icon: otherwise a browser asks the server (or file system) for favicon.ico.
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body><main><h1>{esc(title)}</h1><nav>{links}</nav>{''.join(body)}"
        f'<footer><p class="num">{esc(footer)}</p></footer></main></body></html>\n'
    )
