"""Benchmark: the linear probe's feature accumulation vs the bare forward passes over the same images.

For a ViT-S-sized and a ResNet-50-sized model (random init; no weights needed) it times, on the same
input tensors in the same process, (a) bare forward passes in inference mode, (b) the fit phase's
streaming accumulation (forward with hooks that add every selected layer's cls / gap / token
statistics ``n, sum, X^T X, X^T Y`` to every repetition; every image is a training image of every
repetition, the most expensive case), and (c) the evaluation of fitted probes (forward with hooks
predicting every probe of every repetition), alternating the three ``--rounds`` times (default 2)
and keeping each side's best round. ``ratio_fit`` = forward time / accumulation time and
``ratio_eval`` = forward time / evaluation time (1.0 = free; target >= 0.9). Solving once per run
is timed separately (``solve_s``).

    python benchmarks/linear_probe.py                    # default: 64 images in batches of 32, layers=blocks
    python benchmarks/linear_probe.py --models vit_small_patch16_224 --images 128 --classes 100

The last line is JSON: {"models": {...}, "allocator": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.allocator import tune_allocator  # noqa: E402

TUNED = tune_allocator()  # before torch allocates anything, for both sides alike

import torch  # noqa: E402

MODELS = {"vit_small_patch16_224": "ViT-S-sized", "resnet50": "ResNet-50-sized"}


def _load(model_id: str, batch_size: int):
    from harness.model import load_model
    from harness.registry import get_registry

    return load_model(get_registry().model_spec(model_id), random_init=True, batch_size=batch_size)


def time_model(model_id: str, args) -> dict:
    from harness.data import Batch, Sample
    from harness.runner import MetricContext
    from harness_plugins.metrics.linear_probe import FIT, LinearProbe, Split

    model = _load(model_id, args.batch)
    torch.manual_seed(0)
    inputs = torch.randn(args.images, *model.input_size)
    chunks = [inputs[i : i + args.batch] for i in range(0, args.images, args.batch)]
    samples = [Sample(id=f"img{i:05d}", path="", label=i % args.classes) for i in range(args.images)]

    def batches(chosen):
        for k, x in enumerate(chunks):
            part = samples[k * args.batch : k * args.batch + len(x)]
            batch = Batch(samples=part, images=[None] * len(x), seeds=list(range(len(x))))
            batch._inputs[id(model)] = x  # the same tensors the bare forward sees (no decoding in the timing)
            yield batch

    ctx = MetricContext(models=[model], attributor=None, masker=None, seed=0, batch_size=args.batch,
                        out_dir=Path(args.out), run_id="bench", samples=samples, load_batches=batches)
    metric = LinearProbe(LinearProbe.Options(layers=args.layers.split(","), features=args.features, repetitions=args.repetitions,
                                             gemm_dtype=args.gemm_dtype))
    classes = list(range(args.classes))
    split = Split(classes=classes, label_index={s.id: int(s.label or 0) for s in samples},
                  roles={s.id: (FIT,) * args.repetitions for s in samples}, unlabelled=0, key="bench")
    metric._split = split

    def forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for x in chunks:
                model.module(x)
        return time.perf_counter() - t

    state: dict = {}

    def accumulate() -> float:
        t = time.perf_counter()
        state["acc"] = metric._accumulate(ctx, split, args.repetitions)
        return time.perf_counter() - t

    def evaluate() -> float:
        fit = state["fit"]
        t = time.perf_counter()
        for batch in batches(samples):
            labels = torch.tensor([split.label_index[s.id] for s in batch.samples])
            metric._count(model, batch, labels, fit.stacked, len(fit.models), fit.probes)
        return time.perf_counter() - t

    with torch.inference_mode():
        model.module(chunks[0][:2])  # warm-up (first-call overheads, allocator growth)
    accumulate()  # warm-up; also what the evaluation needs
    t = time.perf_counter()
    fit = metric._fit_probes(ctx, split, "bench")
    solve_s = time.perf_counter() - t
    fit.stacked = metric._stack(fit.models)
    state["fit"] = fit
    fwd, acc, ev = [], [], []
    for _ in range(args.rounds):  # alternate so load changes on a shared machine hit all sides
        fwd.append(forward())
        acc.append(accumulate())
        ev.append(evaluate())
    probes = state["acc"][0]
    return {
        "size": MODELS.get(model_id, model_id),
        "layers": len({p[0] for p in probes}),
        "probes": [f"{p[0]}:{p[1]}" for p in probes][-3:],
        "n_probes": len(probes),
        "images": args.images,
        "batch": args.batch,
        "classes": args.classes,
        "repetitions": args.repetitions,
        "forward_s": round(min(fwd), 3),
        "accumulate_s": round(min(acc), 3),
        "evaluate_s": round(min(ev), 3),
        "fit_with_solve_s (one-off)": round(solve_s, 3),
        "ratio_fit": round(min(fwd) / min(acc), 3),
        "ratio_eval": round(min(fwd) / min(ev), 3),
        "forward_rounds_s": [round(x, 3) for x in fwd],
        "accumulate_rounds_s": [round(x, 3) for x in acc],
        "evaluate_rounds_s": [round(x, 3) for x in ev],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model ids (random init)")
    parser.add_argument("--layers", default="blocks", help="layer patterns: blocks | default | globs")
    parser.add_argument("--features", default="cls,gap,token", help="feature choices")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating forward/accumulate/evaluate rounds (best kept)")
    parser.add_argument("--gemm-dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--out", default="/tmp/harness-bench-linear-probe")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"allocator: {'tuned' if TUNED else 'default glibc'}; torch threads {torch.get_num_threads()}; "
          f"{args.images} images in batches of {args.batch}, {args.classes} classes, {args.repetitions} repetitions, "
          f"layers={args.layers}, features={args.features}, gemm {args.gemm_dtype}", flush=True)
    results = {}
    for model_id in [m for m in args.models.split(",") if m]:
        row = time_model(model_id, args)
        results[model_id] = row
        print(f"  {model_id:24s} forward {row['forward_s']:.2f}s  accumulate {row['accumulate_s']:.2f}s "
              f"(ratio {row['ratio_fit']:.3f})  evaluate {row['evaluate_s']:.2f}s (ratio {row['ratio_eval']:.3f})  "
              f"{row['n_probes']} probes", flush=True)
    print(json.dumps({"models": results, "allocator": "tuned" if TUNED else "default"}))


if __name__ == "__main__":
    main()
