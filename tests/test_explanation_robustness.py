"""Max-/avg-sensitivity and the local Lipschitz estimate (plugins/metrics/explanation_robustness.py).

(a) maps that cannot change give 0: a constant attributor, saliency of a linear model, a seeded random map;
(b) hand cases: a map that is c times the input has Lipschitz constant c (1/std in pixel units);
    sensitivities equal a per-image, per-draw loop over the published perturbations;
(c) scores do not depend on the batch or the chunk size; copies mix images in full chunks and bypass the cache;
(d) directions (lower is better) and option errors.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from harness.components import Attributor
from harness.data import Batch, Sample
from harness.errors import HarnessError
from harness.options import build_options
from harness.runner import MetricContext
from harness_plugins.attributors.gradients import Saliency
from harness_plugins.attributors.random_map import RandomMap
from harness_plugins.metrics.explanation_robustness import (
    AvgSensitivity,
    LipschitzOptions,
    LocalLipschitz,
    MaxSensitivity,
    SensitivityOptions,
    perturbation,
)

from conftest import wrap_module

SIZE = 8


class Constant(Attributor):
    """The same map for every input."""

    id: ClassVar[str] = "constant"

    def attribute(self, model, inputs, target, seeds):
        return torch.linspace(0, 1, SIZE * SIZE).view(1, SIZE, SIZE).expand(len(inputs), -1, -1).clone()


class Scaled(Attributor):
    """c times the input, as a (3H, W) map: ||e(x) - e(x')|| = c ||x - x'|| exactly."""

    id: ClassVar[str] = "scaled"
    c: float = 2.5
    calls: list[int] = []

    def attribute(self, model, inputs, target, seeds):
        Scaled.calls.append(len(inputs))
        return self.c * inputs.reshape(len(inputs), -1, inputs.shape[-1])


def _conv_model(batch_size: int = 4):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten(), torch.nn.Linear(4, 5))
    return wrap_module(module, size=SIZE, batch_size=batch_size)


def _linear_model(batch_size: int = 4):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 5))
    return wrap_module(module, size=SIZE, batch_size=batch_size)


def _batch(ids=("a", "b", "c")):
    rng = np.random.default_rng(0)
    images = {i: Image.fromarray(rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)) for i in ("a", "b", "c")}
    return Batch(samples=[Sample(id=i, path="") for i in ids], images=[images[i] for i in ids],
                 seeds=[100 + "abc".index(i) for i in ids])


def _run(metric, attributor, model=None, batch=None, batch_size: int = 4, tmp_path=None):
    model = model or _conv_model(batch_size)
    ctx = MetricContext(models=[model], attributor=attributor, masker=None, seed=0, batch_size=batch_size,
                        out_dir=tmp_path, run_id="robustness")
    return metric.evaluate(batch or _batch(), ctx)


ALL = [
    MaxSensitivity(SensitivityOptions(samples=6)),
    AvgSensitivity(SensitivityOptions(samples=6)),
    LocalLipschitz(LipschitzOptions(samples=6)),
]


# -- (a) maps that cannot change ------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ALL, ids=lambda m: m.id)
def test_constant_map_scores_zero(metric, tmp_path):
    for record in _run(metric, Constant(), tmp_path=tmp_path):
        assert record["values"][metric.key] == 0.0


@pytest.mark.parametrize("metric", ALL, ids=lambda m: m.id)
def test_saliency_of_a_linear_model_scores_zero_and_of_a_conv_net_not(metric, tmp_path):
    linear = _run(metric, Saliency(), model=_linear_model(), tmp_path=tmp_path)
    assert all(r["values"][metric.key] == pytest.approx(0.0, abs=1e-9) for r in linear)
    assert all(r["values"]["map_norm"] > 0 for r in linear)
    conv = _run(metric, Saliency(), model=_conv_model(), tmp_path=tmp_path)
    assert all(r["values"][metric.key] > 1e-3 for r in conv)


def test_seeded_random_map_is_explained_with_the_images_seed(tmp_path):
    """A copy gets its image's seed: a map that depends on the seed only does not move."""
    for record in _run(MaxSensitivity(SensitivityOptions(samples=4)), RandomMap(), tmp_path=tmp_path):
        assert record["values"]["max_sensitivity"] == 0.0


# -- (b) hand cases -------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
def test_lipschitz_of_a_scaled_input_map_is_the_scale(noise, tmp_path):
    records = _run(LocalLipschitz(LipschitzOptions(samples=5, noise=noise)), Scaled(), tmp_path=tmp_path)
    for r in records:
        assert r["values"]["lipschitz"] == pytest.approx(2.5, rel=1e-6)
        assert r["values"]["mean_ratio"] == pytest.approx(2.5, rel=1e-6)
    model = _conv_model()
    model.data_config["std"] = (0.5, 0.25, 0.5)
    pixel = _run(LocalLipschitz(LipschitzOptions(samples=5, space="pixel")), Scaled(), model=model, tmp_path=tmp_path)
    for r in pixel:  # delta / std moves the input; ||x - x'|| is measured in pixels: between 2.5/0.5 and 2.5/0.25
        assert 2.5 / 0.5 < r["values"]["lipschitz"] < 2.5 / 0.25


@pytest.mark.parametrize("relative", [True, False])
def test_sensitivity_equals_a_loop_over_the_published_perturbations(relative, tmp_path):
    n, radius = 7, 0.3
    batch = _batch()
    model = _conv_model()
    records = _run(MaxSensitivity(SensitivityOptions(samples=n, radius=radius, relative=relative)), Saliency(),
                   model=model, batch=batch, tmp_path=tmp_path)
    avg = _run(AvgSensitivity(SensitivityOptions(samples=n, radius=radius, relative=relative)), Saliency(),
               model=model, batch=batch, tmp_path=tmp_path)
    inputs = batch.inputs(model)
    for i, seed in enumerate(batch.seeds):
        x = inputs[i : i + 1]
        target = torch.tensor([records[i]["values"]["target"]])
        e = Saliency().attribute(model, x, target, [seed])[0].double()
        ratios = []
        for k in range(n):
            delta = perturbation(seed, k, x.shape[1:], "uniform", radius)
            assert float(delta.abs().max()) <= radius
            e2 = Saliency().attribute(model, x + delta, target, [seed])[0].double()
            d = float((e2 - e).norm())
            ratios.append(d / float(e.norm()) if relative else d)
        assert records[i]["values"]["max_sensitivity"] == pytest.approx(max(ratios), rel=1e-5)
        assert avg[i]["values"]["avg_sensitivity"] == pytest.approx(sum(ratios) / n, rel=1e-5)
        assert records[i]["values"]["avg_sensitivity"] == pytest.approx(sum(ratios) / n, rel=1e-5)


def test_perturbations_fill_the_ball_and_have_the_std():
    uniform = perturbation(1, 0, (3, 64, 64), "uniform", 0.2)
    assert float(uniform.abs().max()) <= 0.2 and float(uniform.abs().max()) > 0.19
    assert float(uniform.std()) == pytest.approx(0.2 / math.sqrt(3), rel=0.05)
    gaussian = perturbation(1, 0, (3, 64, 64), "gaussian", 0.1)
    assert float(gaussian.std()) == pytest.approx(0.1, rel=0.05)
    assert not torch.equal(perturbation(1, 1, (3, 4, 4), "uniform", 0.2), perturbation(1, 0, (3, 4, 4), "uniform", 0.2))
    assert not torch.equal(perturbation(2, 0, (3, 4, 4), "uniform", 0.2), perturbation(1, 0, (3, 4, 4), "uniform", 0.2))


# -- (c) batching ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ALL, ids=lambda m: m.id)
def test_scores_do_not_depend_on_the_batch_or_chunk_size(metric, tmp_path):
    together = _run(metric, Saliency(), batch=_batch(("a", "b", "c")), batch_size=4, tmp_path=tmp_path)
    alone = _run(metric, Saliency(), batch=_batch(("b",)), batch_size=1, tmp_path=tmp_path)
    other = _run(metric, Saliency(), batch=_batch(("c", "b")), batch_size=5, tmp_path=tmp_path)
    assert alone[0]["values"][metric.key] == pytest.approx(together[1]["values"][metric.key], rel=1e-6)
    assert other[1]["values"][metric.key] == pytest.approx(together[1]["values"][metric.key], rel=1e-6)


def test_copies_mix_images_in_full_chunks_and_bypass_the_cache(tmp_path):
    from harness.cache import AttributionCache, CachedAttributor

    cache = AttributionCache(tmp_path / "cache")
    Scaled.calls = []
    _run(LocalLipschitz(LipschitzOptions(samples=5)), CachedAttributor(Scaled(), cache), batch_size=4, tmp_path=tmp_path)
    assert Scaled.calls == [3, 4, 4, 4, 3]  # the clean maps, then 3 x 5 copies in chunks of 4 across images
    assert cache.stats.misses == 3 and len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 3


# -- (d) directions and options ------------------------------------------------------------------------
def test_lower_is_better_and_defaults():
    for cls in (MaxSensitivity, AvgSensitivity, LocalLipschitz):
        assert cls.higher_is_better is False and cls.needs_attributor and cls.citation
    s = SensitivityOptions()
    assert (s.radius, s.samples, s.relative, s.space) == (0.2, 50, True, "input")
    lip = LipschitzOptions()
    assert (lip.noise, lip.scale, lip.samples, lip.normalise) == ("gaussian", 0.1, 200, False)
    for bad in ({"radius": 0}, {"samples": 0}, {"space": "pixels"}, {"radius": "0.2"}):
        with pytest.raises(HarnessError):
            build_options(SensitivityOptions, bad, "metric")


def test_summary_reports_both_sensitivities(tmp_path):
    metric = MaxSensitivity(SensitivityOptions(samples=3))
    records = _run(metric, Saliency(), tmp_path=tmp_path)
    summary = metric.summarize(records, None)
    assert summary.value == pytest.approx(np.mean([r["values"]["max_sensitivity"] for r in records]))
    assert summary.values["avg_sensitivity"] <= summary.value
    assert summary.values["samples"] == 3


def test_cli_max_sensitivity(cli, tmp_path, fresh_registry, monkeypatch):
    import json
    from importlib import metadata

    from harness import plugins

    module = "harness_plugins.metrics.explanation_robustness"
    original = plugins.metadata.entry_points
    installed = {ep.value for ep in original(group="harness")}
    extra = [] if module in installed else [metadata.EntryPoint(name="explanation_robustness", value=module, group="harness")]
    monkeypatch.setattr(plugins.metadata, "entry_points",
                        lambda **kw: [*original(**kw), *extra] if kw.get("group") == "harness" else original(**kw))
    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "max_sensitivity", "--limit", "2",
              "-o", "metric.samples=3", "--out", str(tmp_path), "--quiet")
    assert res.exit_code == 0, res.stderr
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["metric"]["higher_is_better"] is False and result["value"] > 0
    assert result["metric"]["options"]["radius"] == 0.2
