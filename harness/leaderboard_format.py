"""Rendering leaderboard tables: Markdown (GitHub), HTML (one self-contained page), CSV, JSON and LaTeX.

Every string read from a result file is escaped for its format (``harness.escape``, ``latex_text``);
the marks in cells are explained in notes under each table. ``standings`` (rank, best, within one
standard error of the best) is shared by the LaTeX tables and the static site (``harness.publish``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

from tabulate import tabulate

from harness.errors import HarnessError
from harness.escape import csv_cell, html_text, markdown_text
from harness.leaderboard import FORMATS, Cell, ColumnKey, Escape, Leaderboard, RowKey, Table

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
    if fmt == "latex":
        return to_latex(board)
    raise HarnessError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")



# -- standings: rank, best, within one standard error (LaTeX and the static site) ------------------------------
@dataclass(frozen=True)
class Standing:
    """Where a cell stands in its column: ``rank`` (1 = best; ties share a rank), ``best``, and ``near``
    (not the best, but within one standard error of the best value, the best's own standard error)."""

    rank: int
    of: int
    best: bool
    near: bool


def _rankable(cell: Cell | None) -> TypeGuard[Cell]:
    return cell is not None and cell.value is not None and math.isfinite(cell.value)


def standings(table: Table) -> dict[tuple[RowKey, ColumnKey], Standing]:
    """The standing of every cell with a finite value in a column with a known better direction."""
    found: dict[tuple[RowKey, ColumnKey], Standing] = {}
    for column in table.columns:
        higher = table.higher_is_better.get(column)
        if higher is None:
            continue
        cells = [(row, cell) for row in table.rows if _rankable(cell := table.cells.get((row, column)))]
        if not cells:
            continue
        sign = 1.0 if higher else -1.0
        scores = [sign * cast(float, cell.value) for _, cell in cells]  # _rankable: a finite value
        top = max(scores)
        spreads = [cell.stderr for (_, cell), score in zip(cells, scores) if score == top and cell.stderr is not None]
        spread = max(spreads) if spreads else None
        for (row, _cell), score in zip(cells, scores):
            rank = 1 + sum(other > score for other in scores)
            near = score != top and spread is not None and top - score <= spread
            found[(row, column)] = Standing(rank, len(cells), score == top, near)
    return found


# -- LaTeX (booktabs) ----------------------------------------------------------------------------------------
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "%": r"\%",
    "_": r"\_", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}", "<": r"\textless{}", ">": r"\textgreater{}",
    "|": r"\textbar{}", '"': r"{\ttfamily\char34}", "`": r"\textasciigrave{}", "[": "{[}", "]": "{]}",
}
_LATEX_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_LATEX_CHARS = re.compile(r"[\\{}$&#%_^~<>|\"`\[\]]")
_LATEX_DASHES = re.compile(r"-(?=-)")
_LATEX_BEYOND_LATIN1 = re.compile(r"[^\x00-\xff]")


def latex_text(text: str) -> str:
    """``text`` as inert LaTeX text: the ten special characters and ``< > | " ` [ ]`` become commands or
    groups (so no command, group, math, comment, ``^^`` character code, alignment or optional argument
    can form), control characters and line breaks become spaces, and ``--`` stays two hyphens. Latin-1
    letters (é, ü, ß) are kept as UTF-8; any other character is written as its code point, ``U+2713``
    in typewriter type, so the table compiles with pdfLaTeX."""
    text = _LATEX_CONTROL.sub(" ", str(text))
    text = _LATEX_CHARS.sub(lambda m: _LATEX_SPECIAL[m.group(0)], text)
    text = _LATEX_BEYOND_LATIN1.sub(lambda m: rf"{{\ttfamily U+{ord(m.group(0)):04X}}}", text)
    return _LATEX_DASHES.sub("-{}", text)


_LATEX_MARKS = {VERIFIED: r"$^{\surd}$", FAILED: r"$^{\times}$"}


def _latex_cell(cell: Cell | None, standing: Standing | None, show_n: bool) -> str:
    if cell is None:
        return ""
    text = "n/a" if cell.value is None else f"{cell.value:.4f}"
    if cell.value is not None and cell.stderr is not None:
        text += rf" $\pm$ {cell.stderr:.4f}"
    if standing is not None and standing.best:
        text = rf"\textbf{{{text}}}"
    if show_n:
        text += rf" {{\scriptsize ($n{{=}}{cell.n}$)}}"
    if cell.n_nonfinite:
        text += rf" {{\scriptsize ({cell.n_nonfinite} non-finite)}}"
    if cell.verification is not None:
        text += _LATEX_MARKS[VERIFIED if cell.verified else FAILED]
        if not cell.verification.same_versions:
            text += "$^{*}$"
    return text


def latex_caption(table: Table) -> str:
    """The caption: dataset, n, sample-set digest(s), what the numbers are, the direction arrows, bold."""
    counts = table.n_samples()
    n = "no samples" if not counts else f"$n={counts[0]}$" if len(counts) == 1 else f"$n={counts[0]}$--${counts[-1]}$"
    if table.group_by == "none":
        where = "All datasets (coarse view: sample sets differ)"
    else:
        where = f"Dataset {latex_text(table.group.id or '')}"
        if table.group_by == "dataset":
            where += " (coarse view: all sample sets)"
    digest = ""
    if table.group_by == "sample-set":
        digest = f" (sample ids {latex_text((table.group.sample_ids_sha256 or '-')[:12])}"
        if table.group.samples_sha256:
            digest += f", content {latex_text(table.group.samples_sha256[:12])}"
        digest += ")"
    return (f"{where}, {n}{digest}. Mean $\\pm$ standard error; $\\uparrow$ higher is better, $\\downarrow$ lower is "
            "better; the best value per column in bold.")


def _latex_notes(table: Table) -> list[str]:
    found = notes(table, latex_text, lambda s: rf"\texttt{{{latex_text(s)}}}")
    return [note.replace(VERIFIED, _LATEX_MARKS[VERIFIED]).replace(FAILED, _LATEX_MARKS[FAILED])
            .replace(f" {OTHER_VERSIONS} ", " $^{*}$ ") for note in found]


def to_latex(board: Leaderboard) -> str:
    """One booktabs ``table`` per group: caption with dataset and n, header arrows, ``value $\\pm$
    stderr``, the best value per column in bold, notes explaining the marks; strings escaped."""
    lines = ["% harness leaderboard: one table per dataset and sample set.",
             r"% Needs \usepackage{booktabs} in the preamble (and \usepackage[T1]{fontenc} for Latin-1 letters in ids).", ""]
    if not board.tables:
        return "\n".join(lines) + "% No results with status ok.\n"
    for number, table in enumerate(board.tables, start=1):
        marks = standings(table)
        show_n = len(table.n_samples()) > 1
        arrows = {True: r" $\uparrow$", False: r" $\downarrow$", None: ""}
        headers = ["Model", *(table.column_name(c, latex_text) + arrows[table.higher_is_better.get(c)] for c in table.columns)]
        lines += [r"\begin{table}[htbp]", r"\centering", rf"\caption{{{latex_caption(table)}}}",
                  rf"\label{{tab:harness-{number}}}", rf"\begin{{tabular}}{{@{{}}l{'r' * len(table.columns)}@{{}}}}",
                  r"\toprule", " & ".join(headers) + r" \\", r"\midrule"]
        for row in table.rows:
            cells = [_latex_cell(table.cells.get((row, c)), marks.get((row, c)), show_n) for c in table.columns]
            name = table.row_name(row, latex_text)
            name = "{}" + name if name.lstrip().startswith("[") else name  # not an optional argument of \\
            lines.append(" & ".join([name, *cells]) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        extra = _latex_notes(table)
        if extra:
            lines += [r"\par\smallskip", r"{\footnotesize " + " ".join(extra) + r"\par}"]
        lines += [r"\end{table}", ""]
    return "\n".join(lines)

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
