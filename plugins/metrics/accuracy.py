"""Top-1 / top-5 accuracy on the labelled samples."""

from __future__ import annotations

from typing import Any, ClassVar

import harness
from harness.components import Metric, Summary
from harness.stats import mean_stderr


class Accuracy(Metric):
    """Top-1 accuracy (headline) and top-5 accuracy over samples with a ground-truth label."""

    id: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    citation: ClassVar[str] = "Russakovsky et al., ImageNet Large Scale Visual Recognition Challenge, IJCV 2015"
    batch_keys: ClassVar[tuple[str, ...]] = ()  # every value is per sample (`harness verify` compares them all)

    def evaluate(self, batch, ctx) -> list[dict[str, Any]]:
        probs = ctx.model.probs(batch.inputs(ctx.model))
        top5 = probs.topk(min(5, probs.shape[1]), dim=1)
        records = []
        for label, p5, i5 in zip(batch.labels, top5.values.tolist(), top5.indices.tolist()):
            values: dict[str, Any] = {"top5": i5, "top5_probs": p5}
            if label is not None:
                values["top1_correct"] = int(i5[0] == label)
                values["top5_correct"] = int(label in i5)
            records.append({"prediction": i5[0], "values": values})
        return records

    def summarize(self, records, ctx) -> Summary:
        labelled = [r["values"] for r in records if "top1_correct" in r["values"]]
        if not labelled:
            from harness.errors import HarnessError

            raise HarnessError("accuracy needs labelled samples; this dataset has no labels")
        top1, top1_err = mean_stderr([v["top1_correct"] for v in labelled])
        top5, top5_err = mean_stderr([v["top5_correct"] for v in labelled])
        return Summary(
            value=top1,
            stderr=top1_err,
            values={"top1": top1, "top5": top5, "top5_stderr": top5_err, "n_labelled": len(labelled)},
        )


@harness.hookimpl
def register_metrics(register):
    register(Accuracy)
