"""HTML building blocks of the run report: number formatting ("n/a" for undefined), escaping, tables, notes,
and the whole page from :mod:`common.report.templates`."""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

import numpy as np

from common.report.templates import PAGE, STYLESHEET

__all__ = ["fmt", "fmt_ci", "metric", "value_ci", "esc", "table", "note", "num", "page"]


def page(title: str, body: str, footer: str) -> str:
    """The whole self-contained page: escaped ``title``, HTML ``body`` and ``footer``, the stylesheet inlined."""
    return PAGE.substitute(title=esc(title), stylesheet=STYLESHEET, body=body, footer=footer)


def num(v: Any) -> float | None:
    """``v`` as a finite float, or None (None, NaN, inf, non-numbers)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt(v: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; "n/a" when undefined."""
    f = num(v)
    if f is None:
        return "n/a"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{f:.{digits}f}"


def fmt_ci(ci: Any, digits: int = 3) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or num(ci[0]) is None or num(ci[1]) is None:
        return "n/a"
    return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def metric(block: dict | None, key: str) -> tuple[Any, Any]:
    """(value, ci95) of ``key`` in a ``bootstrap_ci`` block, tolerating plain values and absent keys."""
    entry = (block or {}).get(key)
    if isinstance(entry, dict):
        return entry.get("value"), entry.get("ci95")
    return entry, None


def value_ci(block: dict | None, key: str) -> str:
    value, ci = metric(block, key)
    text = fmt(value)
    return text if text == "n/a" or fmt_ci(ci) == "n/a" else f"{text} {fmt_ci(ci)}"


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], row_classes: Sequence[str] | None = None,
           raw: bool = False) -> str:
    """An HTML table (no header row when ``header`` is None); cells are escaped unless ``raw``."""
    cell = (lambda c: str(c)) if raw else esc
    out = ["<table>"]
    if header:
        out += ["<thead><tr>", *(f"<th>{esc(h)}</th>" for h in header), "</tr></thead>"]
    out.append("<tbody>")
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def note(text: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{esc(text)}</p>'
