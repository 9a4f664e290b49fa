"""Helpers for the representation-metric tests (cka, attention_distance, norm_ratio, erf):
synthetic images, an image folder, and running a metric the way the runner does (chunks of
``images_per_batch``, records through a JSON round trip, then ``summarize``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


def smooth_images(n: int, size: int = 32, seed: int = 0, contrast: Sequence[float] | None = None) -> list[Image.Image]:
    """``n`` RGB images of smooth random patterns (coarse noise upsampled); ``contrast[i]`` scales image i."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        coarse = rng.normal(size=(4, 4, 3))
        fine = np.kron(coarse, np.ones((size // 4, size // 4, 1))) + 0.3 * rng.normal(size=(size, size, 3))
        c = 1.0 if contrast is None else contrast[i]
        pixels = np.clip(128 + 40 * c * fine, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def image_folder(root: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """A folder of ``n`` PNG images for ``--data folder:PATH``."""
    root.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(smooth_images(n, size, seed)):
        img.save(root / f"img{i:03d}.png")
    return root


def run_metric(metric, models: list, images: list, *, batch_size: int, out_dir: Path, seed: int = 0,
               ids: list[str] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """Evaluate ``metric`` as the runner does and return (summary, records)."""
    from harness.data import Batch, Sample, sample_seed
    from harness.results import _finite
    from harness.runner import MetricContext

    ids = ids or [f"s{i:04d}" for i in range(len(images))]
    samples = [Sample(id=i, path="", label=None) for i in ids]
    ctx = MetricContext(models=models, attributor=None, masker=None, seed=seed, batch_size=batch_size,
                        out_dir=Path(out_dir), run_id="test")
    step = metric.images_per_batch(batch_size)
    records = []
    for start in range(0, len(images), step):
        chunk = samples[start : start + step]
        batch = Batch(samples=chunk, images=images[start : start + step], seeds=[sample_seed(seed, s.id) for s in chunk])
        for s, r in zip(chunk, metric.evaluate(batch, ctx)):
            records.append(json.loads(json.dumps(_finite({"sample_id": s.id, "label": None, **r}))))
    return metric.summarize(records, ctx), records


def as_matrix(rows: list[list[float | None]]) -> torch.Tensor:
    """A nested list with nulls -> float64 tensor with NaN."""
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in rows], dtype=torch.float64)


def cli_result(res) -> tuple[str, dict[str, Any]]:
    """(result path, parsed result) of a successful ``harness run`` (the path its printed line names)."""
    assert res.exit_code == 0, res.stderr
    path = res.stdout.strip().rsplit("-> ", 1)[1]
    return path, json.loads(open(path).read())
