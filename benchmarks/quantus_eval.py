"""Benchmark: the harness's ``max_sensitivity`` and ``pointing_game`` / ``relevance_mass`` against Quantus
0.6.0's ``MaxSensitivity``, ``PointingGame`` and ``RelevanceMassAccuracy`` on identical work, in one process.

Identical work on both sides:

* the same model (``--model``, random init unless it is ``efficientnet_lite0``), frozen, in eval mode;
* the same N preprocessed photos (the bundled ``samples`` with a box, cycled) and the same classes, the
  model's top-1 (Quantus's ``y_batch``, computed with the same forward pass the harness makes);
* the same explanation: the harness's ``saliency`` attributor, called by Quantus through
  ``explain_func`` (numpy in and out, as Quantus requires);
* max-sensitivity: radius 0.2 (uniform noise in the L-inf ball, in the model's input space), the same
  number of perturbed copies per image (``--samples``), the relative Frobenius norm, no normalisation,
  no abs. Quantus draws its noise with numpy, the harness with its seeded generator, so the scores agree
  statistically, not bit for bit. Quantus is given the clean maps (``a_batch``) and explains the
  copies of all N images together, one draw at a time (its batch is the images); the harness explains
  the copies in chunks of ``--batch-size`` rows that mix draws and images, with the clean maps from its
  attribution cache (warm, as in any run after the first: ``ratio``; ``ratio_cold`` computes them too);
* pointing game / relevance mass: both start from the images, the boxes (a boxes JSON file, the bundled
  hand-drawn ones) and the same maps. Quantus gets the maps (``a_batch``) and the box masks
  (``s_batch``), which its side builds with the harness's own ``input_masks`` (Quantus has no box
  reader) and times. The harness side gets the maps from an attributor returning them. Quantus's
  pointing game has no tolerance, so the harness runs with ``tolerance=0`` and ``average=images``; its
  relevance mass uses the signed map, equal to the harness's positive part for saliency (>= 0).
  ``ratio_explain``: both sides compute the saliency maps too (Quantus through ``explain_func``).

Both sides alternate for ``--rounds`` rounds and each keeps its best round, so load from other processes
hits both; ratio = Quantus time / harness time (> 1: the harness is faster).

    python benchmarks/quantus_eval.py                   # test_resnet at 160, N = 4, 10 copies, 3 rounds: ~45 s
    python benchmarks/quantus_eval.py --model resnet18 --n 8 --samples 50
    python benchmarks/quantus_eval.py --quick           # one round

The last line is JSON: {"max_sensitivity": {...}, "pointing_game": {...}, "relevance_mass": {...}, "model": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PRETRAINED = {"efficientnet_lite0"}


def load(model_id: str, batch_size: int):
    from harness.model import load_model
    from harness.registry import get_registry

    return load_model(get_registry().model_spec(model_id), random_init=model_id not in PRETRAINED, batch_size=batch_size)


def boxed_photos(n: int, folder: Path):
    """N samples (the bundled photos with a box, cycled) with their images, and a boxes JSON naming them."""
    from harness.data import Sample
    from harness_plugins.boxes import BoxFinder
    from harness_plugins.datasets import SampleImages

    dataset, finder = SampleImages(), BoxFinder()
    boxed = [(s, finder.find(s)) for s in dataset.samples()]
    boxed = [(s, b) for s, b in boxed if b is not None]
    samples, images, table = [], [], {}
    for i in range(n):
        sample, found = boxed[i % len(boxed)]
        samples.append(Sample(id=f"img{i}", path=sample.path, label=sample.label))
        images.append(dataset.load(sample))
        table[f"img{i}"] = {"width": found.width, "height": found.height, "boxes": [list(b) for b in found.boxes]}
    path = folder / "boxes.json"
    path.write_text(json.dumps({"images": table}))
    return samples, images, path


def quantus_explain(model_ref):
    """Quantus's ``explain_func``: the harness's saliency on the module Quantus hands over, numpy in and out."""
    import dataclasses

    from harness_plugins.attributors.gradients import Saliency

    saliency = Saliency()

    def explain(model: torch.nn.Module, inputs: np.ndarray, targets: np.ndarray, **kwargs) -> np.ndarray:
        wrapped = dataclasses.replace(model_ref, module=model, _transform=None)
        x = torch.as_tensor(inputs, dtype=torch.float32)
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        return saliency.attribute(wrapped, x, t, [0] * len(x))[:, None].detach().cpu().numpy()

    return explain


class GivenMaps:
    """An attributor returning precomputed maps (the harness side of 'the same maps')."""

    id, version = "given", "1"

    def __init__(self, maps: torch.Tensor, seeds: list[int]):
        from harness.components import Options

        self.options = Options()
        self.rows = {s: i for i, s in enumerate(seeds)}
        self.maps = maps

    def attribute(self, model, inputs, target, seeds):
        return self.maps[[self.rows[s] for s in seeds]]


def harness_run(metric, model, samples, images, seeds, attributor, batch_size: int, tmp: Path) -> Callable[[], float]:
    from harness.data import Batch
    from harness.runner import MetricContext

    def run() -> float:
        ctx = MetricContext(models=[model], attributor=attributor, masker=None, seed=0, batch_size=batch_size,
                            out_dir=tmp, run_id="bench")
        batch = Batch(samples=samples, images=images, seeds=seeds)
        records = metric.evaluate(batch, ctx)
        return metric.summarize([{"sample_id": s.id, **r} for s, r in zip(samples, records)], ctx).value

    return run


def best_of(sides: dict[str, Callable[[], float]], rounds: int, label: str) -> tuple[dict[str, float], dict[str, float]]:
    best = {k: float("inf") for k in sides}
    scores: dict[str, float] = {}
    for r in range(rounds):
        for name, fn in sides.items():
            start = time.perf_counter()
            scores[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
        print(f"{label} round {r + 1}: " + ", ".join(f"{k} {v:.3f}s" for k, v in best.items()), file=sys.stderr)
    return best, scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--n", type=int, default=4, help="images")
    parser.add_argument("--samples", type=int, default=10, help="perturbed copies per image (max-sensitivity)")
    parser.add_argument("--batch-size", type=int, default=32, help="the harness's --batch-size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load_start = os.getloadavg()[0]

    import quantus

    from harness.cache import AttributionCache, CachedAttributor
    from harness.data import sample_seed
    from harness_plugins.attributors.gradients import Saliency
    from harness_plugins.boxes import BoxFinder, input_masks
    from harness_plugins.metrics.explanation_robustness import MaxSensitivity, SensitivityOptions
    from harness_plugins.metrics.localisation import (
        PointingGame,
        PointingGameOptions,
        RelevanceMass,
        RelevanceMassOptions,
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench-quantus-eval-"))
    model = load(args.model, batch_size=args.batch_size)
    samples, images, boxes_json = boxed_photos(args.n, tmp)
    seeds = [sample_seed(0, s.id) for s in samples]
    inputs = model.preprocess(images)
    target = model.logits(inputs).argmax(1)
    cached = CachedAttributor(Saliency(), AttributionCache(tmp / "cache"))
    maps = cached.attribute(model, inputs, target, seeds)  # warms the cache
    explain = quantus_explain(model)
    report: dict = {}

    # -- max-sensitivity ------------------------------------------------------------------------------
    sens = MaxSensitivity(SensitivityOptions(samples=args.samples, radius=0.2))
    x, y, a = inputs.cpu().numpy(), target.cpu().numpy(), maps[:, None].cpu().numpy()

    def quantus_sensitivity() -> float:
        # defaults: batch_uniform_noise, difference, Frobenius norms (relative)
        metric = quantus.MaxSensitivity(nr_samples=args.samples, lower_bound=0.2, abs=False, normalise=False,
                                        disable_warnings=True, display_progressbar=False)
        scores = metric(model=model.module, x_batch=x, y_batch=y, a_batch=a.copy(), explain_func=explain,
                        device="cpu", batch_size=len(x))
        return float(np.mean(scores))

    best, scores = best_of({
        "harness": harness_run(sens, model, samples, images, seeds, cached, args.batch_size, tmp),
        "harness_cold": harness_run(sens, model, samples, images, seeds, Saliency(), args.batch_size, tmp),
        "quantus": quantus_sensitivity,
    }, args.rounds, "max_sensitivity")
    report["max_sensitivity"] = {
        "ratio": round(best["quantus"] / best["harness"], 2), "ratio_cold": round(best["quantus"] / best["harness_cold"], 2),
        **{f"{k}_s": round(v, 3) for k, v in best.items()},
        "harness_score": round(scores["harness"], 4), "quantus_score": round(scores["quantus"], 4), "samples": args.samples,
    }

    # -- pointing game and relevance mass -------------------------------------------------------------
    given = GivenMaps(maps, seeds)
    finder = BoxFinder(str(boxes_json))

    def quantus_localisation(cls, explain_maps: bool, **options) -> Callable[[], float]:
        def run() -> float:
            y_batch = model.logits(model.preprocess(images)).argmax(1).cpu().numpy()
            found = [finder.find(s) for s in samples]
            s_batch = input_masks(model, images, [f.scaled(*img.size) for f, img in zip(found, images)])
            metric = cls(abs=False, normalise=False, disable_warnings=True, display_progressbar=False, **options)
            scores = metric(model=model.module, x_batch=x, y_batch=y_batch,
                            a_batch=None if explain_maps else a.copy(), s_batch=s_batch[:, None].cpu().numpy().astype(np.float32),
                            explain_func=explain, device="cpu", batch_size=len(x))
            return float(np.mean(scores))

        return run

    for name, metric, cls in (
        ("pointing_game", PointingGame(PointingGameOptions(tolerance=0, average="images", target="predicted",
                                                           boxes=str(boxes_json))), quantus.PointingGame),
        ("relevance_mass", RelevanceMass(RelevanceMassOptions(target="predicted", boxes=str(boxes_json))),
         quantus.RelevanceMassAccuracy),
    ):
        best, scores = best_of({
            "harness": harness_run(metric, model, samples, images, seeds, given, args.batch_size, tmp),
            "quantus": quantus_localisation(cls, False),
            "harness_explain": harness_run(metric, model, samples, images, seeds, Saliency(), args.batch_size, tmp),
            "quantus_explain": quantus_localisation(cls, True),
        }, args.rounds, name)
        report[name] = {
            "ratio": round(best["quantus"] / best["harness"], 2),
            "ratio_explain": round(best["quantus_explain"] / best["harness_explain"], 2),
            **{f"{k}_s": round(v, 4) for k, v in best.items()},
            "harness_score": round(scores["harness"], 4), "quantus_score": round(scores["quantus"], 4),
        }

    report.update({
        "model": args.model, "input_size": list(model.input_size), "n": args.n, "rounds": args.rounds,
        "batch_size": args.batch_size, "threads": args.threads,
        "load": [round(load_start, 2), round(os.getloadavg()[0], 2)], "torch": torch.__version__,
    })
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
