"""The command line (harness/cli.py): listings, the plugin report, one-line errors with close matches,
the real console script end to end, progress bars, suites and ``--resume`` on a suite."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from conftest import run_cli

LITE = "efficientnet_lite0"
KINDS = {"models", "attributors", "maskers", "metrics", "datasets", "suites"}
ALIASES = ("convnext_t", "swin_t", "deit_s", "deit_s_distilled", "vit_b16", "resnet50", "vgg19", "resnet18")
BUNDLED = {  # entry-point name -> components it must register (a subset: more may be added)
    "efficientnet_lite": {"models": {"efficientnet_lite0"}},
    "datasets": {"datasets": {"samples", "folder", "imagenet"}},
    "attributors": {"attributors": {"saliency"}},
    "maskers": {"maskers": {"blur", "black", "mean", "noise"}},
    "accuracy": {"metrics": {"accuracy"}},
    "insertion_deletion": {"metrics": {"insertion", "deletion"}},
}


def _json(res) -> object:
    assert res.exit_code == 0, res.stderr
    assert "Traceback" not in res.stderr
    return json.loads(res.stdout)


def _one_line_error(res, code: int = 2) -> str:
    """The run failed with ``code`` and exactly one stderr line (no traceback, nothing on stdout)."""
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("harness: error: "), lines[0]
    assert res.stdout == ""
    return lines[0]


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "harness"
    return [str(script)] if script.exists() else [sys.executable, "-m", "harness"]


def _samples_path(result_path: Path) -> Path:
    return result_path.with_name(result_path.name[: -len(".json")] + ".samples.jsonl")


def _result_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))


# -- list ---------------------------------------------------------------------------------------------------
def test_list_models_json_has_bundled_model_and_every_alias(cli):
    rows = _json(cli("list", "models", "--json"))
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate ids in the listing"
    assert LITE in by_id and by_id[LITE]["provider"] == "harness:efficientnet_lite"
    from harness.registry import registry_path

    toml_aliases = set(tomllib.loads(registry_path().read_text(encoding="utf-8"))["models"])
    assert set(ALIASES) <= toml_aliases
    for alias in toml_aliases:
        assert alias in by_id, alias
        assert by_id[alias]["provider"] == "registry.toml"
    assert by_id["convnext_t"]["weights"] == "timm:convnext_tiny.fb_in1k"
    assert by_id["resnet18"]["weights"] == "timm:resnet18.tv_in1k"


def test_list_json_has_all_six_kinds(cli):
    data = _json(cli("list", "--json"))
    assert set(data) == KINDS
    for kind in KINDS:
        assert data[kind], f"no {kind} listed"
        assert all(isinstance(r["id"], str) and r["id"] for r in data[kind])
    assert {"saliency"} <= {r["id"] for r in data["attributors"]}
    assert {"samples"} <= {r["id"] for r in data["datasets"]}
    # `list KIND --json` gives the same rows as the KIND part of `list --json`
    assert _json(cli("list", "maskers", "--json")) == data["maskers"]


def test_list_metrics_json_directions_and_inputs(cli):
    rows = {r["id"]: r for r in _json(cli("list", "metrics", "--json"))}
    assert rows["insertion"]["higher_is_better"] is True
    assert rows["deletion"]["higher_is_better"] is False
    assert rows["accuracy"]["higher_is_better"] is True
    assert rows["insertion"]["needs_attributor"] is True and rows["insertion"]["needs_masker"] is True
    assert rows["accuracy"]["needs_attributor"] is False and rows["accuracy"]["needs_masker"] is False
    assert "steps" in rows["insertion"]["options"]
    assert rows["accuracy"]["options"] == {}
    assert rows["insertion"]["provider"] == "harness:insertion_deletion"
    assert rows["insertion"]["citation"]


def test_list_suites_text_and_json(cli):
    res = cli("list", "suites")
    assert res.exit_code == 0 and "Traceback" not in res.stderr
    assert "quickstart" in res.stdout
    suites = {r["id"]: r for r in _json(cli("list", "suites", "--json"))}
    assert suites["quickstart"]["models"] == [LITE]
    assert set(suites["quickstart"]["metrics"]) == {"accuracy", "insertion", "deletion"}


def test_list_text_mentions_timm_passthrough(cli):
    res = cli("list", "models")
    assert res.exit_code == 0
    assert LITE in res.stdout and "convnext_t" in res.stdout
    assert "timm" in res.stdout


def test_list_unknown_kind_is_one_line(cli):
    line = _one_line_error(cli("list", "modles"))
    assert "modles" in line


# -- plugins ------------------------------------------------------------------------------------------------
def test_plugins_json_lists_bundled_plugins_without_errors(cli):
    from harness import __version__

    infos = _json(cli("plugins", "--json"))
    by_name = {p["name"]: p for p in infos if p["distribution"] == "harness"}
    assert set(BUNDLED) <= set(by_name)
    for info in by_name.values():  # every bundled plugin, including ones added later
        assert info["errors"] == [], info
        assert info["enabled"] is True and info["bundled"] is True
        assert info["version"] == __version__
        assert info["module"].startswith("harness_plugins."), info["module"]
    for name, components in BUNDLED.items():
        for kind, ids in components.items():
            assert ids <= set(by_name[name]["components"].get(kind, [])), (name, kind)


def test_plugins_text(cli):
    res = cli("plugins")
    assert res.exit_code == 0 and res.stderr == ""
    assert "insertion_deletion (harness " in res.stdout
    assert "metrics: insertion, deletion" in res.stdout
    for name in BUNDLED:
        line = next(l for l in res.stdout.splitlines() if l.startswith(f"{name} (harness "))
        assert line.split("[")[1].startswith("ok]"), line


# -- one-line errors --------------------------------------------------------------------------------------
RUN_INSERTION = ("run", "--model", LITE, "--metric", "insertion")
RUN_ACCURACY = ("run", "--model", LITE, "--metric", "accuracy")


@pytest.mark.parametrize(
    "args, kind, wanted, suggestion",
    [
        (("run", "--model", "convnxt_t", "--metric", "accuracy"), "model", "convnxt_t", "convnext_t"),
        (("run", "--model", LITE, "--metric", "insertoin"), "metric", "insertoin", "insertion"),
        ((*RUN_INSERTION, "--attributor", "salincy"), "attributor", "salincy", "saliency"),
        ((*RUN_INSERTION, "--masker", "blurr"), "masker", "blurr", "blur"),
        ((*RUN_ACCURACY, "--data", "sampels"), "dataset", "sampels", "samples"),
        ((*RUN_ACCURACY, "--data", "imagenett:/nowhere"), "dataset", "imagenett", "imagenet"),
        (("run", "--suite", "quickstrat"), "suite", "quickstrat", "quickstart"),
    ],
    ids=["model", "metric", "attributor", "masker", "data", "data-with-path", "suite"],
)
def test_unknown_id_exits_2_with_one_line_and_close_match(cli, tmp_path, args, kind, wanted, suggestion):
    out = tmp_path / "out"
    line = _one_line_error(cli(*args, "--out", out))
    assert f"unknown {kind} {wanted!r}" in line
    assert "did you mean" in line and repr(suggestion) in line, line
    assert not out.exists(), "nothing may be written for a run that cannot start"


@pytest.mark.parametrize(
    "args, expected",
    [
        ((*RUN_INSERTION, "-o", "foo"), ["malformed option 'foo'", "KEY=VALUE"]),
        ((*RUN_INSERTION, "-o", "=3"), ["malformed option"]),
        ((*RUN_INSERTION, "-o", "metric.steps=abc"), ["metric.steps", "integer", "'abc'"]),
        ((*RUN_INSERTION, "-o", "metric.steps=0"), ["metric.steps", "greater than or equal to 1"]),
        ((*RUN_INSERTION, "-o", "metric.nope=1"), ["unknown option metric.nope", "known:", "steps", "target", "score"]),
        ((*RUN_INSERTION, "-o", "bogus.x=1"), ["unknown target 'bogus'", "metric, attributor, masker, dataset"]),
        ((*RUN_ACCURACY, "-o", "attributor.x=1"), ["this run has no attributor"]),
        ((*RUN_ACCURACY, "-o", "nosuchoption=1"), ["matches no component"]),
        ((*RUN_ACCURACY, "--limit", "0"), ["--limit must be at least 1"]),
        ((*RUN_ACCURACY, "--limit", "-3"), ["--limit must be at least 1"]),
        ((*RUN_ACCURACY, "--batch-size", "0"), ["--batch-size must be at least 1"]),
        ((*RUN_ACCURACY, "--attributor", "saliency"), ["'accuracy' takes no attributor"]),
        ((*RUN_ACCURACY, "--masker", "blur"), ["'accuracy' takes no masker"]),
        (("run", "--metric", "accuracy"), ["needs at least one --model"]),
        (("run", "--model", LITE), ["either --metric"]),
        (("run", "--model", LITE, "--metric", "accuracy", "--suite", "quickstart"), ["either --metric"]),
        ((*RUN_ACCURACY, "--model", LITE), ["takes 1 --model, got 2"]),
        ((*RUN_ACCURACY, "--weights", "a.safetensors", "--weights", "b.safetensors"), ["one --weights per --model"]),
        ((*RUN_ACCURACY, "--limit", "abc"), ["--limit", "'abc'"]),
        ((*RUN_ACCURACY, "--data", "folder:/nonexistent/harness-tests"), ["is not a folder"]),
        ((*RUN_ACCURACY, "--device", "bogus"), ["unknown device 'bogus'"]),
        ((*RUN_ACCURACY, "--weights", "/nonexistent/w.safetensors"), ["weights file not found"]),
        ((*RUN_ACCURACY, "--weights", "w.safetensors", "--random-init"), ["exclude each other"]),
        ((*RUN_ACCURACY, "--no-such-flag"), ["--no-such-flag"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments_exit_2_with_one_line(cli, tmp_path, args, expected):
    out = tmp_path / "out"
    line = _one_line_error(cli(*args, "--out", out))
    for text in expected:
        assert text in line, (text, line)
    assert not out.exists()


def test_validate_reports_invalid_file_in_one_line(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1}', encoding="utf-8")
    res = cli("validate", bad)
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    assert res.stdout.strip().splitlines() == [res.stdout.strip()]
    assert res.stdout.startswith("invalid: ") and "bad.json" in res.stdout


# -- the real console script, end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("script") / "results"
    args = ["run", "--model", LITE, "--metric", "insertion", "--attributor", "saliency", "--masker", "blur",
            "--data", "samples", "--limit", "2", "--out", str(out), "-o", "metric.steps=10"]
    proc = subprocess.run([*_console_script(), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=out.parent, stdin=subprocess.DEVNULL)
    return out, proc


def test_console_script_run_writes_one_result_and_samples(script_run):
    out, proc = script_run
    assert proc.returncode == 0, proc.stderr
    results = _result_files(out)
    assert len(results) == 1, results
    path = results[0]
    # one summary line on stdout naming the file
    (line,) = proc.stdout.strip().splitlines()
    assert line.startswith(f"insertion {LITE}: ") and "(n=2)" in line
    assert Path(line.rsplit(" -> ", 1)[1]).resolve() == path.resolve()

    result = json.loads(path.read_text(encoding="utf-8"))
    assert result["status"] == "ok" and result["error"] is None
    assert 0.0 <= result["value"] <= 1.0
    assert result["stderr"] is not None and result["stderr"] >= 0
    assert result["metric"]["id"] == "insertion" and result["metric"]["options"]["steps"] == 10
    assert result["metric"]["higher_is_better"] is True
    assert result["attributor"]["id"] == "saliency" and result["masker"]["id"] == "blur"
    assert result["dataset"]["id"] == "samples" and result["dataset"]["n_samples"] == 2
    assert [m["id"] for m in result["models"]] == [LITE] and result["models"][0]["random_init"] is False
    assert path.name == f"{result['run_id']}.json"
    assert result["provenance"]["argv"][:2] == ["harness", "run"]

    lines = _samples_path(path).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    records = [json.loads(x) for x in lines]
    assert [r["sample_id"] for r in records] == ["chelsea", "coffee"]
    assert all({"sample_id", "label", "prediction", "values"} <= set(r) for r in records)


def test_console_script_not_a_tty_prints_no_progress_bar(script_run):
    _, proc = script_run
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr
    for marker in ("\r", "%|", "img/s", "s/img", "it/s"):
        assert marker not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_console_script_result_validates_and_makes_a_leaderboard(script_run, cli):
    out, _ = script_run
    res = cli("validate", out)
    assert res.exit_code == 0 and res.stdout.startswith("ok: ")
    res = cli("leaderboard", out)
    assert res.exit_code == 0 and LITE in res.stdout and "insertion" in res.stdout


TINY_ACCURACY = ("run", "--model", "test_resnet", "--random-init", "--metric", "accuracy", "--limit", "2")


class _TtyBuffer(io.StringIO):
    """stderr that says it is a terminal (the progress bar decides on ``sys.stderr.isatty()``)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True], ids=["bar", "quiet"])
def test_progress_bar_on_a_terminal_unless_quiet(tmp_path, quiet):
    from harness.cli import main

    err, out = _TtyBuffer(), io.StringIO()
    args = [*TINY_ACCURACY, "--out", str(tmp_path / "r"), *(["--quiet"] if quiet else [])]
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            assert not exc.code, err.getvalue()
    assert out.getvalue().startswith("accuracy test_resnet: ")
    if quiet:
        assert err.getvalue() == ""
    else:
        assert "accuracy test_resnet" in err.getvalue() and "2/2" in err.getvalue(), err.getvalue()


# -- suites -----------------------------------------------------------------------------------------------------
SUITE = ("run", "--suite", "quickstart", "--limit", "1", "-o", "metric.steps=5", "--quiet")


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "results"
    res = run_cli(*SUITE, "--out", out)
    results = {}
    for path in _result_files(out):
        data = json.loads(path.read_text(encoding="utf-8"))
        results[data["metric"]["id"]] = (path, data)
    return out, res, results


def test_suite_runs_every_entry_with_the_given_options(suite_run):
    out, res, results = suite_run
    assert "Traceback" not in res.stderr
    assert set(results) == {"accuracy", "insertion", "deletion"}, "one result file per suite entry"
    for metric in ("insertion", "deletion"):
        path, data = results[metric]
        assert data["status"] == "ok", data["error"]
        assert data["metric"]["options"]["steps"] == 5
        assert data["attributor"]["id"] == "saliency" and data["masker"]["id"] == "blur"
        assert data["dataset"]["n_samples"] == 1 and 0.0 <= data["value"] <= 1.0
        assert f"{metric} {LITE}: " in res.stdout and str(path) in res.stdout
    n_failed = sum(d["status"] == "error" for _, d in results.values())
    assert f"suite: {3 - n_failed} ok, 0 already done, {n_failed} failed" in res.stdout
    assert res.exit_code == (1 if n_failed else 0)
    assert n_failed == 0  # suite-wide -o pairs reach only the entries whose components take them


def test_suite_option_applies_only_to_metrics_that_have_it(suite_run):
    _, res, results = suite_run
    assert res.exit_code == 0, res.stderr
    _, acc = results["accuracy"]
    assert acc["status"] == "ok"
    assert acc["metric"]["options"] == {}


def test_suite_resume_skips_finished_entries(suite_run):
    out, _, results = suite_run
    finished = {m: p for m, (p, d) in results.items() if d["status"] == "ok"}
    assert {"insertion", "deletion"} <= set(finished)
    stamps = {m: p.stat().st_mtime_ns for m, p in finished.items()}
    res = run_cli(*SUITE, "--out", out, "--resume")
    assert "Traceback" not in res.stderr
    for metric, path in finished.items():
        assert f"done already: {metric} {LITE}" in res.stdout and str(path) in res.stdout
        assert path.stat().st_mtime_ns == stamps[metric], f"{metric} was run again"
    n_failed = len(results) - len(finished)
    assert f"suite: 0 ok, {len(finished)} already done, {n_failed} failed" in res.stdout
    assert len(_result_files(out)) == len(results)


def test_suite_resume_reruns_an_entry_whose_result_is_missing(suite_run):
    out, _, results = suite_run
    path, before = results["deletion"]
    samples = _samples_path(path).read_text(encoding="utf-8")
    path.unlink()
    res = run_cli(*SUITE, "--out", out, "--resume")
    assert "Traceback" not in res.stderr
    assert f"deletion {LITE}: " in res.stdout and "done already: insertion" in res.stdout
    after = json.loads(path.read_text(encoding="utf-8"))
    assert after["status"] == "ok" and after["run_id"] == before["run_id"]
    assert after["value"] == before["value"] and after["stderr"] == before["stderr"]
    assert _samples_path(path).read_text(encoding="utf-8") == samples  # the finished sample was kept
