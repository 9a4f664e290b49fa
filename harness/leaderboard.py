"""Leaderboard tables built only from result files, grouped so that only comparable numbers meet.

A table holds results on one dataset and one sample set (dataset id + ``sample_ids_sha256``, + the
content digest ``samples_sha256`` when recorded). Rows are models (+ weights, + reduced precision);
a column is metric + attributor + masker with their ids, versions and options (headers show the
options that differ from the installed component's defaults). Two results share a cell only when
all of that is equal; then the newest wins and the table says how many were superseded.
``group_by="dataset"`` or ``"none"`` gives a coarser view that is labelled as such.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError
from harness.results import (
    Result,
    SamplesFile,
    Verification,
    is_result_file,
    read_result,
    read_verification,
    sibling_path,
    verification_path,
)

FORMATS = ("markdown", "html", "csv", "json", "latex")
GROUPINGS = ("sample-set", "dataset", "none")
"""``sample-set`` (default): dataset id + sample-set digest(s); ``dataset``: dataset id only;
``none``: one table. The last two are coarse views and say so in the output."""

FULL_PRECISION = {"fp32", "float32", "32", "full", ""}


def find_result_files(paths: list[Path]) -> list[Path]:
    """Result files in ``paths`` (files, or folders searched recursively); each file once."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.json") if is_result_file(p)))
        elif path.is_file():
            found.append(path)
        else:
            raise HarnessError(f"no such file or folder: {path}")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


# -- keys ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetKey:
    """What makes two results' samples the same: dataset id, sample-id digest, content digest."""

    id: str | None
    sample_ids_sha256: str | None = None
    samples_sha256: str | None = None

    def to_json(self) -> dict[str, str | None]:
        """The keys as written in the JSON format."""
        return {"dataset": self.id, "sample_ids_sha256": self.sample_ids_sha256, "samples_sha256": self.samples_sha256}


def dataset_key(result: Result) -> DatasetKey:
    """The full sample-set identity of a result. A dataset's ``content_identity`` (e.g. imagefolder's
    class mapping: the same images with other labels) is folded into the content digest."""
    extra = result.dataset.model_extra or {}
    content = extra.get("samples_sha256")
    identity = extra.get("content_identity")
    if content is not None and isinstance(identity, dict) and identity:
        import hashlib
        import json

        content = hashlib.sha256(json.dumps([content, identity], sort_keys=True).encode()).hexdigest()
    return DatasetKey(result.dataset.id, result.dataset.sample_ids_sha256, content)


def group_key(result: Result, group_by: str) -> DatasetKey:
    """The table a result belongs to under ``group_by``."""
    full = dataset_key(result)
    if group_by == "sample-set":
        return full
    if group_by == "dataset":
        return DatasetKey(full.id)
    if group_by == "none":
        return DatasetKey(None)
    raise HarnessError(f"unknown --group-by {group_by!r}; use one of {', '.join(GROUPINGS)}")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b
    return _canonical(a) == _canonical(b)


def component_defaults(kind: str, cid: str) -> tuple[tuple[str, str], ...] | None:
    """Default option values (canonical JSON) of an installed component, or None when not installed."""
    try:
        from pydantic_core import to_jsonable_python

        from harness.registry import get_registry

        entry = get_registry().components.get(kind, {}).get(cid)
        if entry is None:
            return None
        defaults = []
        for name, info in entry.obj.Options.model_fields.items():
            if info.is_required():
                continue
            try:
                defaults.append((name, _canonical(to_jsonable_python(info.get_default(call_default_factory=True)))))
            except Exception:  # a default that cannot be computed is simply always shown
                continue
        return tuple(defaults)
    except Exception:
        return None


def shown_options(kind: str, cid: str, options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The options that differ from the installed component's defaults (all of them if not installed)."""
    defaults = component_defaults(kind, cid)
    known = {} if defaults is None else {k: json.loads(v) for k, v in defaults}
    return tuple(
        (name, value) for name, value in sorted(options.items())
        if defaults is None or name not in known or not _same(known[name], value)
    )


@dataclass(frozen=True)
class Part:
    """One component of a column: id, version and options (what identifies it), and what a header shows."""

    kind: str
    id: str
    version: str
    options: str  # canonical JSON of every option
    granularity: str | None = None
    shown: tuple[tuple[str, Any], ...] = field(default=(), compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        """id, version, every option (and the masker's granularity)."""
        data: dict[str, Any] = {"id": self.id, "version": self.version, "options": json.loads(self.options)}
        if self.kind == "masker":
            data["granularity"] = self.granularity
        return data


def _part(kind: str, cid: str, version: str, options: dict[str, Any], granularity: str | None = None) -> Part:
    return Part(kind, cid, version, _canonical(options), granularity, shown_options(kind, cid, options))


@dataclass(frozen=True)
class ColumnKey:
    """Metric + attributor + masker, each with version and options; ``derived_from`` for ABPC."""

    metric: Part
    attributor: Part | None
    masker: Part | None
    derived_from: tuple[ColumnKey, ...] = ()


def column_key(result: Result) -> ColumnKey:
    """The column of a result: every input that changes its number, except the data and the model."""
    metric = _part("metric", result.metric.id, result.metric.version, result.metric.options)
    attributor = None
    if result.attributor is not None:
        attributor = _part("attributor", result.attributor.id, result.attributor.version, result.attributor.options)
    masker = None
    if result.masker is not None:
        options = dict(result.masker.options)
        recorded = options.pop("granularity", None)
        effective = result.values.get("granularity")
        granularity = effective if isinstance(effective, str) else recorded if isinstance(recorded, str) else None
        masker = _part("masker", result.masker.id, result.masker.version, options, granularity)
    return ColumnKey(metric, attributor, masker)


@dataclass(frozen=True)
class ModelPart:
    """One model of a row: id, the mark for its weights, and the weights digest."""

    id: str
    tag: str | None
    weights_sha256: str | None
    resize: str | None = None  # a non-default input pipeline (``-o model.resize``)


@dataclass(frozen=True)
class RowKey:
    """The model(s) of a row, their weights, and reduced precision (None for fp32)."""

    models: tuple[ModelPart, ...]
    precision: str | None


def row_key(result: Result) -> RowKey:
    """Model(s) + weights (``[random-init]``, a ``--weights`` file name, or ``[user model <digest>]``) + input pipeline when not
    timm's (``[resize=opencv_linear]``) + reduced precision."""
    parts = []
    for m in result.models:
        tag = None
        if m.random_init:
            tag = "random-init"
        elif (m.model_extra or {}).get("user_model") is True:  # harness.evaluate(module): the parameters' digest
            tag = f"user model {str(m.weights_sha256 or 'unknown')[:8]}"
        elif m.weights not in (m.source, "pretrained", ""):  # a user's --weights file
            tag = Path(m.weights).name
        preprocessing = (m.model_extra or {}).get("preprocessing")
        resize = preprocessing.get("resize") if isinstance(preprocessing, dict) else None
        parts.append(ModelPart(m.id, tag, m.weights_sha256, resize if isinstance(resize, str) and resize != "timm" else None))
    precision = (result.provenance.model_extra or {}).get("precision")
    reduced = precision if isinstance(precision, str) and precision.lower() not in FULL_PRECISION else None
    return RowKey(tuple(parts), reduced)


# -- labels (``esc`` escapes strings read from result files for the output format) ---------------------------
Escape = Callable[[str], str]


def _plain(text: str) -> str:
    return text


def _option_text(name: str, value: Any) -> str:
    return f"{name}={value if isinstance(value, str) else _canonical(value)}"


def _part_label(part: Part, esc: Escape, versions: bool) -> str:
    text = esc(part.id)
    if versions:
        text += " v" + esc(part.version)
    if part.kind == "masker" and part.granularity:
        text += ":" + esc(part.granularity)
    for name, value in part.shown:
        text += " " + esc(_option_text(name, value))
    return text


def column_label(column: ColumnKey, esc: Escape = _plain, detail: int = 0) -> str:
    """``metric opts (attributor opts, masker:granularity opts)``; ``detail`` 1 adds versions, 2 a digest."""
    text = _part_label(column.metric, esc, detail >= 1)
    extras = [_part_label(p, esc, detail >= 1) for p in (column.attributor, column.masker) if p is not None]
    if extras:
        text += f" ({', '.join(extras)})"
    if detail >= 2:
        text += " #" + hashlib.sha256(repr(column).encode()).hexdigest()[:6]
    return text


def row_label(row: RowKey, esc: Escape = _plain, detail: int = 0) -> str:
    """``id [random-init] + id2 [w.safetensors] [bf16]``; ``detail`` 1 adds the weights digests."""
    parts = []
    for m in row.models:
        text = esc(m.id)
        if m.tag:
            text += f" [{esc(m.tag)}]"
        if m.resize:
            text += f" [{esc('resize=' + m.resize)}]"
        if detail >= 1:
            text += f" [weights {esc((m.weights_sha256 or 'unknown')[:8])}]"
        parts.append(text)
    text = " + ".join(parts)
    if row.precision:
        text += f" [{esc(row.precision)}]"
    return text


def _details(keys: list[Any], label: Callable[[Any, Escape, int], str], levels: int) -> dict[Any, int]:
    """The least detail level at which each key's label is unique among ``keys``."""
    detail = {k: 0 for k in keys}
    for level in range(1, levels + 1):
        seen: dict[str, list[Any]] = {}
        for key in keys:
            seen.setdefault(label(key, _plain, detail[key]), []).append(key)
        clashing = [k for group in seen.values() if len(group) > 1 for k in group]
        if not clashing:
            break
        for key in clashing:
            detail[key] = level
    return detail


# -- cells and tables -----------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One result (or a derived ABPC value) placed in a table."""

    value: float | None
    stderr: float | None
    n: int
    run_id: str
    started_at: str
    dataset: DatasetKey
    n_nonfinite: int | None = None
    verification: Verification | None = None
    superseded: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool | None:
        """True (verification passed), False (failed) or None (not verified)."""
        return None if self.verification is None else self.verification.status == "passed"


@dataclass
class Table:
    """One group of comparable results: rows x columns of cells."""

    group: DatasetKey
    group_by: str
    rows: list[RowKey] = field(default_factory=list)
    columns: list[ColumnKey] = field(default_factory=list)
    cells: dict[tuple[RowKey, ColumnKey], Cell] = field(default_factory=dict)
    higher_is_better: dict[ColumnKey, bool | None] = field(default_factory=dict)
    superseded: int = 0
    row_detail: dict[RowKey, int] = field(default_factory=dict)
    column_detail: dict[ColumnKey, int] = field(default_factory=dict)

    @property
    def coarse(self) -> bool:
        """Whether this table merges sample sets (``--group-by dataset`` or ``none``)."""
        return self.group_by != "sample-set"

    def column_name(self, column: ColumnKey, esc: Escape = _plain) -> str:
        """The column's header (without the arrow), unique within this table."""
        return column_label(column, esc, self.column_detail.get(column, 0))

    def row_name(self, row: RowKey, esc: Escape = _plain) -> str:
        """The row's label, unique within this table."""
        return row_label(row, esc, self.row_detail.get(row, 0))

    def sample_sets(self) -> list[DatasetKey]:
        """Every distinct sample set behind this table's cells."""
        found = {cell.dataset for cell in self.cells.values()}
        return sorted(found, key=lambda d: (d.id or "", d.sample_ids_sha256 or "", d.samples_sha256 or ""))

    def n_samples(self) -> list[int]:
        """The distinct sample counts of the cells (skipped images make a count smaller)."""
        return sorted({cell.n for cell in self.cells.values()})

    def title(self, esc: Escape = _plain) -> str:
        """Dataset id, sample count and short digest(s); coarse views say what they merge."""
        counts = self.n_samples()
        if not counts:
            count = "no samples"
        elif len(counts) == 1:
            count = f"{counts[0]} sample{'' if counts[0] == 1 else 's'}"
        else:
            count = f"{counts[0]}-{counts[-1]} samples"
        if self.group_by == "none":
            return f"all datasets, {count} (coarse view: --group-by none)"
        name = esc(self.group.id or "")
        if self.group_by == "dataset":
            return f"{name}, {count}, all sample sets (coarse view: --group-by dataset)"
        digest = f"sample ids {esc((self.group.sample_ids_sha256 or '-')[:12])}"
        if self.group.samples_sha256:
            digest += f", content {esc(self.group.samples_sha256[:12])}"
        return f"{name}, {count}, {digest}"


@dataclass
class Leaderboard:
    """The tables, one per group of comparable results."""

    group_by: str
    tables: list[Table]


def _place(table: Table, row: RowKey, column: ColumnKey, cell: Cell, higher_is_better: bool | None) -> None:
    """Put ``cell`` in the table; for an occupied cell the newest run wins and the other is superseded."""
    table.higher_is_better[column] = higher_is_better
    old = table.cells.get((row, column))
    if old is None:
        table.cells[(row, column)] = cell
        return
    if (old.run_id, old.started_at) == (cell.run_id, cell.started_at):
        return  # the same result read twice (a copy of the file)
    table.superseded += 1
    if (cell.started_at, cell.run_id) > (old.started_at, old.run_id):
        cell.superseded = [*old.superseded, old.run_id]
        table.cells[(row, column)] = cell
    else:
        old.superseded.append(cell.run_id)


def _n_nonfinite(result: Result) -> int | None:
    n = result.values.get("n_nonfinite")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def build(
    results: list[Result],
    samples: dict[str, dict[str, float]] | None = None,
    *,
    group_by: str = "sample-set",
    verifications: dict[str, Verification] | None = None,
) -> Leaderboard:
    """Group ``ok`` results into tables and place them; ``status: "error"`` results are left out.

    ``samples`` (run id -> sample id -> AUC) gives ABPC its paired standard error; ``verifications``
    (run id -> record) marks verified cells.
    """
    if group_by not in GROUPINGS:
        raise HarnessError(f"unknown --group-by {group_by!r}; use one of {', '.join(GROUPINGS)}")
    verifications = verifications or {}
    tables: dict[DatasetKey, Table] = {}
    for result in results:
        if result.status != "ok":
            continue
        group = group_key(result, group_by)
        table = tables.setdefault(group, Table(group, group_by))
        cell = Cell(
            value=result.value,
            stderr=result.stderr,
            n=result.dataset.n_samples,
            run_id=result.run_id,
            started_at=result.provenance.started_at,
            dataset=dataset_key(result),
            n_nonfinite=_n_nonfinite(result),
            verification=verifications.get(result.run_id),
        )
        _place(table, row_key(result), column_key(result), cell, result.metric.higher_is_better)
    for table in tables.values():
        _add_abpc(table, samples or {})
        rows = {r for r, _ in table.cells}
        columns = {c for _, c in table.cells}
        table.row_detail = _details(list(rows), row_label, 1)
        table.column_detail = _details(list(columns), column_label, 2)
        table.rows = sorted(rows, key=lambda r: (table.row_name(r), repr(r)))
        table.columns = sorted(columns, key=lambda c: (table.column_name(c), repr(c)))
    ordered = sorted(tables.values(), key=lambda t: (t.group.id or "", t.group.sample_ids_sha256 or "", t.group.samples_sha256 or ""))
    return Leaderboard(group_by, ordered)


def _finite_aucs(aucs: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (aucs or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _add_abpc(table: Table, samples: dict[str, dict[str, Any]]) -> None:
    """ABPC = AUC LeRF - AUC MoRF (higher is better) where a row has both with equal everything else.

    The standard error is the paired one when both samples files are present and cover the same
    samples, else the two standard errors combined in quadrature. Only results on the same sample
    set are paired (in coarse views too).
    """
    from harness.stats import mean_stderr

    for (row, lerf_column), lerf in list(table.cells.items()):
        if lerf_column.metric.id != "lerf" or lerf_column.derived_from or lerf.value is None:
            continue
        match = [c for (r, c) in table.cells if r == row and c.metric.id == "morf" and not c.derived_from
                 and (c.metric.options, c.attributor, c.masker) == (lerf_column.metric.options, lerf_column.attributor, lerf_column.masker)]
        if len(match) != 1:
            continue
        morf_column = match[0]
        morf = table.cells[(row, morf_column)]
        if morf.value is None or morf.dataset != lerf.dataset:
            continue
        a, b = samples.get(lerf.run_id), samples.get(morf.run_id)
        n_nonfinite: int | None = None
        if a and b and set(a) == set(b) and (common := sorted(set(_finite_aucs(a)) & set(_finite_aucs(b)))):
            fa, fb = _finite_aucs(a), _finite_aucs(b)
            value, stderr = mean_stderr([fa[k] - fb[k] for k in common])
            n, n_nonfinite = len(common), (len(a) - len(common)) or None
        else:
            value = lerf.value - morf.value
            stderr = None if lerf.stderr is None or morf.stderr is None else (lerf.stderr**2 + morf.stderr**2) ** 0.5
            n = min(lerf.n, morf.n)
            counts = [c.n_nonfinite for c in (lerf, morf) if c.n_nonfinite is not None]
            n_nonfinite = max(counts) if counts else None
        metric = Part("metric", "abpc", f"{lerf_column.metric.version}/{morf_column.metric.version}", lerf_column.metric.options,
                      shown=lerf_column.metric.shown)
        column = ColumnKey(metric, lerf_column.attributor, lerf_column.masker, (lerf_column, morf_column))
        verified = [lerf.verification, morf.verification]
        cell = Cell(value, stderr, n, f"{lerf.run_id}|{morf.run_id}", max(lerf.started_at, morf.started_at), lerf.dataset,
                    n_nonfinite=n_nonfinite, verification=_combined(verified))
        table.cells[(row, column)] = cell
        table.higher_is_better[column] = True


def _combined(records: list[Verification | None]) -> Verification | None:
    """Both verified -> the worse of the two records; either unverified -> None."""
    if any(r is None for r in records):
        return None
    failed = [r for r in records if r is not None and r.status == "failed"]
    pick = failed[0] if failed else records[0]
    if pick is not None and not all(r is not None and r.same_versions for r in records):
        pick = pick.model_copy(update={"same_versions": False})
    return pick


# -- reading ----------------------------------------------------------------------------------------------------
def load(paths: list[Path], group_by: str = "sample-set") -> Leaderboard:
    """Read and validate the result files under ``paths`` (any invalid file stops with one line
    naming it), read their verification records and MoRF/LeRF samples, and build the tables."""
    files = find_result_files(paths)
    return load_results(files, [read_result(p) for p in files], group_by)


def load_results(
    files: list[Path], results: list[Result], group_by: str = "sample-set",
    verifications: dict[str, Verification] | None = None,
) -> Leaderboard:
    """The tables of ``results`` already read from ``files`` (same order), with their MoRF/LeRF samples
    and verification records (default: ``read_verifications``); ``load`` without the reading."""
    if verifications is None:
        verifications = read_verifications(files, results)
    return build(results, _curve_aucs(files, results), group_by=group_by, verifications=verifications)


def read_verifications(files: list[Path], results: list[Result]) -> dict[str, Verification]:
    """run id -> the verification record beside its result file (bad or stale records are ignored with a warning)."""
    return _verifications(files, results)


def _verifications(files: list[Path], results: list[Result]) -> dict[str, Verification]:
    """run id -> verification record beside its result file; a bad record is ignored with a warning."""
    from harness.progress import warn

    found: dict[str, Verification] = {}
    for path, result in zip(files, results):
        if result.status != "ok":
            continue
        record_path = verification_path(path, result.run_id)
        if not record_path.is_file():
            continue
        try:
            record = read_verification(record_path, result.run_id)
        except HarnessError as exc:
            warn(f"ignoring verification record: {exc}")
            continue
        if _is_stale(record, result):
            warn(f"ignoring verification record: {record_path}: checked before this result was written (run again since)")
            continue
        found[result.run_id] = record
    return found


def _is_stale(record: Verification, result: Result) -> bool:
    """Whether the record's ``checked_at`` (when present) is older than the result's ``started_at``."""
    from datetime import datetime, timezone

    checked = (record.model_extra or {}).get("checked_at")
    if not isinstance(checked, str):
        return False
    try:
        times = [datetime.fromisoformat(t) for t in (checked, result.provenance.started_at)]
    except (TypeError, ValueError):
        return False
    checked_at, started_at = (t if t.tzinfo else t.replace(tzinfo=timezone.utc) for t in times)
    return checked_at < started_at


def _curve_aucs(files: list[Path], results: list[Result]) -> dict[str, dict[str, Any]]:
    """run id -> sample id -> AUC for MoRF/LeRF results whose samples file is present and readable."""
    from harness.progress import warn

    found: dict[str, dict[str, Any]] = {}
    for path, result in zip(files, results):
        if result.metric.id not in ("morf", "lerf") or result.status != "ok":
            continue
        samples_path = sibling_path(path, result.run_id, ".samples.jsonl")
        try:
            records = SamplesFile(samples_path).read()
            aucs = {r["sample_id"]: r["values"].get("auc") for r in records
                    if isinstance(r, dict) and isinstance(r.get("sample_id"), str) and isinstance(r.get("values"), dict)
                    and "auc" in r["values"]}
        except Exception as exc:  # a damaged samples file only costs the paired standard error
            warn(f"{samples_path}: not used for ABPC ({type(exc).__name__}: {exc})")
            continue
        if aucs:
            found[result.run_id] = aucs
    return found


def render(board: Leaderboard, fmt: str) -> str:
    """The tables as Markdown (GitHub), HTML (one self-contained page), CSV, JSON or LaTeX (booktabs)."""
    from harness import leaderboard_format

    return leaderboard_format.render(board, fmt)
