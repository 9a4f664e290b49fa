"""Rendering leaderboard tables: Markdown (GitHub), HTML (one self-contained page), CSV and JSON.

Every string read from a result file is escaped for its format (``harness.escape``); the marks in
cells are explained in notes under each table.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from tabulate import tabulate

from harness.errors import HarnessError
from harness.escape import csv_cell, html_text, markdown_text
from harness.leaderboard import FORMATS, Cell, ColumnKey, Escape, Leaderboard, Table

VERIFIED, FAILED, OTHER_VERSIONS = "✓", "✗", "*"


def cell_text(cell: Cell | None) -> str:
    """``value ± stderr (n=N)`` + ``(k non-finite)`` + ``✓``/``✗`` (``*``: verified with other versions)."""
    if cell is None:
        return ""
    text = "n/a" if cell.value is None else f"{cell.value:.4f}"
    if cell.value is not None and cell.stderr is not None:
        text += f" ± {cell.stderr:.4f}"
    text += f" (n={cell.n})"
    if cell.n_nonfinite:
        text += f" ({cell.n_nonfinite} non-finite)"
    if cell.verification is not None:
        text += " " + (VERIFIED if cell.verified else FAILED)
        if not cell.verification.same_versions:
            text += OTHER_VERSIONS
    return text


def header(table: Table, column: ColumnKey, esc: Escape) -> str:
    """A column header with the better direction: ``↑`` higher, ``↓`` lower."""
    arrow = {True: " ↑", False: " ↓", None: ""}[table.higher_is_better.get(column)]
    return table.column_name(column, esc) + arrow


def notes(table: Table, esc: Escape, code: Escape) -> list[str]:
    """Notes explaining the marks used in ``table`` (and what a coarse view merges)."""
    cells = list(table.cells.values())
    found: list[str] = []
    if table.coarse:
        sets = ", ".join(f"{esc(d.id or '')} (sample ids {esc((d.sample_ids_sha256 or '-')[:12])}"
                         + (f", content {esc(d.samples_sha256[:12])})" if d.samples_sha256 else ")")
                         for d in table.sample_sets())
        what = "datasets and sample sets" if table.group_by == "none" else "sample sets"
        found.append(f"Coarse view ({code('--group-by ' + table.group_by)}): a column may mix results on different "
                     f"{what}, which are not directly comparable. Sample sets here: {sets}.")
    if table.superseded:
        same = "model, weights, metric, attributor, masker, versions and options" if table.coarse else (
            "sample set, model, weights, metric, attributor, masker, versions and options")
        found.append(f"{table.superseded} older result(s) superseded: a newer run in the same cell (same {same}) "
                     "replaced them.")
    if any(c.n_nonfinite for c in cells):
        found.append("(k non-finite): k samples gave a non-finite value (NaN or infinity) and are left out of the value.")
    if any(c.verification is not None for c in cells):
        found.append(f"{VERIFIED} verified: {code('harness verify')} re-ran the recorded configuration and matched the "
                     f"recorded per-sample values; {FAILED} verification failed; {OTHER_VERSIONS} checked with a "
                     "different harness, plugin or torch version.")
    if any(r.precision for r in table.rows):
        found.append("[bf16], [fp16], ...: run at reduced precision (not fp32); numbers may differ from fp32 runs.")
    if any(m.tag == "random-init" for r in table.rows for m in r.models):
        found.append("[random-init]: untrained weights, on purpose.")
    if any(c.derived_from for c in table.columns):
        found.append("abpc: AUC LeRF - AUC MoRF of the same row and settings (higher is better), derived here.")
    return found


def _body(table: Table, esc: Escape) -> tuple[list[str], list[list[str]]]:
    headers = ["model", *(header(table, c, esc) for c in table.columns)]
    rows = [[table.row_name(r, esc), *(cell_text(table.cells.get((r, c))) for c in table.columns)] for r in table.rows]
    return headers, rows


def to_markdown(board: Leaderboard) -> str:
    """One ``## heading``, GitHub table and notes per group; strings from result files escaped."""
    if not board.tables:
        return "No results with status ok.\n"
    blocks = []
    for table in board.tables:
        headers, rows = _body(table, markdown_text)
        text = f"## {table.title(markdown_text)}\n\n"
        text += tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n"
        extra = notes(table, markdown_text, lambda s: f"`{s}`")
        if extra:
            text += "\n" + "".join(f"- {note}\n" for note in extra)
        blocks.append(text)
    return "\n".join(blocks)


def to_html(board: Leaderboard) -> str:
    """One self-contained page (no scripts, no external resources); every string escaped."""
    parts = []
    for table in board.tables:
        headers, rows = _body(table, html_text)
        escaped = [[html_text(v) if i else v for i, v in enumerate(row)] for row in rows]  # names are escaped already
        parts.append(f"<h2>{table.title(html_text)}</h2>")
        parts.append(tabulate(escaped, headers=headers, tablefmt="unsafehtml", disable_numparse=True))
        parts.extend(f"<p>{note}</p>" for note in notes(table, html_text, html_text))
    if not board.tables:
        parts.append("<p>No results with status ok.</p>")
    return _PAGE.format(tables="\n".join(parts))


CSV_COLUMNS = ["table", "model", "metric", "higher_is_better", "value", "stderr", "n", "n_nonfinite", "verified",
               "superseded", "run_id", "dataset", "sample_ids_sha256", "samples_sha256"]


def to_csv(board: Leaderboard) -> str:
    """One line per cell. Strings are quoted (a CR or newline inside one never breaks a line) and
    neutralised against spreadsheet formulas; numbers and booleans stay unquoted numbers."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(CSV_COLUMNS)
    for table in board.tables:
        title = table.title()
        for row in table.rows:
            for column in table.columns:
                cell = table.cells.get((row, column))
                if cell is None:
                    continue
                line = [title, table.row_name(row), table.column_name(column), table.higher_is_better.get(column),
                        cell.value, cell.stderr, cell.n, cell.n_nonfinite, cell.verified, len(cell.superseded),
                        cell.run_id, cell.dataset.id, cell.dataset.sample_ids_sha256, cell.dataset.samples_sha256]
                writer.writerow([csv_cell(v) for v in line])
    return buffer.getvalue()


def _cell_json(cell: Cell) -> dict[str, Any]:
    record = cell.verification
    return {
        "value": cell.value,
        "stderr": cell.stderr,
        "n": cell.n,
        "n_nonfinite": cell.n_nonfinite,
        "verified": cell.verified,
        "verification": None if record is None else {
            "status": record.status, "n_checked": record.n_checked, "n_mismatched": record.n_mismatched,
            "max_abs_diff": record.max_abs_diff, "same_versions": record.same_versions,
        },
        "run_id": cell.run_id,
        "superseded": list(cell.superseded),
        "dataset": cell.dataset.to_json(),
    }


def _column_json(table: Table, column: ColumnKey) -> dict[str, Any]:
    return {
        "name": table.column_name(column),
        "higher_is_better": table.higher_is_better.get(column),
        "metric": column.metric.to_json(),
        "attributor": None if column.attributor is None else column.attributor.to_json(),
        "masker": None if column.masker is None else column.masker.to_json(),
        "shown_options": {p.kind: dict(p.shown) for p in (column.metric, column.attributor, column.masker) if p is not None},
        "derived_from": [table.column_name(c) for c in column.derived_from] or None,
    }


def to_json(board: Leaderboard) -> dict[str, Any]:
    """Every table with its group keys, columns (with full component keys), rows and cells."""
    tables = []
    for table in board.tables:
        group: dict[str, Any] = {}
        if table.group_by != "none":
            group["dataset"] = table.group.id
        if table.group_by == "sample-set":
            group.update(sample_ids_sha256=table.group.sample_ids_sha256, samples_sha256=table.group.samples_sha256)
        tables.append({
            "title": table.title(),
            "group": group,
            "coarse": table.coarse,
            "sample_sets": [d.to_json() for d in table.sample_sets()],
            "n_samples": table.n_samples(),
            "superseded": table.superseded,
            "columns": [_column_json(table, c) for c in table.columns],
            "rows": [
                {
                    "model": table.row_name(row),
                    "models": [{"id": m.id, "mark": m.tag, "weights_sha256": m.weights_sha256} for m in row.models],
                    "precision": row.precision,
                    "cells": {table.column_name(c): _cell_json(cell) for c in table.columns
                              if (cell := table.cells.get((row, c))) is not None},
                }
                for row in table.rows
            ],
            "notes": notes(table, lambda s: s, lambda s: f"`{s}`"),
        })
    return {"group_by": board.group_by, "tables": tables}


def render(board: Leaderboard, fmt: str) -> str:
    """The leaderboard in ``fmt`` (one of ``FORMATS``)."""
    if fmt == "json":
        return json.dumps(to_json(board), indent=2) + "\n"
    if fmt == "csv":
        return to_csv(board)
    if fmt == "markdown":
        return to_markdown(board)
    if fmt == "html":
        return to_html(board)
    raise HarnessError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>harness leaderboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.35rem 0.7rem; text-align: right; }}
th {{ background: #f3f3f3; }}
td:first-child, th:first-child {{ text-align: left; }}
h2 {{ font-size: 1.1rem; margin-top: 2rem; }}
</style>
</head>
<body>
<h1>harness leaderboard</h1>
<p>value ± standard error (n images); ↑ higher is better, ↓ lower is better. One table per dataset and sample set.</p>
{tables}
</body>
</html>
"""
