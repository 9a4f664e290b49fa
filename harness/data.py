"""Samples, image reading, and the batches metrics receive."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.errors import HarnessError

if TYPE_CHECKING:
    from PIL import Image

    from harness.model import LoadedModel

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".jfif"})


@dataclass(frozen=True)
class Sample:
    """One image: a stable id, where it is, and its ImageNet label (None when unknown)."""

    id: str
    path: str
    label: int | None = None


class UnreadableImage(HarnessError):
    """An image file that cannot be decoded."""


def load_rgb(path: str | Path) -> "Image.Image":
    """Decode ``path`` fully as an RGB PIL image; raise :class:`UnreadableImage` with the reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise UnreadableImage(f"unreadable image {path}: {' '.join(str(exc).split())[:200]}") from None


def sample_ids_sha256(samples: list[Sample]) -> str:
    """Digest of the ordered sample ids (recorded in results and part of the run id)."""
    return hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()


def image_files(root: Path) -> list[Path]:
    """Image files below ``root``, sorted by relative path."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class Batch:
    """Images handed to a metric, with per-sample seeds and per-model input tensors on demand."""

    samples: list[Sample]
    images: list[Any]
    seeds: list[int]
    _inputs: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int | None]:
        """Ground-truth labels (None where unknown)."""
        return [s.label for s in self.samples]

    def inputs(self, model: "LoadedModel") -> torch.Tensor:
        """The images preprocessed for ``model`` (cached per model)."""
        key = id(model)
        if key not in self._inputs:
            self._inputs[key] = model.preprocess(self.images)
        return self._inputs[key]


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed independent of batching, order and process: stable across resumes."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little") & (2**63 - 1)
