"""Trustworthy runs (issue 11): content identity, non-finite values, bad images, samples-file damage,
early errors, stale temp files, one lock per run id, and how close a resumed run is to an uninterrupted one."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli

TINY = ["--model", "test_resnet"]
INSERTION = ["--metric", "insertion", "-o", "metric.steps=3", "--quiet", "--device", "cpu"]


# -- helpers -------------------------------------------------------------------------------------------
def one_line_error(res, code: int = 2) -> str:
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("harness: error: "), lines[0]
    return lines[0]


def ok(res) -> tuple[Path, dict, list[dict]]:
    """(result path, result, samples lines) of a successful run."""
    assert res.exit_code == 0, res.stderr
    assert "internal error" not in res.stderr
    path = Path(res.stdout.strip().splitlines()[-1].rsplit(" -> ", 1)[1])
    result = json.loads(path.read_text(encoding="utf-8"))
    return path, result, lines_of(path)


def samples_path(result_path: Path) -> Path:
    return result_path.with_name(result_path.name[: -len(".json")] + ".samples.jsonl")


def lines_of(result_path: Path) -> list[dict]:
    return [json.loads(x) for x in samples_path(result_path).read_text(encoding="utf-8").splitlines()]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_image(path: Path, seed: int, size: int = 24) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def save_weights(path: Path, seed: int, nan_bias: bool = False) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v.detach().clone().contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}
    if nan_bias:
        state["fc.bias"][:] = float("nan")
    save_file(state, str(path))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        write_image(root / f"{i}.png", seed=i)
    return root


@pytest.fixture
def evaluations(monkeypatch):
    """The sample ids every insertion/deletion evaluate call receives."""
    from harness_plugins.metrics.insertion_deletion import CurveMetric

    seen: list[list[str]] = []
    original = CurveMetric.evaluate

    def counting(self, batch, ctx):
        seen.append([s.id for s in batch.samples])
        return original(self, batch, ctx)

    monkeypatch.setattr(CurveMetric, "evaluate", counting)
    return seen


def cut_to(result_path: Path, n: int) -> None:
    """Keep the first ``n`` samples lines and delete the result, as a kill after ``n`` samples would."""
    path = samples_path(result_path)
    path.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    result_path.unlink()


# -- 1. content identity ------------------------------------------------------------------------------
def test_resume_after_the_weights_file_changed_never_mixes_weights(tmp_path):
    weights = save_weights(tmp_path / "w.safetensors", seed=1)
    args = ["run", *TINY, "--weights", weights, *INSERTION, "--limit", "2", "--batch-size", "1", "--out", tmp_path / "out"]
    first, r1, _ = ok(run_cli(*args))
    cut_to(first, 1)  # killed after one sample
    save_weights(weights, seed=2)  # same path, other contents
    res = run_cli(*args, "--resume")
    second, r2, lines = ok(res)
    assert r2["run_id"] != r1["run_id"], "other weights must be another run"
    [note] = res.stderr.strip().splitlines()
    assert "belongs to another run (the weights changed)" in note and r2["run_id"] in note
    assert [l["sample_id"] for l in lines] == ["chelsea", "coffee"]
    assert {l["weights_sha256"][0] for l in lines} == {sha256_of(weights)}  # every sample used the new weights
    from harness.model import load_model
    from harness.registry import get_registry

    assert r2["models"][0]["weights_sha256"] == load_model(get_registry().model_spec("test_resnet"), weights=weights).weights_sha256


def test_run_id_covers_the_weights_content_not_the_path(tmp_path):
    from harness.runner import RunConfig, resolve

    a = save_weights(tmp_path / "a.safetensors", seed=1)
    b = tmp_path / "elsewhere" / "b.safetensors"
    b.parent.mkdir()
    shutil.copy(a, b)
    c = save_weights(tmp_path / "c.safetensors", seed=2)
    ids = [resolve(RunConfig(models=["test_resnet"], metric="accuracy", weights=[str(w)], limit=1)).run_id for w in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]


def test_resume_after_an_image_changed_never_mixes_images(tmp_path, folder, evaluations):
    args = ["run", *TINY, "--random-init", *INSERTION, "--data", f"folder:{folder}", "--batch-size", "1", "--out", tmp_path / "out"]
    first, r1, _ = ok(run_cli(*args))
    cut_to(first, 2)
    write_image(folder / "0.png", seed=99)  # same name, other pixels
    evaluations.clear()
    res = run_cli(*args, "--resume")
    second, r2, lines = ok(res)
    assert r2["run_id"] != r1["run_id"]
    assert "(the content of sample '0.png' changed)" in res.stderr
    assert sum(evaluations, []) == ["0.png", "1.png", "2.png"]  # a new run: nothing reused
    for line in lines:
        assert line["sample_sha256"] == sha256_of(folder / line["sample_id"])
    expected = hashlib.sha256("\n".join(sha256_of(folder / f"{i}.png") for i in range(3)).encode()).hexdigest()
    assert r2["dataset"]["samples_sha256"] == expected


def test_lines_of_another_run_in_the_samples_file_are_recomputed(tmp_path, folder, evaluations):
    args = ["run", *TINY, "--random-init", *INSERTION, "--data", f"folder:{folder}", "--out", tmp_path / "out"]
    first, r1, lines = ok(run_cli(*args))
    forged = dict(lines[1], sample_sha256="0" * 64)  # a line whose image was another one
    samples_path(first).write_text(json.dumps(lines[0]) + "\n" + json.dumps(forged) + "\n", encoding="utf-8")
    evaluations.clear()
    res = run_cli(*args, "--resume")
    _, r2, again = ok(res)
    assert sum(evaluations, []) == ["1.png", "2.png"]
    warnings = [l for l in res.stderr.splitlines() if "another run" in l]
    assert len(warnings) == 1 and "1.png" in warnings[0] and "changed" in warnings[0]
    assert [l["sample_sha256"] for l in again] == [sha256_of(folder / f"{i}.png") for i in range(3)]
    assert r2["value"] == pytest.approx(r1["value"], abs=1e-6)


def test_digest_cache_hashes_once_and_survives_damage(tmp_path, folder, monkeypatch):
    import harness.identity as identity

    hashed: list[str] = []
    real = identity._hash_file
    monkeypatch.setattr(identity, "_hash_file", lambda p: hashed.append(p) or real(p))
    samples = [type("S", (), {"id": p.name, "path": str(p)})() for p in sorted(folder.iterdir())]
    cache_file = tmp_path / "cache" / identity.CACHE_NAME
    first = identity.digest_samples(samples, identity.DigestCache(cache_file))
    assert len(hashed) == 3 and first.sha256["0.png"] == sha256_of(folder / "0.png")
    identity.digest_samples(samples, identity.DigestCache(cache_file))
    assert len(hashed) == 3, "unchanged files are not read again"
    write_image(folder / "1.png", seed=50)
    os.utime(folder / "1.png", ns=(1, 1))  # a new mtime (and maybe the same size): hashed again
    again = identity.digest_samples(samples, identity.DigestCache(cache_file))
    assert hashed[3:] == [str(folder / "1.png")] and again.sha256["1.png"] == sha256_of(folder / "1.png")
    cache_file.write_bytes(b"\x00{not json")
    damaged = identity.digest_samples(samples, identity.DigestCache(cache_file))
    assert damaged.sha256 == again.sha256 and len(hashed) == 7


# -- 2. non-finite values -----------------------------------------------------------------------------------
@pytest.fixture
def nan_for_coffee(monkeypatch):
    """Insertion gives a NaN AUC for the sample 'coffee' (a model or plugin that yields NaN)."""
    from harness_plugins.metrics.insertion_deletion import CurveMetric

    original = CurveMetric.evaluate

    def evaluate(self, batch, ctx):
        records = original(self, batch, ctx)
        for sample, record in zip(batch.samples, records):
            if sample.id == "coffee":
                record["values"]["auc"] = math.nan
        return records

    monkeypatch.setattr(CurveMetric, "evaluate", evaluate)


def test_a_nan_sample_is_recorded_counted_and_left_out(tmp_path, nan_for_coffee):
    args = ["run", *TINY, "--random-init", *INSERTION, "--limit", "3", "--out", tmp_path / "out"]
    res = run_cli(*args)
    path, result, lines = ok(res)
    coffee = next(l for l in lines if l["sample_id"] == "coffee")
    assert coffee["nonfinite"] == {"auc": "nan"} and coffee["values"]["auc"] is None
    assert result["status"] == "ok" and result["values"]["n_nonfinite"] == 1
    assert result["dataset"]["n_samples"] == 2
    finite = [l["values"]["auc"] for l in lines if "nonfinite" not in l]
    assert result["value"] == pytest.approx(sum(finite) / 2, rel=1e-12)
    assert "non-finite" in res.stderr
    cut_to(path, 2)  # resume over a samples file holding the NaN line
    _, again, _ = ok(run_cli(*args, "--resume"))
    assert again["value"] == pytest.approx(result["value"], abs=1e-6) and again["values"]["n_nonfinite"] == 1


def test_a_run_whose_every_sample_is_nan_ends_with_status_error(tmp_path):
    weights = save_weights(tmp_path / "nan.safetensors", seed=1, nan_bias=True)
    args = ["run", *TINY, "--weights", weights, *INSERTION, "--limit", "2", "--out", tmp_path / "out"]
    line = one_line_error(run_cli(*args))
    assert "non-finite" in line
    [result] = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert result["status"] == "error" and "non-finite" in result["error"] and result["value"] is None
    assert all("nonfinite" in l for l in lines_of(tmp_path / "out" / f"{result['run_id']}.json"))
    assert "non-finite" in one_line_error(run_cli(*args, "--resume"))  # resume: the same clear line


def test_summaries_survive_nulls():
    from harness.stats import mean_stderr

    assert mean_stderr([1.0, None, math.nan, math.inf, 3.0]) == (2.0, pytest.approx(1.0))
    from harness_plugins.metrics.insertion_deletion import curve_tensor

    assert curve_tensor([{"values": {"curve": [0.5, None]}}]).isnan().tolist() == [[False, True]]


# -- 3. --weights ID=PATH naming no model of the run -------------------------------------------------------
def test_weights_for_a_model_that_is_not_in_the_run(tmp_path):
    weights = save_weights(tmp_path / "w.safetensors", seed=1)
    out = tmp_path / "out"
    line = one_line_error(run_cli("run", *TINY, "--weights", f"resnet50={weights}", "--metric", "accuracy", "--out", out))
    assert "'resnet50' is not a model of this run" in line and "test_resnet" in line
    assert not out.exists()
    line = one_line_error(run_cli("run", "--suite", "quickstart", "--weights", f"nosuch={weights}", "--out", out))
    assert "'nosuch' is not a model of suite 'quickstart'" in line


# -- 4. one bad image never aborts a run --------------------------------------------------------------------
def _bomb(path: Path) -> Path:
    """A tiny PNG whose header claims 40000 x 40000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def hostile_folder(tmp_path) -> Path:
    root = tmp_path / "hostile"
    root.mkdir()
    write_image(root / "a.png", seed=1)
    _bomb(root / "b_bomb.png")
    write_image(Path(os.fsdecode(bytes(root) + b"/c_\xff\xfe.png")), seed=2)  # a name that is not UTF-8
    write_image(root / "d.png", seed=3)
    return root


def test_bad_images_are_skipped_with_one_warning_each(tmp_path, hostile_folder):
    res = run_cli("run", *TINY, "--random-init", *INSERTION, "--data", f"folder:{hostile_folder}", "--out", tmp_path / "out")
    _, result, lines = ok(res)
    assert [l["sample_id"] for l in lines] == ["a.png", "d.png"] and result["dataset"]["n_samples"] == 2
    warnings = res.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("harness: warning: skipping sample") for w in warnings), res.stderr
    assert any("b_bomb.png" in w and "exceeds limit" in w for w in warnings)
    assert any("c_\\xff\\xfe.png" in w and "not valid UTF-8" in w for w in warnings)


@pytest.mark.parametrize("bad", ["bomb", "name"])
def test_a_bad_image_stops_the_run_when_asked(tmp_path, bad):
    root = tmp_path / "one"
    root.mkdir()
    write_image(root / "a.png", seed=1)
    if bad == "bomb":
        _bomb(root / "b.png")
    else:
        write_image(Path(os.fsdecode(bytes(root) + b"/b\xff.png")), seed=2)
    res = run_cli("run", *TINY, "--random-init", *INSERTION, "--data", f"folder:{root}", "--on-bad-image", "stop",
                  "--out", tmp_path / "out")
    assert ("b.png" if bad == "bomb" else "b\\xff.png") in one_line_error(res)


def test_any_decoder_error_is_an_unreadable_image(tmp_path, monkeypatch):
    from PIL import ImageFile

    from harness.data import UnreadableImage, load_rgb

    path = write_image(tmp_path / "x.png", seed=1)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(struct.error("unpack requires a buffer")))
    with pytest.raises(UnreadableImage, match="x.png"):
        load_rgb(path)


# -- 5. samples-file damage ---------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", [b"\xff\xfe{\"sample_id\": \"0.png\"}", b"{\"sample_id\":\x00\x00 \"0.png\"}", b"[1, 2, 3]",
                                    b"{\"sample_id\": \"0.png\"}", b"\"text\"", b"{\"sample_id\": 7, \"values\": {}}"],
                         ids=["invalid-utf8", "nul-bytes", "json-list", "no-values", "json-string", "id-not-a-string"])
def test_damaged_samples_lines_are_dropped_and_recomputed(tmp_path, folder, evaluations, damage):
    args = ["run", *TINY, "--random-init", *INSERTION, "--data", f"folder:{folder}", "--out", tmp_path / "out"]
    first, r1, lines = ok(run_cli(*args))
    good = [json.dumps(l).encode() + b"\n" for l in lines]
    samples_path(first).write_bytes(damage + b"\n" + good[1] + good[2])
    evaluations.clear()
    res = run_cli(*args, "--resume")
    _, r2, again = ok(res)
    assert sum(evaluations, []) == ["0.png"]
    warnings = [l for l in res.stderr.splitlines() if "damaged" in l]
    assert len(warnings) == 1 and "line 1" in warnings[0]
    assert [l["sample_id"] for l in again] == ["0.png", "1.png", "2.png"]
    assert r2["value"] == pytest.approx(r1["value"], abs=1e-6)


# -- 6. early and clear errors -------------------------------------------------------------------------------
@pytest.fixture
def no_model_loads(monkeypatch):
    import harness.runner

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the output folders were checked")

    monkeypatch.setattr(harness.runner, "load_model", refuse)


@pytest.mark.parametrize("which", ["out", "cache"])
def test_unwritable_folders_are_found_before_any_model_loads(tmp_path, no_model_loads, which):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out, cache = (blocker / "out", tmp_path / "cache") if which == "out" else (tmp_path / "out", blocker / "cache")
    line = one_line_error(run_cli("run", *TINY, "--random-init", *INSERTION, "--limit", "1", "--out", out, "--cache", cache))
    assert "cannot write to the" in line and str(blocker) in line
    assert ("output folder" if which == "out" else "cache folder") in line


def test_disk_full_is_one_line_and_resume_continues(tmp_path, monkeypatch):
    from harness.results import SamplesFile

    original = SamplesFile.append
    calls = []

    def append(self, records):
        calls.append(len(records))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return original(self, records)

    args = ["run", *TINY, "--random-init", *INSERTION, "--limit", "3", "--batch-size", "1", "--out", tmp_path / "out"]
    with monkeypatch.context() as patch:
        patch.setattr(SamplesFile, "append", append)
        line = one_line_error(run_cli(*args))
    assert "disk full" in line and "--resume" in line
    _, result, lines = ok(run_cli(*args, "--resume"))
    assert [l["sample_id"] for l in lines] == ["chelsea", "coffee", "rocket"]


@pytest.mark.parametrize("seed", [str(2**63), "99999999999999999999999", "-1"])
def test_seed_outside_the_valid_range(tmp_path, seed):
    line = one_line_error(run_cli("run", *TINY, "--random-init", "--metric", "accuracy", "--seed", seed, "--out", tmp_path))
    assert "--seed must be between 0 and 2**63-1" in line


def test_largest_seed_is_valid():
    from harness.runner import SEED_MAX, RunConfig, resolve

    assert SEED_MAX == 2**63 - 1
    resolve(RunConfig(models=["test_resnet"], metric="accuracy", random_init=True, seed=SEED_MAX, limit=1))
    torch.manual_seed(SEED_MAX)  # and torch takes it


@pytest.mark.parametrize("option, wanted", [
    ("metric.steps=true", "expected an integer, not a boolean"),
    ("metric.steps=false", "expected an integer, not a boolean"),
    ('metric.steps="5"', "expected an integer, not a string"),
    ("masker.sigma=true", "expected a number, not a boolean"),
    ('masker.sigma="2.5"', "expected a number, not a string"),
])
def test_options_are_not_coerced_to_numbers(tmp_path, option, wanted):
    line = one_line_error(run_cli("run", *TINY, "--random-init", *INSERTION, "-o", option, "--out", tmp_path / "out"))
    assert wanted in line and option.split("=")[0] in line


def test_an_integer_is_still_a_float_option():
    from harness.runner import RunConfig, resolve

    run = resolve(RunConfig(models=["test_resnet"], metric="insertion", options=["masker.sigma=10"], limit=1, random_init=True))
    assert run.masker.options.sigma == 10.0 and isinstance(run.masker.options.sigma, float)


def test_strict_numbers_reach_into_lists_unions_and_dicts():
    from pydantic import ValidationError

    from harness.components import Options

    class Nested(Options):
        sizes: list[int] = [1]
        scale: float | None = None
        weights: dict[str, float] = {}
        names: str | list[str] = "all"

    assert Nested(sizes=[2, 3], scale=2, weights={"a": 1}, names="x").scale == 2.0
    for bad in ({"sizes": [1, True]}, {"scale": "0.5"}, {"weights": {"a": False}}, {"sizes": ["4"]}):
        with pytest.raises(ValidationError, match="expected"):
            Nested(**bad)


@pytest.mark.parametrize("granularity", ["patch:161", "grid:500"])
def test_granularity_larger_than_the_image(tmp_path, granularity):
    line = one_line_error(run_cli("run", *TINY, "--random-init", *INSERTION, "--limit", "1",
                                  "-o", f"masker.granularity={granularity}", "--out", tmp_path / "out"))
    assert granularity in line and "160x160" in line


@pytest.mark.parametrize("spec", ["folder:", "folder:  ", "imagenet:"])
def test_data_with_an_empty_path(tmp_path, spec, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty path must not mean "the current folder"
    write_image(tmp_path / "here.png", seed=1)
    line = one_line_error(run_cli("run", *TINY, "--random-init", "--metric", "accuracy", "--data", spec, "--out", tmp_path / "out"))
    assert "empty" in line


def test_temp_files_of_killed_writes_are_removed(tmp_path):
    out = tmp_path / "out"
    args = ["run", *TINY, "--random-init", *INSERTION, "--limit", "1", "--out", out]
    path, result, _ = ok(run_cli(*args))
    run_id = result["run_id"]
    own = [out / f".{run_id}.json.k1l2m3.tmp", out / f".{run_id}.samples.jsonl.x9.tmp", out / run_id / "visuals" / "v.tmp"]
    old_foreign, fresh_foreign = out / ".other-run.json.aaaa.tmp", out / ".busy-run.json.bbbb.tmp"
    for p in [*own, old_foreign, fresh_foreign]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{half a res")
    os.utime(old_foreign, (1, 1))
    ok(run_cli(*args))
    assert not any(p.exists() for p in [*own, old_foreign])
    assert fresh_foreign.exists()  # may belong to a write happening right now


def test_a_second_identical_run_refuses_while_the_first_holds_the_lock(tmp_path, no_model_loads):
    from harness.locking import RunLock
    from harness.runner import RunConfig, resolve

    out = tmp_path / "out"
    run_id = resolve(RunConfig(models=["test_resnet"], metric="insertion", options=["metric.steps=3"], random_init=True,
                               limit=1)).run_id
    lock = RunLock(out, run_id)
    out.mkdir()
    lock.acquire()
    try:
        line = one_line_error(run_cli("run", *TINY, "--random-init", *INSERTION, "--limit", "1", "--out", out))
    finally:
        lock.release()
    assert f"run {run_id} is already running" in line and f"pid {os.getpid()}" in line
    assert not (out / f"{run_id}.samples.jsonl").exists()


def test_the_lock_is_released_after_a_run(tmp_path):
    out = tmp_path / "out"
    _, result, _ = ok(run_cli("run", *TINY, "--random-init", *INSERTION, "--limit", "1", "--out", out))
    assert not (out / f".{result['run_id']}.lock").exists()
    ok(run_cli("run", *TINY, "--random-init", *INSERTION, "--limit", "1", "--out", out, "--resume"))


# -- 8. resumed vs uninterrupted ---------------------------------------------------------------------------
RESUME_BOUND = 2e-6
"""The README's bound: resumed per-sample values equal an uninterrupted run's up to float32 rounding
(measured on CPU: 0 to 1.2e-10 on the timm test models, 8.3e-7 on EfficientNet-Lite0 probabilities)."""


def _max_abs_diff(a, b) -> float:
    if isinstance(a, list):
        assert len(a) == len(b)
        return max([_max_abs_diff(x, y) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([_max_abs_diff(a[k], b[k]) for k in a], default=0.0)
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return abs(a - b)
    assert a == b
    return 0.0


@pytest.mark.parametrize("model, metric", [
    ("test_resnet", [*INSERTION, "--attributor", "smoothgrad", "-o", "attributor.samples=2", "--no-cache"]),
    ("test_vit", [*INSERTION, "--attributor", "smoothgrad", "-o", "attributor.samples=2", "--no-cache"]),
    ("efficientnet_lite0", ["--metric", "accuracy", "--quiet", "--device", "cpu"]),
], ids=["test_resnet-insertion", "test_vit-insertion", "lite0-accuracy"])
def test_a_resumed_run_equals_the_uninterrupted_one_up_to_rounding(tmp_path, model, metric):
    root = tmp_path / "photos"
    root.mkdir()
    import skimage.data

    for name in ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"):
        shutil.copy(Path(skimage.data.__file__).parent / name, root / name)
    data = ["--data", "samples"] if "accuracy" in metric else ["--data", f"folder:{root}"]
    args = ["run", "--model", model, *([] if model.startswith("efficientnet") else ["--random-init"]), *metric, *data,
            "--batch-size", "3"]
    _, whole, whole_lines = ok(run_cli(*args, "--out", tmp_path / "whole"))
    cut, _, _ = ok(run_cli(*args, "--out", tmp_path / "cut"))
    cut_to(cut, 1)  # killed inside the first batch of 3: the resumed batches differ from the uninterrupted ones
    _, resumed, resumed_lines = ok(run_cli(*args, "--out", tmp_path / "cut", "--resume"))
    assert [l["sample_id"] for l in resumed_lines] == [l["sample_id"] for l in whole_lines]
    assert [l["prediction"] for l in resumed_lines] == [l["prediction"] for l in whole_lines]
    worst = _max_abs_diff([l["values"] for l in whole_lines], [l["values"] for l in resumed_lines])
    print(f"resumed vs uninterrupted, {model}: max |diff| {worst:.3g}")
    assert worst <= RESUME_BOUND
    assert abs(whole["value"] - resumed["value"]) <= RESUME_BOUND
