"""Benchmark: the harness's ``mprt`` (cascading) against Quantus 0.6.0's ``MPRT`` (ModelParameterRandomisation)
on identical work, in one process.

Identical work on both sides:

* the same model (``--model``, random init unless it is ``efficientnet_lite0``), frozen, in eval mode;
* the same N preprocessed photos (the bundled ``samples``, cycled) and the same classes: the model's top-1,
  fixed for every randomised model (Quantus's ``y_batch``; ``randomised_target=same`` in the harness);
* the same explanation: the harness's ``saliency`` attributor, called by Quantus through ``explain_func``
  on the module Quantus hands it (numpy in and out, as Quantus requires);
* the same layers: every module with parameters and ``reset_parameters``, randomised top-down with
  the layer's own ``reset_parameters`` (harness: ``layers=modules, running_stats=reset``, which also
  resets BatchNorm statistics as ``reset_parameters`` does in Quantus); the script checks the counts match;
* the same similarity: Spearman rank correlation of the absolute maps (Quantus: ``abs=True``,
  normalise by the batch maximum, ``correlation_spearman``; harness: ``similarities=spearman_abs``,
  per-image PAIR normalisation), all N images in one batch on both sides, per-sample means over layers.

The harness takes the original explanations from its attribution cache (warmed before timing, as in
any run after the first; ``ratio``); ``ratio_cold`` times it with the cache off, computing them too.
Quantus recomputes the original explanations on every call (``MPRT.__call__``), even when ``a_batch``
is given; it is given the same maps. Both sides alternate for ``--rounds`` rounds and each keeps its best
round (the order of the sides rotates every round), so load from other processes hits both; ratio =
Quantus time / harness time (> 1: harness faster), from wall-clock time and (``ratio_cpu``) from this
process's CPU time, which a busy shared machine disturbs less.

    python benchmarks/quantus_randomisation.py                       # test_resnet at 160 (31 layers), N = 4, 3 rounds: ~1.5 min
    python benchmarks/quantus_randomisation.py --model resnet18 --n 8   # ResNet-18 at 224 (41 layers): ~6 min on 2 cores
    python benchmarks/quantus_randomisation.py --quick               # one round

The last line is JSON: {"metric": "mprt", "ratio": ..., "ratio_cold": ..., "ratio_cpu": ..., "ratio_cold_cpu": ...,
"harness_s": ..., "harness_cold_s": ..., "quantus_s": ..., "cpu_s": {...}, "layers": ..., "n": ..., "model": ..., "harness_score": ..., "quantus_score": ..., "load": [...]}.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PRETRAINED = {"efficientnet_lite0"}


def load(model_id: str, batch_size: int):
    from harness.model import load_model
    from harness.registry import get_registry

    return load_model(get_registry().model_spec(model_id), random_init=model_id not in PRETRAINED, batch_size=batch_size)


def photos(model, n: int) -> torch.Tensor:
    from harness_plugins.datasets import SampleImages

    dataset = SampleImages()
    samples = dataset.samples()
    images = [dataset.load(samples[i % len(samples)]) for i in range(n)]
    return model.preprocess(images)


def harness_side(model, inputs: torch.Tensor, attributor, tmp: Path):
    """One full harness MPRT over the batch: a fresh metric (randomised values built, model copied) per call."""
    from harness.data import Batch, Sample, sample_seed
    from harness.runner import MetricContext
    from harness_plugins.metrics.randomisation import MPRT

    ids = [f"img{i}" for i in range(len(inputs))]
    options = MPRT.Options(layers=["modules"], running_stats="reset", randomised_target="same",
                           similarities=["spearman_abs"], headline="spearman_abs")

    def run() -> float:
        metric = MPRT(options)
        ctx = MetricContext(models=[model], attributor=attributor, masker=None, seed=42, batch_size=len(inputs),
                            out_dir=tmp, run_id="bench")
        batch = Batch(samples=[Sample(i, "", None) for i in ids], images=[None] * len(ids), seeds=[sample_seed(0, i) for i in ids])
        batch._inputs[id(model)] = inputs
        records = metric.evaluate(batch, ctx)
        summary = metric.summarize([{"sample_id": i, **r} for i, r in zip(ids, records)], ctx)
        run.layers = len(records[0]["values"]["layers"])  # type: ignore[attr-defined]
        return summary.value

    return run


def quantus_side(model, inputs: torch.Tensor, target: torch.Tensor, originals: torch.Tensor):
    """One full Quantus MPRT over the batch (top_down = cascading), explaining with the harness's saliency."""
    import dataclasses

    import quantus

    from harness_plugins.attributors.gradients import Saliency

    saliency = Saliency()

    def explain(model: torch.nn.Module, inputs: np.ndarray, targets: np.ndarray, **kwargs) -> np.ndarray:
        wrapped = dataclasses.replace(model_ref, module=model, _transform=None)
        x = torch.as_tensor(inputs, dtype=torch.float32)
        t = torch.as_tensor(targets, dtype=torch.long)
        return saliency.attribute(wrapped, x, t, [0] * len(x))[:, None].detach().cpu().numpy()

    model_ref = model
    x = inputs.cpu().numpy()
    y = target.cpu().numpy()
    a = originals[:, None].cpu().numpy()

    def run() -> float:
        metric = quantus.MPRT(layer_order="top_down", seed=42, return_average_correlation=True,
                              disable_warnings=True, display_progressbar=False)
        scores = metric(model=model.module, x_batch=x, y_batch=y, a_batch=a.copy(), explain_func=explain,
                        device="cpu", batch_size=len(x))
        return float(np.mean(scores))

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load_start = os.getloadavg()[0]

    from harness.cache import AttributionCache, CachedAttributor
    from harness_plugins.attributors.gradients import Saliency
    from harness_plugins.metrics.randomiser import resolve_units

    model = load(args.model, batch_size=args.n)
    inputs = photos(model, args.n)
    target = model.logits(inputs).argmax(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-mprt-"))
    cached = CachedAttributor(Saliency(), AttributionCache(tmp / "cache"))
    from harness.data import sample_seed

    seeds = [sample_seed(0, f"img{i}") for i in range(args.n)]  # the harness side's per-sample seeds
    originals = cached.attribute(model, inputs, target, seeds)  # warms the cache
    units = resolve_units(model, ["modules"], "reset")
    quantus_layers = len([m for m in model.module.modules() if hasattr(m, "reset_parameters")])
    if len(units) != quantus_layers:
        sys.exit(f"layer counts differ: harness {len(units)}, Quantus {quantus_layers}; choose another model")

    sides = {
        "harness": harness_side(model, inputs, cached, tmp),
        "harness_cold": harness_side(model, inputs, Saliency(), tmp),
        "quantus": quantus_side(model, inputs, target, originals),
    }
    best = {k: float("inf") for k in sides}
    best_cpu = {k: float("inf") for k in sides}
    scores: dict[str, float] = {}
    names = list(sides)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # the order rotates every round
            start, start_cpu = time.perf_counter(), time.process_time()
            scores[name] = sides[name]()
            best[name] = min(best[name], time.perf_counter() - start)
            best_cpu[name] = min(best_cpu[name], time.process_time() - start_cpu)
        print(f"round {r + 1} best: " + ", ".join(f"{k} {best[k]:.2f}s (cpu {best_cpu[k]:.2f}s)" for k in names), file=sys.stderr)
    report = {
        "metric": "mprt",
        "ratio": round(best["quantus"] / best["harness"], 2),
        "ratio_cold": round(best["quantus"] / best["harness_cold"], 2),
        "ratio_cpu": round(best_cpu["quantus"] / best_cpu["harness"], 2),
        "ratio_cold_cpu": round(best_cpu["quantus"] / best_cpu["harness_cold"], 2),
        "harness_s": round(best["harness"], 3),
        "harness_cold_s": round(best["harness_cold"], 3),
        "quantus_s": round(best["quantus"], 3),
        "cpu_s": {k: round(v, 3) for k, v in best_cpu.items()},
        "layers": len(units),
        "n": args.n,
        "rounds": args.rounds,
        "model": args.model,
        "input_size": list(model.input_size),
        "harness_score": round(scores["harness"], 4),
        "quantus_score": round(scores["quantus"], 4),
        "threads": args.threads,
        "load": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
