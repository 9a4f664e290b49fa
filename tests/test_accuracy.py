"""Accuracy (plugins/metrics/accuracy.py) with the bundled EfficientNet-Lite0 weights on real photos."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli

PHOTOS = {"chelsea": "chelsea.png", "coffee": "coffee.png", "rocket": "rocket.jpg", "astronaut": "astronaut.png"}
LABELS = {"chelsea": 285, "coffee": 967, "rocket": 657, "astronaut": None}


def _photo(name: str) -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / PHOTOS[name]


@pytest.fixture(scope="module")
def independent():
    """Top-5 classes and probabilities per photo: the registry's lite0, preprocessed by hand."""
    from harness.registry import get_registry

    module = get_registry().model_spec("efficientnet_lite0").build(True).eval()
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    out = {}
    for name in PHOTOS:
        # the recorded preprocessing: squash-resize the whole image to 224 (bilinear), ImageNet mean/std
        img = Image.open(_photo(name)).convert("RGB").resize((224, 224), Image.BILINEAR)
        x = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
        with torch.no_grad():
            probs = module(torch.from_numpy(x).permute(2, 0, 1)[None]).softmax(1)[0]
        top = probs.topk(5)
        out[name] = (top.indices.tolist(), top.values.tolist())
    return out


def _run(tmp_path: Path, *extra: str):
    res = run_cli("run", "--model", "efficientnet_lite0", "--metric", "accuracy", "--out", str(tmp_path), "--quiet", *extra)
    assert res.exit_code == 0, res.stderr
    if not extra:  # the bundled photos: the astronaut has no ImageNet class and is not counted
        assert "(n=3 of 4)" in res.stdout
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    samples = [json.loads(line) for line in Path(str(path)[: -len(".json")] + ".samples.jsonl").read_text().splitlines()]
    return result, samples


def test_independent_predictions_are_the_documented_ones(independent):
    """METHODS.md section 8: chelsea -> 285 (p ~ 0.52), coffee -> 967 (p ~ 0.89)."""
    assert independent["chelsea"][0][0] == 285 and independent["chelsea"][1][0] == pytest.approx(0.52, abs=0.05)
    assert independent["coffee"][0][0] == 967 and independent["coffee"][1][0] == pytest.approx(0.89, abs=0.05)


def test_accuracy_on_samples_matches_independent(tmp_path, independent):
    result, samples = _run(tmp_path)
    assert [s["sample_id"] for s in samples] == list(PHOTOS)
    for s in samples:
        top5, probs = independent[s["sample_id"]]
        assert s["label"] == LABELS[s["sample_id"]]
        assert s["prediction"] == top5[0]
        assert s["values"]["top5"] == top5
        np.testing.assert_allclose(s["values"]["top5_probs"], probs, atol=1e-4)
        if s["label"] is None:  # astronaut: no ImageNet class, not counted
            assert "top1_correct" not in s["values"]
    labelled = [n for n in PHOTOS if LABELS[n] is not None]
    top1 = [int(independent[n][0][0] == LABELS[n]) for n in labelled]
    top5 = [int(LABELS[n] in independent[n][0]) for n in labelled]
    assert result["value"] == pytest.approx(np.mean(top1))
    assert result["values"]["top1"] == pytest.approx(np.mean(top1))
    assert result["values"]["top5"] == pytest.approx(np.mean(top5))
    assert result["values"]["n_labelled"] == 3
    assert result["stderr"] == pytest.approx(np.std(top1, ddof=1) / math.sqrt(3), abs=1e-12)
    assert result["dataset"]["n_samples"] == 4  # every image was evaluated; accuracy counts the labelled 3
    assert result["metric"]["higher_is_better"] is True
    assert result["attributor"] is None and result["masker"] is None
    assert result["models"][0]["random_init"] is False


def test_accuracy_with_wrong_labels_gives_the_right_fractions_and_stderr(tmp_path, independent):
    """An imagenet: folder where chelsea is filed under its 5th-ranked class and rocket under its
    runner-up (wrong top-1, right top-5), coffee as a cat (wrong everywhere) and astronaut under its own
    prediction (right): top-1 = 1/4, top-5 = 3/4."""
    from harness_plugins.datasets import imagenet_wnids

    wnids = imagenet_wnids()
    layout = {
        "chelsea": independent["chelsea"][0][4],
        "coffee": 285,
        "rocket": independent["rocket"][0][1],
        "astronaut": independent["astronaut"][0][0],
    }
    assert len(set(layout.values())) == 4
    data = tmp_path / "val"
    for name, label in layout.items():
        folder = data / wnids[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PHOTOS[name]).write_bytes(_photo(name).read_bytes())
    result, samples = _run(tmp_path / "out", "--data", f"imagenet:{data}")
    by_name = {Path(s["sample_id"]).stem: s for s in samples}
    assert {n: s["label"] for n, s in by_name.items()} == layout
    top1 = [int(independent[n][0][0] == layout[n]) for n in layout]
    top5 = [int(layout[n] in independent[n][0]) for n in layout]
    assert sorted(top1) == [0, 0, 0, 1] and sorted(top5) == [0, 1, 1, 1]
    for n, s in by_name.items():
        assert s["values"]["top1_correct"] == int(independent[n][0][0] == layout[n])
        assert s["values"]["top5_correct"] == int(layout[n] in independent[n][0])
    assert result["value"] == pytest.approx(1 / 4)
    assert result["values"]["top1"] == pytest.approx(1 / 4)
    assert result["values"]["top5"] == pytest.approx(3 / 4)
    assert result["values"]["n_labelled"] == 4
    assert result["stderr"] == pytest.approx(np.std(top1, ddof=1) / math.sqrt(4))  # 0.25
    assert result["values"]["top5_stderr"] == pytest.approx(np.std(top5, ddof=1) / math.sqrt(4))


def test_accuracy_without_labels_is_an_error(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    (data / "a.png").write_bytes(_photo("astronaut").read_bytes())
    res = run_cli("run", "--model", "efficientnet_lite0", "--metric", "accuracy", "--data", f"folder:{data}",
                  "--out", str(tmp_path / "out"), "--quiet")
    assert res.exit_code != 0
    assert "label" in res.stderr
