"""A content-addressed cache of attributions, so a map is computed once per
(model + weights, attributor + options, input image, target class, seed).

Each map is one safetensors file ``<dir>/<key[:2]>/<key>.safetensors``, written atomically. The key
hashes the model's weight digest and preprocessing, the attributor's id, version and options, the
exact input tensor, the target class and the per-sample seed, so any change to one of them misses.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from harness.components import Attributor

ENV_CACHE_DIR = "HARNESS_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$HARNESS_CACHE_DIR``, else ``$XDG_CACHE_HOME/harness/attributions`` (``~/.cache`` by default)."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "harness" / "attributions"


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


@dataclass
class CacheStats:
    """Hits and misses of one run (recorded in the result's provenance)."""

    hits: int = 0
    misses: int = 0


@dataclass
class AttributionCache:
    """Stores and finds attribution maps by content key."""

    root: Path
    stats: CacheStats = field(default_factory=CacheStats)

    def key(self, model: Any, attributor: Attributor, method: str, inputs: torch.Tensor, target: int, seed: int) -> str:
        """The content key of one image's map."""
        identity = {
            "model": model.id,
            "weights_sha256": model.weights_sha256,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in model.data_config.items()},
            "attributor": attributor.id,
            "version": attributor.version,
            "options": attributor.options.model_dump(mode="json"),
            "method": method,
            "input": _tensor_digest(inputs),
            "target": int(target),
            "seed": int(seed),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        """The stored map, or None (a damaged file counts as a miss)."""
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["map"]
        except Exception:
            return None

    def store(self, key: str, value: torch.Tensor) -> None:
        """Write one map atomically."""
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"map": value.detach().to("cpu").contiguous()}, str(tmp))
        os.replace(tmp, path)

    def info(self) -> dict[str, Any]:
        """Location, number of maps and bytes used."""
        files = list(self.root.glob("*/*.safetensors")) if self.root.is_dir() else []
        return {"path": str(self.root), "entries": len(files), "bytes": sum(f.stat().st_size for f in files)}

    def clear(self) -> int:
        """Delete every cached map; return how many."""
        removed = 0
        if self.root.is_dir():
            for f in self.root.glob("*/*.safetensors"):
                f.unlink(missing_ok=True)
                removed += 1
            for d in self.root.iterdir():
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
        return removed


class CachedAttributor:
    """Wraps an attributor: per image, a stored map is reused, the rest are computed together."""

    def __init__(self, inner: Attributor, cache: AttributionCache):
        self.inner = inner
        self.cache = cache
        self.id, self.version, self.options = inner.id, inner.version, inner.options
        if hasattr(inner, "coarse"):
            self.coarse = lambda model, inputs, target, seeds: self._cached("coarse", model, inputs, target, seeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def attribute(self, model: Any, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return self._cached("attribute", model, inputs, target, seeds)

    def _cached(self, method: str, model: Any, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        keys = [self.cache.key(model, self.inner, method, inputs[i], int(target[i]), seeds[i]) for i in range(len(inputs))]
        found = [self.cache.load(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.cache.stats.hits += len(inputs) - len(missing)
        self.cache.stats.misses += len(missing)
        if missing:
            index = torch.tensor(missing, device=inputs.device)
            computed = getattr(self.inner, method)(model, inputs[index], target[index], [seeds[i] for i in missing])
            for row, i in enumerate(missing):
                found[i] = value = computed[row].detach().cpu()
                self.cache.store(keys[i], value)
        return torch.stack([f.to(inputs.device) for f in found])  # type: ignore[union-attr]
