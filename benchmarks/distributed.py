"""The same `harness run` on 1 and on 2 processes (torchrun, gloo, 1 thread each).

Both runs evaluate the insertion metric (saliency, blur, `--steps` points) of a random-init timm
model on N copies of scikit-image photos, with the attribution cache off, and must write identical
samples files. Wall time includes process start-up and model loading on each side, as a user sees
it. The last line is JSON: {"benchmark": "distributed", "speedup": t1 / t2, ...}.

    python benchmarks/distributed.py [--n 24] [--model resnet18] [--steps 20]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="images")
    parser.add_argument("--model", default="resnet18", help="timm model id (random init)")
    parser.add_argument("--steps", type=int, default=20, help="insertion steps")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import skimage.data

    photos = Path(skimage.data.__file__).parent
    work = Path(tempfile.mkdtemp(prefix="harness-bench-dist-"))
    data = work / "images"
    data.mkdir()
    names = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"]
    for i in range(args.n):
        shutil.copy(photos / names[i % len(names)], data / f"{i:04d}_{names[i % len(names)]}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    common = [sys.executable, "-m", "harness", "run", "--model", args.model, "--random-init", "--metric", "insertion",
              "--data", f"folder:{data}", "-o", f"metric.steps={args.steps}", "--batch-size", str(args.batch_size),
              "--no-cache", "--quiet"]
    timings = {}
    for procs in (1, 2):
        out = work / f"out{procs}"
        extra = ["--launcher", "torchrun", "--nproc", str(procs)] if procs > 1 else []
        start = time.perf_counter()
        subprocess.run([*common, "--out", str(out), *extra], check=True, env=env, capture_output=True)
        timings[procs] = time.perf_counter() - start
        print(f"{procs} process(es): {timings[procs]:.1f} s for {args.n} images")
    same = [p.read_text() for p in sorted((work / "out1").glob("*.samples.jsonl"))] == \
           [p.read_text() for p in sorted((work / "out2").glob("*.samples.jsonl"))]
    print(f"identical samples files: {same}")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "benchmark": "distributed", "speedup": round(timings[1] / timings[2], 3),
        "time_1proc_s": round(timings[1], 2), "time_2proc_s": round(timings[2], 2),
        "n_images": args.n, "model": args.model, "steps": args.steps, "threads_per_process": 1,
        "identical": same, "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
