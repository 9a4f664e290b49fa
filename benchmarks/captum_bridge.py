"""Benchmark: Captum's IntegratedGradients through the harness bridge (``captum.IntegratedGradients``)
against Captum called directly, on identical work, in one process.

Identical work on both sides:

* the same model (``--model``, random init unless it is ``efficientnet_lite0``), frozen, in eval mode;
* the same N preprocessed photos (the bundled ``samples``, cycled) and the same classes, the model's top-1;
* the same call: ``IntegratedGradients(module).attribute(inputs, target=..., baselines=black, n_steps=...,
  method="gausslegendre", internal_batch_size=--batch-size)``. The direct side is given the black
  baseline (zero pixels, normalised) ready-made; the bridge builds it from the harness's ``black`` fill,
  splits the batch by ``--batch-size`` and sums the channels into (N, H, W) maps, all inside its timing.

Both sides alternate for ``--rounds`` rounds and each keeps its best round, so load from other processes
hits both; ratio = bridge time / direct time (1.0: the bridge costs nothing; > 1: its overhead).
``max_abs_diff`` is the largest difference between the bridge's maps and the channel sum of Captum's.

    python benchmarks/captum_bridge.py                          # efficientnet_lite0, N = 4, 50 steps, 3 rounds: ~2 min
    python benchmarks/captum_bridge.py --model test_resnet      # 160 px, random init: ~20 s
    python benchmarks/captum_bridge.py --quick                  # one round

The last line is JSON: {"ratio": ..., "bridge_s": ..., "captum_s": ..., "max_abs_diff": ..., "model": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

PRETRAINED = {"efficientnet_lite0"}


def load(model_id: str, batch_size: int) -> Any:
    from harness.model import load_model
    from harness.registry import get_registry

    return load_model(get_registry().model_spec(model_id), random_init=model_id not in PRETRAINED, batch_size=batch_size)


def photos(n: int) -> list[Any]:
    """N bundled sample photos (cycled)."""
    from harness_plugins.datasets import SampleImages

    dataset = SampleImages()
    samples = dataset.samples()
    return [dataset.load(samples[i % len(samples)]) for i in range(n)]


def best_of(sides: dict[str, Callable[[], torch.Tensor]], rounds: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    best = {k: float("inf") for k in sides}
    out: dict[str, torch.Tensor] = {}
    for r in range(rounds):
        for name, fn in sides.items():
            start = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f}s" for k, v in best.items()), file=sys.stderr)
    return best, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--n", type=int, default=4, help="images")
    parser.add_argument("--steps", type=int, default=50, help="n_steps (Captum's default: 50)")
    parser.add_argument("--batch-size", type=int, default=32, help="the harness's --batch-size (Captum's internal_batch_size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load_start = os.getloadavg()[0]

    import captum
    import captum.attr

    from harness.options import build_component
    from harness.registry import get_registry

    model = load(args.model, batch_size=args.batch_size)
    inputs = model.preprocess(photos(args.n))
    target = model.logits(inputs).argmax(1)
    seeds = list(range(args.n))

    bridged: Any = build_component(get_registry().get("attributor", "captum.IntegratedGradients"),
                              {"n_steps": args.steps}, "attributor")
    black = model.normalise(torch.zeros_like(inputs))  # the harness's black fill: zero pixels, normalised

    def bridge() -> torch.Tensor:
        return bridged.attribute(model, inputs, target, seeds)

    def direct() -> torch.Tensor:
        ig = captum.attr.IntegratedGradients(model.module)
        return ig.attribute(inputs, target=target, baselines=black, n_steps=args.steps, method="gausslegendre",
                            internal_batch_size=args.batch_size).detach()

    best, out = best_of({"bridge": bridge, "captum": direct}, args.rounds)
    report = {
        "ratio": round(best["bridge"] / best["captum"], 3),
        "bridge_s": round(best["bridge"], 3), "captum_s": round(best["captum"], 3),
        "max_abs_diff": float((out["bridge"] - out["captum"].sum(1)).abs().max()),
        "max_abs_map": float(out["bridge"].abs().max()),
        "model": args.model, "input_size": list(model.input_size), "n": args.n, "n_steps": args.steps,
        "rounds": args.rounds, "batch_size": args.batch_size, "threads": args.threads,
        "load": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__, "captum": captum.__version__,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
