"""The HTML pages of the static site (``harness publish``): index, result, component pages.

Every string read from a result file, a samples file or a component's docstring goes through
``html_text``; every link is relative to the page that holds it (``Site.href``) and percent-encoded;
pages load only ``assets/site.css`` and ``assets/sort.js`` under a CSP that allows nothing else.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import posixpath
import re
import shlex
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from harness import __version__
from harness.escape import html_text as esc
from harness.leaderboard import Cell, ColumnKey, Leaderboard, Part, RowKey, Table
from harness.leaderboard_format import FAILED, OTHER_VERSIONS, VERIFIED, Standing, notes, standings

if TYPE_CHECKING:
    from harness.publish import Entry

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'")
KIND_FOLDERS = {"metric": "metrics", "attributor": "attributors", "masker": "maskers"}
MAX_VALUE_CHARS = 4000
MAX_SAMPLE_COLUMNS = 16
PLOT_DESCRIPTIONS = {
    "curve": "the mean curve and the first images' curves",
    "attributions": "the first images with their attribution maps overlaid",
    "heatmap": "the heatmap of the pairwise values",
    "landscape": "the two-dimensional landscape of the models",
}


# -- small helpers ------------------------------------------------------------------------------------------
def number(value: Any, digits: int = 4) -> str:
    """A number as fixed-point text (``n/a`` for None, ``nan``/``inf`` spelled out)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def json_text(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``value`` as compact JSON, cut at ``limit`` characters with a note (escaped)."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > limit:
        return esc(text[:limit]) + f" … ({len(text) - limit} more characters; see the result JSON)"
    return esc(text)


def scalar_text(value: Any) -> str:
    """Plain scalars as text; lists and objects summarised (escaped)."""
    if isinstance(value, list):
        return f"[{len(value)} values]"
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}"
    if isinstance(value, float):
        return esc(f"{value:.6g}")
    if value is None:
        return "null"
    return esc(value if isinstance(value, str) else json.dumps(value))


def slug(cid: str) -> str:
    """A file-name token for a component id: the id itself when it is plain lowercase, else a hashed form."""
    if re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,80}", cid) and ".." not in cid:
        return cid
    plain = re.sub(r"[^a-z0-9_-]+", "_", cid.lower())[:40].strip("_") or "component"
    return f"{plain}-{hashlib.sha256(cid.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def component_page(kind: str, cid: str) -> str:
    """The site-relative page of a component."""
    return f"{KIND_FOLDERS[kind]}/{slug(cid)}.html"


def kv_table(rows: list[tuple[str, str]], caption: str | None = None) -> str:
    """A two-column key/value table; keys and values must already be HTML."""
    head = f"<caption>{caption}</caption>" if caption else ""
    body = "".join(f"<tr><th scope=\"row\">{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<div class=\"scroll\"><table class=\"kv\">{head}<tbody>{body}</tbody></table></div>"


def paragraphs(doc: str) -> str:
    """A docstring's text as paragraphs (escaped; ````code```` shown as code)."""
    blocks = [" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", doc.strip())]
    out = []
    for block in blocks:
        if block:
            html = re.sub(r"``(.+?)``", r"<code>\1</code>", esc(block))
            out.append(f"<p>{html}</p>")
    return "".join(out)


# -- component information (from the installed registry) ---------------------------------------------------
@dataclass
class ComponentInfo:
    """What the installed harness knows about a component."""

    summary: str
    description: str
    citation: str
    version: str
    provider: str
    options: list[tuple[str, str, str, str]]  # name, type, default (JSON or "required"), description
    facts: list[tuple[str, str]]


def option_docs(options_cls: type) -> dict[str, str]:
    """Attribute docstrings of an ``Options`` class and its bases (the string under ``name: type = ...``)."""
    import ast
    import textwrap

    docs: dict[str, str] = {}
    for cls in reversed(options_cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    text = name if name and not getattr(annotation, "__args__", None) else str(annotation)
    return text.replace("typing.", "")


def component_info(kind: str, cid: str) -> ComponentInfo | None:
    """Docstring, citation, options with defaults and provider of an installed component (else None)."""
    try:
        from pydantic_core import to_jsonable_python

        from harness.registry import get_registry

        registered = get_registry().components.get(kind, {}).get(cid)
        if registered is None:
            return None
        cls = registered.obj
        doc = inspect.getdoc(cls) or ""
        first, _, rest = doc.strip().partition("\n")
        if not rest.strip():  # a one-line class docstring: the plugin module's docstring tells more
            module = inspect.getdoc(sys.modules.get(cls.__module__)) or ""
            rest = module if module.strip() != first.strip() else ""
        described = option_docs(cls.Options)
        options = []
        for name, info in cls.Options.model_fields.items():
            if info.is_required():
                default = "required"
            else:
                try:
                    default = json.dumps(to_jsonable_python(info.get_default(call_default_factory=True)), ensure_ascii=False)
                except Exception:
                    default = "(computed)"
            options.append((name, _type_name(info.annotation), default, info.description or described.get(name, "")))
        facts = []
        if kind == "metric":
            better = {True: "higher", False: "lower", None: "no direction"}[getattr(cls, "higher_is_better", None)]
            yes = {True: "yes", False: "no"}
            facts = [("better", better), ("needs an attributor", yes[bool(getattr(cls, "needs_attributor", False))]),
                     ("needs a masker", yes[bool(getattr(cls, "needs_masker", False))]),
                     ("models per run", f"{getattr(cls, 'min_models', 1)}-{getattr(cls, 'max_models', None) or 'any'}")]
        return ComponentInfo(first.strip(), rest.strip(), str(getattr(cls, "citation", "") or ""), str(cls.version),
                             registered.provider, options, facts)
    except Exception:  # a broken plugin must not stop the site; the page says it is not installed
        return None


# -- the site ---------------------------------------------------------------------------------------------------
@dataclass
class Placement:
    """Where a result sits in the leaderboard."""

    number: int
    table: Table
    row: RowKey
    column: ColumnKey
    cell: Cell
    standing: Standing | None


class Site:
    """All pages of a site, from the leaderboard and the published entries."""

    def __init__(self, board: Leaderboard, entries: list["Entry"], *, title: str, skipped: list[str]):
        self.board = board
        self.entries = {e.result.run_id: e for e in entries}
        self.title = title
        self.skipped = skipped
        self.standings = [standings(t) for t in board.tables]
        self.placements: dict[str, list[Placement]] = {}
        self.superseded_by: dict[str, str] = {}
        for number, (table, marks) in enumerate(zip(board.tables, self.standings), start=1):
            for (row, column), cell in table.cells.items():
                for run_id in cell.run_id.split("|") if column.derived_from else [cell.run_id]:
                    self.placements.setdefault(run_id, []).append(
                        Placement(number, table, row, column, cell, marks.get((row, column))))
                for old in cell.superseded:
                    self.superseded_by[old] = cell.run_id
        self.components: dict[tuple[str, str], list["Entry"]] = {}
        for entry in entries:
            for kind, part in (("metric", entry.result.metric), ("attributor", entry.result.attributor),
                               ("masker", entry.result.masker)):
                if part is not None:
                    self.components.setdefault((kind, part.id), []).append(entry)

    # -- links and the page frame ------------------------------------------------------------------------
    @staticmethod
    def href(here: str, target: str, anchor: str = "") -> str:
        """The relative, percent-encoded link from page ``here`` to site file ``target`` (+ ``#anchor``)."""
        relative = posixpath.relpath(target, posixpath.dirname(here) or ".")
        return esc(quote(relative, safe="/") + (f"#{anchor}" if anchor else ""))

    def frame(self, here: str, title: str, body: str) -> str:
        """A whole page: CSP, the site's stylesheet and sort script, navigation, ``body``."""
        link = lambda target: self.href(here, target)  # noqa: E731
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            "<meta name=\"referrer\" content=\"no-referrer\">\n"
            f"<title>{esc(title)}</title>\n"
            f"<link rel=\"stylesheet\" href=\"{link('assets/site.css')}\">\n"
            f"<script src=\"{link('assets/sort.js')}\" defer></script>\n</head>\n<body>\n"
            f"<header class=\"site\"><nav><a href=\"{link('index.html')}\">{esc(self.title)}</a>"
            f"<a href=\"{link('components.html')}\">Components</a>"
            f"<a href=\"{link('index.html')}#downloads\">Downloads</a></nav></header>\n"
            f"<main>\n{body}\n</main>\n"
            f"<footer>Built by harness {esc(__version__)} from {len(self.entries)} result file(s) with "
            "<code>harness publish</code>. Every number links to the result it comes from.</footer>\n"
            "</body>\n</html>\n"
        )

    def pages(self) -> dict[str, str]:
        """Site-relative path -> HTML of every page."""
        pages = {"index.html": self.index(), "components.html": self.components_page()}
        for entry in self.entries.values():
            pages[entry.page] = self.result_page(entry)
        for kind, cid in self.components:
            pages[component_page(kind, cid)] = self.component(kind, cid)
        return pages

    # -- index ----------------------------------------------------------------------------------------------
    def _row_header(self, table: Table, row: RowKey) -> str:
        models = []
        for model in row.models:
            text = esc(model.id)
            if model.tag == "random-init":
                text += " <span class=\"tag\" title=\"untrained weights, on purpose\">random-init</span>"
            elif model.tag:
                text += f" <span class=\"tag user\" title=\"the user's weights file\">weights: {esc(model.tag)}</span>"
            if table.row_detail.get(row, 0) >= 1:
                text += f" <span class=\"tag\">weights {esc((model.weights_sha256 or 'unknown')[:8])}</span>"
            models.append(text)
        text = " + ".join(models)
        if row.precision:
            text += (f" <span class=\"tag precision\" title=\"run at reduced precision, not fp32\">"
                     f"{esc(row.precision)}</span>")
        return f"<th scope=\"row\" data-value=\"{esc(table.row_name(row))}\">{text}</th>"

    def _column_header(self, here: str, table: Table, column: ColumnKey) -> str:
        better = table.higher_is_better.get(column)
        arrow = {True: ("↑", "higher is better"), False: ("↓", "lower is better"), None: ("", "")}[better]
        data_better = {True: "higher", False: "lower", None: "none"}[better]
        parts = []
        if column.derived_from:
            links = [f"<a href=\"{self.href(here, component_page('metric', c.metric.id))}\">{esc(c.metric.id)}</a>"
                     for c in column.derived_from]
            parts.append("derived: " + " − ".join(links))
        else:
            parts.append(self._part_link(here, "metric", column.metric))
        for kind, part in (("attributor", column.attributor), ("masker", column.masker)):
            if part is not None:
                parts.append(self._part_link(here, kind, part))
        direction = f" <span class=\"dir\" title=\"{arrow[1]}\">{arrow[0]}</span>" if arrow[0] else ""
        return (f"<th scope=\"col\" data-sort=\"number\" data-better=\"{data_better}\">"
                f"<span class=\"colname\">{table.column_name(column, esc)}</span>{direction}"
                f"<span class=\"parts\">{' · '.join(parts)}</span></th>")

    def _part_link(self, here: str, kind: str, part: Part) -> str:
        return f"{kind} <a href=\"{self.href(here, component_page(kind, part.id))}\">{esc(part.id)}</a>"

    def _marks(self, cell: Cell) -> str:
        text = ""
        if cell.n_nonfinite:
            text += f" <span class=\"n\">({cell.n_nonfinite} non-finite)</span>"
        record = cell.verification
        if record is not None:
            if cell.verified:
                text += (f" <abbr class=\"ok\" title=\"verified: {record.n_checked} sample(s) re-run and matched\">"
                         f"{VERIFIED}</abbr>")
            else:
                text += (f" <abbr class=\"bad\" title=\"verification failed: {record.n_mismatched} of "
                         f"{record.n_checked} sample(s) differ\">{FAILED}</abbr>")
            if not record.same_versions:
                text += f"<abbr title=\"verified with other versions\">{OTHER_VERSIONS}</abbr>"
        return text

    def _cell(self, here: str, table: Table, cell: Cell | None, column: ColumnKey, standing: Standing | None) -> str:
        if cell is None:
            return "<td data-value=\"\"></td>"
        value = number(cell.value)
        if standing is not None and standing.best:
            value = f"<strong>{value}</strong>"
        runs = cell.run_id.split("|") if column.derived_from else [cell.run_id]
        if len(runs) == 1 and runs[0] in self.entries:
            value = f"<a href=\"{self.href(here, self.entries[runs[0]].page)}\" title=\"the result: configuration, samples, plots\">{value}</a>"
        text = value
        if cell.value is not None and cell.stderr is not None:
            text += f" <span class=\"se\">± {number(cell.stderr)}</span>"
        if len(table.n_samples()) > 1:
            text += f" <span class=\"n\">n={cell.n}</span>"
        if standing is not None and standing.near:
            text += " <abbr title=\"within one standard error of the best\">≈</abbr>"
        text += self._marks(cell)
        if len(runs) > 1:
            names = [c.metric.id for c in column.derived_from] or [f"run {i + 1}" for i in range(len(runs))]
            links = [f"<a href=\"{self.href(here, self.entries[r].page)}\">{esc(n)}</a>"
                     for n, r in zip(names, runs) if r in self.entries]
            text += f" <span class=\"n\">({', '.join(links)})</span>"
        rank = ""
        if standing is not None:
            rank = f"<span class=\"rank\" title=\"rank {standing.rank} of {standing.of}\">#{standing.rank}</span> "
        css = " class=\"best\"" if standing is not None and standing.best else (
            " class=\"near\"" if standing is not None and standing.near else "")
        data = "" if cell.value is None or not math.isfinite(cell.value) else repr(float(cell.value))
        return f"<td{css} data-value=\"{data}\">{rank}{text}</td>"

    def _table(self, here: str, number_: int, table: Table, marks: dict[Any, Standing]) -> str:
        counts = table.n_samples()
        count = ", ".join(str(c) for c in counts) if counts else "none"
        facts = []
        if table.group_by != "none":
            facts.append(("dataset", esc(table.group.id or "")))
        facts.append(("samples", count + (" (differ: skipped images)" if len(counts) > 1 else "")))
        if table.group_by == "sample-set":
            facts.append(("sample ids sha256", f"<code>{esc(table.group.sample_ids_sha256 or '-')}</code>"))
            if table.group.samples_sha256:
                facts.append(("content sha256", f"<code>{esc(table.group.samples_sha256)}</code>"))
        found = {v for v in table.higher_is_better.values() if v is not None}
        direction = {frozenset({True}): "↑ higher is better (every column with a direction)",
                     frozenset({False}): "↓ lower is better (every column with a direction)",
                     frozenset({True, False}): "per column: ↑ higher is better, ↓ lower is better"}
        facts.append(("direction", direction.get(frozenset(found), "none given")))
        fact_html = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
        head = ("<th scope=\"col\" data-sort=\"text\">model</th>"
                + "".join(self._column_header(here, table, c) for c in table.columns))
        body = []
        for row in table.rows:
            cells = "".join(self._cell(here, table, table.cells.get((row, c)), c, marks.get((row, c)))
                            for c in table.columns)
            body.append(f"<tr>{self._row_header(table, row)}{cells}</tr>")
        extra = notes(table, esc, lambda s: f"<code>{esc(s)}</code>")
        note_html = "<ul class=\"notes\">" + "".join(f"<li>{n}</li>" for n in extra) + "</ul>" if extra else ""
        return (f"<section id=\"table-{number_}\"><h2>{number_}. {table.title(esc)}</h2>"
                f"<dl class=\"facts\">{fact_html}</dl>"
                f"<div class=\"scroll\"><table class=\"board sortable\"><thead><tr>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table></div>{note_html}</section>")

    def index(self) -> str:
        """The leaderboard: a legend, one table per group, failed runs, skipped files, downloads."""
        here = "index.html"
        parts = [f"<h1>{esc(self.title)}</h1>",
                 f"<p class=\"lead\">{len(self.entries)} result(s) in {len(self.board.tables)} table(s): one per "
                 "dataset and sample set, with metric options in the columns, so only comparable numbers share a "
                 "table. Each value is a mean ± its standard error; click it for the result's configuration, "
                 "per-sample values and plots.</p>"]
        parts.append(
            "<details class=\"legend\"><summary>How to read the tables</summary><div class=\"scroll\"><table><tbody>"
            "<tr><th scope=\"row\">↑ / ↓</th><td>higher / lower is better</td></tr>"
            "<tr><th scope=\"row\"><strong>bold</strong>, green</th><td>the best value of the column (ties share it)</td></tr>"
            "<tr><th scope=\"row\">≈, light green</th><td>within one standard error of the best (the best's own)</td></tr>"
            "<tr><th scope=\"row\">#k</th><td>rank in the column (1 = best; ties share a rank)</td></tr>"
            f"<tr><th scope=\"row\">{VERIFIED} / {FAILED} / {OTHER_VERSIONS}</th><td><code>harness verify</code> re-ran the "
            "run and matched / did not match; * with other versions</td></tr>"
            "<tr><th scope=\"row\"><span class=\"tag\">random-init</span> <span class=\"tag user\">weights: f</span> "
            "<span class=\"tag precision\">bf16</span></th><td>untrained weights on purpose; the user's weights file; "
            "reduced precision</td></tr>"
            "</tbody></table></div><p>Sort a column with its ⇅ button (needs scripts; the tables are complete "
            "without them).</p></details>")
        if len(self.board.tables) > 1:
            items = "".join(f"<li><a href=\"#table-{i}\">{t.title(esc)}</a></li>"
                            for i, t in enumerate(self.board.tables, start=1))
            parts.append(f"<nav class=\"toc\" aria-label=\"tables\"><ul>{items}</ul></nav>")
        if not self.board.tables:
            parts.append("<p>No results with status ok.</p>")
        for number_, (table, marks) in enumerate(zip(self.board.tables, self.standings), start=1):
            parts.append(self._table(here, number_, table, marks))
        failed = [e for e in self.entries.values() if e.result.status != "ok"]
        if failed:
            items = "".join(f"<li><a href=\"{self.href(here, e.page)}\">{esc(e.result.run_id)}</a>: "
                            f"{esc(e.result.error or 'no message')}</li>" for e in failed)
            parts.append(f"<section id=\"failed\"><h2>Runs that failed ({len(failed)})</h2>"
                         f"<p>Not in the tables.</p><ul>{items}</ul></section>")
        if self.skipped:
            items = "".join(f"<li>{esc(s)}</li>" for s in self.skipped)
            parts.append(f"<section id=\"skipped\" class=\"warn\"><h2>Files left out ({len(self.skipped)})</h2>"
                         f"<p>These files are not valid result files.</p><ul>{items}</ul></section>")
        downloads = "".join(
            f"<li><a href=\"{self.href(here, f'downloads/leaderboard.{suffix}')}\" download>{label}</a></li>"
            for suffix, label in (("md", "Markdown (one table per group)"), ("tex", "LaTeX (booktabs)"),
                                  ("csv", "CSV (one line per cell)"), ("json", "JSON (the tables with every key)")))
        parts.append(f"<section id=\"downloads\"><h2>Downloads</h2><ul>{downloads}</ul></section>")
        return self.frame(here, self.title, "\n".join(parts))

    # -- result pages -------------------------------------------------------------------------------------
    def _placement_html(self, here: str, entry: "Entry") -> str:
        run_id = entry.result.run_id
        lines = []
        for p in self.placements.get(run_id, []):
            where = (f"<a href=\"{self.href(here, 'index.html', f'table-{p.number}')}\">table {p.number}</a> "
                     f"({p.table.title(esc)}), column {p.table.column_name(p.column, esc)}")
            if p.column.derived_from:
                where += f" = {number(p.cell.value)} (derived from this run and its pair)"
            if p.standing is not None:
                where += f": rank {p.standing.rank} of {p.standing.of}"
                if p.standing.best:
                    where += ", <strong>best</strong>"
                elif p.standing.near:
                    where += ", within one standard error of the best"
            lines.append(f"<li>{where}</li>")
        if run_id in self.superseded_by:
            newer = self.superseded_by[run_id]
            link = (f"<a href=\"{self.href(here, self.entries[newer].page)}\">{esc(newer)}</a>"
                    if newer in self.entries else esc(newer))
            lines.append(f"<li>not shown in the tables: superseded by the newer run {link} in the same cell</li>")
        if entry.result.status != "ok":
            lines.append("<li>not in the tables: the run failed</li>")
        return f"<ul>{''.join(lines)}</ul>" if lines else "<p>Not in a table.</p>"

    def _verification_html(self, entry: "Entry") -> str:
        record = entry.verification
        if record is None:
            return "<p>Not verified (no <code>harness verify</code> record beside the result file).</p>"
        status = (f"<span class=\"ok\">{VERIFIED} passed</span>" if record.status == "passed"
                  else f"<span class=\"bad\">{FAILED} failed</span>")
        rows = [("status", status), ("samples checked", str(record.n_checked)),
                ("samples that differ", str(record.n_mismatched)),
                ("largest difference", esc(number(record.max_abs_diff, 6) if record.max_abs_diff is not None else "n/a")),
                ("same versions", "yes" if record.same_versions else "no (other harness, plugin or torch versions)")]
        rows += [(esc(k), json_text(v)) for k, v in sorted((record.model_extra or {}).items())]
        return kv_table(rows)

    def _samples_html(self, entry: "Entry") -> str:
        info = entry.samples
        if info is None:
            return "<p>No samples file beside the result file.</p>"
        if not info.rows:
            return f"<p>The samples file has no records of this run ({info.n_lines} line(s)).</p>"
        columns: list[str] = []
        for record in info.rows:
            for key in record["values"]:
                if key not in columns and len(columns) < MAX_SAMPLE_COLUMNS:
                    columns.append(key)
        nonfinite = any(isinstance(r.get("nonfinite"), dict) and r["nonfinite"] for r in info.rows)
        head = ("<th scope=\"col\" data-sort=\"text\">sample</th><th scope=\"col\" data-sort=\"number\">label</th>"
                "<th scope=\"col\" data-sort=\"number\">prediction</th>"
                + "".join(f"<th scope=\"col\" data-sort=\"number\">{esc(c)}</th>" for c in columns)
                + ("<th scope=\"col\" data-sort=\"text\">non-finite</th>" if nonfinite else ""))
        body = []
        for record in info.rows:
            cells = [f"<th scope=\"row\" data-value=\"{esc(str(record.get('sample_id', '')))}\">"
                     f"{esc(str(record.get('sample_id', '')))}</th>"]
            for value in [record.get("label"), record.get("prediction"), *(record["values"].get(c) for c in columns)]:
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                data = repr(value) if numeric else ""
                css = "" if numeric or value is None else " class=\"text\""
                cells.append(f"<td{css} data-value=\"{esc(data)}\">{'' if value is None else scalar_text(value)}</td>")
            if nonfinite:
                bad = found if isinstance(found := record.get("nonfinite"), dict) else {}
                cells.append(f"<td class=\"text\">{esc(', '.join(f'{k}: {v}' for k, v in bad.items()))}</td>")
            body.append(f"<tr>{''.join(cells)}</tr>")
        shown = len(info.rows)
        note = [f"{shown} of {info.n_lines} sample(s) shown"
                + (f" (the first {shown}; the whole file is a download above)" if shown < info.n_lines else "")]
        if len(columns) == MAX_SAMPLE_COLUMNS:
            note.append(f"only the first {MAX_SAMPLE_COLUMNS} value keys are shown")
        if info.n_damaged:
            note.append(f"{info.n_damaged} damaged line(s) not shown")
        if info.n_foreign:
            note.append(f"{info.n_foreign} line(s) of another configuration not shown")
        note.append("lists are summarised as [k values]; the samples file has them in full")
        return (f"<p>{esc('; '.join(note))}.</p><div class=\"scroll\"><table class=\"samples sortable\">"
                f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")

    def _component_rows(self, here: str, kind: str, part: Any) -> list[tuple[str, str]]:
        if part is None:
            return [(kind, "none")]
        rows = [(kind, f"<a href=\"{self.href(here, component_page(kind, part.id))}\">{esc(part.id)}</a> "
                       f"version {esc(part.version)}"),
                (f"{kind} options", json_text(part.options))]
        if kind == "metric":
            better = {True: "higher is better", False: "lower is better", None: "no direction"}[part.higher_is_better]
            rows.append(("direction", better))
        rows += [(f"{kind} {esc(k)}", json_text(v)) for k, v in sorted((part.model_extra or {}).items())]
        return rows

    def result_page(self, entry: "Entry") -> str:
        """Everything about one result: headline, placement, values, plots, configuration, provenance,
        verification, per-sample table and downloads."""
        here = entry.page
        r = entry.result
        models = " + ".join(m.id for m in r.models)
        title = f"{r.metric.id}: {models}"
        headline = "n/a" if r.value is None else number(r.value)
        if r.value is not None and r.stderr is not None:
            headline += f" ± {number(r.stderr)}"
        better = {True: " (higher is better)", False: " (lower is better)", None: ""}[r.metric.higher_is_better]
        parts = [f"<p class=\"breadcrumb\"><a href=\"{self.href(here, 'index.html')}\">← {esc(self.title)}</a></p>",
                 f"<h1>{esc(title)}</h1>", f"<p class=\"lead\">run <code>{esc(r.run_id)}</code></p>"]
        facts = [("value", f"<strong>{esc(headline)}</strong>{better}"),
                 ("samples", str(r.dataset.n_samples)),
                 ("status", esc(r.status) if r.status == "ok" else f"<span class=\"bad\">{esc(r.status)}</span>")]
        if r.error:
            facts.append(("error", esc(r.error)))
        marks = []
        for m in r.models:
            if m.random_init:
                marks.append(f"{esc(m.id)}: <span class=\"tag\">random-init</span> (untrained weights, on purpose)")
            elif m.weights not in (m.source, "pretrained", ""):
                marks.append(f"{esc(m.id)}: <span class=\"tag user\">weights: {esc(m.weights)}</span>")
        precision = (r.provenance.model_extra or {}).get("precision")
        if isinstance(precision, str):
            facts.append(("precision", esc(precision)))
        if marks:
            facts.append(("weights", "; ".join(marks)))
        record = entry.verification
        if record is not None:
            facts.append(("verification", (f"<span class=\"ok\">{VERIFIED} passed</span>" if record.status == "passed"
                                           else f"<span class=\"bad\">{FAILED} failed</span>")
                          + f" ({record.n_checked} sample(s) re-run; details below)"))
        parts.append("<dl class=\"facts\">" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>")
        downloads = [f"<li><a href=\"{self.href(here, entry.json_path)}\" download>{esc(r.run_id)}.json</a> "
                     "(the result file)</li>"]
        if entry.samples is not None and entry.samples.path is not None:
            downloads.append(f"<li><a href=\"{self.href(here, entry.samples.path)}\" download>"
                             f"{esc(posixpath.basename(entry.samples.path))}</a> (one JSON line per sample, "
                             f"{entry.samples.size / 1000:.1f} kB)</li>")
        parts.append(f"<h2>Downloads</h2><ul>{''.join(downloads)}</ul>")
        parts.append(f"<h2>In the leaderboard</h2>{self._placement_html(here, entry)}")
        value_rows = [(esc(k), json_text(v)) for k, v in sorted(r.values.items())]
        parts.append("<h2>Values</h2>" + (kv_table(value_rows) if value_rows else "<p>None.</p>"))
        if entry.plots or entry.left_out:
            figures = []
            for plot in entry.plots:
                what = PLOT_DESCRIPTIONS.get(plot.name, f"plot {plot.name}")
                alt = f"{plot.name} plot of {r.metric.id} for {models}: {what}"
                figures.append(f"<figure><a href=\"{self.href(here, plot.path)}\"><img src=\"{self.href(here, plot.path)}\" "
                               f"alt=\"{esc(alt)}\" loading=\"lazy\"></a><figcaption>{esc(plot.name)}</figcaption></figure>")
            left = "".join(f"<li>{esc(s)}</li>" for s in entry.left_out)
            parts.append("<h2>Plots</h2>" + "".join(figures)
                         + (f"<p>Artifacts not shown:</p><ul class=\"notes\">{left}</ul>" if left else ""))
        config: list[tuple[str, str]] = []
        for i, m in enumerate(r.models, start=1):
            label = "model" if len(r.models) == 1 else f"model {i}"
            config.append((label, f"{esc(m.id)} (source {esc(m.source)})"))
            config.append((f"{label} weights", esc(m.weights) + (" (random-init)" if m.random_init else "")))
            config.append((f"{label} weights sha256", f"<code>{esc(m.weights_sha256 or 'none')}</code>"))
            config += [(f"{label} {esc(k)}", json_text(v)) for k, v in sorted((m.model_extra or {}).items())]
        config += self._component_rows(here, "metric", r.metric)
        config += self._component_rows(here, "attributor", r.attributor)
        config += self._component_rows(here, "masker", r.masker)
        config += [("dataset", esc(r.dataset.id)), ("dataset samples", str(r.dataset.n_samples)),
                   ("dataset sample ids sha256", f"<code>{esc(r.dataset.sample_ids_sha256)}</code>")]
        config += [(f"dataset {esc(k)}", json_text(v)) for k, v in sorted((r.dataset.model_extra or {}).items())]
        parts.append("<h2>Configuration</h2>" + kv_table(config))
        p = r.provenance
        prov = [("command", f"<code>{esc(shlex.join(p.argv))}</code>"), ("started at", esc(p.started_at)),
                ("duration", f"{p.duration_s:.1f} s"), ("harness", esc(p.harness)), ("plugins", json_text(p.plugins)),
                ("python", esc(p.python)), ("torch", esc(p.torch)), ("timm", esc(p.timm)), ("device", esc(p.device)),
                ("seed", str(p.seed)), ("batch size", str(p.batch_size))]
        prov += [(esc(k), json_text(v)) for k, v in sorted((p.model_extra or {}).items())]
        prov += [(esc(k), json_text(v)) for k, v in sorted((r.model_extra or {}).items())]
        parts.append("<h2>Provenance</h2>" + kv_table(prov))
        parts.append("<h2>Verification</h2>" + self._verification_html(entry))
        parts.append("<h2>Per-sample values</h2>" + self._samples_html(entry))
        return self.frame(here, f"{title} · {self.title}", "\n".join(parts))

    # -- component pages ----------------------------------------------------------------------------------
    def component(self, kind: str, cid: str) -> str:
        """A metric, attributor or masker: docstring, citation, options with defaults, results that used it."""
        here = component_page(kind, cid)
        info = component_info(kind, cid)
        parts = [f"<p class=\"breadcrumb\"><a href=\"{self.href(here, 'components.html')}\">← metrics, attributors "
                 "and maskers</a></p>", f"<h1>{esc(kind)} {esc(cid)}</h1>"]
        if info is None:
            parts.append("<p class=\"warn\">Not installed where this site was built: no description. Versions and "
                         "options below come from the result files.</p>")
        else:
            if info.summary:
                parts.append(f"<p class=\"lead\">{esc(info.summary)}</p>")
            parts.append(paragraphs(info.description))
            facts = [("installed version", esc(info.version)), ("provided by", esc(info.provider))]
            facts += [(esc(k), esc(v)) for k, v in info.facts]
            facts.append(("citation", esc(info.citation) if info.citation else "none given"))
            parts.append("<dl class=\"facts\">" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>")
            if info.options:
                option_rows = "".join(f"<tr><th scope=\"row\"><code>{esc(n)}</code></th><td><code>{esc(t)}</code></td>"
                                      f"<td><code>{esc(d)}</code></td><td>{esc(desc)}</td></tr>" for n, t, d, desc in info.options)
                parts.append("<h2>Options</h2><div class=\"scroll\"><table class=\"kv\"><thead><tr><th scope=\"col\">"
                             "option</th><th scope=\"col\">type</th><th scope=\"col\">default</th><th scope=\"col\">"
                             f"description</th></tr></thead><tbody>{option_rows}</tbody></table></div>")
            else:
                parts.append("<h2>Options</h2><p>None.</p>")
        entries = sorted(self.components.get((kind, cid), []),
                         key=lambda e: (e.result.dataset.id, " + ".join(m.id for m in e.result.models), e.result.run_id))
        rows = []
        for e in entries:
            r = e.result
            part = {"metric": r.metric, "attributor": r.attributor, "masker": r.masker}[kind]
            assert part is not None  # the results listed for a component used it
            value = "n/a" if r.value is None else number(r.value)
            if r.value is not None and r.stderr is not None:
                value += f" ± {number(r.stderr)}"
            others = [f"{k} {esc(p.id)}" for k, p in (("metric", r.metric), ("attributor", r.attributor),
                                                      ("masker", r.masker)) if p is not None and k != kind]
            data = repr(float(r.value)) if r.value is not None and math.isfinite(r.value) else ""
            rows.append(f"<tr><th scope=\"row\" data-value=\"{esc(r.run_id)}\"><a href=\"{self.href(here, e.page)}\">"
                        f"{esc(r.run_id)}</a></th><td class=\"text\">{esc(' + '.join(m.id for m in r.models))}</td>"
                        f"<td class=\"text\">{esc(r.dataset.id)} (n={r.dataset.n_samples})</td>"
                        f"<td data-value=\"{data}\">{esc(value)}</td><td class=\"text\">{esc(part.version)}</td>"
                        f"<td class=\"text\">{json_text(part.options, 400)}</td><td class=\"text\">{', '.join(others)}</td>"
                        f"<td class=\"text\">{esc(r.status)}</td></tr>")
        parts.append(f"<h2>Results that used it ({len(entries)})</h2><div class=\"scroll\"><table class=\"samples sortable\">"
                     "<thead><tr><th scope=\"col\" data-sort=\"text\">run</th><th scope=\"col\" data-sort=\"text\">models</th>"
                     "<th scope=\"col\" data-sort=\"text\">dataset</th><th scope=\"col\" data-sort=\"number\">value</th>"
                     "<th scope=\"col\" data-sort=\"text\">version</th><th scope=\"col\" data-sort=\"text\">options</th>"
                     "<th scope=\"col\" data-sort=\"text\">with</th><th scope=\"col\" data-sort=\"text\">status</th></tr>"
                     f"</thead><tbody>{''.join(rows)}</tbody></table></div>")
        return self.frame(here, f"{kind} {cid} · {self.title}", "\n".join(parts))

    def components_page(self) -> str:
        """Every metric, attributor and masker used by a published result."""
        here = "components.html"
        parts = [f"<h1>Metrics, attributors and maskers</h1><p class=\"lead\">The components used by the "
                 f"{len(self.entries)} published result(s).</p>"]
        for kind, folder in KIND_FOLDERS.items():
            ids = sorted(cid for k, cid in self.components if k == kind)
            if not ids:
                continue
            rows = []
            for cid in ids:
                info = component_info(kind, cid)
                summary = esc(info.summary) if info is not None else "(not installed where this site was built)"
                rows.append(f"<tr><th scope=\"row\"><a href=\"{self.href(here, component_page(kind, cid))}\">{esc(cid)}"
                            f"</a></th><td>{summary}</td><td>{len(self.components[(kind, cid)])}</td></tr>")
            parts.append(f"<h2>{folder.capitalize()}</h2><div class=\"scroll\"><table class=\"kv\"><thead><tr>"
                         f"<th scope=\"col\">id</th><th scope=\"col\">summary</th><th scope=\"col\">results</th></tr>"
                         f"</thead><tbody>{''.join(rows)}</tbody></table></div>")
        return self.frame(here, f"Metrics, attributors and maskers · {self.title}", "\n".join(parts))
