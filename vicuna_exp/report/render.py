"""One report document, three renderings: report.md, a self-contained report.html, the console.

The document is a list of plain blocks built once from the sweep, so the three outputs cannot
disagree. The HTML inlines its images (base64) and styles and loads nothing, so it opens offline
and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vicuna_exp.report.collect import Sweep, job_label, median_metric
from vicuna_exp.report.compare import Fairness, Table, fmt
from vicuna_exp.report.plots import Plot


@dataclass
class Block:
    kind: str  # h1 | h2 | p | bullets | table | image
    text: str = ""
    items: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    sort_keys: list[list[Any]] = field(default_factory=list)  # raw values, for sorting in HTML
    numeric: list[bool] = field(default_factory=list)  # right-aligned columns
    path: Path | None = None


def build_document(sweep: Sweep, table: Table, fairness: Fairness, plots: list[Plot]) -> list[Block]:
    name = str(sweep.meta.get("name") or sweep.root.resolve().name)
    counts: dict[str, int] = {}
    for j in sweep.jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = [
        Block("h1", f"Sweep report: {name}"),
        Block("p", f"{len(sweep.jobs)} jobs ({tally or 'none found'}) in {sweep.root}. Generated {when} "
                   "from the run dirs (summary.json, metrics.jsonl, .hydra/)."),
    ]
    if sweep.meta.get("description"):
        doc.append(Block("p", str(sweep.meta["description"]).strip()))
    doc.append(Block("h2", "Results"))
    if sweep.axes:
        doc.append(Block("p", "Swept axes (overrides that differ between jobs): " + ", ".join(sweep.axes) + "."))
    arms = sweep.meta.get("arms")
    if isinstance(arms, dict) and arms:
        doc.append(Block("p", "Arms: " + "; ".join(f"{name} = {' '.join(map(str, o or [])) or '(the defaults)'}"
                                                    for name, o in arms.items()) + "."))
    doc.append(Block("p", "tokens/s is the median over logged steps after the first (all ranks together); "
                          "eval_loss is per supervised token."))
    doc.append(Block("table", header=[c.title for c in table.columns],
                     rows=[table.cells(r) for r in table.rows],
                     sort_keys=[[r.get(c.key) for c in table.columns] for r in table.rows],
                     numeric=[c.kind != "text" for c in table.columns]))

    held = [f"Overrides shared by every job: {', '.join(sweep.constant_overrides)}"] if sweep.constant_overrides else []
    shared = {o.partition("=")[0].lstrip("+~") for o in sweep.constant_overrides}
    held += [h for h in fairness.held if h.partition(" = ")[0] not in shared]  # each setting once
    notes = sweep.meta.get("held_constant")
    if isinstance(notes, list):
        held += [f"Declared by the sweep: {n}" for n in notes]
    doc.append(Block("h2", "What was held constant"))
    doc.append(Block("bullets", items=held) if held else Block("p", "Nothing could be confirmed as constant."))
    doc.append(Block("h2", "What could not be held constant"))
    doc.append(Block("bullets", items=fairness.caveats) if fairness.caveats else
               Block("p", "No known confounders between the arms beyond the swept axes."))
    if fairness.varied:
        doc.append(Block("h2", "Configuration values that differ between jobs"))
        doc.append(Block("bullets", items=fairness.varied))
    stats_line, stats_block = _data_stats(sweep, fairness)
    if stats_line or stats_block:
        doc.append(Block("h2", "Data statistics per arm"))
        if stats_line:
            doc.append(Block("p", stats_line))
        if stats_block:
            doc.append(stats_block)

    doc.append(Block("h2", "Plots"))
    for p in plots:
        doc.append(Block("image", p.title, path=p.path) if p.path else Block("p", f"{p.title}: not drawn ({p.why_missing})."))
    if sweep.warnings:
        doc += [Block("h2", "Warnings"), Block("bullets", items=sweep.warnings)]
    return doc


def _data_stats(sweep: Sweep, fairness: Fairness) -> tuple[str | None, Block | None]:
    """Data statistics: one line for the facts every arm shares, a table for those that differ."""
    per_job: dict[str, dict[str, Any]] = {}
    for name, stats in fairness.data_stats:
        per_job[name] = {k: v for k, v in stats.items() if _plain_stat(v)}
    for j in sweep.jobs:
        eff = median_metric(j, "packing_efficiency", skip_first=False) if j.readable else None
        if eff is not None:
            per_job.setdefault(j.name, {})["packing_efficiency"] = eff
    if not per_job:
        return None, None
    keys: list[str] = []
    for stats in per_job.values():
        keys.extend(k for k in stats if k not in keys)
    varying = [k for k in keys if len({repr(s.get(k)) for s in per_job.values()}) > 1]
    shared = [k for k in keys if k not in varying]
    first = next(iter(per_job.values()))
    line = ("Data statistics equal in every arm: " + ", ".join(f"{k}={fmt(_kind(k), first.get(k))}" for k in shared)
            if shared and len(per_job) > 1 else None)
    if not varying and len(per_job) > 1:
        return line, None
    cols = varying if len(per_job) > 1 else keys
    labels = {j.name: job_label(sweep, j) for j in sweep.jobs}
    rows = [[labels.get(name, name)] + [fmt(_kind(k), stats.get(k)) for k in cols] for name, stats in per_job.items()]
    return line, Block("table", header=["job", *cols], rows=rows)


def _plain_stat(v: Any) -> bool:
    """Numbers, flags and short labels; not nested dicts or hashes."""
    return isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 24)


def _kind(key: str) -> str:
    return "percent" if ("efficiency" in key or "fraction" in key) else "float"


# ---------------------------------------------------------------- markdown


def to_markdown(doc: list[Block], out_dir: Path) -> str:
    out: list[str] = []
    for b in doc:
        if b.kind == "h1":
            out.append(f"# {b.text}")
        elif b.kind == "h2":
            out.append(f"## {b.text}")
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "bullets":
            out.append("\n".join(f"- {_md_escape(i)}" for i in b.items))
        elif b.kind == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                     "|" + "|".join("---" for _ in b.header) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif b.kind == "image" and b.path is not None:
            rel = b.path.relative_to(out_dir) if b.path.is_relative_to(out_dir) else b.path
            out.append(f"![{b.text}]({rel.as_posix()})")
    return "\n\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_escape(text: str) -> str:
    return text.replace("\n", " ")


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #d0d0d0;padding:.25rem .5rem;text-align:left;white-space:nowrap}
td.note{white-space:normal;min-width:16rem;color:#555}td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tr.status-failed td,tr.status-unreadable td{background:#fdecea}tr.status-interrupted td{background:#fff6e0}
figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}img{max-width:100%;height:auto}
"""

# Click a header to sort by that column; numbers sort numerically, blanks last.
_JS = """
(function () {
  "use strict";
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var headers = table.querySelectorAll("th");
    headers.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute("data-sort"), y = b.cells[col].getAttribute("data-sort");
          if (x === "" || x === null) { return 1; }
          if (y === "" || y === null) { return -1; }
          var nx = Number(x), ny = Number(y);
          var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
    table.setAttribute("data-sortable", "ready");
  });
})();
"""


def to_html(doc: list[Block]) -> str:
    title = next((b.text for b in doc if b.kind == "h1"), "Sweep report")
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             # Nothing may load from outside the file: the CSP makes that a guarantee.
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
             "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
             f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    first_table = True
    for b in doc:
        if b.kind in ("h1", "h2"):
            parts.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "bullets":
            parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            parts.append(_html_table(b, results=first_table))
            first_table = False
        elif b.kind == "image" and b.path is not None:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
    parts += [f"<script>{_JS}</script>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _html_table(b: Block, results: bool) -> str:
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in b.header)
    body = []
    status_col = b.header.index("status") if results and "status" in b.header else None
    for i, row in enumerate(b.rows):
        raw = b.sort_keys[i] if i < len(b.sort_keys) else row
        cls = f' class="status-{html.escape(row[status_col])}"' if status_col is not None else ""
        cells = []
        numeric = b.numeric or [False] * len(b.header)
        for h, text, key, num in zip(b.header, row, raw, numeric, strict=True):
            sort = "" if key is None else (json.dumps(key) if isinstance(key, (int, float)) else str(key))
            td_cls = ' class="note"' if h == "note" else (' class="num"' if num else "")
            cells.append(f'<td{td_cls} data-sort="{html.escape(sort)}">{html.escape(text)}</td>')
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


# ---------------------------------------------------------------- console


CONSOLE_WIDTH = 120  # the console table's budget: columns that do not fit go to a second table


_NOTE_WIDTH = 60
_CELL_PAD = 3  # rich's padding and rule per column


def column_groups(table: Table, cells: list[list[str]], width: int) -> list[list[int]]:
    """Column indices per console table: the job column in every one, then the others in order,
    as many as fit `width` at their widest cell; a column too wide even alone gets a table of its
    own (rich folds it)."""
    def widest(i: int) -> int:
        w = max([len(table.columns[i].title), *(len(row[i]) for row in cells)])
        return min(w, _NOTE_WIDTH) if table.columns[i].key == "note" else w

    first = widest(0) + _CELL_PAD + 1
    groups: list[list[int]] = [[0]]
    used = first
    for i in range(1, len(table.columns)):
        need = widest(i) + _CELL_PAD
        if used + need > width and len(groups[-1]) > 1:
            groups.append([0])
            used = first
        groups[-1].append(i)
        used += need
    return groups


def print_console(sweep: Sweep, table: Table, fairness: Fairness, outputs: list[Path]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table as RichTable

    terminal = Console()
    width = min(CONSOLE_WIDTH, terminal.width) if terminal.is_terminal else CONSOLE_WIDTH
    console = Console(width=width)
    name = sweep.meta.get("name") or sweep.root.resolve().name
    cells = [table.cells(r) for r in table.rows]
    colours = {"completed": "green", "failed": "red", "unreadable": "red", "interrupted": "yellow"}
    groups = column_groups(table, cells, width)
    for n, group in enumerate(groups):
        title = f"sweep {name}: {len(sweep.jobs)} jobs" + (f" ({n + 1}/{len(groups)})" if len(groups) > 1 else "")
        rt = RichTable(title=title, show_lines=False)
        for i in group:
            c = table.columns[i]
            rt.add_column(c.title, justify="left" if c.kind == "text" else "right", overflow="fold",
                          max_width=_NOTE_WIDTH if c.key == "note" else None)
        for r, row_cells in zip(table.rows, cells, strict=True):
            style = None if r.get("status") == "completed" else colours.get(str(r.get("status")))
            rt.add_row(*(row_cells[i] for i in group), style=style)
        console.print(rt)
    if sweep.constant_overrides:
        console.print("[bold]held constant (overrides):[/bold] " + escape(", ".join(sweep.constant_overrides)),
                      highlight=False)
    for c in fairness.caveats:
        console.print(f"[yellow]not held constant:[/yellow] {escape(c)}", highlight=False)
    for w in sweep.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in outputs), highlight=False)
