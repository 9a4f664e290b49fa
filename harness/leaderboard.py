"""Leaderboard tables built only from result files: one row per model, one column per metric."""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.errors import HarnessError
from harness.results import Result, is_result_file, read_result

FORMATS = ("markdown", "html", "csv", "json")


@dataclass(frozen=True)
class Cell:
    """One result placed in the table."""

    value: float | None
    stderr: float | None
    n: int
    run_id: str
    started_at: str


def find_result_files(paths: list[Path]) -> list[Path]:
    """Result files in ``paths`` (files, or folders searched recursively)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.json") if is_result_file(p)))
        elif path.is_file():
            found.append(path)
        else:
            raise HarnessError(f"no such file or folder: {path}")
    return found


def row_key(result: Result) -> str:
    """Model(s) + weights: e.g. ``resnet50``, ``resnet50 [random-init]``, ``a [w.safetensors]``."""
    parts = []
    for m in result.models:
        tag = ""
        if m.random_init:
            tag = " [random-init]"
        elif m.weights not in (m.source, "pretrained", ""):  # a user's --weights file
            tag = f" [{Path(m.weights).name}]"
        parts.append(m.id + tag)
    return " + ".join(parts)


def column_key(result: Result) -> str:
    """Metric with attributor / masker (+ granularity) where they apply."""
    name = result.metric.id
    extras = []
    if result.attributor is not None:
        extras.append(result.attributor.id)
    if result.masker is not None:
        masker = result.masker.id
        granularity = result.values.get("granularity") if isinstance(result.values, dict) else None
        extras.append(f"{masker}:{granularity}" if granularity else masker)
    return f"{name} ({', '.join(extras)})" if extras else name


@dataclass
class Leaderboard:
    """Rows x columns of cells, and each column's better direction."""

    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell]
    higher_is_better: dict[str, bool | None]

    def header(self, column: str) -> str:
        arrow = {True: " ↑", False: " ↓", None: ""}[self.higher_is_better[column]]
        return column + arrow

    def text(self, row: str, column: str) -> str:
        cell = self.cells.get((row, column))
        if cell is None or cell.value is None:
            return ""
        err = f" ± {cell.stderr:.4f}" if cell.stderr is not None else ""
        return f"{cell.value:.4f}{err} (n={cell.n})"


def build(results: list[Result], samples: dict[str, dict[str, float]] | None = None) -> Leaderboard:
    """Place every ``ok`` result; for a repeated cell the newest run wins.

    Where a row has both ``morf (...)`` and ``lerf (...)`` with the same attributor and masker, an
    ``abpc (...)`` column (AUC LeRF - AUC MoRF, higher is better) is derived; its standard error is
    the paired one when ``samples`` (run id -> sample id -> AUC) has both runs, else the two
    standard errors combined in quadrature.
    """
    cells: dict[tuple[str, str], Cell] = {}
    directions: dict[str, bool | None] = {}
    for result in results:
        if result.status != "ok":
            continue
        row, column = row_key(result), column_key(result)
        directions[column] = result.metric.higher_is_better
        cell = Cell(result.value, result.stderr, result.dataset.n_samples, result.run_id, result.provenance.started_at)
        old = cells.get((row, column))
        if old is None or (cell.started_at, cell.run_id) > (old.started_at, old.run_id):
            cells[(row, column)] = cell
    _add_abpc(cells, directions, samples or {})
    rows = sorted({r for r, _ in cells})
    columns = sorted({c for _, c in cells})
    return Leaderboard(rows, columns, cells, directions)


def _add_abpc(cells: dict[tuple[str, str], Cell], directions: dict[str, bool | None], samples: dict[str, dict[str, float]]) -> None:
    from harness.stats import mean_stderr

    for (row, column), lerf in list(cells.items()):
        if not column.startswith("lerf (") or lerf.value is None:
            continue
        suffix = column[len("lerf"):]
        morf = cells.get((row, "morf" + suffix))
        if morf is None or morf.value is None:
            continue
        a, b = samples.get(lerf.run_id), samples.get(morf.run_id)
        if a and b and set(a) == set(b):
            value, stderr = mean_stderr([a[k] - b[k] for k in sorted(a)])
        else:
            value = lerf.value - morf.value
            stderr = None if lerf.stderr is None or morf.stderr is None else (lerf.stderr**2 + morf.stderr**2) ** 0.5
        column_name = "abpc" + suffix
        directions[column_name] = True
        cells[(row, column_name)] = Cell(value, stderr, min(lerf.n, morf.n), f"{lerf.run_id}|{morf.run_id}", max(lerf.started_at, morf.started_at))


def load(paths: list[Path]) -> Leaderboard:
    """Read and validate the result files under ``paths`` and build the table."""
    files = find_result_files(paths)
    results = [read_result(p) for p in files]
    return build(results, _curve_aucs(files, results))


def _curve_aucs(files: list[Path], results: list[Result]) -> dict[str, dict[str, float]]:
    """run id -> sample id -> AUC for MoRF/LeRF results whose samples file is present."""
    from harness.results import SamplesFile

    found = {}
    for path, result in zip(files, results):
        if result.metric.id in ("morf", "lerf") and result.status == "ok":
            records = SamplesFile(path.with_name(f"{result.run_id}.samples.jsonl")).read()
            aucs = {r["sample_id"]: r["values"]["auc"] for r in records if "auc" in r.get("values", {})}
            if aucs:
                found[result.run_id] = aucs
    return found


def render(board: Leaderboard, fmt: str) -> str:
    """The table as Markdown (GitHub), HTML (one self-contained page), CSV or JSON."""
    if fmt == "json":
        return json.dumps(to_json(board), indent=2) + "\n"
    if fmt == "csv":
        return to_csv(board)
    table = [[row, *(board.text(row, c) for c in board.columns)] for row in board.rows]
    headers = ["model", *(board.header(c) for c in board.columns)]
    if fmt == "markdown":
        cells = [[str(v).replace("|", "\\|") for v in row] for row in table]
        heads = [h.replace("|", "\\|") for h in headers]
        return tabulate(cells, headers=heads, tablefmt="github", disable_numparse=True) + "\n"
    if fmt == "html":
        escaped = [[html.escape(str(v)) for v in row] for row in table]
        return to_html(tabulate(escaped, headers=[html.escape(h) for h in headers], tablefmt="unsafehtml"))
    raise HarnessError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def to_json(board: Leaderboard) -> dict[str, Any]:
    """Rows, columns and every cell with value, stderr, n and run id."""
    return {
        "columns": [{"name": c, "higher_is_better": board.higher_is_better[c]} for c in board.columns],
        "rows": [
            {
                "model": row,
                "cells": {
                    c: {"value": cell.value, "stderr": cell.stderr, "n": cell.n, "run_id": cell.run_id}
                    for c in board.columns
                    if (cell := board.cells.get((row, c))) is not None
                },
            }
            for row in board.rows
        ],
    }


def to_csv(board: Leaderboard) -> str:
    """One line per (model, metric column) with value, stderr and n."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "metric", "higher_is_better", "value", "stderr", "n", "run_id"])
    for row in board.rows:
        for column in board.columns:
            cell = board.cells.get((row, column))
            if cell is not None:
                writer.writerow([row, column, board.higher_is_better[column], cell.value, cell.stderr, cell.n, cell.run_id])
    return buffer.getvalue()


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
</style>
</head>
<body>
<h1>harness leaderboard</h1>
<p>value ± standard error (n images); ↑ higher is better, ↓ lower is better.</p>
{table}
</body>
</html>
"""


def to_html(table: str) -> str:
    """Wrap an HTML table whose strings are already escaped in a self-contained page."""
    return _PAGE.format(table=table)
