"""Insertion and deletion (plugins/metrics/insertion_deletion.py, harness/sweep.py, harness/stats.py).

(a) the CLI's curves and AUCs equal an independent per-image, per-step reference;
(b) a perfect attribution beats the random control on a model whose evidence is known;
(c) the trapezoid AUC; (d) curve endpoints; (e) the sweep is batched and reuses the clean endpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from harness.components import Attributor
from harness.data import Batch, Sample
from harness.regions import Granularity
from harness.runner import MetricContext
from harness.stats import trapezoid_auc
from harness.sweep import perturbation_curves, step_counts
from harness_plugins.attributors.random_map import RandomMap
from harness_plugins.maskers.fills import BlackFill, BlurFill
from harness_plugins.metrics.insertion_deletion import Deletion, Insertion

from conftest import wrap_module

STEPS = 10


# -- independent reference ---------------------------------------------------------------------------
def _blur_reference(x: np.ndarray, size: int = 51, sigma: float = 50.0) -> np.ndarray:
    """OpenCV-style Gaussian kernel, reflect-101 borders, separable (scipy), float64. x: (3, H, W)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    g /= g.sum()
    out = ndimage.correlate1d(x.astype(np.float64), g, axis=1, mode="mirror")
    return ndimage.correlate1d(out, g, axis=2, mode="mirror")


def _reference_run(module: torch.nn.Module, inputs: torch.Tensor, steps: int, descending: bool = True):
    """Per image: target, clean score, and insertion/deletion curves from plain Python loops."""
    out = []
    for b in range(len(inputs)):
        x = inputs[b : b + 1].detach().clone()
        with torch.no_grad():
            clean_logits = module(x)
        target = int(clean_logits.argmax(1))
        clean = float(clean_logits.softmax(1)[0, target])
        # saliency: |d logit_target / dx|, max over channels (the attributor's default score is the logit)
        xg = x.clone().requires_grad_(True)
        module(xg)[0, target].backward()
        saliency = xg.grad.abs().amax(1)[0].numpy().reshape(-1)
        order = np.argsort(-saliency if descending else saliency, kind="stable")
        baseline = torch.from_numpy(_blur_reference(x[0].numpy())).float()[None]
        n = saliency.size
        curves = {}
        for mode in ("insert", "remove"):
            curve = []
            for k in range(steps + 1):
                count = int(round(k * n / steps))
                moved = np.zeros(n, dtype=np.float32)
                moved[order[:count]] = 1
                keep = moved if mode == "insert" else 1 - moved
                mask = torch.from_numpy(keep).view(1, 1, *x.shape[-2:])
                composite = mask * x + (1 - mask) * baseline
                with torch.no_grad():
                    curve.append(float(module(composite).softmax(1)[0, target]))
            curves[mode] = np.array(curve)
        aucs = {m: float(np.sum((c[1:] + c[:-1]) / 2) / steps) for m, c in curves.items()}
        with torch.no_grad():
            base_score = float(module(baseline).softmax(1)[0, target])
        out.append({"target": target, "clean": clean, "curves": curves, "aucs": aucs, "baseline_score": base_score})
    return out


def _read_run(out: Path):
    results = [p for p in out.glob("*.json")]
    assert len(results) == 1, results
    result = json.loads(results[0].read_text())
    samples = [json.loads(line) for line in results[0].with_suffix("").with_suffix(".samples.jsonl").read_text().splitlines()]
    return result, samples


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """`harness run --metric insertion|deletion` on test_resnet (random init, seed 0), chelsea + coffee."""
    from conftest import run_cli

    runs = {}
    for metric in ("insertion", "deletion"):
        out = tmp_path_factory.mktemp(metric)
        res = run_cli("run", "--model", "test_resnet", "--random-init", "--metric", metric, "--limit", "2",
                      "-o", f"metric.steps={STEPS}", "--batch-size", "8", "--seed", "0", "--out", str(out), "--quiet")
        assert res.exit_code == 0, res.stderr
        runs[metric] = _read_run(out)
    return runs


@pytest.fixture(scope="module")
def reference():
    """The same model and images, computed independently of the harness."""
    import skimage.data
    import timm
    import timm.data

    torch.manual_seed(0)  # the harness seeds --random-init with --seed before building
    module = timm.create_model("test_resnet", pretrained=False).eval()
    config = timm.data.resolve_data_config(model=module)
    transform = timm.data.create_transform(**config, is_training=False)
    root = Path(skimage.data.__file__).parent
    images = [Image.open(root / name).convert("RGB") for name in ("chelsea.png", "coffee.png")]
    inputs = torch.stack([transform(img) for img in images])
    return module, inputs, _reference_run(module, inputs, STEPS)


def _rel_close(a, b, rtol=1e-4, atol=1e-8):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("metric,mode", [("insertion", "insert"), ("deletion", "remove")])
def test_cli_matches_independent_reference(cli_runs, reference, metric, mode):
    result, samples = cli_runs[metric]
    _, _, ref = reference
    assert [s["sample_id"] for s in samples] == ["chelsea", "coffee"]
    for record, r in zip(samples, ref):
        values = record["values"]
        assert values["target"] == r["target"] == record["prediction"]
        assert len(values["curve"]) == STEPS + 1
        _rel_close(values["clean_score"], r["clean"])
        _rel_close(values["curve"], r["curves"][mode])
        _rel_close(values["auc"], r["aucs"][mode])
    # the headline is the mean AUC, with the standard error of the mean
    aucs = [r["aucs"][mode] for r in ref]
    _rel_close(result["value"], np.mean(aucs))
    _rel_close(result["stderr"], np.std(aucs, ddof=1) / math.sqrt(len(aucs)), rtol=1e-3)
    assert result["values"]["steps"] == STEPS and result["values"]["granularity"] == "pixel"
    _rel_close(result["values"]["mean_curve"], np.mean([r["curves"][mode] for r in ref], axis=0))
    assert result["metric"]["higher_is_better"] is (metric == "insertion")
    assert result["attributor"]["id"] == "saliency" and result["masker"]["id"] == "blur"


def test_reference_has_the_power_to_tell_orders_apart(cli_runs, reference):
    """The comparison above would notice a reversed ranking (the curves are not flat at 1e-4)."""
    module, inputs, _ = reference
    reversed_ref = _reference_run(module, inputs[:1], STEPS, descending=False)[0]
    harness_curve = np.array(cli_runs["insertion"][1][0]["values"]["curve"])
    rel = np.abs(reversed_ref["curves"]["insert"] - harness_curve) / np.abs(harness_curve)
    assert rel.max() > 1e-3


# -- (d) endpoints ---------------------------------------------------------------------------------------
def test_curve_endpoints(cli_runs, reference):
    _, _, ref = reference
    _, ins = cli_runs["insertion"]
    _, dele = cli_runs["deletion"]
    for i, d, r in zip(ins, dele, ref):
        # the endpoint that keeps the whole image is the clean score itself
        assert i["values"]["curve"][-1] == i["values"]["clean_score"]
        assert d["values"]["curve"][0] == d["values"]["clean_score"]
        # the endpoint that keeps nothing is the score of the (blurred) baseline
        _rel_close(i["values"]["curve"][0], r["baseline_score"])
        _rel_close(d["values"]["curve"][-1], r["baseline_score"])


def test_computed_endpoint_equals_clean_score():
    """Without clean_scores the full-image point is evaluated, and equals the clean score."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                 torch.nn.Flatten(), torch.nn.Linear(16, 5))
    model = wrap_module(module, size=16, batch_size=4)
    inputs = torch.randn(2, 3, 16, 16)
    baseline = torch.zeros_like(inputs)
    attribution = torch.rand(2, 16, 16)
    g = Granularity.parse("pixel", 16, 16)
    with torch.no_grad():
        logits = module(inputs)
        base = module(baseline)
    target = logits.argmax(1)
    clean = logits.softmax(1).gather(1, target[:, None])[:, 0]
    base_score = base.softmax(1).gather(1, target[:, None])[:, 0]
    ins = perturbation_curves(model, inputs, baseline, attribution, g, steps=4, mode="insert", target=target)
    dele = perturbation_curves(model, inputs, baseline, attribution, g, steps=4, mode="remove", target=target)
    assert torch.allclose(ins[:, -1], clean, atol=1e-6) and torch.allclose(ins[:, 0], base_score, atol=1e-6)
    assert torch.allclose(dele[:, 0], clean, atol=1e-6) and torch.allclose(dele[:, -1], base_score, atol=1e-6)


# -- (b) a model whose evidence is known ------------------------------------------------------------------
SIZE = 32


class QuadrantNet(torch.nn.Module):
    """Class 0's logit is 10 x the mean of the top-left quadrant; the 9 other logits are 0."""

    def forward(self, x):
        evidence = 10 * x[:, :, : SIZE // 2, : SIZE // 2].mean((1, 2, 3))
        return torch.cat([evidence[:, None], torch.zeros(len(x), 9, dtype=x.dtype, device=x.device)], 1)


class PerfectAttributor(Attributor):
    """1 on the top-left quadrant, 0 elsewhere."""

    id: ClassVar[str] = "perfect"

    def attribute(self, model, inputs, target, seeds):
        maps = torch.zeros(len(inputs), SIZE, SIZE)
        maps[:, : SIZE // 2, : SIZE // 2] = 1
        return maps


def _quadrant_batch():
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(60, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(3)]
    samples = [Sample(id=f"img{i}", path="") for i in range(3)]
    return Batch(samples=samples, images=images, seeds=[101, 202, 303])


def _evaluate(metric, attributor, masker, tmp_path, batch_size=16):
    model = wrap_module(QuadrantNet(), size=SIZE, batch_size=batch_size)
    ctx = MetricContext(models=[model], attributor=attributor, masker=masker, seed=0, batch_size=batch_size,
                        out_dir=tmp_path, run_id="constructed")
    return metric.evaluate(_quadrant_batch(), ctx), model


@pytest.mark.parametrize("granularity", [None, "patch:8", "grid:4"])
def test_perfect_attribution_beats_random(tmp_path, granularity):
    masker = BlackFill(BlackFill.Options(granularity=granularity))
    steps = Insertion.Options(steps=16)
    ins_perfect, _ = _evaluate(Insertion(steps), PerfectAttributor(), masker, tmp_path)
    ins_random, _ = _evaluate(Insertion(steps), RandomMap(), masker, tmp_path)
    del_perfect, _ = _evaluate(Deletion(steps), PerfectAttributor(), masker, tmp_path)
    del_random, _ = _evaluate(Deletion(steps), RandomMap(), masker, tmp_path)
    for ip, ir, dp, dr in zip(ins_perfect, ins_random, del_perfect, del_random):
        assert ip["prediction"] == 0 and ip["values"]["target"] == 0
        assert ip["values"]["auc"] > ir["values"]["auc"] + 0.05
        assert dp["values"]["auc"] < dr["values"]["auc"] - 0.05
        if granularity != "grid:4":  # hard regions: the quadrant is exactly the first quarter of them
            # perfect insertion reaches the clean score once the quadrant is in; deletion then is at chance
            assert ip["values"]["curve"][4] == pytest.approx(ip["values"]["clean_score"], abs=1e-5)
            assert dp["values"]["curve"][4] == pytest.approx(0.1, abs=1e-5)  # logits all 0 -> 1/10


@pytest.mark.parametrize("score", ["softmax", "logit"])
def test_perfect_insertion_patch_curve_is_analytic(tmp_path, score):
    """patch:8 on 32 px: the quadrant is patches 0, 1, 4, 5 (inserted in index order), black = 0."""
    masker = BlackFill(BlackFill.Options(granularity="patch:8"))
    records, model = _evaluate(Insertion(Insertion.Options(steps=16, score=score)), PerfectAttributor(), masker, tmp_path)
    inputs = _quadrant_batch().inputs(model)
    for b, record in enumerate(records):
        x = inputs[b]
        patch_sums = [float(x[:, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].sum()) for r, c in [(0, 0), (0, 1), (1, 0), (1, 1)]]
        expected = []
        for k in range(17):
            evidence = 10 * sum(patch_sums[: min(k, 4)]) / (3 * 16 * 16)
            expected.append(math.exp(evidence) / (math.exp(evidence) + 9) if score == "softmax" else evidence)
        np.testing.assert_allclose(record["values"]["curve"], expected, rtol=1e-5)
        auc = sum((expected[i] + expected[i + 1]) / 2 for i in range(16)) / 16
        assert record["values"]["auc"] == pytest.approx(auc, rel=1e-5)


def test_target_label_scores_the_ground_truth_class(tmp_path):
    """target=label scores the labelled class (the prediction where there is no label)."""
    from harness_plugins.metrics.insertion_deletion import choose_targets

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert choose_targets(logits, [None, None], "predicted").tolist() == [1, 0]
    assert choose_targets(logits, [2, None], "label").tolist() == [2, 0]
    assert choose_targets(logits, [2, 1], "predicted").tolist() == [1, 0]
    batch = _quadrant_batch()
    batch = Batch(samples=[Sample(id=s.id, path="", label=3) for s in batch.samples], images=batch.images, seeds=batch.seeds)
    model = wrap_module(QuadrantNet(), size=SIZE)
    ctx = MetricContext(models=[model], attributor=PerfectAttributor(), masker=BlackFill(), seed=0, batch_size=16,
                        out_dir=tmp_path, run_id="label")
    records = Insertion(Insertion.Options(steps=4, target="label")).evaluate(batch, ctx)
    for record, x in zip(records, batch.inputs(model)):
        assert record["prediction"] == 0 and record["values"]["target"] == 3
        evidence = 10 * float(x[:, :16, :16].mean())
        assert record["values"]["clean_score"] == pytest.approx(1 / (math.exp(evidence) + 9), rel=1e-5)
        assert record["values"]["curve"][0] == pytest.approx(0.1, rel=1e-5)  # black baseline: uniform


# -- (c) the AUC -------------------------------------------------------------------------------------------
def test_trapezoid_auc():
    assert float(trapezoid_auc(torch.full((7,), 0.3, dtype=torch.float64))) == pytest.approx(0.3)
    assert float(trapezoid_auc(torch.linspace(0, 1, 11, dtype=torch.float64))) == pytest.approx(0.5)
    assert float(trapezoid_auc(torch.linspace(1, 0, 51, dtype=torch.float64))) == pytest.approx(0.5)
    assert float(trapezoid_auc(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))) == pytest.approx(0.5)
    assert float(trapezoid_auc(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))) == pytest.approx(1 / 6)
    batch = trapezoid_auc(torch.tensor([[0.2, 0.2, 0.2], [0.0, 0.5, 1.0]], dtype=torch.float64))
    assert batch.tolist() == pytest.approx([0.2, 0.5])
    # agrees with numpy's trapezoid on the unit interval
    curve = np.random.default_rng(0).uniform(size=9)
    assert float(trapezoid_auc(torch.from_numpy(curve))) == pytest.approx(np.trapezoid(curve, dx=1 / 8))


def test_step_counts():
    assert step_counts(100, 4).tolist() == [0, 25, 50, 75, 100]
    assert step_counts(7, 4).tolist() == [0, 2, 4, 5, 7]  # round(1.75), round(3.5), round(5.25)
    assert step_counts(10, 3).tolist() == [0, 3, 7, 10]
    assert step_counts(49, 49).tolist() == list(range(50))
    counts = step_counts(25600, 50)
    assert counts[0] == 0 and counts[-1] == 25600 and len(counts) == 51


# -- (e) batching and forward-pass count -------------------------------------------------------------------
def _counting_model(batch_size):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten(), torch.nn.Linear(4, 5))
    rows: list[int] = []
    module.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    return wrap_module(module, size=16, batch_size=batch_size), rows


@pytest.mark.parametrize("mode", ["insert", "remove"])
@pytest.mark.parametrize("n_images,steps,batch_size", [(1, 8, 3), (2, 8, 5), (3, 5, 64), (2, 7, 1)])
def test_sweep_forward_passes(mode, n_images, steps, batch_size):
    model, rows = _counting_model(batch_size)
    inputs = torch.randn(n_images, 3, 16, 16)
    with torch.no_grad():
        logits = model.module(inputs)
    rows.clear()
    target = logits.argmax(1)
    clean = logits.softmax(1).gather(1, target[:, None])[:, 0]
    curves = perturbation_curves(model, inputs, torch.zeros_like(inputs), torch.rand(n_images, 16, 16),
                                 Granularity.parse("pixel", 16, 16), steps=steps, mode=mode, target=target,
                                 clean_scores=clean)
    assert tuple(curves.shape) == (n_images, steps + 1)
    # S points per image (the shared full-image endpoint is reused), in full chunks across images and steps
    assert sum(rows) == steps * n_images
    assert len(rows) == math.ceil(steps * n_images / batch_size)
    assert all(r == batch_size for r in rows[:-1])


def test_metric_forward_passes(tmp_path):
    """One image, steps = 8, batch size 3: one clean pass + ceil(8 / 3) sweep passes (random map: none)."""
    model, rows = _counting_model(3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
    batch = Batch(samples=[Sample(id="a", path="")], images=[image], seeds=[1])
    ctx = MetricContext(models=[model], attributor=RandomMap(), masker=BlurFill(BlurFill.Options(kernel_size=5, sigma=2.0)),
                        seed=0, batch_size=3, out_dir=tmp_path, run_id="count")
    records = Insertion(Insertion.Options(steps=8)).evaluate(batch, ctx)
    assert len(records[0]["values"]["curve"]) == 9
    assert rows == [1, 3, 3, 2]
