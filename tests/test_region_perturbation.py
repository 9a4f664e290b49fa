"""MoRF and LeRF (plugins/metrics/region_perturbation.py, harness/sweep.py), ABPC in the leaderboard
(harness/leaderboard.py) and the seed-004 suite.

(a) on a model whose class score is a known weighted sum of patches, a perfect attribution gives
    the analytic curves, MoRF < LeRF, and beats the random control on both;
(b) MoRF and LeRF remove patches in exactly opposite orders (the composites are recorded);
(c) defaults: patch:8 granularity, one step per patch unless `steps` is set;
(d) `harness leaderboard` derives ABPC = LeRF - MoRF with the paired standard error;
(e) the seed004 suite expands to the 6 runs of seed 004 with its parameters.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from harness.components import Attributor
from harness.data import Batch, Sample
from harness.regions import Granularity
from harness.runner import MetricContext, RunConfig
from harness.sweep import perturbation_curves
from harness_plugins.attributors.random_map import RandomMap
from harness_plugins.maskers.fills import BlackFill
from harness_plugins.metrics.region_perturbation import LeRF, MoRF

from conftest import wrap_module

SIZE, PATCH = 32, 8
N_PATCHES = (SIZE // PATCH) ** 2  # 16
# distinct per-patch weights (row-major patch index), a fixed shuffled order
WEIGHTS = torch.tensor([3, 11, 7, 15, 1, 9, 13, 5, 14, 2, 8, 0, 6, 12, 4, 10], dtype=torch.float32) / 15


def patch_means(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) -> (B, 16) mean of every 8 x 8 patch (row-major)."""
    return torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), PATCH).flatten(1)


class PatchNet(torch.nn.Module):
    """Class 0's logit is 2 x sum_p WEIGHTS[p] * mean(patch p); the 9 other logits are 0."""

    def forward(self, x):
        evidence = 2 * (patch_means(x) * WEIGHTS.to(x)).sum(1)
        return torch.cat([evidence[:, None], torch.zeros(len(x), 9, dtype=x.dtype, device=x.device)], 1)


class PerfectAttributor(Attributor):
    """Every pixel of patch p gets WEIGHTS[p]: the model's own evidence."""

    id: ClassVar[str] = "perfect"

    def attribute(self, model, inputs, target, seeds):
        grid = WEIGHTS.view(1, 1, SIZE // PATCH, SIZE // PATCH)
        return torch.nn.functional.interpolate(grid, scale_factor=PATCH, mode="nearest")[:, 0].expand(len(inputs), -1, -1).clone()


def _batch(n=3, seed=7):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(150, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]
    return Batch(samples=[Sample(id=f"img{i}", path="") for i in range(n)], images=images, seeds=[11 * (i + 1) for i in range(n)])


def _evaluate(metric, attributor, tmp_path, module=None, batch=None, granularity=None):
    model = wrap_module(module or PatchNet(), size=SIZE, batch_size=8)
    masker = BlackFill(BlackFill.Options(granularity=granularity))
    ctx = MetricContext(models=[model], attributor=attributor, masker=masker, seed=0, batch_size=8,
                        out_dir=tmp_path, run_id="constructed")
    batch = batch or _batch()
    return metric.evaluate(batch, ctx), model, batch, ctx


def _softmax0(evidence: float) -> float:
    return math.exp(evidence) / (math.exp(evidence) + 9)


# -- (a) a model whose evidence is known ---------------------------------------------------------------------
def test_perfect_attribution_curves_are_analytic(tmp_path):
    morf, model, batch, _ = _evaluate(MoRF(), PerfectAttributor(), tmp_path)
    lerf, *_ = _evaluate(LeRF(), PerfectAttributor(), tmp_path, batch=batch)
    means = patch_means(batch.inputs(model))
    descending = torch.argsort(WEIGHTS, descending=True).tolist()
    for b, (m, l) in enumerate(zip(morf, lerf)):
        contributions = (2 * WEIGHTS * means[b]).tolist()  # black = 0 removes a patch's evidence entirely
        for record, order in ((m, descending), (l, descending[::-1])):
            expected = [_softmax0(sum(contributions[p] for p in order[k:])) for k in range(N_PATCHES + 1)]
            np.testing.assert_allclose(record["values"]["curve"], expected, rtol=1e-5)
            auc = sum((expected[i] + expected[i + 1]) / 2 for i in range(N_PATCHES)) / N_PATCHES
            assert record["values"]["auc"] == pytest.approx(auc, rel=1e-5)
            assert record["values"]["target"] == 0 and record["prediction"] == 0


def test_perfect_beats_random_and_morf_below_lerf(tmp_path):
    results = {}
    for name, attributor in (("perfect", PerfectAttributor()), ("random", RandomMap())):
        for metric in (MoRF(), LeRF()):
            records, *_ = _evaluate(metric, attributor, tmp_path)
            results[name, metric.id] = np.array([r["values"]["auc"] for r in records])
    assert (results["perfect", "morf"] < results["perfect", "lerf"] - 0.1).all(), results
    assert (results["perfect", "morf"] < results["random", "morf"] - 0.02).all(), results
    assert (results["perfect", "lerf"] > results["random", "lerf"] + 0.02).all(), results
    assert MoRF.higher_is_better is False and LeRF.higher_is_better is True


# -- (b) opposite orders ----------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """Records every input row it sees; its logits are a fixed function of the image."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return PatchNet()(x)


def _removed_patches(composites: torch.Tensor) -> list[set[int]]:
    """Inputs all 1, baseline 0: a composite is its keep-mask; the patches set to 0 were removed."""
    means = patch_means(composites)
    assert torch.all((means == 0) | (means == 1))  # hard patches, nothing partial
    return [set(torch.nonzero(row == 0).flatten().tolist()) for row in means]


@pytest.mark.parametrize("batch_size", [5, 64])
def test_morf_and_lerf_remove_in_opposite_orders(batch_size):
    recorder = Recorder()
    model = wrap_module(recorder, size=SIZE, batch_size=batch_size)
    scores = torch.randperm(N_PATCHES, generator=torch.Generator().manual_seed(3)).float()  # distinct
    attribution = torch.nn.functional.interpolate(scores.view(1, 1, 4, 4), scale_factor=PATCH, mode="nearest")[:, 0]
    attribution = attribution + 0.01 * torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    granularity = Granularity.parse("patch:8", SIZE, SIZE)
    ones = torch.ones(1, 3, SIZE, SIZE)
    removed = {}
    for order in ("most", "least"):
        recorder.seen.clear()
        perturbation_curves(model, ones, torch.zeros_like(ones), attribution, granularity, steps=N_PATCHES,
                            mode="remove", order=order, target=torch.tensor([0]))
        composites = torch.cat(recorder.seen)
        assert len(composites) == N_PATCHES + 1  # no clean score given: every point is evaluated, in order
        removed[order] = _removed_patches(composites)
    ranking = torch.argsort(scores, descending=True).tolist()  # most relevant patch first
    for k in range(N_PATCHES + 1):
        assert removed["most"][k] == set(ranking[:k])
        assert removed["least"][k] == set(ranking[N_PATCHES - k :])
        # the k-th MoRF mask is the complement of the (16 - k)-th LeRF mask
        all_patches = set(range(N_PATCHES))
        assert removed["most"][k] == all_patches - removed["least"][N_PATCHES - k]


def test_metrics_pass_their_order_to_the_sweep(tmp_path):
    """Through MoRF/LeRF.evaluate: the composites after the clean pass follow the attribution's order."""
    white = Image.fromarray(np.full((SIZE, SIZE, 3), 255, dtype=np.uint8))
    batch = Batch(samples=[Sample(id="w", path="")], images=[white], seeds=[1])
    ranking = torch.argsort(WEIGHTS, descending=True).tolist()
    for metric, expected in ((MoRF(), ranking), (LeRF(), ranking[::-1])):
        recorder = Recorder()
        records, model, *_ = _evaluate(metric, PerfectAttributor(), tmp_path, module=recorder, batch=batch)
        assert torch.equal(batch.inputs(model), torch.ones(1, 3, SIZE, SIZE))
        composites = torch.cat(recorder.seen[1:])  # the first pass is the clean image
        # step 0 reuses the clean score: steps 1..16 are evaluated
        assert len(composites) == N_PATCHES
        removed = _removed_patches(composites)
        for k in range(1, N_PATCHES + 1):
            assert removed[k - 1] == set(expected[:k]), (metric.id, k)
        assert records[0]["values"]["curve"][0] == records[0]["values"]["clean_score"]


# -- (c) defaults --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric_cls", [MoRF, LeRF])
def test_default_granularity_and_steps(tmp_path, metric_cls):
    records, _, _, ctx = _evaluate(metric_cls(), RandomMap(), tmp_path)
    assert all(len(r["values"]["curve"]) == N_PATCHES + 1 for r in records)  # patch:8 -> 16 patches -> 16 steps
    summary = metric_cls().summarize([{"sample_id": f"img{i}", **r} for i, r in enumerate(records)], ctx)
    assert summary.values["granularity"] == "patch:8" and summary.values["steps"] == N_PATCHES
    assert summary.value == pytest.approx(np.mean([r["values"]["auc"] for r in records]))
    # steps set: that many points after 0 (capped at the number of regions)
    four, *_ = _evaluate(metric_cls(metric_cls.Options(steps=4)), RandomMap(), tmp_path)
    assert all(len(r["values"]["curve"]) == 5 for r in four)
    many, *_ = _evaluate(metric_cls(metric_cls.Options(steps=100)), RandomMap(), tmp_path)
    assert all(len(r["values"]["curve"]) == N_PATCHES + 1 for r in many)
    # the masker's granularity overrides the default
    grid, *_ = _evaluate(metric_cls(), RandomMap(), tmp_path, granularity="patch:16")
    assert all(len(r["values"]["curve"]) == 5 for r in grid)
    assert metric_cls.default_masker == "blur"


# -- (d) ABPC in the leaderboard -------------------------------------------------------------------------------------------
def test_leaderboard_abpc_is_lerf_minus_morf_with_paired_stderr(cli, tmp_path):
    out = tmp_path / "results"
    for metric in ("morf", "lerf"):
        res = cli("run", "--model", "test_resnet", "--random-init", "--metric", metric, "--limit", "2",
                  "-o", "metric.steps=4", "--out", str(out), "--quiet")
        assert res.exit_code == 0, res.stderr
    results, aucs = {}, {}
    for path in out.glob("*.json"):
        result = json.loads(path.read_text())
        metric = result["metric"]["id"]
        results[metric] = result
        lines = path.with_name(f"{result['run_id']}.samples.jsonl").read_text().splitlines()
        aucs[metric] = {r["sample_id"]: r["values"]["auc"] for r in map(json.loads, lines)}
    assert set(results) == {"morf", "lerf"} and set(aucs["morf"]) == set(aucs["lerf"]) == {"chelsea", "coffee"}
    assert results["morf"]["values"]["granularity"] == "patch:8" and results["morf"]["values"]["steps"] == 4

    res = cli("leaderboard", str(out), "--format", "json")
    assert res.exit_code == 0, res.stderr
    (board,) = json.loads(res.stdout)["tables"]  # one dataset and sample set: one table
    column = "abpc steps=4 (saliency, blur:patch:8)"  # steps=4 is not the default, so the header shows it
    assert any(c["name"] == column and c["higher_is_better"] is True for c in board["columns"])
    (row,) = board["rows"]
    assert row["model"] == "test_resnet [random-init]"
    cell = row["cells"][column]
    assert cell["value"] == pytest.approx(results["lerf"]["value"] - results["morf"]["value"], rel=1e-9, abs=1e-12)
    diffs = [aucs["lerf"][k] - aucs["morf"][k] for k in ("chelsea", "coffee")]
    paired = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs)))
    assert cell["stderr"] == pytest.approx(paired, rel=1e-9, abs=1e-15)
    assert cell["n"] == 2
    # the paired error is not the unpaired one (the test can tell them apart)
    unpaired = math.hypot(results["lerf"]["stderr"], results["morf"]["stderr"])
    assert abs(unpaired - paired) > 1e-3 * max(unpaired, paired)

    markdown = cli("leaderboard", str(out)).stdout
    assert "abpc steps=4 (saliency, blur:patch:8) ↑" in markdown


# -- (e) the seed004 suite -----------------------------------------------------------------------------------------------------
def test_seed004_suite_expands_to_six_runs():
    from harness.registry import get_registry
    from harness.runner import resolve
    from harness.suites import expand_suite

    reg = get_registry()
    configs = expand_suite("seed004", RunConfig(models=[], metric="", data=""), reg)
    combos = sorted((tuple(c.models), c.metric, c.attributor) for c in configs)
    assert combos == sorted(
        (("resnet18",), metric, attributor)
        for metric in ("morf", "lerf")
        for attributor in ("saliency", "integrated_gradients", "smoothgrad")
    )
    assert len(configs) == 6
    # resolving (no model is loaded) gives seed 004's parameters and MoRF/LeRF's defaults
    runs = [resolve(c, reg) for c in configs]
    assert len({r.run_id for r in runs}) == 6
    for run in runs:
        assert run.masker.id == "blur" and run.masker.options.granularity is None  # -> patch:8
        assert run.metric.steps(Granularity.parse("patch:8", 224, 224)) == 28 * 28
        options = run.attributor.options
        if run.attributor.id == "integrated_gradients":
            assert options.steps == 25 and options.baseline == "black"
        if run.attributor.id == "smoothgrad":
            assert options.samples == 25 and options.sigma == 0.15
