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
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UnreadableImage(f"unreadable image {printable(str(path))}: {reason}") from None
    except Exception as exc:  # a decoder choking on hostile bytes (struct.error, IndexError, ...)
        raise UnreadableImage(f"unreadable image {printable(str(path))}: {type(exc).__name__}: {exc}"[:300]) from None


def printable(text: str) -> str:
    """``text`` with bytes that are not valid UTF-8 (surrogate escapes) shown as ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def valid_names(samples: list[Sample], stop: bool) -> list[Sample]:
    """``samples`` without those whose id or path is not valid UTF-8 (a file name with undecodable
    bytes): each is skipped with one warning, or, with ``stop``, the run stops with one line."""
    from harness.progress import warn

    kept = []
    for sample in samples:
        try:
            sample.id.encode("utf-8")
            sample.path.encode("utf-8")
        except UnicodeEncodeError:
            message = f"file name is not valid UTF-8: {printable(sample.path)}"
            if stop:
                raise UnreadableImage(message) from None
            warn(f"skipping sample {printable(sample.id)}: {message}")
            continue
        kept.append(sample)
    return kept


def sample_ids_sha256(samples: list[Sample]) -> str:
    """Digest of the ordered sample ids (recorded in results and part of the run id)."""
    return hashlib.sha256("\n".join(s.id for s in samples).encode("utf-8", "surrogatepass")).hexdigest()


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
