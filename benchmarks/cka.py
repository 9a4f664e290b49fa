"""Benchmark: minibatch CKA heatmap vs the bare forward passes over the same images, same process.

For a ResNet-50-sized and a ViT-S-sized model (random init; no weights needed) it times, on the same
input tensors, (a) bare forward passes in inference mode and (b) the ``cka`` metric's ``evaluate``
(forward with gram hooks, U-centring, one GEMM per chunk for all layer pairs), alternating the two
``--rounds`` times (default 2) and keeping each side's best round. ``ratio`` = forward time / CKA time (1.0 =
CKA is free; target >= 0.8). Peak memory is measured in fresh subprocesses (VmHWM minus the RSS
before the batch) for the bare forward and for CKA, against the number of layers and n; it varies by
up to ~150 MB between identical processes (glibc arenas of the OpenMP threads), so use
``--mem-reps 3`` for comparisons (the minimum over processes is reported).

Both sides run under the same allocator setting: ``harness.allocator.tune_allocator()`` (glibc
mmap off, no trimming) unless ``HARNESS_MALLOC_TUNING=0``.

    python benchmarks/cka.py                       # default: n=32, 2 batches, layers=blocks (about 2 min)
    python benchmarks/cka.py --layers default      # 6 sublayers per ViT block, 3 per ResNet block
    python benchmarks/cka.py --n 64 --batches 4 --mem-n 16,32,64 --mem-layers blocks,default

The last line is JSON: {"ratio": ..., "models": {...}, "memory": [...], "allocator": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.allocator import tune_allocator  # noqa: E402

TUNED = tune_allocator()  # before torch allocates anything, for both sides alike

import torch  # noqa: E402

MODELS = {"resnet50": "ResNet-50-sized", "vit_small_patch16_224": "ViT-S-sized"}


def _load(model_id: str, batch_size: int):
    from harness.model import load_model
    from harness.registry import get_registry

    return load_model(get_registry().model_spec(model_id), random_init=True, batch_size=batch_size)


def _metric(layers: str, n: int, gram_dtype: str):
    from harness_plugins.metrics.cka import CKA

    return CKA(CKA.Options(layers=layers, minibatch=n, gram_dtype=gram_dtype))


def _batch(inputs: torch.Tensor, model, start: int):
    from harness.data import Batch, Sample

    samples = [Sample(id=f"img{start + i}", path="") for i in range(len(inputs))]
    batch = Batch(samples=samples, images=[None] * len(inputs), seeds=list(range(len(inputs))))
    batch._inputs[id(model)] = inputs  # the same tensors the bare forward sees (no decoding in the timing)
    return batch


def _ctx(model, n: int, out: Path):
    from harness.runner import MetricContext

    return MetricContext(models=[model], attributor=None, masker=None, seed=0, batch_size=n, out_dir=out, run_id="bench")


def time_model(model_id: str, args) -> dict:
    model = _load(model_id, args.n)
    torch.manual_seed(0)
    inputs = torch.randn(args.batches * args.n, *model.input_size)
    metric = _metric(args.layers, args.n, args.gram_dtype)
    ctx = _ctx(model, args.n, Path(args.out))
    chunks = [inputs[i * args.n : (i + 1) * args.n] for i in range(args.batches)]

    def forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for x in chunks:
                model.module(x)
        return time.perf_counter() - t

    records: list = []

    def cka() -> float:
        records.clear()
        t = time.perf_counter()
        for k, x in enumerate(chunks):
            records.extend({"sample_id": f"img{k}_{i}", **r} for i, r in enumerate(metric.evaluate(_batch(x, model, k * args.n), ctx)))
        return time.perf_counter() - t

    with torch.inference_mode():
        model.module(chunks[0][:2])  # warm-up (first-call overheads, allocator growth)
    fwd, ck = [], []
    for _ in range(args.rounds):  # alternate so load changes on a shared machine hit both sides
        fwd.append(forward())
        ck.append(cka())
    t = time.perf_counter()
    summary = metric.summarize([dict(r, values=r["values"]) for r in json.loads(json.dumps(records))], ctx)
    summarize_s = time.perf_counter() - t
    layers = len(summary.values["layers_a"])
    return {
        "size": MODELS.get(model_id, model_id),
        "layers": layers,
        "n": args.n,
        "images": len(inputs),
        "forward_s": round(min(fwd), 3),
        "cka_s": round(min(ck), 3),
        "summarize_s": round(summarize_s, 3),
        "ratio": round(min(fwd) / min(ck), 3),
        "forward_rounds_s": [round(x, 3) for x in fwd],
        "cka_rounds_s": [round(x, 3) for x in ck],
        "gram_bytes": layers * args.n * args.n * 8,
    }


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def memory_child(model_id: str, mode: str, layers: str, n: int, gram_dtype: str) -> dict:
    """In a fresh process: peak RSS growth of one batch of n images, bare forward or CKA."""
    model = _load(model_id, n)
    inputs = torch.randn(n, *model.input_size)
    with torch.inference_mode():
        model.module(inputs[:1])
    before = _status_kb("VmRSS")
    if mode == "forward":
        with torch.inference_mode():
            model.module(inputs)
        n_layers = 0
    else:
        metric = _metric(layers, n, gram_dtype)
        records = metric.evaluate(_batch(inputs, model, 0), _ctx(model, n, Path("/tmp")))
        n_layers = len(records[0]["values"]["chunk"]["layers"][0])
    peak = _status_kb("VmHWM")
    return {"model": model_id, "mode": mode, "layers": n_layers, "n": n, "peak_extra_mb": round((peak - before) / 1024, 1)}


def measure_memory(args) -> list[dict]:
    """Each configuration in ``--mem-reps`` fresh processes: peak RSS growth varies by ~100 MB from run to
    run (glibc arenas of the OpenMP threads), so the minimum and the median are reported."""
    from harness_plugins.metrics.cka import CHUNK_ELEMENTS

    rows = []
    for model_id in args.models:
        for n in args.mem_n:
            configs = [("forward", "-")] + [("cka", layers) for layers in args.mem_layers]
            for mode, layers in configs:
                runs = []
                for _ in range(args.mem_reps):
                    cmd = [sys.executable, __file__, "--_memory-child", model_id, mode, layers, str(n), args.gram_dtype]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                    runs.append(json.loads(out))
                peaks = sorted(r["peak_extra_mb"] for r in runs)
                n_layers = runs[0]["layers"]
                row = {"model": model_id, "mode": mode, "layers": n_layers, "n": n,
                       "peak_extra_mb_min": peaks[0], "peak_extra_mb_median": peaks[len(peaks) // 2],
                       # what CKA keeps besides the forward: grams (L, n, n) float64 + the centring workspace
                       "cka_state_mb": round((n_layers * n * n * 8 + (CHUNK_ELEMENTS + n * n) * 4) / 2**20, 2) if mode == "cka" else 0.0}
                rows.append(row)
                print(f"  memory {model_id:24s} {mode:7s} layers={n_layers:3d} n={n:3d}: peak +{row['peak_extra_mb_min']:.0f} MB "
                      f"(median +{row['peak_extra_mb_median']:.0f} MB of {len(peaks)} processes; CKA state {row['cka_state_mb']} MB)",
                      flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model ids (random init)")
    parser.add_argument("--layers", default="blocks", help="CKA layer patterns: blocks (all blocks) | default (sublayers) | globs")
    parser.add_argument("--n", type=int, default=32, help="CKA minibatch size")
    parser.add_argument("--batches", type=int, default=2, help="minibatches per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating forward/CKA rounds (best kept)")
    parser.add_argument("--gram-dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--mem-n", default="32", help="comma-separated n for the memory measurement ('' to skip)")
    parser.add_argument("--mem-layers", default="blocks", help="comma-separated layer settings for the memory measurement")
    parser.add_argument("--mem-reps", type=int, default=1, help="fresh processes per memory configuration")
    parser.add_argument("--out", default="/tmp/harness-bench-cka")
    parser.add_argument("--_memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_child:
        model_id, mode, layers, n, gram_dtype = args._memory_child
        print(json.dumps(memory_child(model_id, mode, layers, int(n), gram_dtype)))
        return
    args.models = [m for m in args.models.split(",") if m]
    args.mem_n = [int(x) for x in args.mem_n.split(",") if x]
    args.mem_layers = [x for x in args.mem_layers.split(",") if x]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"allocator: {'tuned (harness.allocator.tune_allocator: mmap_max=0, no trim)' if TUNED else 'default glibc'}; "
          f"torch threads {torch.get_num_threads()}; n={args.n}, {args.batches} batches, layers={args.layers}, "
          f"gram {args.gram_dtype}", flush=True)
    results = {}
    for model_id in args.models:
        r = time_model(model_id, args)
        results[model_id] = r
        print(f"  {model_id:24s} {r['layers']:3d} layers, {r['images']} images: forward {r['forward_s']:.2f} s, "
              f"CKA {r['cka_s']:.2f} s (+ summarize {r['summarize_s']:.2f} s) -> ratio {r['ratio']:.3f}", flush=True)
    memory = measure_memory(args) if args.mem_n else []
    total_fwd = sum(r["forward_s"] for r in results.values())
    total_cka = sum(r["cka_s"] for r in results.values())
    print(json.dumps({
        "ratio": round(total_fwd / total_cka, 3),
        "models": {k: {key: v[key] for key in ("size", "layers", "n", "images", "forward_s", "cka_s", "ratio")} for k, v in results.items()},
        "memory": memory,
        "allocator": "tuned" if TUNED else "default",
        "gram_dtype": args.gram_dtype,
    }))


if __name__ == "__main__":
    main()
