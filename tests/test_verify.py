"""``harness verify``: re-running a result's recorded configuration and comparing per-sample values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_cli

RUN = ["run", "--model", "test_resnet", "--random-init", "--quiet", "--device", "cpu"]
INSERTION = [*RUN, "--metric", "insertion", "-o", "metric.steps=3", "--batch-size", "2", "--limit", "3"]
KEYS = {"run_id", "status", "n_checked", "n_mismatched", "max_abs_diff", "tolerance", "harness", "torch",
        "same_versions", "checked_at"}


def run_ok(*args) -> Path:
    res = run_cli(*args)
    assert res.exit_code == 0, res.stderr
    return Path(res.stdout.strip().splitlines()[-1].rsplit(" -> ", 1)[1])


def record_of(result: Path) -> dict:
    run_id = json.loads(result.read_text())["run_id"]
    return json.loads((result.parent / f"{run_id}.verification.json").read_text())


def samples_of(result: Path) -> Path:
    return result.with_name(result.name[: -len(".json")] + ".samples.jsonl")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return run_ok(*INSERTION, "--out", tmp_path_factory.mktemp("verify") / "out")


@pytest.fixture
def result(made, tmp_path) -> Path:
    """A private copy of the made result and its samples file."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(made.parent, out)
    return out / made.name


def test_verify_passes_and_writes_the_record(result):
    res = run_cli("verify", result)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("passed: ") and "3 sample(s) agree" in res.stdout
    record = record_of(result)
    assert KEYS <= set(record)
    assert record["status"] == "passed" and record["n_checked"] == 3 and record["n_mismatched"] == 0
    assert record["max_abs_diff"] <= 1e-6 and record["same_versions"] is True
    assert record["tolerance"] == {"abs": 1e-5, "rel": 1e-4}
    import torch

    from harness import __version__

    assert record["harness"] == __version__ and record["torch"] == torch.__version__
    assert {"prediction", "nonfinite", "auc", "curve", "clean_score", "target"} <= set(record["compared"])


def test_verify_a_seeded_choice_of_samples(result):
    assert run_cli("verify", result, "--samples", "2").exit_code == 0
    first = record_of(result)
    assert first["n_checked"] == 2 and len(first["checked_samples"]) == 2
    assert run_cli("verify", result, "--samples", "2").exit_code == 0
    assert record_of(result)["checked_samples"] == first["checked_samples"]  # the same seed, the same choice
    assert run_cli("verify", result, "--samples", "99").exit_code == 0
    assert record_of(result)["n_checked"] == 3


def _edit_line(result: Path, index: int, edit) -> None:
    path = samples_of(result)
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    edit(lines[index])
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))


def test_a_recorded_value_that_does_not_reproduce_fails(result):
    _edit_line(result, 1, lambda l: l["values"].update(auc=l["values"]["auc"] + 0.01))
    res = run_cli("verify", result)
    assert res.exit_code == 1
    assert res.stdout.startswith("FAILED: ") and "1 of 3 sample(s) differ" in res.stdout and "auc" in res.stdout
    record = record_of(result)
    assert record["status"] == "failed" and record["n_mismatched"] == 1
    assert record["mismatches"][0]["sample_id"] == "coffee" and record["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)


def test_a_difference_within_the_tolerance_passes(result):
    _edit_line(result, 0, lambda l: l["values"].update(auc=l["values"]["auc"] + 1e-9))
    assert run_cli("verify", result).exit_code == 0
    assert record_of(result)["max_abs_diff"] == pytest.approx(1e-9, rel=0.1)


def test_a_result_made_with_other_versions_says_so(result):
    data = json.loads(result.read_text())
    data["provenance"]["torch"] = "0.0.1"
    data["provenance"]["plugins"] = {"harness": "0.0.0", "gone-plugin": "1"}
    result.write_text(json.dumps(data))
    res = run_cli("verify", result)
    assert res.exit_code == 0, res.stderr
    record = record_of(result)
    assert record["same_versions"] is False and record["result_versions"]["torch"] == "0.0.1"
    [line] = [l for l in res.stderr.splitlines() if "other versions" in l]
    assert "torch 0.0.1 ->" in line and "gone-plugin" in line


def test_a_changed_image_fails_verification(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    result = run_ok(*RUN, "--metric", "deletion", "-o", "metric.steps=2", "--data", f"folder:{root}", "--out", tmp_path / "out")
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(root / "1.png")
    assert run_cli("verify", result).exit_code == 1
    record = record_of(result)
    assert record["mismatches"] == [{"sample_id": "1.png", "reason": "the image's content changed"}]
    assert record["same_identity"] is False


def test_verify_accuracy(tmp_path):
    result = run_ok(*RUN, "--metric", "accuracy", "--out", tmp_path / "out")
    assert run_cli("verify", result).exit_code == 0
    record = record_of(result)
    assert record["n_checked"] == 4
    assert {"top1_correct", "top5_correct", "top5", "top5_probs", "prediction"} <= set(record["compared"])


def test_verify_non_finite_samples(tmp_path, monkeypatch):
    from harness_plugins.metrics.insertion_deletion import CurveMetric

    original = CurveMetric.evaluate

    def evaluate(self, batch, ctx):
        records = original(self, batch, ctx)
        for sample, record in zip(batch.samples, records):
            if sample.id == "coffee":
                record["values"]["auc"] = math.inf
        return records

    monkeypatch.setattr(CurveMetric, "evaluate", evaluate)
    result = run_ok(*INSERTION, "--out", tmp_path / "out")
    assert run_cli("verify", result).exit_code == 0
    assert record_of(result)["n_checked"] == 3
    monkeypatch.setattr(CurveMetric, "evaluate", original)  # now coffee is finite: it no longer reproduces
    assert run_cli("verify", result).exit_code == 1
    assert "non-finite" in record_of(result)["mismatches"][0]["reason"]


def test_verify_a_folder_skips_failed_runs(result):
    from harness.runner import RunConfig, write_error_result

    write_error_result(RunConfig(models=["ghost"], metric="accuracy", out=result.parent), "boom")
    for _ in range(2):  # the second time, the first verification record is no result file
        res = run_cli("verify", result.parent)
        assert res.exit_code == 0, res.stderr
        assert res.stdout.count("passed: ") == 1
        assert "skipped: " in res.stderr and "status 'error'" in res.stderr


def test_verify_without_a_recorded_configuration(result):
    data = json.loads(result.read_text())
    del data["provenance"]["run_config"]
    result.write_text(json.dumps(data))
    res = run_cli("verify", result)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "records no run configuration" in res.stderr
