"""A small labelled ImageFolder for tests (``imagefolder:PATH``, probes, accuracy, robustness).

One scikit-image sample photo per class, so the classes are genuinely separable; every image is a
random square crop of its class's photo, randomly flipped, with a small per-channel colour shift,
resized to ``size`` and written as PNG (even numbers) or JPEG (odd numbers). Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
    "ihc.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg",
)
"""Colour photos bundled with scikit-image, in sorted order: class i (sorted folder order) is SOURCES[i]."""


def make_labelled_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write ``root/<photo>/<nnn>.(png|jpg)``: ``per_class`` images of ``classes`` classes; return ``root``.

    Class folders are named after their photo (``astronaut``, ``chelsea``, ``coffee``, ...); their
    sorted order is SOURCES' order, so class index i (torchvision's rule) is the i-th photo.
    """
    import skimage.data

    if not 1 <= classes <= len(SOURCES):
        raise ValueError(f"classes must be 1 ... {len(SOURCES)}, got {classes}")
    if per_class < 1 or size < 8:
        raise ValueError(f"per_class must be >= 1 and size >= 8, got {per_class} and {size}")
    photos = Path(skimage.data.__file__).parent
    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in SOURCES[:classes]:
        folder = root / name.rsplit(".", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(photos / name) as opened:
            photo = opened.convert("RGB")
        width, height = photo.size
        for j in range(per_class):
            side = int(min(width, height) * rng.uniform(0.75, 0.95))
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            gain, offset = rng.uniform(0.92, 1.08, 3), rng.uniform(-8.0, 8.0, 3)
            pixels = np.clip(np.asarray(crop, dtype=np.float64) * gain + offset, 0, 255).round().astype(np.uint8)
            image = Image.fromarray(pixels, "RGB")
            if j % 2 == 0:
                image.save(folder / f"{j:03d}.png", format="PNG")
            else:
                image.save(folder / f"{j:03d}.jpg", format="JPEG", quality=92)
    return root
