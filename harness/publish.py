"""``harness publish RESULTS... --site OUT``: a static site built only from result files.

The site works from the file system and from any static host (GitHub Pages, S3, a plain web server):
every link is relative, nothing is fetched from elsewhere, and every page carries a
Content-Security-Policy that allows only the site's own stylesheet, sort script and images.

Layout of ``OUT``::

    index.html                      one table per comparable group (the leaderboard's grouping)
    components.html                 the metrics, attributors and maskers used, with links
    metrics/<id>.html, attributors/<id>.html, maskers/<id>.html
    results/<run_id>/index.html     configuration, provenance, values, plots, per-sample table
    results/<run_id>/<run_id>.json  the result file, byte for byte (download)
    results/<run_id>/<run_id>.samples.jsonl   its samples file (download)
    results/<run_id>/files/...      the result's PNG plots
    downloads/leaderboard.{md,tex,csv,json}
    assets/site.css, assets/sort.js

The index holds only the table cells (no per-sample data, no plots), so its size grows with the
number of results (about 0.5 kB per cell), not with the number of samples.

What is read is checked the way ``harness validate`` and the leaderboard check it: an invalid result
file (including an unsafe ``run_id`` or artifact path) is left out with a warning, and a samples
file or plot that is a link leading outside its results folder, or a plot that is not a PNG, is not
copied (with a warning), so publishing a folder someone else wrote cannot copy other files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.results import Result, Verification, is_safe_relative_path, read_result, sibling_path

SITE_MARKER = ".harness-site"
"""A file at the root of every site; a folder holding it may be replaced by ``harness publish``."""

MAX_SAMPLE_ROWS = 1000
"""Per-sample rows shown on a result page by default (the whole samples file is always a download)."""

MAX_PLOT_BYTES = 20_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ASSETS = ("site.css", "sort.js")


@dataclass
class Plot:
    """A PNG artifact copied into the site."""

    name: str
    path: str  # site-relative


@dataclass
class Samples:
    """A result's samples file: the copy in the site and the rows shown on its page."""

    path: str | None  # site-relative download (None: not copied)
    size: int
    n_lines: int
    rows: list[dict[str, Any]]
    n_damaged: int = 0
    n_foreign: int = 0


@dataclass
class Entry:
    """One published result: what was read and what was copied for it."""

    source: Path
    result: Result
    verification: Verification | None = None
    samples: Samples | None = None
    plots: list[Plot] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # artifacts not copied, with the reason

    @property
    def folder(self) -> str:
        """The site-relative folder of this result."""
        return f"results/{self.result.run_id}"

    @property
    def page(self) -> str:
        """The site-relative path of this result's page."""
        return f"{self.folder}/index.html"

    @property
    def json_path(self) -> str:
        """The site-relative path of the copied result file."""
        return f"{self.folder}/{self.result.run_id}.json"


@dataclass
class Report:
    """What ``publish`` wrote."""

    site: Path
    n_results: int
    n_tables: int
    n_pages: int
    index_bytes: int
    skipped: list[str]


def _warn(message: str) -> None:
    from harness.progress import warn

    warn(message)


# -- reading ------------------------------------------------------------------------------------------------
def _inside_site(path: Path) -> bool:
    """Whether ``path`` lies in a folder written by ``harness publish`` (its copies are not inputs)."""
    return any((parent / SITE_MARKER).is_file() for parent in path.resolve().parents)


def collect(paths: list[Path]) -> tuple[list[Entry], list[str]]:
    """Valid result files under ``paths``, one per run id (the newest), and the files left out."""
    from harness.leaderboard import find_result_files

    skipped: list[str] = []
    chosen: dict[str, Entry] = {}
    for path in find_result_files(paths):
        if _inside_site(path):
            continue
        try:
            result = read_result(path)
        except HarnessError as exc:
            _warn(f"left out of the site: {exc}")
            message = str(exc)  # the site names the file, not the folder it was published from
            skipped.append(path.name + message[len(str(path)):] if message.startswith(str(path)) else message)
            continue
        old = chosen.get(result.run_id)
        if old is not None:
            newer = result.provenance.started_at > old.result.provenance.started_at
            if old.result.provenance.started_at != result.provenance.started_at:
                loser = old.source if newer else path
                _warn(f"run {result.run_id} is in more than one file; publishing the newest, not {loser}")
            if not newer:
                continue
        chosen[result.run_id] = Entry(path, result)
    entries = sorted(chosen.values(), key=lambda e: e.result.run_id)
    return entries, skipped


def _contained(source: Path, relative: str) -> Path | None:
    """``source``'s folder / ``relative`` if it is a regular file whose real path stays in that folder."""
    if not is_safe_relative_path(relative):
        return None
    root = source.parent.resolve()
    target = (source.parent / relative).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def read_samples(path: Path, run_sha256: str | None, limit: int) -> tuple[list[dict[str, Any]], int, int, int]:
    """(first ``limit`` records of this run, lines of this run, damaged lines, lines of other runs),
    streaming the file; a last line cut short by a crash is ignored."""
    rows: list[dict[str, Any]] = []
    n_lines = damaged = foreign = 0
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                damaged += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("values"), dict):
                damaged += 1
                continue
            if run_sha256 is not None and record.get("run_sha256") not in (None, run_sha256):
                foreign += 1
                continue
            n_lines += 1
            if len(rows) < limit:
                rows.append(record)
    return rows, n_lines, damaged, foreign


def _copy_evidence(entry: Entry, out: Path, sample_rows: int) -> None:
    """Copy the result file, its samples file and its PNG plots into ``out``; note what is left out."""
    result, source = entry.result, entry.source
    folder = out / entry.folder
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / entry.json_path)

    samples_name = sibling_path(source, result.run_id, ".samples.jsonl").name
    samples_file = _contained(source, samples_name)
    if samples_file is not None:
        run_sha = (result.provenance.model_extra or {}).get("run_sha256")
        rows, n_lines, damaged, foreign = read_samples(samples_file, run_sha if isinstance(run_sha, str) else None,
                                                       sample_rows)
        shutil.copyfile(samples_file, folder / samples_name)
        entry.samples = Samples(f"{entry.folder}/{samples_name}", samples_file.stat().st_size, n_lines, rows,
                                damaged, foreign)
    elif (source.parent / samples_name).is_symlink():
        _warn(f"{source.parent / samples_name}: a link leading outside the results folder; not published")
        entry.left_out.append("samples file: a link leading outside the results folder")

    for name, relative in sorted(result.artifacts.items()):
        reason = None
        found = _contained(source, relative)
        if found is None:
            reason = "missing, or outside the results folder"
        elif found.stat().st_size > MAX_PLOT_BYTES:
            reason = f"larger than {MAX_PLOT_BYTES // 1_000_000} MB"
        elif not relative.lower().endswith(".png") or not found.read_bytes()[:8] == PNG_SIGNATURE:
            reason = "not a PNG image"
        if reason is not None:
            if reason != "not a PNG image":
                _warn(f"{source}: artifact {name!r} ({relative}) not published: {reason}")
            entry.left_out.append(f"{name}: {reason}")
            continue
        assert found is not None  # a missing artifact has a reason
        target = f"{entry.folder}/files/{relative}"
        (out / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, out / target)
        entry.plots.append(Plot(name, target))


# -- writing ------------------------------------------------------------------------------------------------
def _check_destination(site: Path, inputs: list[Path]) -> None:
    """``site`` may be new, empty or an earlier site, and must not lie inside a folder being published."""
    if site.exists() and not site.is_dir():
        raise HarnessError(f"--site {site}: exists and is not a folder")
    if site.is_dir() and any(site.iterdir()) and not (site / SITE_MARKER).is_file():
        raise HarnessError(f"--site {site}: folder is not empty and was not written by `harness publish`; "
                           "choose a new or empty folder")
    target = site.resolve()
    for root in inputs:
        root = root.resolve()
        if root.is_dir() and (target == root or target.is_relative_to(root)):
            raise HarnessError(f"--site {site}: inside {root}, a folder being published; choose a folder outside it")


def _replace(staging: Path, site: Path) -> None:
    """Move the finished site into place (an earlier site there is removed only after that)."""
    old = None
    if site.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{site.name}.old-", dir=site.parent))
        site.rename(old / "site")
    staging.rename(site)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish(paths: list[Path], site: Path, *, group_by: str = "sample-set", title: str = "harness leaderboard",
            sample_rows: int = MAX_SAMPLE_ROWS) -> Report:
    """Write the static site of the result files under ``paths`` to the folder ``site``."""
    from harness import leaderboard as lb
    from harness.leaderboard_format import render
    from harness.site_html import Site

    if sample_rows < 0:
        raise HarnessError(f"--sample-rows must not be negative, got {sample_rows}")
    site = Path(site)
    _check_destination(site, paths)
    entries, skipped = collect(paths)
    if not entries:
        raise HarnessError(f"no valid result files in {', '.join(map(str, paths))}")
    files = [e.source for e in entries]
    results = [e.result for e in entries]
    records = lb.read_verifications(files, results)
    for entry in entries:
        entry.verification = records.get(entry.result.run_id)
    board = lb.load_results(files, results, group_by, verifications=records)

    site.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{site.name}.new-", dir=site.parent))
    try:
        for entry in entries:
            _copy_evidence(entry, staging, sample_rows)
        assets = staging / "assets"
        assets.mkdir()
        for name in ASSETS:
            (assets / name).write_bytes(resources.files("harness").joinpath("site_assets").joinpath(name).read_bytes())
        downloads = staging / "downloads"
        downloads.mkdir()
        for fmt, suffix in (("markdown", "md"), ("latex", "tex"), ("csv", "csv"), ("json", "json")):
            (downloads / f"leaderboard.{suffix}").write_text(render(board, fmt), encoding="utf-8")
        pages = Site(board, entries, title=title, skipped=skipped).pages()
        for relative, text in pages.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        (staging / ".nojekyll").write_text("", encoding="utf-8")  # GitHub Pages: serve files starting with _
        (staging / SITE_MARKER).write_text("written by harness publish; the folder is replaced on the next publish\n",
                                           encoding="utf-8")
        staging.chmod(0o755)
        index_bytes = (staging / "index.html").stat().st_size
        _replace(staging, site)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Report(site, len(entries), len(board.tables), len(pages), index_bytes, skipped)
