"""Trustworthy output (issue 11, items 7, 9, 10): strict and total `harness validate`, escaped and
path-safe leaderboard/plot output, and a leaderboard that only puts comparable numbers together
(grouped by dataset and sample set, options in the headers, marks for non-finite values, verified
cells and reduced precision)."""

from __future__ import annotations

import copy
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli

# A schema_version 1 result exactly as the runner wrote it before this change (must stay valid).
FROZEN_V1 = json.loads(r"""
{
  "schema_version": 1,
  "run_id": "accuracy-test_resnet-429e31323946",
  "models": [{"id": "test_resnet", "source": "timm:test_resnet", "weights": "random-init(seed=0)",
              "weights_sha256": "215bdd717860d49ad423742e603b2703e44ea39d8c3490cb78fb700356b376af",
              "random_init": true}],
  "metric": {"id": "accuracy", "version": "1", "higher_is_better": true, "options": {}},
  "attributor": null,
  "masker": null,
  "dataset": {"id": "samples", "n_samples": 2,
              "sample_ids_sha256": "cacd94c5f8ea5d4b2a8c1ab701e8f1563ed3e27af0aa0cd4b0e667db7fabea9c"},
  "value": 0.0,
  "stderr": 0.0,
  "values": {"top1": 0.0, "top5": 0.0, "top5_stderr": 0.0, "n_labelled": 2},
  "artifacts": {},
  "provenance": {"harness": "0.1.0", "plugins": {"harness": "0.1.0"}, "python": "3.11.7", "torch": "2.14.1+cu130",
                 "timm": "1.0.31", "device": "cpu", "seed": 0, "batch_size": 32,
                 "started_at": "2026-11-30T05:43:02.043256+00:00", "duration_s": 0.271,
                 "argv": ["harness", "run", "--model", "test_resnet", "--random-init", "--metric", "accuracy"],
                 "attribution_cache": null},
  "status": "ok",
  "error": null
}
""")
TINY_ROW = "test_resnet [random-init]"
OTHER_SET = "0" * 64


def _edit(data: dict, changes: dict[str, Any]) -> dict:
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split("__")
        for key in path:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return data


def make(run_id: str, **changes: Any) -> dict:
    """A copy of FROZEN_V1 with ``run_id`` and double-underscore path changes (``dataset__id="x"`` sets dataset.id)."""
    data = copy.deepcopy(FROZEN_V1)
    data["run_id"] = run_id
    return _edit(data, changes)


def curve(metric: str, run_id: str, steps: int = 5, granularity: str = "pixel", **changes: Any) -> dict:
    """A hand-made insertion/deletion/MoRF/LeRF result with saliency + blur."""
    data = make(run_id)
    data["metric"] = {"id": metric, "version": "1", "higher_is_better": metric != "morf", "options": {"steps": steps}}
    data["attributor"] = {"id": "saliency", "version": "1", "options": {"score": "logit"}}
    data["masker"] = {"id": "blur", "version": "1", "options": {"granularity": None, "kernel_size": 51, "sigma": 50.0}}
    data["values"] = {"granularity": granularity, "steps": steps}
    return _edit(data, changes)


def put(folder: Path, data: dict, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{data['run_id']}.json")
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def ok(*args: Any) -> str:
    res = run_cli(*map(str, args))
    assert res.exit_code == 0, res.stderr
    assert "Traceback" not in res.stderr
    return res.stdout


def board(folder: Path, *args: Any) -> dict:
    return json.loads(ok("leaderboard", folder, "--format", "json", *args))


def one_line_error(res) -> str:
    assert res.exit_code != 0 and "Traceback" not in res.stderr + res.stdout
    lines = (res.stderr + res.stdout).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# == item 7: strict, total validation =================================================================================
def test_frozen_schema_1_file_still_validates(tmp_path):
    path = put(tmp_path, FROZEN_V1)
    assert ok("validate", path).strip() == f"ok: {path}"
    assert len(board(tmp_path)["tables"]) == 1


RAW_NUMBER_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999"]


@pytest.mark.parametrize("token", RAW_NUMBER_TOKENS)
def test_validate_rejects_non_finite_json_tokens(tmp_path, token):
    text = json.dumps(FROZEN_V1, indent=2).replace('"value": 0.0', f'"value": {token}')
    assert token in text
    bad = tmp_path / "tokens.json"
    bad.write_text(text, encoding="utf-8")
    line = one_line_error(run_cli("validate", bad))
    assert line.startswith("invalid: ") and str(bad) in line and token in line


@pytest.mark.parametrize("field, value", [
    ("value", "0.5"),
    ("value", True),
    ("stderr", "0.1"),
    ("stderr", -0.1),
    ("dataset__n_samples", "2"),
    ("dataset__n_samples", True),
    ("dataset__n_samples", 2.0),
    ("dataset__n_samples", -1),
    ("provenance__seed", "0"),
    ("provenance__seed", False),
    ("provenance__batch_size", "32"),
    ("provenance__duration_s", "0.2"),
    ("provenance__duration_s", -1.0),
    ("schema_version", "1"),
    ("schema_version", True),
    ("models__0__random_init", 1),
    ("metric__higher_is_better", "true"),
    ("models", []),
    ("values", {"n_nonfinite": -1}),
    ("values", {"n_nonfinite": True}),
])
def test_validate_rejects_wrong_types_and_ranges(tmp_path, field, value):
    bad = put(tmp_path, make("accuracy-x-000000000001", **{field: value}), name="edited.json")
    line = one_line_error(run_cli("validate", bad))
    dotted = field.replace("__", ".")
    where = "values" if field == "values" else dotted
    assert line.startswith("invalid: ") and "edited.json" in line and where in line, line


@pytest.mark.parametrize("run_id", ["..", ".", "a/b", "../escape", "a\\b", ".hidden", "a..b", "a\x00b", "a\nb", "", "x" * 201])
def test_validate_rejects_a_run_id_that_is_not_a_plain_file_name(tmp_path, run_id):
    bad = put(tmp_path, make(run_id), name="hostile.json")
    line = one_line_error(run_cli("validate", bad))
    assert "run_id" in line and "hostile.json" in line


@pytest.mark.parametrize("relative", ["../outside.png", "/etc/passwd", "a/../../b.png", "C:/x.png", "a\\b.png", ""])
def test_validate_rejects_artifact_paths_outside_the_folder(tmp_path, relative):
    bad = put(tmp_path, make("accuracy-x-000000000002", artifacts={"curve": relative}), name="artifact.json")
    assert "artifacts" in one_line_error(run_cli("validate", bad))


def test_runner_run_ids_match_the_pattern():
    from harness.results import is_safe_run_id
    from harness.runner import RunConfig, resolve

    run_id = resolve(RunConfig(models=["test_resnet"], metric="insertion", attributor="random", limit=1,
                               random_init=True, options=["metric.steps=4"])).run_id
    assert is_safe_run_id(run_id) and is_safe_run_id(FROZEN_V1["run_id"])


def test_validate_reports_every_file_and_survives_deep_nesting(tmp_path):
    good = put(tmp_path, FROZEN_V1)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")
    nested_value = tmp_path / "nested-value.json"
    nested_value.write_text(json.dumps(FROZEN_V1).replace('"top1": 0.0', '"top1": ' + "[" * 500 + "]" * 500))
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(FROZEN_V1).replace('"stderr": 0.0', '"stderr": NaN'), encoding="utf-8")
    other = put(tmp_path / "sub", make("accuracy-x-000000000003"))
    res = run_cli("validate", tmp_path)
    assert res.exit_code == 1 and "Traceback" not in res.stderr and "internal error" not in res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 5, lines
    assert f"ok: {good}" in lines and f"ok: {other}" in lines
    for bad in (deep, nested_value, nan):
        assert sum(line.startswith("invalid: ") and str(bad) in line for line in lines) == 1, (bad, lines)
    report = json.loads(run_cli("validate", tmp_path, "--json").stdout)
    assert sorted(item["ok"] for item in report) == [False, False, False, True, True]


def test_leaderboard_names_a_deeply_nested_file_in_one_line(tmp_path):
    put(tmp_path, FROZEN_V1)
    deep = tmp_path / "deep.json"
    deep.write_text("{\"a\":" * 200_000 + "1" + "}" * 200_000, encoding="utf-8")
    line = one_line_error(run_cli("leaderboard", tmp_path))
    assert str(deep) in line and "internal error" not in line


def test_validate_rejects_duplicate_keys(tmp_path):
    text = json.dumps(FROZEN_V1)
    bad = tmp_path / "dup.json"
    bad.write_text(text[:-1] + ', "value": 0.5}', encoding="utf-8")  # valid but for the repeated key
    assert "duplicate" in one_line_error(run_cli("validate", bad))


def test_validate_of_an_empty_folder_is_one_line_error(tmp_path):
    (tmp_path / "x.samples.jsonl").write_text("", encoding="utf-8")
    line = one_line_error(run_cli("validate", tmp_path))
    assert line.startswith("harness: error: no result files in") and str(tmp_path) in line


def test_verification_files_are_not_result_files(tmp_path):
    put(tmp_path, FROZEN_V1)
    (tmp_path / f"{FROZEN_V1['run_id']}.verification.json").write_text(json.dumps(_record(FROZEN_V1["run_id"])))
    assert ok("validate", tmp_path).strip().splitlines() == [f"ok: {tmp_path / (FROZEN_V1['run_id'] + '.json')}"]


# == item 9: safe output ==================================================================================================
FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+2", "-2+3", "@SUM(A1)", "\t=1", "\r=1", "  =cmd|' /C calc'!A0"]


def test_csv_neutralises_formulas_and_keeps_numbers_numeric(tmp_path):
    for i, model_id in enumerate(FORMULAS):
        put(tmp_path, make(f"accuracy-f{i}-00000000000{i}", models__0__id=model_id, value=-0.5 - i, stderr=0.25))
    rows = list(csv.DictReader(io.StringIO(ok("leaderboard", tmp_path, "--format", "csv"))))
    assert len(rows) == len(FORMULAS)
    models = {r["model"] for r in rows}
    assert models == {"'" + m + " [random-init]" for m in FORMULAS}
    for row in rows:
        for name, cell in row.items():
            if name not in ("value", "stderr", "n", "superseded"):
                assert not cell.lstrip(" ").startswith(("=", "+", "-", "@", "\t", "\r")), (name, cell)
        assert float(row["value"]) < 0 and row["value"].startswith("-")  # a negative number stays a number
        assert float(row["stderr"]) == 0.25


HOSTILE_IDS = [
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    "![pic](http://evil.example/x.png)",
    "two\nlines",
    "cr\rhere",
    "pipe|inside",
    "back\\slash|",
    "`code`",
    "<a href=\"javascript:alert(2)\">x</a>",
    "JavaScript:alert(3)",
]


def _unescaped(line: str, ch: str) -> int:
    return len(re.findall(r"(?<!\\)(?:\\\\)*" + re.escape(ch), line))


def test_markdown_cells_are_inert(tmp_path):
    for i, model_id in enumerate(HOSTILE_IDS):
        put(tmp_path, make(f"accuracy-h{i}-0000000000{i:02d}", models__0__id=model_id))
    text = ok("leaderboard", tmp_path)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(HOSTILE_IDS)  # header, separator, one line per row: no newline split a row
    assert {_unescaped(line, "|") for line in lines} == {3}  # model | accuracy: no extra cell separators
    body = "\n".join(lines[2:])
    assert "<" not in body and ">" not in body  # no raw HTML
    assert "javascript:" not in body.lower()  # no script link
    for ch in "[]()":
        # the only unescaped brackets and parentheses are the harness's own marks: [random-init] and (n=2)
        assert all(_unescaped(line, ch) == 1 for line in lines[2:]), (ch, lines)
    assert _unescaped(body, "`") == 0
    assert "\\[click\\]\\(javascript&#58;alert\\(1\\)\\)" in body
    assert "two lines [random-init]" in body and "back\\\\slash\\|" in body


def test_markdown_heading_and_headers_escape_strings_from_files(tmp_path):
    put(tmp_path, make("accuracy-d-000000000001", dataset__id="folder:/x/<b>[a](javascript:y)\n#"))
    put(tmp_path, make("accuracy-m-000000000002", metric__id="m<i>|x", metric__options={"k": "[l](javascript:z)"}))
    text = ok("leaderboard", tmp_path)
    assert "<b>" not in text and "<i>" not in text and "javascript:" not in text.lower()
    assert "## folder:/x/&lt;b&gt;\\[a\\]\\(javascript&#58;y\\) #," in text
    assert "m&lt;i&gt;\\|x k=\\[l\\]\\(javascript&#58;z\\)" in text


def test_html_escapes_headings_and_notes(tmp_path):
    put(tmp_path, make("accuracy-d-000000000001", dataset__id="<script>alert(1)</script>", values={"n_nonfinite": 1}))
    page = ok("leaderboard", tmp_path, "--format", "html")
    assert "<script" not in page.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.mark.parametrize("run_id", ["..", "a/b"])
def test_leaderboard_rejects_a_path_like_run_id_in_one_line(tmp_path, run_id):
    put(tmp_path, FROZEN_V1)
    bad = put(tmp_path, make(run_id, metric__id="morf"), name="hostile.json")
    line = one_line_error(run_cli("leaderboard", tmp_path))
    assert line.startswith("harness: error: ") and str(bad) in line and "run_id" in line


@pytest.fixture(scope="module")
def insertion_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("insertion") / "results"
    ok("run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "--attributor", "random",
       "-o", "metric.steps=4", "--limit", "1", "--quiet", "--out", out)
    return next(p for p in out.glob("*.json"))


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("run_id", ["..", "a/b"])
def test_plot_never_writes_outside_the_results_folder(insertion_run, tmp_path, run_id):
    inner = tmp_path / "inner"
    data = json.loads(insertion_run.read_text(encoding="utf-8"))
    data["run_id"] = run_id
    path = put(inner, data, name="victim.json")
    samples = insertion_run.with_name(insertion_run.name.replace(".json", ".samples.jsonl"))
    (inner / "...samples.jsonl").write_bytes(samples.read_bytes())
    before = _tree(tmp_path)
    line = one_line_error(run_cli("plot", path))
    assert "run_id" in line and str(path) in line
    assert _tree(tmp_path) == before  # nothing written anywhere


def test_plot_of_a_valid_result_stays_in_its_run_folder(insertion_run, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    data = json.loads(insertion_run.read_text(encoding="utf-8"))
    target = put(folder, data)
    samples = insertion_run.with_name(insertion_run.name.replace(".json", ".samples.jsonl"))
    (folder / samples.name).write_bytes(samples.read_bytes())
    res = run_cli("plot", target)
    assert res.exit_code == 0, res.stderr
    artifacts = json.loads(target.read_text(encoding="utf-8"))["artifacts"]
    assert artifacts and all(v.startswith(data["run_id"] + "/") for v in artifacts.values())
    assert all(p == folder or folder in p.parents for p in tmp_path.rglob("*") if p != folder)


def test_artifact_path_refuses_unsafe_names(tmp_path):
    from harness.errors import HarnessError
    from harness.plotting import artifact_path

    with pytest.raises(HarnessError):
        artifact_path(tmp_path, "..", "curve.png")
    with pytest.raises(HarnessError):
        artifact_path(tmp_path, "run-1", "../curve.png")
    path, relative = artifact_path(tmp_path, "run-1", "curve.png")
    assert relative == "run-1/curve.png" and path == tmp_path / "run-1" / "curve.png"


def test_error_results_are_left_out_and_never_crash(tmp_path):
    put(tmp_path, FROZEN_V1)
    put(tmp_path, make("accuracy-err-000000000001", status="error", error="<b>boom</b>", value=None, stderr=None,
                       dataset__n_samples=0, dataset__sample_ids_sha256="", metric__higher_is_better=None))
    data = board(tmp_path)
    assert len(data["tables"]) == 1 and [c["name"] for c in data["tables"][0]["columns"]] == ["accuracy"]
    assert data["tables"][0]["rows"][0]["cells"]["accuracy"]["run_id"] == FROZEN_V1["run_id"]
    only_errors = tmp_path / "errors"
    put(only_errors, make("accuracy-err-000000000002", status="error", error="x", value=None))
    for fmt in ("markdown", "html", "csv", "json"):
        ok("leaderboard", only_errors, "--format", fmt)
    assert "No results with status ok" in ok("leaderboard", only_errors)


def test_leaderboard_of_an_empty_folder_is_one_line_error(tmp_path):
    line = one_line_error(run_cli("leaderboard", tmp_path))
    assert "no result files" in line


# == item 10: an honest leaderboard =========================================================================================
def _tables(data: dict) -> list[dict]:
    return data["tables"]


def _cells(table: dict) -> dict[str, dict[str, dict]]:
    return {r["model"]: r["cells"] for r in table["rows"]}


def test_different_datasets_and_sample_sets_are_separate_tables(tmp_path):
    put(tmp_path, make("accuracy-a-000000000001", value=0.25))
    put(tmp_path, make("accuracy-b-000000000002", value=0.5, dataset__id="imagenet:/data/val", dataset__n_samples=50))
    put(tmp_path, make("accuracy-c-000000000003", value=0.75, dataset__sample_ids_sha256=OTHER_SET, dataset__n_samples=1))
    put(tmp_path, make("accuracy-d-000000000004", value=1.0, dataset__samples_sha256="f" * 64))
    data = board(tmp_path)
    assert data["group_by"] == "sample-set"
    tables = _tables(data)
    assert len(tables) == 4
    seen = {}
    for table in tables:
        assert table["coarse"] is False and table["superseded"] == 0
        (cell,) = [c for cells in _cells(table).values() for c in cells.values()]
        group = table["group"]
        assert set(group) == {"dataset", "sample_ids_sha256", "samples_sha256"}
        assert cell["dataset"] == group
        seen[cell["value"]] = group
    assert seen[0.25] == {"dataset": "samples", "sample_ids_sha256": FROZEN_V1["dataset"]["sample_ids_sha256"], "samples_sha256": None}
    assert seen[0.5]["dataset"] == "imagenet:/data/val"
    assert seen[0.75]["sample_ids_sha256"] == OTHER_SET
    assert seen[1.0]["samples_sha256"] == "f" * 64
    text = ok("leaderboard", tmp_path)
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert len(headings) == 4
    assert "## imagenet:/data/val, 50 samples, sample ids cacd94c5f8ea" in headings
    assert "## samples, 1 sample, sample ids 000000000000" in headings
    assert "## samples, 2 samples, sample ids cacd94c5f8ea, content ffffffffffff" in headings


def test_metric_options_are_separate_columns_with_options_in_the_header(tmp_path):
    put(tmp_path, curve("insertion", "insertion-s5-000000000001", steps=5))
    put(tmp_path, curve("insertion", "insertion-s50-000000000002", steps=50))
    put(tmp_path, curve("insertion", "insertion-prob-000000000003", steps=5, attributor__options={"score": "prob"}))
    put(tmp_path, curve("insertion", "insertion-sig-000000000004", steps=5, masker__options={"granularity": None,
                                                                                          "kernel_size": 51, "sigma": 10.0}))
    put(tmp_path, curve("insertion", "insertion-patch-000000000005", steps=5, granularity="patch:8"))
    put(tmp_path, FROZEN_V1)  # accuracy has no options: a bare header
    (table,) = _tables(board(tmp_path))
    assert table["superseded"] == 0
    names = [c["name"] for c in table["columns"]]
    assert names == [
        "accuracy",
        "insertion steps=5 (saliency score=prob, blur:pixel)",
        "insertion steps=5 (saliency, blur:patch:8)",
        "insertion steps=5 (saliency, blur:pixel sigma=10.0)",
        "insertion steps=5 (saliency, blur:pixel)",
        "insertion steps=50 (saliency, blur:pixel)",
    ]
    assert len(_cells(table)[TINY_ROW]) == 6
    column = next(c for c in table["columns"] if c["name"] == "insertion steps=50 (saliency, blur:pixel)")
    assert column["metric"] == {"id": "insertion", "version": "1", "options": {"steps": 50}}
    assert column["attributor"] == {"id": "saliency", "version": "1", "options": {"score": "logit"}}
    assert column["masker"] == {"id": "blur", "version": "1", "options": {"kernel_size": 51, "sigma": 50.0},
                                "granularity": "pixel"}
    assert column["shown_options"] == {"metric": {"steps": 50}, "attributor": {}, "masker": {}}
    header = next(line for line in ok("leaderboard", tmp_path).splitlines() if line.startswith("| model"))
    assert "insertion steps=50 (saliency, blur:pixel) ↑" in header


def test_an_uninstalled_metric_shows_all_its_options(tmp_path):
    put(tmp_path, make("ghost-a-000000000001", metric__id="ghost_metric", metric__options={"alpha": 1, "mode": "x"}))
    (table,) = _tables(board(tmp_path))
    assert [c["name"] for c in table["columns"]] == ["ghost_metric alpha=1 mode=x"]


def test_versions_never_share_a_column(tmp_path):
    put(tmp_path, make("accuracy-v1-000000000001", value=0.25))
    put(tmp_path, make("accuracy-v2-000000000002", value=0.5, metric__version="2",
                       provenance__started_at="2999-01-01T00:00:00+00:00"))
    (table,) = _tables(board(tmp_path))
    assert table["superseded"] == 0
    assert sorted(c["name"] for c in table["columns"]) == ["accuracy v1", "accuracy v2"]


def test_different_weights_and_precision_are_different_rows(tmp_path):
    put(tmp_path, make("accuracy-w1-000000000001", value=0.25))
    put(tmp_path, make("accuracy-w2-000000000002", value=0.5, models__0__weights_sha256="1" * 64))
    put(tmp_path, make("accuracy-bf-000000000003", value=0.75, provenance__precision="bf16"))
    put(tmp_path, make("accuracy-fp-000000000004", value=0.25, provenance__precision="fp32",
                       provenance__started_at="2000-01-01T00:00:00+00:00"))
    (table,) = _tables(board(tmp_path))
    rows = _cells(table)
    assert set(rows) == {"test_resnet [random-init] [weights 215bdd71]", "test_resnet [random-init] [weights 11111111]",
                         "test_resnet [random-init] [bf16]"}
    assert table["superseded"] == 1  # fp32 recorded explicitly is the same as unrecorded: the older run is replaced
    assert rows["test_resnet [random-init] [bf16]"]["accuracy"]["value"] == 0.75
    text = ok("leaderboard", tmp_path)
    assert "- [bf16], [fp16], ...: run at reduced precision" in text


def test_newest_wins_only_for_identical_configurations_and_is_counted(tmp_path):
    put(tmp_path, make("accuracy-old-000000000001", value=0.25, provenance__started_at="2000-01-01T00:00:00+00:00"))
    put(tmp_path, make("accuracy-new-000000000002", value=0.5, provenance__started_at="2999-01-01T00:00:00+00:00"))
    put(tmp_path, make("accuracy-set-000000000003", value=0.75, dataset__sample_ids_sha256=OTHER_SET))
    put(tmp_path, make("accuracy-vit-000000000004", value=0.125, dataset__sample_ids_sha256=OTHER_SET, models__0__id="test_vit"))
    data = board(tmp_path)
    main = next(t for t in _tables(data) if t["group"]["sample_ids_sha256"] != OTHER_SET)
    cell = _cells(main)[TINY_ROW]["accuracy"]
    assert (cell["value"], cell["superseded"], main["superseded"]) == (0.5, ["accuracy-old-000000000001"], 1)
    assert "1 older result(s) superseded" in ok("leaderboard", tmp_path)
    # the coarse view merges sample sets, says so, and counts what it replaced
    (coarse,) = _tables(board(tmp_path, "--group-by", "dataset"))
    assert coarse["coarse"] is True and coarse["group"] == {"dataset": "samples"} and coarse["superseded"] == 2
    assert len(coarse["sample_sets"]) == 2 and coarse["n_samples"] == [2]  # the sample sets of the cells shown
    assert {r["model"]: r["cells"]["accuracy"]["value"] for r in coarse["rows"]} == {TINY_ROW: 0.5, "test_vit [random-init]": 0.125}
    text = ok("leaderboard", tmp_path, "--group-by", "dataset")
    assert "(coarse view: --group-by dataset)" in text.splitlines()[0]
    assert "Coarse view (`--group-by dataset`)" in text
    none = ok("leaderboard", tmp_path, "--group-by", "none")
    assert none.splitlines()[0].startswith("## all datasets") and "coarse view: --group-by none" in none
    csv_rows = list(csv.DictReader(io.StringIO(ok("leaderboard", tmp_path, "--format", "csv"))))
    assert sorted(r["superseded"] for r in csv_rows) == ["0", "0", "1"]


def test_group_by_rejects_unknown_values(tmp_path):
    put(tmp_path, FROZEN_V1)
    res = run_cli("leaderboard", tmp_path, "--group-by", "metric")
    assert res.exit_code == 2 and "Traceback" not in res.stderr


def test_abpc_pairs_only_matching_settings_and_skips_non_finite_aucs(tmp_path):
    aucs = {"lerf": {"a": 0.5, "b": 0.75, "c": None}, "morf": {"a": 0.25, "b": 0.25, "c": 0.5}}
    for metric in ("lerf", "morf"):
        data = curve(metric, f"{metric}-t-000000000001", steps=4, granularity="patch:8", value=0.5, stderr=0.1,
                     values={"granularity": "patch:8", "steps": 4, "n_nonfinite": int(metric == "lerf")})
        put(tmp_path, data)
        lines = [json.dumps({"sample_id": k, "label": 1, "prediction": 1, "values": {"auc": v}}) + "\n"
                 for k, v in aucs[metric].items()]
        (tmp_path / f"{metric}-t-000000000001.samples.jsonl").write_text("".join(lines), encoding="utf-8")
    # a MoRF with other options: no ABPC with it
    put(tmp_path, curve("morf", "morf-other-000000000002", steps=8, granularity="patch:8"))
    (table,) = _tables(board(tmp_path))
    abpc = [c for c in table["columns"] if c["metric"]["id"] == "abpc"]
    assert [c["name"] for c in abpc] == ["abpc steps=4 (saliency, blur:patch:8)"]
    assert abpc[0]["derived_from"] == ["lerf steps=4 (saliency, blur:patch:8)", "morf steps=4 (saliency, blur:patch:8)"]
    cell = _cells(table)[TINY_ROW][abpc[0]["name"]]
    assert cell["value"] == pytest.approx(((0.5 - 0.25) + (0.75 - 0.25)) / 2)  # sample c (non-finite) left out
    assert cell["n"] == 2 and cell["n_nonfinite"] == 1
    assert "(1 non-finite)" in ok("leaderboard", tmp_path)


# == item 4 of the task: non-finite, verified and precision marks ===========================================================
def _record(run_id: str, status: str = "passed", same_versions: bool = True) -> dict:
    return {"run_id": run_id, "status": status, "n_checked": 2, "n_mismatched": 0 if status == "passed" else 1,
            "max_abs_diff": 0.0 if status == "passed" else 0.5, "same_versions": same_versions}


def _verify(folder: Path, run_id: str, record: Any) -> None:
    text = record if isinstance(record, str) else json.dumps(record)
    (folder / f"{run_id}.verification.json").write_text(text, encoding="utf-8")


def test_marks_for_non_finite_and_verified_cells(tmp_path):
    runs = {
        "test_a": ("accuracy-a-000000000001", _record("accuracy-a-000000000001")),
        "test_b": ("accuracy-b-000000000002", _record("accuracy-b-000000000002", "failed")),
        "test_c": ("accuracy-c-000000000003", _record("accuracy-c-000000000003", same_versions=False)),
        "test_d": ("accuracy-d-000000000004", None),
    }
    for model, (run_id, record) in runs.items():
        put(tmp_path, make(run_id, models__0__id=model, models__0__random_init=False, models__0__weights="pretrained",
                           value=0.5, stderr=0.125,
                           values={"n_nonfinite": 3 if model == "test_d" else 0}))
        if record:
            _verify(tmp_path, run_id, record)
    text = ok("leaderboard", tmp_path)
    row = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| test_")}
    assert row == {"test_a": "0.5000 ± 0.1250 (n=2) ✓", "test_b": "0.5000 ± 0.1250 (n=2) ✗",
                   "test_c": "0.5000 ± 0.1250 (n=2) ✓*", "test_d": "0.5000 ± 0.1250 (n=2) (3 non-finite)"}
    assert "- (k non-finite): k samples gave a non-finite value" in text
    assert "- ✓ verified: `harness verify` re-ran" in text and "✗ verification failed" in text
    (table,) = _tables(board(tmp_path))
    cells = {m: c["accuracy"] for m, c in _cells(table).items()}
    assert [cells[m]["verified"] for m in ("test_a", "test_b", "test_c", "test_d")] == [True, False, True, None]
    assert cells["test_c"]["verification"]["same_versions"] is False and cells["test_d"]["n_nonfinite"] == 3
    csv_rows = {r["model"]: r for r in csv.DictReader(io.StringIO(ok("leaderboard", tmp_path, "--format", "csv")))}
    assert [csv_rows[m]["verified"] for m in ("test_a", "test_b", "test_d")] == ["True", "False", ""]
    assert csv_rows["test_d"]["n_nonfinite"] == "3"
    assert "✓" in ok("leaderboard", tmp_path, "--format", "html")


@pytest.mark.parametrize("record", [
    "{not json",
    "[" * 100_000 + "]" * 100_000,
    json.dumps(_record("some-other-run")),
    json.dumps({**_record("accuracy-a-000000000001"), "status": "maybe"}),
    json.dumps({**_record("accuracy-a-000000000001"), "n_checked": "2"}),
    '{"run_id": "accuracy-a-000000000001", "status": "passed", "n_checked": 2, "n_mismatched": 0, '
    '"max_abs_diff": NaN, "same_versions": true}',
], ids=["not-json", "deep", "other-run", "bad-status", "string-count", "nan"])
def test_a_bad_verification_record_is_ignored_with_a_warning(tmp_path, record):
    put(tmp_path, make("accuracy-a-000000000001"))
    _verify(tmp_path, "accuracy-a-000000000001", record)
    res = run_cli("leaderboard", tmp_path, "--format", "json")
    assert res.exit_code == 0 and "Traceback" not in res.stderr
    warnings = res.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("harness: warning: ignoring verification record")
    (table,) = json.loads(res.stdout)["tables"]
    assert _cells(table)[TINY_ROW]["accuracy"]["verified"] is None


def test_a_damaged_samples_file_only_costs_the_paired_error(tmp_path):
    for metric in ("lerf", "morf"):
        put(tmp_path, curve(metric, f"{metric}-t-000000000001", steps=4, granularity="patch:8", value=0.5, stderr=0.1))
    (tmp_path / "lerf-t-000000000001.samples.jsonl").write_bytes(b'["not a record"]\n{"sample_id": 3}\n\xff\xfe\n')
    res = run_cli("leaderboard", tmp_path, "--format", "json")
    assert res.exit_code == 0 and "Traceback" not in res.stderr
    (table,) = json.loads(res.stdout)["tables"]
    cell = _cells(table)[TINY_ROW]["abpc steps=4 (saliency, blur:patch:8)"]
    assert cell["value"] == 0.0 and cell["stderr"] == pytest.approx(2**0.5 * 0.1)


def test_a_verification_older_than_the_result_is_ignored(tmp_path):
    put(tmp_path, make("accuracy-a-000000000001"))  # started 2026-11-30T05:43:02
    _verify(tmp_path, "accuracy-a-000000000001", {**_record("accuracy-a-000000000001"), "checked_at": "2026-01-01T00:00:00+00:00"})
    res = run_cli("leaderboard", tmp_path, "--format", "json")
    assert res.exit_code == 0 and "checked before this result was written" in res.stderr
    (table,) = json.loads(res.stdout)["tables"]
    assert _cells(table)[TINY_ROW]["accuracy"]["verified"] is None
    _verify(tmp_path, "accuracy-a-000000000001", {**_record("accuracy-a-000000000001"), "checked_at": "2027-01-01T00:00:00+00:00"})
    (table,) = board(tmp_path)["tables"]
    assert _cells(table)[TINY_ROW]["accuracy"]["verified"] is True
