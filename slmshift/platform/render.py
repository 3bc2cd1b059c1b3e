"""One way to show a number: the Markdown tables, value-with-interval cells, Matplotlib figures and the offline HTML
page that every report (run, convert, tune, loop) renders with. How a number is computed lives with its kind of
number (`train/routing/estimate.py`, `platform/report.py` ...), never here."""

from __future__ import annotations

import base64
import html as h
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence


def fmt(v: Any, ci: Sequence[Any] | None = None, digits: int = 3, pct: bool = False) -> str:
    """A value, with its interval when it has a finite one: `0.412 [0.301, 0.530]` or `41% [30, 53]`; `n/a` when
    the value is missing or not finite."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if pct:
        s = f"{v:.0%}"
        if ci is not None and all(c is not None and math.isfinite(c) for c in ci):
            s += f" [{ci[0] * 100:.0f}, {ci[1] * 100:.0f}]"
        return s
    s = f"{v:.{digits}f}"
    if ci is not None and all(c is not None and math.isfinite(c) for c in ci):
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table as lines; a `|` inside a cell is escaped and a line break becomes a space, so the table
    stays one."""
    def cell(c: Any) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]


@contextmanager
def figure(path: Path, ncols: int = 1, size: tuple[float, float] = (7, 4.5), dpi: int = 110) -> Iterator[Any]:
    """A Matplotlib figure (headless backend) saved to `path` and closed when the block ends; yields its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def html_page(md: str, images: dict[str, Path], title: str) -> str:
    """A self-contained page from report Markdown (headings, tables, paragraphs, `![x](name.png)` images embedded as
    base64), readable offline; no scripts."""
    body, rows = [], []
    data = {name: base64.b64encode(p.read_bytes()).decode() for name, p in images.items() if p.is_file()}

    def flush_table() -> None:
        if rows:
            head, *rest = rows
            body.append("<table><thead><tr>" + "".join(f"<th>{h.escape(c)}</th>" for c in head) + "</tr></thead>"
                        "<tbody>" + "".join("<tr>" + "".join(f"<td>{h.escape(c)}</td>" for c in r) + "</tr>"
                                            for r in rest) + "</tbody></table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            if not all(set(c) <= {"-"} for c in cells):
                rows.append(cells)
            continue
        flush_table()
        if line.startswith("![") and "](" in line:
            name = line[line.index("](") + 2:-1]
            body.append(f'<p><img alt="{h.escape(name)}" src="data:image/png;base64,{data.get(name, "")}"></p>')
        elif line.startswith("## "):
            body.append(f"<h2>{h.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{h.escape(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{h.escape(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{h.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
