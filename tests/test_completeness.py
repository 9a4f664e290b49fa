"""Completeness (plugins/metrics/completeness.py): the relative gap |sum a - (F(x) - F(x'))| / |F(x) - F(x')|
against an independent evaluation, IG's gap shrinking with more steps, and the baseline rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import wrap_module
from harness.data import Batch, Sample
from harness.errors import HarnessError
from harness.runner import MetricContext
from harness_plugins.attributors.gradients import InputXGradient, Saliency
from harness_plugins.attributors.integrated_gradients import IntegratedGradients
from harness_plugins.metrics.completeness import Completeness

SIZE = 12
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


class Smooth(nn.Module):
    """A nonlinear model whose gradient changes along the IG path."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * SIZE * SIZE, 4)

    def forward(self, x):
        return self.fc(torch.tanh(2 * self.conv(x)).flatten(1))


def model_with_normalisation(module: nn.Module):
    model = wrap_module(module, size=SIZE)
    model.data_config = {**model.data_config, "mean": MEAN, "std": STD}
    return model


def evaluate(attributor, module: nn.Module, x: torch.Tensor, tmp_path, **options):
    model = model_with_normalisation(module)
    ctx = MetricContext(models=[model], attributor=attributor, masker=None, seed=0, batch_size=8, out_dir=tmp_path, run_id="t")
    ids = [f"s{i}" for i in range(len(x))]
    batch = Batch(samples=[Sample(i, "", None) for i in ids], images=[None] * len(ids), seeds=list(range(len(ids))))
    batch._inputs[id(model)] = x
    metric = Completeness(Completeness.Options(**options))
    records = metric.evaluate(batch, ctx)
    return records, metric.summarize([{"sample_id": i, **r} for i, r in zip(ids, records)], ctx)


def inputs(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_gap_is_the_relative_difference_to_an_independent_evaluation(tmp_path):
    module, x = Smooth(), inputs()
    ig = IntegratedGradients(IntegratedGradients.Options(steps=4))
    records, summary = evaluate(ig, module, x, tmp_path)
    black = ((torch.zeros(1, 3, 1, 1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).expand_as(x)
    with torch.no_grad():
        f_x, f_black = module(x), module(black)
    model = model_with_normalisation(module)
    for i, record in enumerate(records):
        v = record["values"]
        t = int(f_x[i].argmax())
        delta = float(f_x[i, t] - f_black[i, t])
        total = float(ig.attribute(model, x[i : i + 1], torch.tensor([t]), [0]).sum())
        assert v["target"] == t
        assert v["delta"] == pytest.approx(delta, rel=1e-5)
        assert v["attribution_sum"] == pytest.approx(total, rel=1e-5)
        assert v["gap"] == pytest.approx(abs(total - delta) / abs(delta), rel=1e-4)
    assert summary.values["baseline"] == "black" and summary.values["score"] == "logit"


def test_integrated_gradients_with_more_steps_has_a_smaller_gap(tmp_path):
    module, x = Smooth(), inputs()
    gaps = []
    for steps in (2, 8, 64):
        _, summary = evaluate(IntegratedGradients(IntegratedGradients.Options(steps=steps)), module, x, tmp_path)
        gaps.append(summary.value)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.05  # the IG paper's 5%


def test_gradient_times_input_is_complete_for_a_linear_model(tmp_path):
    module = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 4))
    records, summary = evaluate(InputXGradient(), module, inputs(), tmp_path)
    assert summary.values["baseline"] == "mean"  # x' = 0 in the model's input space
    assert max(r["values"]["gap"] for r in records) < 1e-4


def test_baseline_and_reduction_rules(tmp_path):
    module, x = Smooth(), inputs(1)
    with pytest.raises(HarnessError, match="has no baseline of its own"):
        evaluate(Saliency(), module, x, tmp_path)
    records, _ = evaluate(Saliency(), module, x, tmp_path, baseline="black")
    assert records[0]["values"]["gap"] > 0
    with pytest.raises(HarnessError, match="reduce=sum"):
        evaluate(IntegratedGradients(IntegratedGradients.Options(reduce="abs_sum")), module, x, tmp_path)
    softmax = IntegratedGradients(IntegratedGradients.Options(score="softmax", steps=64))
    records, summary = evaluate(softmax, module, x, tmp_path)
    assert summary.values["score"] == "softmax" and 0 < records[0]["values"]["score"] <= 1
    assert Completeness.higher_is_better is False
