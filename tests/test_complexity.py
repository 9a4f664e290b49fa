"""Complexity metrics (plugins/metrics/complexity.py): sparseness (Gini), complexity (entropy) and effective
complexity against hand computations and Quantus 0.6.0 where the definitions agree, and per-image
normalisation where Quantus's batch-wide maximum makes a score depend on the batch."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import torch

from harness.components import Attributor
from harness.data import Batch, Sample
from harness.runner import MetricContext
from harness_plugins.metrics.complexity import Complexity, EffectiveComplexity, Sparseness, effective_count, entropy, gini


class GivenMaps(Attributor):
    """Returns the maps it was built with (ignores the model)."""

    id: ClassVar[str] = "given"

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.maps = maps

    def attribute(self, model, inputs, target, seeds):
        return self.maps[: len(inputs)]


def run(metric, maps: torch.Tensor, tmp_path):
    from conftest import wrap_module

    model = wrap_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)), size=4)
    ctx = MetricContext(models=[model], attributor=GivenMaps(maps), masker=None, seed=0, batch_size=8,
                        out_dir=tmp_path, run_id="t")
    ids = [f"s{i}" for i in range(len(maps))]
    batch = Batch(samples=[Sample(i, "", None) for i in ids], images=[None] * len(ids), seeds=list(range(len(ids))))
    batch._inputs[id(model)] = torch.zeros(len(maps), 3, 4, 4)
    records = metric.evaluate(batch, ctx)
    return records, metric.summarize([{"sample_id": i, **r} for i, r in zip(ids, records)], ctx)


# -- hand computations ----------------------------------------------------------------------------------------
def test_gini_by_hand():
    d = 16
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 2, 1] = -3.0  # the absolute value counts
    uniform = torch.full((1, 4, 4), 0.7)
    assert gini(one_hot).item() == pytest.approx(1 - 1 / d, abs=1e-12)
    assert gini(uniform).item() == pytest.approx(0.0, abs=1e-12)
    # sorted |a| = 0, 0, 1, 3 (d = 4): sum (2i - 5) a_(i) = 1 * 1 + 3 * 3 = 10, over d * sum = 16
    assert gini(torch.tensor([[3.0, 0.0, -1.0, 0.0]])).item() == pytest.approx(10 / 16, abs=1e-12)
    assert math.isnan(gini(torch.zeros(1, 4)).item())
    assert gini(torch.zeros(1, 4), epsilon=1e-7).item() == pytest.approx(0.0, abs=1e-12)  # Quantus's epsilon


def test_entropy_by_hand():
    assert entropy(torch.full((1, 5, 5), 2.0)).item() == pytest.approx(math.log(25), abs=1e-9)
    one_hot = torch.zeros(1, 25)
    one_hot[0, 3] = 1
    assert entropy(one_hot).item() == pytest.approx(0.0, abs=1e-9)
    p = np.array([0.25, 0.25, 0.5])
    assert entropy(torch.tensor([[1.0, -1.0, 2.0]])).item() == pytest.approx(-(p * np.log(p)).sum(), abs=1e-9)


def test_effective_complexity_by_hand():
    a = torch.tensor([[0.0, 1e-6, 1e-4, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64) * 20
    assert effective_count(a).tolist() == [2, 0]  # 1e-6 and 0 are below eps = 1e-5 of the max
    assert effective_count(a, eps=1e-7).tolist() == [3, 0]
    assert effective_count(a, normalise=False).tolist() == [3, 0]  # raw |a| = 2e-5 > 1e-5


# -- Quantus ---------------------------------------------------------------------------------------------------
def quantus_scores(metric, maps: np.ndarray) -> list[float]:
    x = np.zeros((len(maps), 3, *maps.shape[-2:]), dtype=np.float32)
    y = np.zeros(len(maps), dtype=int)
    return [float(v) for v in metric(model=None, x_batch=x, y_batch=y, a_batch=maps[:, None].astype(np.float32).copy())]


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 12, 12, generator=g)
    base[1] = base[1] ** 3  # heavier tails
    base[2, :6] = 0.0
    return base


def test_sparseness_and_complexity_equal_quantus(maps):
    quantus = pytest.importorskip("quantus")
    # Sparseness: Quantus adds 1e-7 after normalising by the batch max; the Gini index is scale-invariant,
    # so without normalisation and with the same epsilon the definitions agree exactly.
    q = quantus_scores(quantus.Sparseness(normalise=False, disable_warnings=True), maps.numpy())
    assert gini(maps, epsilon=1e-7).tolist() == pytest.approx(q, abs=1e-6)
    # Complexity: the entropy of |a| / sum |a| is scale-invariant, so Quantus's batch-max normalisation changes nothing
    q = quantus_scores(quantus.Complexity(disable_warnings=True), maps.numpy())
    assert entropy(maps).tolist() == pytest.approx(q, abs=1e-4)  # Quantus computes in float32


def test_effective_complexity_is_per_image_where_quantus_depends_on_the_batch(maps):
    quantus = pytest.importorskip("quantus")
    metric = quantus.EffectiveComplexity(eps=0.3, disable_warnings=True)
    alone = quantus_scores(metric, maps[:1].numpy())
    with_larger = quantus_scores(metric, torch.stack([maps[0], 10 * maps[1]]).numpy())
    assert alone[0] != with_larger[0]  # Quantus: one maximum over the batch
    assert effective_count(maps[:1], eps=0.3).tolist() == [int(alone[0])]  # one image: the definitions agree
    ours = effective_count(torch.stack([maps[0], 10 * maps[1]]), eps=0.3).tolist()
    assert ours[0] == alone[0]  # here: each map its own maximum


# -- the metrics -------------------------------------------------------------------------------------------------
def test_metrics_report_per_sample_values_and_directions(maps, tmp_path):
    records, summary = run(Sparseness(), maps, tmp_path)
    assert [r["values"]["gini"] for r in records] == pytest.approx(gini(maps).tolist(), abs=1e-12)
    assert summary.value == pytest.approx(float(np.mean(gini(maps).numpy())), abs=1e-12)
    records, summary = run(Complexity(), maps, tmp_path)
    assert [r["values"]["entropy"] for r in records] == pytest.approx(entropy(maps).tolist(), abs=1e-12)
    records, summary = run(EffectiveComplexity(EffectiveComplexity.Options(eps=0.2)), maps, tmp_path)
    counts = effective_count(maps, eps=0.2).tolist()
    assert [r["values"]["count"] for r in records] == counts
    assert [r["values"]["fraction"] for r in records] == pytest.approx([c / 144 for c in counts])
    assert summary.value == pytest.approx(np.mean(counts))
    assert (Sparseness.higher_is_better, Complexity.higher_is_better, EffectiveComplexity.higher_is_better) == (True, False, False)
    for metric in (Sparseness, Complexity, EffectiveComplexity):
        assert metric.citation and metric.needs_attributor
