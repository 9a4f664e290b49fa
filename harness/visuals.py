"""Small per-sample tensors kept for plots (input image, attribution map), one safetensors file each.

They live in ``<out>/<run_id>/visuals/`` so ``harness plot`` can draw overlays later without the
model or the data; only the first few samples of a run are kept.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

VISUAL_SAMPLES = 4


def visuals_dir(out_dir: Path, run_id: str) -> Path:
    """The folder of a run's visuals."""
    return Path(out_dir) / run_id / "visuals"


def _file_name(sample_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", sample_id)[:60]
    return f"{safe}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}.safetensors"


def save_visual(out_dir: Path, run_id: str, sample_id: str, tensors: dict[str, torch.Tensor]) -> None:
    """Store ``tensors`` (float16 on CPU) for ``sample_id``, atomically."""
    from safetensors.torch import save_file

    folder = visuals_dir(out_dir, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _file_name(sample_id)
    tmp = path.with_suffix(".tmp")
    data = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()}
    save_file(data, str(tmp), metadata={"sample_id": sample_id})
    tmp.replace(path)


def load_visuals(out_dir: Path, run_id: str) -> dict[str, dict[str, torch.Tensor]]:
    """sample id -> its stored tensors (float32)."""
    from safetensors import safe_open

    found: dict[str, dict[str, torch.Tensor]] = {}
    folder = visuals_dir(out_dir, run_id)
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            sample_id = (handle.metadata() or {}).get("sample_id", path.stem)
            found[sample_id] = {k: handle.get_tensor(k).float() for k in handle.keys()}
    return found
