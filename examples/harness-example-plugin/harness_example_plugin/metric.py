"""``example_confidence``: the model's mean top-1 softmax probability on the images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from harness.components import Metric, Options, Summary
from harness.stats import mean_stderr

if TYPE_CHECKING:
    from harness.data import Batch
    from harness.runner import MetricContext


class ConfidenceOptions(Options):
    """Options of ``example_confidence`` (set with ``-o metric.temperature=2``)."""

    temperature: float = Field(1.0, gt=0)
    """Logits are divided by this before the softmax (1 = plain softmax)."""


class ExampleConfidence(Metric):
    """Mean top-1 softmax confidence of the model (max over classes of softmax(logits / T))."""

    id: ClassVar[str] = "example_confidence"
    version: ClassVar[str] = "1"
    higher_is_better: ClassVar[bool] = True
    citation: ClassVar[str] = (
        "Guo et al., On Calibration of Modern Neural Networks, ICML 2017 (confidence = max softmax probability)"
    )
    Options = ConfidenceOptions
    options: ConfidenceOptions

    def evaluate(self, batch: "Batch", ctx: "MetricContext") -> list[dict[str, Any]]:
        """One record per image: the predicted class and its softmax probability."""
        logits = ctx.model.logits(batch.inputs(ctx.model))
        top = (logits / self.options.temperature).softmax(dim=-1).max(dim=-1)
        return [
            {"prediction": int(index), "values": {"confidence": float(conf)}}
            for conf, index in zip(top.values.tolist(), top.indices.tolist())
        ]

    def summarize(self, records: list[dict[str, Any]], ctx: "MetricContext") -> Summary:
        """Mean confidence over the images, with its standard error."""
        mean, stderr = mean_stderr([r["values"]["confidence"] for r in records])
        return Summary(
            value=mean,
            stderr=stderr,
            values={"confidence": mean, "temperature": self.options.temperature, "n": len(records)},
        )
