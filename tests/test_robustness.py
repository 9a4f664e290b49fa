"""Robustness (plugins/metrics/robustness.py, corruptions.py): mCE with AlexNet's constants, retention,
the released ImageNet-C layout (``imagenet-c:PATH``) and on-the-fly corruption (builtin backend;
the imagecorruptions backend when installed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import wrap_module
from harness.errors import HarnessError

ALEXNET = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")


# -- the summary -------------------------------------------------------------------------------------
def test_mce_of_a_model_with_alexnets_errors_is_one():
    from harness_plugins.metrics.robustness import corruption_summary

    # errors differ by severity but average to AlexNet's: CE is a ratio of sums over severities
    offsets = (-0.04, -0.02, 0.0, 0.02, 0.04)
    accuracy = {c: {s: 1 - err + offsets[s - 1] for s in range(1, 6)} for c, err in ALEXNET.items()}
    report = corruption_summary(accuracy, clean_accuracy=0.5)
    assert report["mce"] == pytest.approx(1.0, abs=1e-12)
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in report["ce"].values())
    assert report["mean_accuracy_15"] == pytest.approx(1 - np.mean(list(ALEXNET.values())), abs=1e-12)
    assert report["mean_accuracy_19"] is None  # the 4 extra corruptions were not evaluated


def test_mce_ratios_and_the_15_and_19_means():
    from harness_plugins.metrics.robustness import corruption_summary

    accuracy = {c: {s: 1 - err / 2 for s in range(1, 6)} for c, err in ALEXNET.items()}  # half AlexNet's errors
    accuracy.update({c: {s: 0.1 * s for s in range(1, 6)} for c in EXTRA})
    report = corruption_summary(accuracy, clean_accuracy=0.8)
    assert report["mce"] == pytest.approx(0.5)
    mean15 = float(np.mean([1 - e / 2 for e in ALEXNET.values()]))
    assert report["mean_accuracy_15"] == pytest.approx(mean15)
    assert report["mean_accuracy_19"] == pytest.approx((15 * mean15 + 4 * 0.3) / 19)
    assert report["retention_15"] == pytest.approx(mean15 / 0.8)
    assert report["retention_19"] == pytest.approx(report["mean_accuracy_19"] / 0.8)
    assert report["mean_accuracy"] == pytest.approx(report["mean_accuracy_19"])  # the headline: every corruption once
    partial = corruption_summary({"fog": {1: 0.5, 3: 0.7}}, clean_accuracy=None)
    assert partial["mce"] is None and partial["mean_accuracy_15"] is None and partial["retention"] is None
    assert partial["ce"]["fog"] == pytest.approx(0.4 / ALEXNET["fog"]) and partial["severities"] == [1, 3]


# -- on the fly --------------------------------------------------------------------------------------
class FixedClass(torch.nn.Module):
    """Predicts class 285 whatever the image: no corruption can change its answer."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 1000)
        logits[:, 285] = 1.0
        return logits


class Brightness(torch.nn.Module):
    """Class 285 for bright images, 967 for dark ones: changes its answer under strong corruption."""

    def forward(self, x):
        m = x.mean((1, 2, 3))
        logits = torch.zeros(x.shape[0], 1000)
        logits[:, 285] = m
        logits[:, 967] = 0.45 - m
        return logits


def _run(metric, module, samples, tmp_path):
    """Evaluate as the runner does (records through JSON with label and sample id), then summarise."""
    from harness.data import Batch, load_rgb, sample_seed
    from harness.runner import MetricContext

    model = wrap_module(module, size=64, batch_size=8)
    ctx = MetricContext(models=[model], attributor=None, masker=None, seed=0, batch_size=8, out_dir=tmp_path, run_id="t")
    batch = Batch(samples=samples, images=[load_rgb(s.path) for s in samples], seeds=[sample_seed(0, s.id) for s in samples])
    records = [json.loads(json.dumps({"sample_id": s.id, "label": s.label, **r})) for s, r in zip(samples, metric.evaluate(batch, ctx))]
    return metric.summarize(records, ctx), records


def _samples():
    from harness_plugins.datasets import SampleImages

    return SampleImages().samples()


def test_retention_of_a_model_unaffected_by_corruption_is_one(tmp_path):
    from harness_plugins.metrics.robustness import Robustness

    metric = Robustness(Robustness.Options(backend="builtin", corruptions="gaussian_noise,contrast,pixelate", severities=[1, 5]))
    summary, records = _run(metric, FixedClass(), _samples(), tmp_path)
    values = summary.values
    assert values["clean_accuracy"] == pytest.approx(1 / 3)  # chelsea is 285; coffee, rocket are not; astronaut unlabelled
    assert summary.value == pytest.approx(1 / 3)
    assert values["retention"] == pytest.approx(1.0)
    assert values["consistency"] == 1.0 and values["source"] == "on_the_fly"
    assert values["n"]["contrast"] == {"1": 3, "5": 3} and values["n_clean"] == 3
    assert set(records[0]["values"]["predictions"]) == {f"{c}/{s}" for c in ("gaussian_noise", "contrast", "pixelate") for s in (1, 5)}
    assert "not the released ImageNet-C benchmark" in values["note"]


def test_on_the_fly_accuracy_per_condition_and_determinism(tmp_path):
    from harness_plugins.metrics.robustness import Robustness

    options = Robustness.Options(backend="builtin", corruptions=["brightness", "contrast"], severities=[1, 5])
    summary, records = _run(Robustness(options), Brightness(), _samples(), tmp_path)
    again, records_again = _run(Robustness(options), Brightness(), _samples(), tmp_path)
    assert records == records_again and summary.value == again.value
    acc = summary.values["accuracy"]
    # the model reads brightness: +0.5 V (severity 5) makes everything "bright" (285), low contrast pulls to the mean
    assert acc["brightness"]["5"] == pytest.approx(1 / 3)
    assert set(acc) == {"brightness", "contrast"} and summary.values["ce"].keys() == {"brightness", "contrast"}
    assert summary.values["mce"] is None and "ce_note" in summary.values


def test_builtin_corruptions_are_seeded_and_grow_with_severity():
    from harness_plugins.metrics.corruptions import BuiltinCorruptor, imagenet_c_geometry

    image = np.asarray(imagenet_c_geometry(Image.open(_samples()[0].path).convert("RGB")))
    assert image.shape == (224, 224, 3)
    corrupt = BuiltinCorruptor()
    assert len(corrupt.available) == 11
    for name in corrupt.available:
        a, b = corrupt(image, name, 3, seed=7), corrupt(image, name, 3, seed=7)
        assert a.dtype == np.uint8 and a.shape == image.shape and np.array_equal(a, b), name
    change = [np.abs(corrupt(image, "gaussian_noise", s, 1).astype(float) - image).mean() for s in range(1, 6)]
    assert change == sorted(change) and change[0] > 1
    assert not np.array_equal(corrupt(image, "shot_noise", 2, 1), corrupt(image, "shot_noise", 2, 2))


def test_imagecorruptions_backend_when_installed():
    pytest.importorskip("imagecorruptions")
    from harness_plugins.metrics.corruptions import ALL, ImageCorruptionsCorruptor

    image = np.asarray(Image.open(_samples()[0].path).convert("RGB").resize((64, 64)))
    corrupt = ImageCorruptionsCorruptor()
    for name in ("gaussian_noise", "impulse_noise", "motion_blur", "frost", "contrast"):
        a, b = corrupt(image, name, 2, seed=3), corrupt(image, name, 2, seed=3)
        assert a.shape == image.shape and np.array_equal(a, b), name
    assert corrupt.available == ALL


def test_options_are_validated(cli, tmp_path):
    res = cli("run", "--model", "efficientnet_lite0", "--metric", "robustness", "-o", "metric.corruptions=fogg", "--out", tmp_path)
    assert res.exit_code != 0 and "unknown corruption(s) fogg" in res.stderr
    res = cli("run", "--model", "efficientnet_lite0", "--metric", "robustness", "-o", "metric.severities=[0,6]", "--out", tmp_path)
    assert res.exit_code != 0 and "severities must be" in res.stderr
    res = cli("run", "--model", "efficientnet_lite0", "--metric", "robustness", "-o", "metric.backend=builtin",
              "-o", "metric.corruptions=fog", "--data", "samples", "--limit", "1", "--out", tmp_path)
    assert res.exit_code != 0 and "fog not available" in res.stderr


def test_cli_on_the_fly_on_samples(cli, tmp_path):
    res = cli("run", "--model", "efficientnet_lite0", "--metric", "robustness", "--data", "samples", "--limit", "2",
              "-o", "metric.backend=builtin", "-o", "metric.corruptions=contrast,jpeg_compression",
              "-o", "metric.severities=[2]", "--out", tmp_path, "--quiet", "--plot")
    assert res.exit_code == 0, res.stderr
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    values = result["values"]
    assert result["metric"]["options"]["backend"] == "builtin" and values["backend"] == "builtin"
    assert values["clean_accuracy"] == 1.0  # chelsea and coffee, the documented predictions
    assert values["corruptions"] == ["contrast", "jpeg_compression"] and values["severities"] == [2]
    assert values["retention"] == pytest.approx(result["value"])
    assert (tmp_path / result["artifacts"]["robustness"]).is_file()


# -- the released layout -----------------------------------------------------------------------------
def _imagenet_c(root: Path, with_clean: bool = True) -> Path:
    """A miniature ImageNet-C tree: 2 classes x 1 image, gaussian_noise (1, 5) and contrast (5)."""
    rng = np.random.default_rng(0)
    layout = [("gaussian_noise", 1), ("gaussian_noise", 5), ("contrast", 5)] + ([("clean", None)] if with_clean else [])
    for wnid, name in (("n02124075", "ILSVRC2012_val_00000002.JPEG"), ("n07920052", "ILSVRC2012_val_00000001.JPEG")):
        pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        for corruption, severity in layout:
            folder = root / corruption / ("" if severity is None else str(severity)) / wnid
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / name)
    return root


def test_imagenet_c_dataset_ids_labels_and_image_major_order(tmp_path):
    from harness_plugins.metrics.robustness import ImageNetC

    root = _imagenet_c(tmp_path / "inc")
    samples = ImageNetC(ImageNetC.Options(path=str(root))).samples()
    assert [s.id for s in samples] == [
        "clean/n07920052/ILSVRC2012_val_00000001.JPEG",
        "gaussian_noise/1/n07920052/ILSVRC2012_val_00000001.JPEG",
        "gaussian_noise/5/n07920052/ILSVRC2012_val_00000001.JPEG",
        "contrast/5/n07920052/ILSVRC2012_val_00000001.JPEG",
        "clean/n02124075/ILSVRC2012_val_00000002.JPEG",
        "gaussian_noise/1/n02124075/ILSVRC2012_val_00000002.JPEG",
        "gaussian_noise/5/n02124075/ILSVRC2012_val_00000002.JPEG",
        "contrast/5/n02124075/ILSVRC2012_val_00000002.JPEG",
    ]
    assert {s.label for s in samples} == {285, 967}  # n02124075 Egyptian cat, n07920052 espresso
    only = ImageNetC(ImageNetC.Options(path=str(root), corruptions="contrast", severities=[5])).samples()
    assert [s.id.split("/")[0] for s in only] == ["clean", "contrast", "clean", "contrast"]
    with pytest.raises(HarnessError, match="no folder for fog"):
        ImageNetC(ImageNetC.Options(path=str(root), corruptions="fog")).samples()
    with pytest.raises(HarnessError, match="no corruption folders"):
        ImageNetC(ImageNetC.Options(path=str(tmp_path))).samples()


def test_imagenet_c_clean_from_another_folder_and_grouping(tmp_path):
    from harness_plugins.metrics.robustness import ImageNetC, Robustness

    root = _imagenet_c(tmp_path / "inc", with_clean=False)
    assert all(not s.id.startswith("clean/") for s in ImageNetC(ImageNetC.Options(path=str(root))).samples())
    clean = _imagenet_c(tmp_path / "val", with_clean=True) / "clean"
    samples = ImageNetC(ImageNetC.Options(path=str(root), clean=str(clean))).samples()
    assert sum(s.id.startswith("clean/") for s in samples) == 2
    summary, records = _run(Robustness(), FixedClass(), samples, tmp_path)
    values = summary.values
    assert values["source"] == "dataset" and values["consistency"] is None
    assert values["accuracy"] == {"gaussian_noise": {"1": 0.5, "5": 0.5}, "contrast": {"5": 0.5}}
    assert values["clean_accuracy"] == 0.5 and values["retention"] == pytest.approx(1.0)
    assert values["n"] == {"gaussian_noise": {"1": 2, "5": 2}, "contrast": {"5": 2}}
    assert records[1]["values"] == {"corruption": "gaussian_noise", "severity": 1}
