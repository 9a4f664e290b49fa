"""Benchmark: the SAG search (beam search + pruning to MSEs), batched as ``harness run`` runs it,
against the same search evaluated one patch set per forward pass.

On ``efficientnet_lite0`` (224, its real packaged weights) and scikit-image's ``rocket`` photo
(``--images rocket,chelsea`` for more), with the ``subexplanations`` metric's defaults (grid:7
tents, black fill, q = 15 candidates, beam width 3, more than 10 roots, threshold 0.9 x p0, I-GOS
ranking with the per-sample seed ``harness run --seed 0`` gives each photo):

* **batched**: the metric's own search (``ConfidenceOracle`` with forward passes of up to
  ``--batch-size`` rows: all candidates of a depth, and in pruning the next removal of every set
  being pruned, of every image, share passes; ``pruning="batched"``), i.e. ``harness run --metric
  subexplanations -o metric.count=false --batch-size 32``. Batched pruning evaluates exactly the
  patch sets sequential pruning evaluates, so both sides make the same number of passes.
* **unbatched**: the same search with ``ConfidenceOracle(chunk_size=1)`` and
  ``pruning="sequential"``: one patch set per forward pass, removals tried one at a time, as the
  published SAG code evaluates them (the oracle's per-image cache still never evaluates a patch set
  twice; the published code does, so it makes more passes than this side).

The I-GOS ranking is computed once beforehand (it is the same for both sides; its time is printed
separately). Sub-explanation counting is off in the timed searches (``count=False``);
``--count`` times it separately after the batched search. The benchmark checks that both sides find
the same MSEs (same patch sets in the same order) and reports the largest confidence difference
(batched and single-row forward passes may differ in the last bits).

``ratio`` = unbatched time / batched time (> 1: batching pays). The sides alternate for
``--rounds`` rounds (best round kept). Both run in this process under the same allocator setting
(``harness.allocator.tune_allocator()`` at process start; ``HARNESS_MALLOC_TUNING=0`` to measure
the default allocator) and ``torch.set_num_threads(--threads)`` (default 2).

    python benchmarks/subexplanations.py                           # rocket, batch 32, 2 rounds: ~2 min on 2 idle cores
    python benchmarks/subexplanations.py --images rocket,chelsea --batch-size 64 --count
    python benchmarks/subexplanations.py --quick                   # beam width 1, stop after 3 roots (~20 s)
    python benchmarks/subexplanations.py --speculative             # batched side: speculative pruning windows

``--cost`` measures instead what one image costs with counting on (``harness run --metric
subexplanations`` as a user runs it): per photo, the forward passes of each phase (search, pruning,
counting) with the default I-GOS ranking (and with ``--previous`` the ranking the harness used before
this release: ``igos`` with ``baseline=blur`` and ``ranking=clamped``, which ties most cells), the subsets
counting had to evaluate against those the MSEs have one by one, and the seconds against the bare
forward floor (the same number of images pushed through the model in full batches, no search logic):

    python benchmarks/subexplanations.py --cost --images chelsea,coffee,rocket [--previous]

The last line is JSON: {"ratio": ..., "batched": {"seconds", "forward_passes", "forward_calls", ...},
"unbatched": {...}, "same_mses": true, "images": {...}, "allocator": ..., "torch": ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.allocator import tune_allocator  # noqa: E402

TUNED = tune_allocator()  # before torch allocates anything, for both sides alike

import torch  # noqa: E402


class Counting(torch.nn.Module):
    """Wraps a model's module and counts forward calls and rows."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module
        self.calls = 0
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += len(x)
        return self.inner(x)


def prepare(args):
    """Model, inputs, targets, p0, ranking (I-GOS, timed), baseline, granularity, metric settings."""
    from harness.data import sample_seed
    from harness.model import load_model
    from harness.registry import get_registry
    from harness.regions import Granularity
    from harness.scoring import target_scores
    from harness_plugins.attributors.igos import IGOS
    from harness_plugins.datasets import SampleImages
    from harness_plugins.maskers.fills import BlackFill
    from harness_plugins.metrics.subexplanations import Subexplanations, grid_importance, ranking_of
    from harness.runner import MetricContext

    model = load_model(get_registry().model_spec(args.model), batch_size=args.batch_size)
    dataset = SampleImages()
    by_id = {s.id: s for s in dataset.samples()}
    samples = [by_id[name] for name in args.images]
    inputs = model.preprocess([dataset.load(s) for s in samples])
    seeds = [sample_seed(0, s.id) for s in samples]  # what `harness run --seed 0` gives each photo
    options = {"count": False}
    if args.quick:
        options.update(beam_width=1, max_roots=2)
    metric = Subexplanations(Subexplanations.Options(**options))
    masker = BlackFill()
    ctx = MetricContext(models=[model], attributor=IGOS(), masker=masker, seed=0, batch_size=args.batch_size,
                        out_dir=args.out, run_id="bench")
    clean_logits = model.logits(inputs)
    target = clean_logits.argmax(1)
    p0 = target_scores(clean_logits, target, "softmax").tolist()
    granularity = Granularity.parse("grid:7", inputs.shape[-2], inputs.shape[-1])
    t = time.perf_counter()
    importance = grid_importance(ctx, model, inputs, target, seeds, granularity)
    igos_s = time.perf_counter() - t
    rankings = ranking_of(importance)
    baseline = masker.baseline(model, inputs, seeds)
    return model, inputs, target, p0, rankings, baseline, granularity, metric, igos_s


def search(model, inputs, baseline, granularity, target, p0, rankings, settings, chunk_size):
    """One timed SAG search over all images; returns (seconds, oracle, results, counter)."""
    from harness_plugins.metrics.sag import ConfidenceOracle, beam_search

    counter = Counting(model.module)
    counted = dataclasses.replace(model, module=counter)
    oracle = ConfidenceOracle(counted, inputs, baseline, granularity, target, "softmax", chunk_size=chunk_size)
    t = time.perf_counter()
    found = oracle.drive({i: beam_search(rankings[i], p0[i], settings) for i in range(len(inputs))})
    return time.perf_counter() - t, oracle, found, counter


def side_summary(seconds: float, oracle, counter, n_images: int) -> dict:
    phases: dict[str, int] = {}
    for per_image in oracle.passes:
        for phase, k in per_image.items():
            phases[phase] = phases.get(phase, 0) + k
    passes = sum(phases.values())
    return {
        "seconds": round(seconds, 2),
        "seconds_per_image": round(seconds / n_images, 2),
        "forward_passes": passes,  # single-image evaluations (patch sets)
        "forward_passes_by_phase": phases,
        "forward_calls": counter.calls,  # model invocations (batches)
        "ms_per_pass": round(1000 * seconds / max(1, passes), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="rocket", help="comma-separated sample photos: rocket, chelsea, coffee, astronaut")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32, help="the batched side's --batch-size (32 or 64)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating batched/unbatched rounds (best kept; default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--count", action="store_true", help="also time sub-explanation counting (batched) separately")
    parser.add_argument("--quick", action="store_true", help="beam width 1, stop after more than 2 roots (a smoke run)")
    parser.add_argument("--speculative", action="store_true",
                        help="batched side with speculative pruning windows (fewer forward calls, more passes; for GPUs)")
    parser.add_argument("--cost", action="store_true",
                        help="passes and time per image with counting on, against the forward floor")
    parser.add_argument("--previous", action="store_true",
                        help="with --cost: also the ranking used before (igos baseline=blur, ranking=clamped; ~4x the passes)")
    parser.add_argument("--out", default="/tmp/harness-bench-subexplanations")
    args = parser.parse_args(argv)
    args.images = [x for x in args.images.split(",") if x]
    torch.set_num_threads(args.threads)
    from pathlib import Path

    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    load1 = os.getloadavg()[0]
    print(f"allocator: {'tuned (harness.allocator.tune_allocator: mmap_max=0, no trim)' if TUNED else 'default glibc'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}; images {args.images}; "
          f"batch size {args.batch_size}; {args.rounds} round(s); load average {load1:.2f}", flush=True)

    if args.cost:
        cost(args)
        return
    model, inputs, target, p0, rankings, baseline, granularity, metric, igos_s = prepare(args)
    n = len(inputs)
    print(f"I-GOS ranking (both sides, not in the timings): {igos_s:.2f} s", flush=True)
    batched_settings = dataclasses.replace(metric.settings(granularity.n_regions), speculative_pruning=args.speculative)
    unbatched_settings = dataclasses.replace(batched_settings, pruning="sequential")
    with torch.inference_mode():  # warm-up at both shapes
        model.module(inputs[:1])
        model.module(inputs[:1].expand(args.batch_size, -1, -1, -1).contiguous())

    best: dict[str, tuple] = {}
    for _ in range(args.rounds):
        for name, settings, chunk in (("batched", batched_settings, None), ("unbatched", unbatched_settings, 1)):
            run = search(model, inputs, baseline, granularity, target, p0, rankings, settings, chunk)
            print(f"  {name}: {run[0]:.2f} s, {sum(sum(p.values()) for p in run[1].passes)} passes in {run[3].calls} forward calls", flush=True)
            if name not in best or run[0] < best[name][0]:
                best[name] = run

    (tb, ob, fb, cb), (tu, ou, fu, cu) = best["batched"], best["unbatched"]
    same = all(fb[i].roots == fu[i].roots for i in range(n))
    diffs = [abs(ob.cache[i][s] - ou.cache[i][s]) for i in range(n) for s in set(ob.cache[i]) & set(ou.cache[i])]
    images = {}
    for i, name in enumerate(args.images):
        images[name] = {
            "target": int(target[i]), "p0": round(p0[i], 4), "n_mses": len(fb[i].roots),
            "mse_sizes": [len(r) for r in fb[i].roots], "depth": fb[i].depth,
            "batched_passes": dict(ob.passes[i]), "unbatched_passes": dict(ou.passes[i]),
            "same_mses": fb[i].roots == fu[i].roots,
        }
        print(f"{name}: target {int(target[i])}, p0 {p0[i]:.3f}; {len(fb[i].roots)} MSEs (sizes {images[name]['mse_sizes']}), "
              f"depth {fb[i].depth}; passes batched {dict(ob.passes[i])}, unbatched {dict(ou.passes[i])}; "
              f"same MSEs: {images[name]['same_mses']}", flush=True)
    batched = side_summary(tb, ob, cb, n)
    unbatched = side_summary(tu, ou, cu, n)
    print(f"batched (batch {args.batch_size}): {tb:.2f} s ({tb / n:.2f} s/image), {batched['forward_passes']} passes in "
          f"{batched['forward_calls']} forward calls, {batched['ms_per_pass']:.2f} ms/pass", flush=True)
    print(f"unbatched (1 per pass, sequential pruning): {tu:.2f} s ({tu / n:.2f} s/image), {unbatched['forward_passes']} passes, "
          f"{unbatched['ms_per_pass']:.2f} ms/pass", flush=True)
    print(f"ratio (unbatched / batched time): {tu / tb:.2f}; same MSEs: {same}; max confidence difference on shared sets: "
          f"{max(diffs) if diffs else 0:.2e}", flush=True)
    counting = None
    if args.count:
        from harness_plugins.metrics.sag import count_subexplanations

        o = metric.options
        before = sum(sum(p.values()) for p in ob.passes)
        t = time.perf_counter()
        counted = ob.drive({i: count_subexplanations(fb[i].roots, p0[i], min(o.count_thresholds), o.exhaustive_max, o.max_subsets)
                            for i in range(n)})
        counting = {
            "seconds": round(time.perf_counter() - t, 2),
            "forward_passes": sum(sum(p.values()) for p in ob.passes) - before,
            "counts": {name: {f"{th:g}": sum(v >= th for v in counted[i].relative.values()) for th in o.count_thresholds}
                       for i, name in enumerate(args.images)},
        }
        print(f"counting (batched): {counting['seconds']:.2f} s, {counting['forward_passes']} passes; counts {counting['counts']}", flush=True)
    print(json.dumps({
        "ratio": round(tu / tb, 3),
        "batched": batched,
        "unbatched": unbatched,
        "same_mses": same,
        "max_confidence_difference": max(diffs) if diffs else 0.0,
        "images": images,
        "igos_seconds": round(igos_s, 2),
        "counting": counting,
        "model": args.model,
        "batch_size": args.batch_size,
        "speculative_pruning": args.speculative,
        "quick": args.quick,
        "allocator": "tuned" if TUNED else "default",
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "load_average_1min": [round(load1, 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }))


def cost(args) -> None:
    """Passes per phase and seconds per image (counting on), default ranking vs the previous one."""
    from harness.data import sample_seed
    from harness.model import load_model
    from harness.registry import get_registry
    from harness.regions import Granularity
    from harness.scoring import target_scores
    from harness_plugins.attributors.igos import IGOS
    from harness_plugins.datasets import SampleImages
    from harness_plugins.maskers.fills import BlackFill
    from harness_plugins.metrics.sag import ConfidenceOracle, beam_search, count_subexplanations
    from harness_plugins.metrics.subexplanations import Subexplanations, ranking_of

    model = load_model(get_registry().model_spec(args.model), batch_size=args.batch_size)
    dataset = SampleImages()
    by_id = {s.id: s for s in dataset.samples()}
    metric = Subexplanations(Subexplanations.Options())
    o = metric.options
    report = {}
    for name in args.images:
        sample = by_id[name]
        inputs = model.preprocess([dataset.load(sample)])
        seeds = [sample_seed(0, sample.id)]
        target = model.logits(inputs).argmax(1)
        p0 = target_scores(model.logits(inputs), target, "softmax").tolist()
        granularity = Granularity.parse("grid:7", inputs.shape[-2], inputs.shape[-1])
        baseline = BlackFill().baseline(model, inputs, seeds)
        settings = metric.settings(granularity.n_regions)
        report[name] = {}
        sides = [("default", IGOS())] + ([("previous", IGOS(IGOS.Options(baseline="blur", ranking="clamped")))] if args.previous else [])
        for label, igos in sides:
            importance = igos.coarse(model, inputs, target, seeds).reshape(1, -1)
            ties = 49 - len(set(importance[0].tolist()))
            counter = Counting(model.module)
            oracle = ConfidenceOracle(dataclasses.replace(model, module=counter), inputs, baseline, granularity, target)
            t = time.perf_counter()
            found = oracle.drive({0: beam_search(ranking_of(importance)[0], p0[0], settings)})
            counted = oracle.drive({0: count_subexplanations(found[0].roots, p0[0], min(o.count_thresholds), o.exhaustive_max, o.max_subsets)})
            seconds = time.perf_counter() - t
            passes = dict(oracle.passes[0])
            total = sum(passes.values())
            with torch.inference_mode():  # the floor: the same number of images in full batches
                block = inputs.expand(args.batch_size, -1, -1, -1).contiguous()
                t = time.perf_counter()
                for _ in range(-(-total // args.batch_size)):
                    model.module(block)
                floor = time.perf_counter() - t
            rel = counted[0].relative
            report[name][label] = {
                "tied_cells": ties, "mse_sizes": [len(r) for r in found[0].roots], "passes": passes, "total_passes": total,
                "counting_subsets": {"per_mse": counted[0].per_mse_subsets, "distinct": len(rel), "evaluated": passes.get("counting", 0)},
                "counts": {f"{th:g}": sum(v >= th for v in rel.values()) for th in o.count_thresholds},
                "seconds": round(seconds, 2), "floor_seconds": round(floor, 2), "over_floor": round(seconds / max(floor, 1e-9), 2),
            }
            r = report[name][label]
            print(f"{name} [{label} ranking, {ties} tied cells]: MSE sizes {r['mse_sizes']}; passes {passes} = {total}; "
                  f"counting subsets per MSE {r['counting_subsets']['per_mse']}, distinct {len(rel)}, evaluated "
                  f"{r['counting_subsets']['evaluated']}; {seconds:.1f} s vs forward floor {floor:.1f} s "
                  f"({r['over_floor']:.2f}x); counts {r['counts']}", flush=True)
    totals = {label: sum(report[n][label]["total_passes"] for n in report) / len(report) for label in report[args.images[0]]}
    seconds = sum(report[n]["default"]["seconds"] for n in report) / len(report)
    print(json.dumps({"cost": report, "mean_passes_per_image": totals, "seconds_per_image": round(seconds, 2),
                      "images_per_hour_cpu": round(3600 / seconds, 1), "batch_size": args.batch_size, "model": args.model,
                      "allocator": "tuned" if TUNED else "default", "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
