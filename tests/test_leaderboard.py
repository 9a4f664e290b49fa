"""The leaderboard (harness/leaderboard.py, `harness leaderboard`): built only from result files written
by real runs, in Markdown, HTML, CSV and JSON; escaping, error results, newest-wins, broken files."""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import shutil
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import run_cli

LITE, TINY = "efficientnet_lite0", "test_resnet"
TINY_ROW = f"{TINY} [random-init]"
CURVE = ("--attributor", "saliency", "--masker", "blur", "-o", "metric.steps=4")
RUNS = [  # (model args, metric args)
    ((LITE,), ("accuracy",)),
    ((TINY, "--random-init"), ("accuracy",)),
    ((LITE,), ("insertion", *CURVE)),
    ((TINY, "--random-init"), ("insertion", *CURVE)),
    ((TINY, "--random-init"), ("deletion", *CURVE)),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[tuple[Path, dict]]]:
    """Small real runs into one folder: (folder, [(result path, result data)])."""
    out = tmp_path_factory.mktemp("leaderboard") / "results"
    made = []
    for (model, *model_flags), (metric, *metric_flags) in RUNS:
        res = run_cli("run", "--model", model, *model_flags, "--metric", metric, *metric_flags,
                      "--limit", "2", "--quiet", "--out", out)
        assert res.exit_code == 0, res.stderr
        path = Path(res.stdout.strip().rsplit(" -> ", 1)[1])
        made.append((path, json.loads(path.read_text(encoding="utf-8"))))
    return out, made


@pytest.fixture
def copy_of(runs, tmp_path):
    """A private copy of the result folder (result and samples files) for tests that add or edit files."""
    src, _ = runs
    dst = tmp_path / "results"
    dst.mkdir()
    for path in src.iterdir():
        if path.is_file():
            shutil.copy2(path, dst / path.name)
    return dst


def board(*args) -> str:
    res = run_cli("leaderboard", *map(str, args))
    assert res.exit_code == 0, res.stderr
    assert "Traceback" not in res.stderr
    return res.stdout


def board_json(*args) -> dict:
    return json.loads(board(*args, "--format", "json"))


def table_json(*args) -> dict:
    """The JSON of a leaderboard that has exactly one table (all results on one sample set)."""
    (table,) = board_json(*args)["tables"]
    return table


def table_lines(text: str) -> list[str]:
    """The Markdown table lines of a one-table leaderboard (without its heading and notes)."""
    lines = text.rstrip("\n").splitlines()
    assert lines[0].startswith("## samples, 2 samples, sample ids ") and lines[1] == "", lines[:2]
    return [line for line in lines if line.startswith("|")]


def row_of(result: dict) -> str:
    return TINY_ROW if result["models"][0]["random_init"] else result["models"][0]["id"]


def column_of(result: dict) -> str:
    metric = result["metric"]["id"]
    if result["attributor"] is None:
        return metric
    steps = result["metric"]["options"]["steps"]  # not the default: shown in the header
    return f"{metric} steps={steps} ({result['attributor']['id']}, {result['masker']['id']}:{result['values']['granularity']})"


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def find(made, model: str, metric: str) -> tuple[Path, dict]:
    return next((p, d) for p, d in made if d["models"][0]["id"] == model and d["metric"]["id"] == metric)


# -- JSON ----------------------------------------------------------------------------------------------------
def test_json_one_row_per_model_one_column_per_metric_attributor_masker(runs):
    out, made = runs
    data = table_json(out)
    rows = {r["model"]: r["cells"] for r in data["rows"]}
    assert list(rows) == sorted(rows) and set(rows) == {LITE, TINY_ROW}  # random-init marked in the row
    columns = {c["name"]: c["higher_is_better"] for c in data["columns"]}
    assert columns == {
        "accuracy": True,
        "insertion steps=4 (saliency, blur:pixel)": True,
        "deletion steps=4 (saliency, blur:pixel)": False,
    }
    assert sum(len(cells) for cells in rows.values()) == len(made)
    for _, result in made:
        cell = rows[row_of(result)][column_of(result)]
        assert {k: cell[k] for k in ("value", "stderr", "n", "run_id")} == {
            "value": result["value"], "stderr": result["stderr"], "n": result["dataset"]["n_samples"], "run_id": result["run_id"]}
        assert cell["n"] == 2
    assert column_of(find(made, LITE, "insertion")[1]) in rows[LITE]
    assert "deletion steps=4 (saliency, blur:pixel)" not in rows[LITE]  # a cell with no result is simply absent


def test_folder_and_files_give_the_same_board(runs):
    out, made = runs
    assert board_json(*[p for p, _ in made]) == board_json(out)
    assert board_json(out, *[p for p, _ in made[:2]]) == board_json(out)  # a file given twice counts once


def test_default_folder_is_results(runs, monkeypatch):
    out, _ = runs
    monkeypatch.chdir(out.parent)
    assert board() == board(out)


# -- Markdown -------------------------------------------------------------------------------------------------
def _md_cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    return [c.strip() for c in line[1:-1].split("|")]


def test_markdown_is_a_github_table_with_direction_arrows(runs):
    out, made = runs
    text = board(out)
    assert board(out, "--format", "markdown") == text  # the default format
    lines = table_lines(text)
    assert len(lines) == 2 + 2  # header, separator, two models
    header = _md_cells(lines[0])
    assert header == ["model", "accuracy ↑", "deletion steps=4 (saliency, blur:pixel) ↓", "insertion steps=4 (saliency, blur:pixel) ↑"]
    assert all(re.fullmatch(r":?-{3,}:?", c) for c in _md_cells(lines[1])), lines[1]
    body = {cells[0]: dict(zip(header[1:], cells[1:])) for cells in map(_md_cells, lines[2:])}
    assert set(body) == {LITE, TINY_ROW}
    for _, r in made:
        arrow = " ↑" if r["metric"]["higher_is_better"] else " ↓"
        assert body[row_of(r)][column_of(r) + arrow] == f"{r['value']:.4f} ± {r['stderr']:.4f} (n=2)"
    assert body[LITE]["deletion steps=4 (saliency, blur:pixel) ↓"] == ""


def test_markdown_escapes_pipes(runs, copy_of):
    _, made = runs
    path, data = find(made, LITE, "accuracy")
    data = copy.deepcopy(data)
    data["models"][0]["id"] = "a|b"
    write(copy_of / path.name, data)
    lines = table_lines(board(copy_of))
    widths = {len(re.findall(r"(?<!\\)\|", line)) for line in lines}
    assert len(widths) == 1, lines  # every line has the same number of (unescaped) cell separators


# -- CSV ----------------------------------------------------------------------------------------------------------
def test_csv_parses_and_matches_the_result_files(runs):
    out, made = runs
    rows = list(csv.DictReader(io.StringIO(board(out, "--format", "csv"))))
    assert len(rows) == len(made)
    assert list(rows[0]) == ["table", "model", "metric", "higher_is_better", "value", "stderr", "n", "n_nonfinite",
                             "verified", "superseded", "run_id", "dataset", "sample_ids_sha256", "samples_sha256"]
    by_run = {r["run_id"]: r for r in rows}
    for _, result in made:
        row = by_run[result["run_id"]]
        assert row["model"] == row_of(result) and row["metric"] == column_of(result)
        assert float(row["value"]) == result["value"] and float(row["stderr"]) == result["stderr"]
        assert int(row["n"]) == 2
        assert row["higher_is_better"] == str(result["metric"]["higher_is_better"])


# -- HTML -----------------------------------------------------------------------------------------------------------
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "thead", "tbody", "tr",
                "th", "td"}


class _Page(HTMLParser):
    """Every tag with its attributes, and the text (entities decoded) of the page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse_self_contained(page: str) -> _Page:
    """Parse ``page`` and check it is one self-contained document: no scripts, no external references."""
    assert page.lstrip().lower().startswith("<!doctype html>")
    parsed = _Page()
    parsed.feed(page)
    parsed.close()
    names = [t for t, _ in parsed.tags]
    assert names.count("html") == 1 and names.count("table") == 1 and names.count("style") <= 1
    assert set(names) <= ALLOWED_TAGS, set(names) - ALLOWED_TAGS
    for tag, attrs in parsed.tags:
        for name, value in attrs.items():
            assert name not in ("src", "href", "srcset", "action", "formaction") and not name.startswith("on"), (tag, attrs)
            assert not any(bad in (value or "").lower() for bad in ("url(", "://", "javascript:")), (tag, attrs)
    assert page.rstrip().lower().endswith("</html>")
    style = page.lower().split("<style>", 1)[-1].split("</style>", 1)[0]
    assert "url(" not in style and "@import" not in style
    return parsed


def test_html_is_one_self_contained_page(runs):
    out, made = runs
    page = board(out, "--format", "html")
    _parse_self_contained(page)
    for _, r in made:
        assert f"{r['value']:.4f} ± {r['stderr']:.4f} (n=2)" in page
    assert "insertion steps=4 (saliency, blur:pixel) ↑" in page and "deletion steps=4 (saliency, blur:pixel) ↓" in page
    assert TINY_ROW in page and page.count("<tr") == 3


def test_html_escapes_every_string(runs, copy_of):
    _, made = runs
    edits = {
        (LITE, "accuracy"): ("models", "<script>alert(1)</script>"),
        (TINY, "accuracy"): ("models", "a&b"),
        (LITE, "insertion"): ("attributor", '<img src="x" onerror="alert(2)">'),
    }
    for (model, metric), (where, new_id) in edits.items():
        path, data = find(made, model, metric)
        data = copy.deepcopy(data)
        if where == "models":
            data["models"][0]["id"] = new_id
        else:
            data[where]["id"] = new_id
        write(copy_of / path.name, data)
    page = board(copy_of, "--format", "html")
    parsed = _parse_self_contained(page)  # no <script> or <img> tag came through
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&amp;b [random-init]" in page
    assert "&lt;img src=&quot;x&quot; onerror=&quot;alert(2)&quot;&gt;" in page
    assert "a&b" not in page and "<script" not in page.lower()
    # the browser shows the original strings as text
    text = [t.strip() for t in parsed.text]
    assert "<script>alert(1)</script>" in text and "a&b [random-init]" in text
    assert any('<img src="x" onerror="alert(2)">' in t for t in text)
    # the other formats carry the strings unchanged
    rows = {r["model"] for r in table_json(copy_of)["rows"]}
    assert {"<script>alert(1)</script>", "a&b [random-init]"} <= rows


# -- which results are shown --------------------------------------------------------------------------------------
def test_error_results_do_not_appear(runs, copy_of):
    from harness.runner import RunConfig, write_error_result

    _, made = runs
    before = board_json(copy_of)
    # an error result written by the runner's own code, for a model with no other result
    path = write_error_result(RunConfig(models=["ghost_model"], metric="accuracy", out=copy_of), "boom")
    assert json.loads(path.read_text(encoding="utf-8"))["status"] == "error"
    # and a newer error result for a cell that has an ok result
    _, ok = find(made, TINY, "insertion")
    failed = copy.deepcopy(ok)
    failed.update(run_id="insertion-failed-later", status="error", error="out of memory", value=None, stderr=None)
    failed["provenance"]["started_at"] = "2999-01-01T00:00:00+00:00"
    write(copy_of / "insertion-failed-later.json", failed)
    assert run_cli("validate", copy_of).exit_code == 0  # both are valid result files
    after = board_json(copy_of)
    assert after == before
    assert "ghost_model" not in board(copy_of) and "out of memory" not in board(copy_of, "--format", "html")


def test_newer_result_for_the_same_cell_wins(runs, copy_of):
    _, made = runs
    _, original = find(made, LITE, "insertion")
    newer = copy.deepcopy(original)
    newer.update(run_id="insertion-newer", value=0.123456, stderr=0.0125)
    newer["dataset"]["n_samples"] = 7
    newer["provenance"]["started_at"] = "2999-01-01T00:00:00+00:00"
    older = copy.deepcopy(original)
    older.update(run_id="insertion-older", value=0.987654, stderr=0.5)
    older["provenance"]["started_at"] = "2000-01-01T00:00:00+00:00"
    write(copy_of / "aaa-newer.json", newer)  # read first
    write(copy_of / "zzz-older.json", older)  # read last
    table = table_json(copy_of)
    rows = {r["model"]: r["cells"] for r in table["rows"]}
    cell = rows[LITE][column_of(original)]
    assert {k: cell[k] for k in ("value", "stderr", "n", "run_id")} == {"value": 0.123456, "stderr": 0.0125, "n": 7,
                                                                         "run_id": "insertion-newer"}
    assert sorted(cell["superseded"]) == sorted([original["run_id"], "insertion-older"]) and table["superseded"] == 2
    assert "0.1235 ± 0.0125 (n=7)" in board(copy_of)
    assert "0.9877" not in board(copy_of)
    assert "2 older result(s) superseded" in board(copy_of)


def _accuracy_run_at(monkeypatch, out: Path, limit: int, instant: datetime) -> str:
    """A real accuracy run whose clock reads ``instant``; returns its run id."""
    import harness.runner

    class Clock:
        @staticmethod
        def now(tz=None):
            return instant

    with monkeypatch.context() as patch:
        patch.setattr(harness.runner, "datetime", Clock)
        res = run_cli("run", "--model", TINY, "--random-init", "--metric", "accuracy", "--limit", str(limit),
                      "--quiet", "--out", out)
    assert res.exit_code == 0, res.stderr
    return json.loads(Path(res.stdout.strip().rsplit(" -> ", 1)[1]).read_text(encoding="utf-8"))["run_id"]


@pytest.mark.parametrize("gap_s", [
    5.0,
    0.3,
], ids=["seconds-apart", "same-second"])
def test_later_run_replaces_the_cell(tmp_path, monkeypatch, gap_s):
    """Runs on other sample sets (here --limit) are separate tables; in the coarse `--group-by dataset` view
    they share the cell and the one started later wins, in either order."""
    t0 = datetime(2030, 1, 1, 12, 0, 0, 100_000, tzinfo=timezone.utc)
    for first, second in ((1, 2), (2, 1)):
        out = tmp_path / f"limit{first}-then-limit{second}"
        _accuracy_run_at(monkeypatch, out, first, t0)
        later = _accuracy_run_at(monkeypatch, out, second, t0 + timedelta(seconds=gap_s))
        assert len(board_json(out)["tables"]) == 2  # by default never in one cell
        (table,) = board_json(out, "--group-by", "dataset")["tables"]
        assert table["coarse"] is True and table["superseded"] == 1
        cell = {r["model"]: r["cells"] for r in table["rows"]}[TINY_ROW]["accuracy"]
        assert (cell["run_id"], cell["n"]) == (later, second), f"limit {first} then limit {second}"


# -- broken inputs ------------------------------------------------------------------------------------------------
def _broken_variants(valid: dict) -> dict[str, bytes]:
    missing = copy.deepcopy(valid)
    del missing["run_id"]
    no_metric_id = copy.deepcopy(valid)
    del no_metric_id["metric"]["id"]
    wrong_type = copy.deepcopy(valid)
    wrong_type["value"] = "high"
    return {
        "invalid-json": b'{"schema_version": 1, "run_id": ',
        "empty": b"",
        "not-an-object": b"[1, 2, 3]",
        "not-utf8": b"\xff\xfe\x00{",
        "missing-key": json.dumps(missing).encode(),
        "missing-nested-key": json.dumps(no_metric_id).encode(),
        "wrong-type": json.dumps(wrong_type).encode(),
    }


@pytest.mark.parametrize("variant", ["invalid-json", "empty", "not-an-object", "not-utf8", "missing-key",
                                     "missing-nested-key", "wrong-type"])
@pytest.mark.parametrize("fmt", ["markdown", "json"])
def test_broken_result_file_stops_with_one_line_naming_it(runs, copy_of, variant, fmt):
    _, made = runs
    broken = copy_of / "sub" / f"broken-{variant}.json"
    broken.parent.mkdir()
    broken.write_bytes(_broken_variants(made[0][1])[variant])
    res = run_cli("leaderboard", copy_of, "--format", fmt)
    assert res.exit_code != 0 and res.exit_code == 2
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(broken) in lines[0]
    if variant == "missing-key":
        assert "run_id" in lines[0]
    if variant == "missing-nested-key":
        assert "metric.id" in lines[0]


def test_missing_path_is_one_line(tmp_path):
    res = run_cli("leaderboard", tmp_path / "nowhere")
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"harness: error: no such file or folder: {tmp_path / 'nowhere'}"]


def test_samples_and_temporary_files_are_not_read(copy_of):
    (copy_of / ".half-written.json.tmp").write_text("{", encoding="utf-8")
    (copy_of / ".partial.json").write_text("{", encoding="utf-8")
    assert len(table_json(copy_of)["rows"]) == 2


# -- --output -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, name", [("markdown", "board.md"), ("html", "board.html"), ("csv", "board.csv"),
                                       ("json", "board.json")])
def test_output_writes_the_file(runs, tmp_path, fmt, name):
    out, _ = runs
    target = tmp_path / "site" / name
    res = run_cli("leaderboard", out, "--format", fmt, "--output", target)
    assert res.exit_code == 0 and res.stdout == ""
    assert "Traceback" not in res.stderr and str(target) in res.stderr
    assert target.read_text(encoding="utf-8") == board(out, "--format", fmt)
    assert [p.name for p in target.parent.iterdir()] == [name]  # no temporary file left behind
