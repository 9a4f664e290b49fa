"""The same `harness run` as 1 process x T threads and as T processes x 1 thread (gloo; `--launcher local`
by default, `--launcher torchrun` to start them through torchrun).

Both evaluate the insertion metric (saliency, blur, `--steps` points) of a random-init timm model
on N copies of scikit-image photos with the attribution cache off and the same explicit
`--batch-size` (so no calibration runs inside the timing). Wall time includes process start-up and
model loading, as a user sees it; the same command on `--startup-images` images is timed too, and
the speedup is also given with that fixed cost taken out of both sides. The samples files must agree
(per-sample values within 1e-5: different thread counts may round differently). The last line is
JSON: {"benchmark": "distributed", "speedup": t1 / tT, "speedup_excluding_startup": ..., ...}.

    python benchmarks/distributed.py [--n 96] [--model resnet18] [--steps 20] [--procs 2]
    python benchmarks/distributed.py --model test_resnet --n 192      # small model: ~2 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(common: list[str], out: Path, procs: int, threads: int, limit: int | None, launcher: str = "local") -> float:
    """Wall seconds of one `harness run` with ``procs`` processes of ``threads`` threads each."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               OMP_WAIT_POLICY="PASSIVE")
    extra = ["--launcher", launcher, "--nproc", str(procs)] if procs > 1 else []
    start = time.perf_counter()
    subprocess.run([*common, "--out", str(out), *extra, *(["--limit", str(limit)] if limit else [])],
                   check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def curves(folder: Path) -> dict[str, list[float]]:
    """sample id -> curve of the run's samples file."""
    (path,) = folder.glob("*.samples.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["sample_id"]: r["values"]["curve"] for r in lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96, help="images (default 96)")
    parser.add_argument("--model", default="resnet18", help="timm model id (random init)")
    parser.add_argument("--steps", type=int, default=20, help="insertion steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--procs", type=int, default=2, help="processes on the distributed side = threads on the other")
    parser.add_argument("--single-thread", action="store_true",
                        help="also time 1 process x 1 thread: how much the second thread gives one process bounds the gain")
    parser.add_argument("--launcher", default="local", choices=["local", "torchrun"],
                        help="how the processes start (harness run --launcher; default local)")
    parser.add_argument("--startup-images", type=int, default=2, help="images of the start-up-cost runs (0: skip)")
    args = parser.parse_args()

    import skimage.data

    photos = Path(skimage.data.__file__).parent
    work = Path(tempfile.mkdtemp(prefix="harness-bench-dist-"))
    data = work / "images"
    data.mkdir()
    names = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"]
    for i in range(args.n):
        shutil.copy(photos / names[i % len(names)], data / f"{i:04d}_{names[i % len(names)]}")
    common = [sys.executable, "-m", "harness", "run", "--model", args.model, "--random-init", "--metric", "insertion",
              "--data", f"folder:{data}", "-o", f"metric.steps={args.steps}", "--batch-size", str(args.batch_size),
              "--no-cache", "--quiet"]
    load1 = os.getloadavg()[0]
    sides = {"1proc": (1, args.procs), f"{args.procs}proc": (args.procs, 1)}
    if args.single_thread:
        sides["1proc1thread"] = (1, 1)
    timings, startup = {}, {}
    for name, (procs, threads) in sides.items():
        if args.startup_images:
            startup[name] = run(common, work / f"startup-{name}", procs, threads, args.startup_images * args.procs,
                                args.launcher)
        timings[name] = run(common, work / f"out-{name}", procs, threads, None, args.launcher)
        print(f"{procs} process(es) x {threads} thread(s): {timings[name]:.1f} s for {args.n} images"
              + (f" (start-up run on {args.startup_images * args.procs} images: {startup[name]:.1f} s)" if startup else ""), flush=True)
    one, many = (curves(work / f"out-{name}") for name in ("1proc", f"{args.procs}proc"))
    worst = max(abs(a - b) for sid in one for a, b in zip(one[sid], many[sid]))
    same = one.keys() == many.keys() and worst <= 1e-5
    print(f"samples files agree: {same} (largest difference {worst:.2e})")
    shutil.rmtree(work, ignore_errors=True)
    t1, t2 = timings["1proc"], timings[f"{args.procs}proc"]
    result = {
        "benchmark": "distributed", "speedup": round(t1 / t2, 3), "time_1proc_s": round(t1, 2),
        f"time_{args.procs}proc_s": round(t2, 2), "procs": args.procs, "launcher": args.launcher, "threads_1proc": args.procs, "threads_per_process": 1,
        "n_images": args.n, "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
        "agree": same, "largest_difference": worst, "cpu_count": os.cpu_count(),
        "load_average_1min": [round(load1, 2), round(os.getloadavg()[0], 2)],
    }
    if startup:
        s1, s2 = startup["1proc"], startup[f"{args.procs}proc"]
        result.update({"startup_run_1proc_s": round(s1, 2), f"startup_run_{args.procs}proc_s": round(s2, 2),
                       "speedup_excluding_startup": round((t1 - s1) / max(1e-9, t2 - s2), 3)})
    if args.single_thread:
        t0 = timings["1proc1thread"]
        result.update({"time_1proc_1thread_s": round(t0, 2), "thread_scaling_1proc": round(t0 / t1, 3),
                       "speedup_vs_1proc_1thread": round(t0 / t2, 3)})
        if startup:
            s0 = startup["1proc1thread"]
            result.update({"startup_run_1proc_1thread_s": round(s0, 2),
                           "thread_scaling_1proc_excluding_startup": round((t0 - s0) / max(1e-9, t1 - s1), 3),
                           "speedup_vs_1proc_1thread_excluding_startup": round((t0 - s0) / max(1e-9, t2 - s2), 3)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
