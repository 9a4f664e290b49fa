"""Result files and runs (harness/results.py, harness/runner.py): reproducibility, run ids, schema,
validation, atomic writes, and --resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

BASE = ["run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "--attributor", "random",
        "--limit", "2", "-o", "metric.steps=4", "--batch-size", "8", "--quiet"]


def _run(out: Path, *extra: str) -> tuple[Path, dict, list[str]]:
    res = run_cli(*BASE, "--out", str(out), *extra)
    assert res.exit_code == 0, res.stderr
    path = Path(res.stdout.strip().rsplit(" -> ", 1)[1])
    assert path.parent == out
    return path, json.loads(path.read_text()), _samples_path(path).read_text().splitlines(keepends=True)


def _samples_path(result_path: Path) -> Path:
    return result_path.with_name(result_path.name[: -len(".json")] + ".samples.jsonl")


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("first"))


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("second"))


# -- reproducibility and run ids ------------------------------------------------------------------------
def test_same_config_and_seed_same_run_id_and_numbers(first, second):
    p1, r1, s1 = first
    p2, r2, s2 = second
    assert r1["run_id"] == r2["run_id"] and p1.name == p2.name == f"{r1['run_id']}.json"
    assert r1["status"] == "ok" and r1["error"] is None
    assert r1["value"] == r2["value"] and r1["stderr"] == r2["stderr"]
    assert r1["values"] == r2["values"]
    assert s1 == s2  # per-sample records byte-identical
    assert [json.loads(line)["sample_id"] for line in s1] == ["chelsea", "coffee"]
    for key in ("models", "metric", "attributor", "masker", "dataset"):
        assert r1[key] == r2[key]


def test_different_seed_gives_different_run_id_and_numbers(first, tmp_path):
    _, r1, s1 = first
    _, r2, s2 = _run(tmp_path, "--seed", "1")
    assert r2["run_id"] != r1["run_id"]
    assert r2["provenance"]["seed"] == 1
    assert r2["value"] != r1["value"]
    assert [json.loads(line)["values"]["curve"] for line in s1] != [json.loads(line)["values"]["curve"] for line in s2]


def _run_id(*extra_options: str, **overrides) -> str:
    from harness.runner import RunConfig, resolve

    config = dict(models=["test_resnet"], metric="insertion", attributor="random", limit=2, random_init=True,
                  options=["metric.steps=4", *extra_options])
    config.update(overrides)
    return resolve(RunConfig(**config)).run_id


def test_run_id_depends_on_every_part_of_the_configuration(first):
    base = _run_id()
    assert base == first[1]["run_id"]
    different = {
        "seed": _run_id(seed=1),
        "metric option": _run_id(options=["metric.steps=3"]),
        "masker option": _run_id("masker.sigma=10"),
        "masker": _run_id(masker="black"),
        "attributor": _run_id(attributor="saliency"),
        "samples": _run_id(limit=3),
        "model": _run_id(models=["test_vit"]),
        "weights": _run_id(random_init=False),
        "metric": _run_id(metric="deletion"),
    }
    for what, run_id in different.items():
        assert run_id != base, what
    assert len(set(different.values())) == len(different)
    # options spelled differently but resolving to the same values give the same id
    assert _run_id("masker.sigma=50") == base
    assert _run_id(batch_size=3) == base  # the batch size is not part of the configuration's identity


def test_run_id_is_stable_across_processes(first):
    code = (
        "from harness.runner import RunConfig, resolve;"
        "print(resolve(RunConfig(models=['test_resnet'], metric='insertion', attributor='random', limit=2,"
        " random_init=True, options=['metric.steps=4'])).run_id)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == first[1]["run_id"]


# -- the schema -------------------------------------------------------------------------------------------
def test_result_has_the_minimum_keys_with_types(first):
    path, r, samples = first
    assert isinstance(r["schema_version"], int)
    assert isinstance(r["run_id"], str) and r["run_id"]
    assert isinstance(r["models"], list) and len(r["models"]) == 1
    m = r["models"][0]
    assert m["id"] == "test_resnet" and isinstance(m["source"], str) and isinstance(m["weights"], str)
    assert isinstance(m["weights_sha256"], str) and len(m["weights_sha256"]) == 64
    assert m["random_init"] is True
    assert set(r["metric"]) >= {"id", "version", "higher_is_better", "options"}
    assert r["metric"]["id"] == "insertion" and isinstance(r["metric"]["version"], str)
    assert r["metric"]["higher_is_better"] is True and r["metric"]["options"]["steps"] == 4
    for kind, cid in (("attributor", "random"), ("masker", "blur")):
        assert set(r[kind]) >= {"id", "version", "options"} and r[kind]["id"] == cid
        assert isinstance(r[kind]["version"], str) and isinstance(r[kind]["options"], dict)
    assert r["masker"]["options"]["kernel_size"] == 51 and r["masker"]["options"]["sigma"] == 50.0
    d = r["dataset"]
    assert d["id"] == "samples" and d["n_samples"] == 2 and isinstance(d["n_samples"], int)
    import hashlib

    assert d["sample_ids_sha256"] == hashlib.sha256(b"chelsea\ncoffee").hexdigest()
    assert isinstance(r["value"], float) and isinstance(r["stderr"], float)
    assert isinstance(r["values"], dict) and isinstance(r["artifacts"], dict)
    p = r["provenance"]
    for key, kind in (("harness", str), ("plugins", dict), ("python", str), ("torch", str), ("timm", str),
                      ("device", str), ("seed", int), ("batch_size", int), ("started_at", str),
                      ("duration_s", (int, float)), ("argv", list)):
        assert isinstance(p[key], kind), key
    assert p["seed"] == 0 and p["batch_size"] == 8 and p["device"] == "cpu" and p["duration_s"] >= 0
    import torch, timm

    assert p["torch"] == torch.__version__ and p["timm"] == timm.__version__
    from datetime import datetime

    datetime.fromisoformat(p["started_at"])
    assert r["status"] == "ok" and r["error"] is None
    # the samples file: one record per image with id, label, prediction and values
    for line in samples:
        rec = json.loads(line)
        assert set(rec) >= {"sample_id", "label", "prediction", "values"}
        assert isinstance(rec["prediction"], int) and isinstance(rec["values"]["auc"], float)
    # the value is the mean of the per-sample AUCs
    aucs = [json.loads(line)["values"]["auc"] for line in samples]
    assert r["value"] == pytest.approx(sum(aucs) / len(aucs), rel=1e-12)


def test_validate_accepts_a_written_result(first, cli):
    res = cli("validate", str(first[0]))
    assert res.exit_code == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok:")


def _delete(path):
    def edit(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def _set(path, value):
    def edit(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize(
    "edit,field",
    [
        (_delete(["value"]), "value"),
        (_set(["status"], "maybe"), "status"),
        (_delete(["run_id"]), "run_id"),
        (_set(["dataset", "n_samples"], "two"), "dataset.n_samples"),
        (_delete(["provenance", "seed"]), "provenance.seed"),
        (_delete(["metric", "higher_is_better"]), "metric.higher_is_better"),
        (_set(["models", 0, "random_init"], "perhaps"), "models.0.random_init"),
        (_set(["artifacts"], []), "artifacts"),
    ],
)
def test_validate_rejects_a_hand_edited_file(first, tmp_path, cli, edit, field):
    data = json.loads(first[0].read_text())
    edit(data)
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(data))
    res = cli("validate", str(bad))
    assert res.exit_code == 1
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert field in lines[0] and "edited.json" in lines[0]


def test_validate_rejects_non_json(tmp_path, cli):
    bad = tmp_path / "broken.json"
    bad.write_text('{"schema_version": 1, ')
    res = cli("validate", str(bad))
    assert res.exit_code == 1 and len((res.stdout + res.stderr).strip().splitlines()) == 1


# -- atomic writes and resume -------------------------------------------------------------------------------
def _no_temp_files(folder: Path):
    leftovers = [name for name in os.listdir(folder) if name.endswith(".tmp") or ".tmp" in name]
    assert leftovers == []


def test_no_temp_files_remain(first, second):
    _no_temp_files(first[0].parent)
    _no_temp_files(second[0].parent)


@pytest.fixture
def count_evaluations(monkeypatch):
    """Record the sample ids every metric.evaluate call receives."""
    from harness_plugins.metrics.insertion_deletion import CurveMetric

    seen: list[list[str]] = []
    original = CurveMetric.evaluate

    def counting(self, batch, ctx):
        seen.append([s.id for s in batch.samples])
        return original(self, batch, ctx)

    monkeypatch.setattr(CurveMetric, "evaluate", counting)
    return seen


def _copy_run(first, tmp_path) -> Path:
    out = tmp_path / "resume"
    shutil.copytree(first[0].parent, out)
    return out


def test_rerun_without_resume_starts_over(first, tmp_path, count_evaluations):
    out = _copy_run(first, tmp_path)
    _, r, samples = _run(out)
    assert count_evaluations == [["chelsea", "coffee"]]
    assert samples == first[2]  # not appended twice
    assert r["value"] == first[1]["value"]


def test_resume_recomputes_only_the_missing_sample(first, tmp_path, count_evaluations):
    out = _copy_run(first, tmp_path)
    samples_path = _samples_path(out / first[0].name)
    samples_path.write_text("".join(first[2][:-1]))  # the last line is lost
    _, r, samples = _run(out, "--resume")
    assert count_evaluations == [["coffee"]]
    assert samples[0] == first[2][0]  # the kept line is untouched, byte for byte
    assert len(samples) == 2 and json.loads(samples[1])["sample_id"] == "coffee"
    _assert_same_record(json.loads(samples[1]), json.loads(first[2][1]))
    assert r["value"] == pytest.approx(first[1]["value"], rel=1e-6)
    assert r["run_id"] == first[1]["run_id"] and r["dataset"]["n_samples"] == 2
    _no_temp_files(out)


def _assert_same_record(got: dict, want: dict):
    assert got["sample_id"] == want["sample_id"] and got["label"] == want["label"]
    assert got["prediction"] == want["prediction"] and got["values"]["target"] == want["values"]["target"]
    assert got["values"]["curve"] == pytest.approx(want["values"]["curve"], rel=1e-6)
    assert got["values"]["auc"] == pytest.approx(want["values"]["auc"], rel=1e-6)


@pytest.mark.parametrize("cut", ["half", "newline"])
def test_resume_repairs_a_half_written_last_line(first, tmp_path, count_evaluations, cut):
    out = _copy_run(first, tmp_path)
    samples_path = _samples_path(out / first[0].name)
    line = first[2][1]
    partial = line[: len(line) // 2] if cut == "half" else line[:-1]  # a crash while writing coffee
    samples_path.write_text(first[2][0] + partial)
    _, r, samples = _run(out, "--resume")
    if cut == "half":
        assert count_evaluations == [["coffee"]]
    else:  # whole JSON without its newline: recomputing it or keeping it are both fine, gluing is not
        assert count_evaluations in ([["coffee"]], [])
    assert len(samples) == 2 and samples[0] == first[2][0]
    assert all(line.endswith("\n") for line in samples)
    for line in samples:
        json.loads(line)  # every line is whole JSON again
    _assert_same_record(json.loads(samples[1]), json.loads(first[2][1]))
    assert r["value"] == pytest.approx(first[1]["value"], rel=1e-6)
    _no_temp_files(out)


def test_resume_of_a_finished_run_evaluates_nothing(first, tmp_path, count_evaluations):
    out = _copy_run(first, tmp_path)
    _, r, samples = _run(out, "--resume")
    assert count_evaluations == []
    assert samples == first[2]
    assert r["value"] == first[1]["value"] and r["values"] == first[1]["values"]


def test_resume_with_no_samples_file_runs_everything(first, tmp_path, count_evaluations):
    out = tmp_path / "fresh"
    _, r, samples = _run(out, "--resume")
    assert count_evaluations == [["chelsea", "coffee"]]
    assert samples == first[2] and r["value"] == first[1]["value"]


def test_written_files_have_ordinary_permissions(first):
    """Atomic writes must not change the mode a plain open() would give (0666 minus the umask)."""
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    for path in (first[0], _samples_path(first[0])):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_samples_file_read_drops_only_a_partial_tail(tmp_path):
    from harness.results import SamplesFile

    path = tmp_path / "x.samples.jsonl"
    whole = '{"sample_id":"a","values":{}}\n{"sample_id":"b","values":{}}\n'
    path.write_text(whole + '{"sample_id":"c","val')
    f = SamplesFile(path)
    assert [r["sample_id"] for r in f.read()] == ["a", "b"]
    assert path.read_text().endswith('"val')  # reading alone does not modify the file
    assert [r["sample_id"] for r in f.read(repair=True)] == ["a", "b"]
    assert path.read_text() == whole
    f.append([{"sample_id": "c", "values": {"x": float("nan")}}])
    records = f.read()
    assert [r["sample_id"] for r in records] == ["a", "b", "c"] and records[2]["values"]["x"] is None


def test_write_result_is_atomic_and_round_trips(first, tmp_path):
    from harness.results import read_result, write_result

    result = read_result(first[0])
    path = write_result(result, tmp_path)
    assert path == tmp_path / f"{result.run_id}.json"
    assert read_result(path) == result
    assert os.listdir(tmp_path) == [path.name]
