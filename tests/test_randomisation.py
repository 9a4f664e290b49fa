"""Randomisation sanity checks (plugins/metrics/randomisation.py, randomiser.py, similarity.py).

(a) the similarities equal scipy / scikit-image (Spearman with ties, PAIR normalisations, SSIM, HOG);
(b) units follow the model's structure, the cascade randomises the right units, restores them and
never touches the run's model, and the random values are seeded per module;
(c) MPRT and the random logit test equal a per-image reference written with plain loops, scipy and
scikit-image; a model-independent "explanation" scores 1 (fails the check), saliency does not;
(d) per-image scores do not depend on the batch; originals come from the cache, randomised maps do not
go into it; (e) the runner end to end: result, resume, plots.
"""

from __future__ import annotations

import copy
import json
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.stats
import torch
from skimage.feature import hog
from skimage.metrics import structural_similarity
from torch import nn

from conftest import wrap_module
from harness.components import Attributor
from harness.data import Batch, Sample, sample_seed
from harness.errors import HarnessError
from harness.runner import MetricContext
from harness_plugins.attributors.gradients import Saliency
from harness_plugins.metrics import similarity as S
from harness_plugins.metrics.randomisation import MPRT, MPRTIndependent, RandomLogit, other_class
from harness_plugins.metrics.randomiser import Randomiser, derived_seed, random_values, resolve_units

SIZE = 48  # HOG needs 3 x 3 cells of 16 px


# -- references (numpy / scipy / scikit-image, per image) ---------------------------------------------------
def pair_grayscale(a: np.ndarray, q: float = 99) -> np.ndarray:
    """PAIR saliency's VisualizeImageGrayscale on a 2-D map."""
    x = np.abs(a)
    vmax, vmin = np.percentile(x, q), np.min(x)
    return np.clip((x - vmin) / (vmax - vmin), 0, 1)


def pair_diverging(a: np.ndarray, q: float = 99) -> np.ndarray:
    """PAIR saliency's VisualizeImageDiverging on a 2-D map."""
    span = abs(np.percentile(a, q))
    return np.clip((a - (-span)) / (span - (-span)), -1, 1)


def unit_range(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def reference_similarities(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> dict[str, float]:
    hog_a, hog_b = (hog(unit_range(m), orientations=9, pixels_per_cell=(16, 16), cells_per_block=(3, 3),
                        block_norm="L2-Hys") for m in (a, b))
    return {
        "spearman_abs": scipy.stats.spearmanr(pair_grayscale(a).ravel(), pair_grayscale(b).ravel())[0],
        "spearman": scipy.stats.spearmanr(pair_diverging(a).ravel(), pair_diverging(b).ravel())[0],
        "ssim": structural_similarity(unit_range(a), unit_range(b), gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=True, data_range=data_range),
        "hog": scipy.stats.spearmanr(hog_a, hog_b)[0],
    }


def saliency_one(module: nn.Module, x: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, int]:
    """|d logit / d x| max over channels of one image (target: the module's top-1 when None)."""
    x = x[None].clone().requires_grad_(True)
    out = module(x)
    t = int(out.argmax(1)) if target is None else target
    (grad,) = torch.autograd.grad(out[0, t], x)
    return grad.abs().amax(1)[0].double().numpy(), t


# -- small models and helpers -------------------------------------------------------------------------------
class ConvFC(nn.Module):
    """conv -> tanh -> linear: two units ("conv", "fc") without recognisable blocks."""

    def __init__(self, size: int = SIZE, classes: int = 5, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * size * size, classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class InputMap(Attributor):
    """An "explanation" that ignores the model: |x| summed over channels."""

    id: ClassVar[str] = "input_map"

    def attribute(self, model, inputs, target, seeds):
        return inputs.abs().sum(1)


def images(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 6, 6, generator=g)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + 0.2 * torch.randn(n, 3, size, size, generator=g)


def evaluate(metric, model, x: torch.Tensor, ids: list[str], attributor=None, tmp_path: Path = Path("."), seed: int = 0):
    ctx = MetricContext(models=[model], attributor=attributor or Saliency(), masker=None, seed=seed, batch_size=len(x),
                        out_dir=tmp_path, run_id="t")
    batch = Batch(samples=[Sample(i, "", None) for i in ids], images=[None] * len(ids), seeds=[sample_seed(seed, i) for i in ids])
    batch._inputs[id(model)] = x
    return metric.evaluate(batch, ctx), ctx


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# -- (a) similarities -----------------------------------------------------------------------------------------
def test_spearman_and_pair_normalisations_match_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 20, 17, generator=g, dtype=torch.float64)
    b = a + torch.randn(4, 20, 17, generator=g, dtype=torch.float64)
    a[0, :8] = 0.25  # ties
    b[2] = b[2].round()  # many ties
    for ours, ref in ((S.grayscale, pair_grayscale), (S.diverging, pair_diverging)):
        got = S.spearman(ours(a), ours(b))
        for i in range(4):
            assert np.allclose(ours(a)[i].numpy(), ref(a[i].numpy()).ravel(), atol=1e-12)
            assert got[i].item() == pytest.approx(scipy.stats.spearmanr(ref(a[i].numpy()).ravel(), ref(b[i].numpy()).ravel())[0], abs=1e-12)
    ranks = S.average_ranks(S.flat(b))
    assert np.array_equal(ranks.numpy(), np.stack([scipy.stats.rankdata(r) for r in S.flat(b).numpy()]))
    assert torch.isnan(S.spearman(torch.ones(1, 9, dtype=torch.float64), torch.arange(9.0, dtype=torch.float64)[None])).all()


@pytest.mark.parametrize("data_range", [2.0, 1.0])
def test_ssim_equals_scikit_image(data_range):
    g = torch.Generator().manual_seed(1)
    a = S.minmax(torch.randn(3, 30, 26, generator=g).cumsum(1))
    b = S.minmax(a + 0.3 * torch.randn(3, 30, 26, generator=g, dtype=torch.float64))
    got = S.ssim(a, b, data_range=data_range)
    for i in range(3):
        ref = structural_similarity(a[i].numpy(), b[i].numpy(), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=True, data_range=data_range)
        assert got[i].item() == pytest.approx(ref, abs=1e-12)
    with pytest.raises(HarnessError, match="at least 11 x 11"):
        S.ssim(a[:, :10, :10], b[:, :10, :10])


def test_all_similarities_equal_the_reference_on_maps():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, SIZE, SIZE, generator=g, dtype=torch.float64)
    b = 0.5 * a + torch.randn(2, SIZE, SIZE, generator=g, dtype=torch.float64)
    got = S.similarities(a, b, S.SIMILARITIES)
    for i in range(2):
        ref = reference_similarities(a[i].numpy(), b[i].numpy())
        for name in S.SIMILARITIES:
            assert got[name][i].item() == pytest.approx(ref[name], abs=1e-10), name
    with pytest.raises(HarnessError, match="HOG needs maps of at least 48"):
        S.similarities(a[:, :40, :40], b[:, :40, :40], ("hog",))


# -- (b) units and randomisation ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, labels", [
    ("test_resnet", ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "logits"]),
    ("test_vit", ["stem", *[f"blocks.{i}" for i in range(6)], "pre_logits", "logits"]),
])
def test_block_units_follow_the_model_structure(name, labels):
    import timm

    module = timm.create_model(name)
    units = resolve_units(module, ["blocks"])
    assert [u.label for u in units] == labels
    covered = [t for u in units for t in u.tensors]
    assert sorted(covered) == sorted(n for n, _ in module.named_parameters())  # every parameter exactly once
    if name == "test_vit":
        assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(units[0].tensors)
        assert set(units[-1].tensors) == {"head.weight", "head.bias"}
    stages = [u.label for u in resolve_units(module, ["stages"])]
    assert stages == (["stem", "layer1", "layer2", "layer3", "layer4", "logits"] if name == "test_resnet" else labels)
    modules = resolve_units(module, ["modules"])  # Quantus's layers: every module with reset_parameters and parameters
    assert len(modules) == len([m for m in module.modules() if hasattr(m, "reset_parameters") and list(m.parameters(recurse=False))])
    with pytest.raises(HarnessError, match="matches no module"):
        resolve_units(module, ["nothing.*"])


def test_cascade_randomises_top_down_restores_and_never_touches_the_model():
    import timm

    torch.manual_seed(0)
    module = timm.create_model("test_resnet").eval()
    model = wrap_module(module, size=64)
    before = state(module)
    units = resolve_units(model, ["blocks"])
    values = random_values(module, units, seed=3)
    randomiser = Randomiser(model, units, values, marker="x")
    work = randomiser.copy.module
    assert work is not module and randomiser.copy.weights_sha256 == "x"

    def random_labels() -> set[str]:
        now = dict(work.named_parameters())
        return {u.label for u in units if any(not torch.equal(now[t], before[t]) for t in u.tensors)}

    seen = []
    for unit in randomiser.steps("cascading"):
        seen.append(unit.label)
        assert random_labels() == set(seen)
    assert seen == [u.label for u in reversed(units)]  # logits first, stem last
    assert random_labels() == set()  # restored
    for unit in randomiser.steps("independent"):
        assert random_labels() == {unit.label}
    assert random_labels() == set()
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    # running statistics are kept (not trainable variables); reset as Quantus does with running_stats=reset
    bn = "layer1.0.bn1"
    assert f"{bn}.running_mean" not in values
    assert torch.equal(values[f"{bn}.weight"], torch.ones_like(values[f"{bn}.weight"]))  # BatchNorm's own init
    reset = random_values(module, resolve_units(model, ["blocks"], "reset"), seed=3)
    assert torch.equal(reset[f"{bn}.running_mean"], torch.zeros_like(reset[f"{bn}.running_mean"]))


def test_random_values_are_seeded_per_module_and_use_the_modules_own_initialiser():
    module = ConvFC()
    blocks = random_values(module, resolve_units(module, ["blocks"]), seed=5)
    modules = random_values(module, resolve_units(module, ["modules"]), seed=5)
    assert blocks.keys() == modules.keys() and all(torch.equal(blocks[k], modules[k]) for k in blocks)
    other = random_values(module, resolve_units(module, ["blocks"]), seed=6)
    assert not torch.equal(blocks["fc.weight"], other["fc.weight"])
    reference = copy.deepcopy(module.fc)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(5, "fc"))
        reference.reset_parameters()
    assert torch.equal(blocks["fc.weight"], reference.weight) and torch.equal(blocks["fc.bias"], reference.bias)
    normal = random_values(module, resolve_units(module, ["blocks"]), seed=5, init="normal", normal_std=0.5)
    assert abs(normal["fc.weight"].std().item() - 0.5) < 0.01


# -- (c) the metrics against per-image references -----------------------------------------------------------
@pytest.mark.parametrize("order", ["cascading", "independent"])
def test_mprt_equals_a_per_image_reference(order, tmp_path):
    module = ConvFC()
    model = wrap_module(module, size=SIZE)
    x = images(2)
    metric = MPRT() if order == "cascading" else MPRTIndependent()
    records, _ = evaluate(metric, model, x, ["a", "b"], tmp_path=tmp_path)
    names = ["conv", "fc"]
    for i, record in enumerate(records):
        original, target = saliency_one(module, x[i])
        randomised = copy.deepcopy(module)
        expected: dict[str, list[float]] = {k: [] for k in S.SIMILARITIES}
        explained = []
        for name in reversed(names):  # from the logits down
            if order == "independent":
                randomised = copy.deepcopy(module)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derived_seed(0, name))
                randomised.get_submodule(name).reset_parameters()
            random_map, t = saliency_one(randomised, x[i])  # the randomised model's own top-1
            explained.append(t)
            for k, v in reference_similarities(original, random_map).items():
                expected[k].append(v)
        values = record["values"]
        assert values["layers"] == ["fc", "conv"]
        assert values["target"] == target and values["randomised_target"] == explained
        for k in S.SIMILARITIES:
            assert values["similarity"][k] == pytest.approx(expected[k], abs=1e-6), k
        assert values["score"] == pytest.approx(np.mean(expected["spearman_abs"]), abs=1e-6)


def test_a_model_independent_explanation_fails_the_check_and_saliency_passes(tmp_path):
    model = wrap_module(ConvFC(), size=SIZE)
    x = images(2)
    fixed, _ = evaluate(MPRT(), model, x, ["a", "b"], attributor=InputMap(), tmp_path=tmp_path)
    for record in fixed:
        for k in S.SIMILARITIES:
            assert record["values"]["similarity"][k] == pytest.approx([1.0, 1.0], abs=1e-9)
        assert record["values"]["score"] == pytest.approx(1.0, abs=1e-9)
    real, _ = evaluate(MPRT(), model, x, ["a", "b"], tmp_path=tmp_path)
    assert all(r["values"]["score"] < 0.5 for r in real)


def test_random_logit_equals_a_per_image_reference(tmp_path):
    module = ConvFC(classes=7)
    model = wrap_module(module, size=SIZE)
    x = images(3)
    records, _ = evaluate(RandomLogit(), model, x, ["a", "b", "c"], tmp_path=tmp_path)
    for i, record in enumerate(records):
        values = record["values"]
        original, target = saliency_one(module, x[i])
        assert values["target"] == target and values["random_class"] != target
        assert values["random_class"] == other_class(sample_seed(0, "abc"[i]), target, 7)  # the sample's seed
        other, _ = saliency_one(module, x[i], values["random_class"])
        ref = reference_similarities(original, other)
        assert values["similarity"] == pytest.approx(ref, abs=1e-6)
        assert values["score"] == pytest.approx(ref["ssim"], abs=1e-6)  # Sixt et al. report SSIM


def test_random_class_is_uniform_over_the_other_classes():
    draws = [other_class(seed, 2, 5) for seed in range(2000)]
    counts = np.bincount(draws, minlength=5)
    assert counts[2] == 0 and all(400 < c < 600 for c in counts[[0, 1, 3, 4]])
    assert other_class(123, 0, 1000) == other_class(123, 0, 1000)


# -- (d) per image, cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("metric_cls", [MPRT, RandomLogit])
def test_a_per_image_score_does_not_depend_on_the_batch(metric_cls, tmp_path):
    model = wrap_module(ConvFC(), size=SIZE)
    x = images(4)
    x[3] *= 50  # a much larger map in the batch (Quantus's batch-wide max normalisation would rescale the others)
    ids = ["a", "b", "c", "d"]
    alone, _ = evaluate(metric_cls(), model, x[:1], ids[:1], tmp_path=tmp_path)
    together, _ = evaluate(metric_cls(), model, x[[3, 1, 0]], ["d", "b", "a"], tmp_path=tmp_path)
    a_alone, a_together = alone[0]["values"], together[2]["values"]
    for k in S.SIMILARITIES:
        assert np.allclose(a_together["similarity"][k], a_alone["similarity"][k], atol=1e-6), k
    assert a_together["score"] == pytest.approx(a_alone["score"], abs=1e-6)


def test_originals_come_from_the_cache_and_randomised_maps_stay_out(tmp_path):
    from harness.cache import AttributionCache, CachedAttributor

    cache = AttributionCache(tmp_path / "cache")
    cached = CachedAttributor(Saliency(), cache)
    model = wrap_module(ConvFC(), size=SIZE)
    metric = MPRT(MPRT.Options(similarities=["spearman_abs"]))
    first, _ = evaluate(metric, model, images(2), ["a", "b"], attributor=cached, tmp_path=tmp_path)
    assert (cache.stats.hits, cache.stats.misses, cache.info()["entries"]) == (0, 2, 2)
    second, _ = evaluate(metric, model, images(2), ["a", "b"], attributor=cached, tmp_path=tmp_path)
    assert (cache.stats.hits, cache.info()["entries"]) == (2, 2)
    assert [r["values"] for r in first] == [r["values"] for r in second]


def test_options_are_checked():
    with pytest.raises(ValueError, match="'ssim' is not among the similarities computed"):
        MPRT.Options(similarities="spearman_abs,spearman", headline="ssim")
    assert MPRT.Options(similarities="ssim,hog", headline="ssim").similarities == ["ssim", "hog"]
    with pytest.raises(ValueError):
        MPRT.Options(similarities=["pearson"])
    with pytest.raises(ValueError):
        MPRT.Options(similarities=[])
    assert RandomLogit.Options().headline == "ssim" and RandomLogit.Options(similarities="ssim").similarities == ["ssim"]
    with pytest.raises(ValueError, match="'ssim' is not among"):
        RandomLogit.Options(similarities="spearman")  # the default headline is checked too


# -- (e) the runner end to end --------------------------------------------------------------------------------
@pytest.fixture
def with_plugins(monkeypatch, fresh_registry):
    """The registry with this module's metrics (until the lead adds their entry points)."""
    import harness.plugins

    real = metadata.entry_points
    extra = [metadata.EntryPoint(name=n, value=f"harness_plugins.metrics.{n}", group="harness")
             for n in ("randomisation", "complexity", "completeness")]

    def entry_points(**kwargs):
        found = real(**kwargs)
        if kwargs.get("group") != "harness":
            return found
        names = {e.name for e in found}
        return [*found, *(e for e in extra if e.name not in names)]

    monkeypatch.setattr(harness.plugins.metadata, "entry_points", entry_points)


def test_runner_result_resume_and_plots(with_plugins, tmp_path):
    from _rep_helpers import image_folder
    from harness.results import read_result
    from harness.runner import RunConfig, run

    folder = image_folder(tmp_path / "data", 3, size=64)
    config = RunConfig(models=["test_resnet"], metric="mprt", attributor="saliency", data=f"folder:{folder}",
                       batch_size=2, random_init=True, options=["metric.similarities=spearman_abs,ssim"],
                       out=tmp_path / "out", quiet=True, cache_dir=tmp_path / "cache")
    path = run(config)
    result = read_result(path)
    assert result.metric.higher_is_better is False
    assert result.values["layers"] == ["logits", "layer4.0", "layer3.0", "layer2.0", "layer1.0", "stem"]
    assert set(result.values["curves"]) == {"spearman_abs", "ssim"}
    samples = path.parent / f"{result.run_id}.samples.jsonl"
    lines = samples.read_text().splitlines()
    scores = [json.loads(line)["values"]["score"] for line in lines]
    assert result.value == pytest.approx(np.mean(scores), abs=1e-12)
    samples.write_text(lines[0] + "\n")  # interrupted after the first sample
    config.resume = True
    resumed = read_result(run(config))
    assert resumed.value == pytest.approx(result.value, abs=1e-6)
    metric = MPRT(MPRT.Options(similarities=["spearman_abs", "ssim"]))
    from harness.results import SamplesFile

    written = metric.plot(resumed, SamplesFile(samples).read(), path.parent)
    assert set(written) == {"curve", "maps"}
    assert all((path.parent / p).stat().st_size > 1000 for p in written.values())


def test_one_sort_ranks_equal_the_ranks_of_the_normalised_maps():
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(3, 25, 25, generator=g)
    maps[1, :5] = 0.0
    maps[2] = maps[2].abs().round()
    for fused, plain in ((S.grayscale_ranks, S.grayscale), (S.diverging_ranks, S.diverging)):
        assert torch.equal(fused(maps), S.average_ranks(plain(maps)))
    maps[0, 3, 3] = float("nan")
    assert torch.isnan(S.similarities(maps, maps, ("spearman_abs", "spearman"))["spearman"][0])


def test_the_copy_computes_with_its_own_parameters_when_forward_was_wrapped(tmp_path):
    module = ConvFC()
    inner = module.forward
    module.forward = lambda x: inner(x)  # as --precision's autocast does: a closure over the original module
    model = wrap_module(module, size=SIZE)
    records, _ = evaluate(MPRT(MPRT.Options(similarities=["spearman_abs"])), model, images(2), ["a", "b"], tmp_path=tmp_path)
    assert all(r["values"]["score"] < 0.9 for r in records)  # the randomised copy ran, not the original
    assert "forward" in module.__dict__  # the run's model keeps its wrapper
