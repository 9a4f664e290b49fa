"""``--attributor maps:PATH``: score attribution maps computed elsewhere, by sample id.

PATH is a folder of ``<sample id>.npy`` or ``<sample id>.safetensors`` files (one tensor each; for a
sample id with an image suffix, ``cat.jpg``, the file may also be ``cat.npy``), or one
``.safetensors`` file whose keys are sample ids. Every sample of the run must have a map; shapes,
channel reduction and resizing are as in :mod:`harness.maps`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.data import IMAGE_SUFFIXES
from harness.errors import HarnessError
from harness.maps import MapSource, MapsOptions, SampleMapsAttributor

MAP_SUFFIXES = (".npy", ".safetensors")


class PathMapsOptions(MapsOptions):
    path: str
    """A folder of <sample id>.npy / .safetensors files, or one .safetensors file keyed by sample id."""


def _shown(items: list[str], n: int = 3) -> str:
    text = ", ".join(repr(i) for i in items[:n])
    return text + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


def _check_shape(shape: tuple[int, ...], where: str) -> None:
    if len(shape) not in (2, 3):
        raise HarnessError(f"maps: {where} has shape {shape}; expected (H, W) or (C, H, W)")


class FolderMaps:
    """A folder of ``<sample id>.npy`` / ``<sample id>.safetensors`` files."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, Path] = {}

    def _find(self, sample_id: str) -> list[Path]:
        names = [sample_id]
        stem, dot, suffix = sample_id.rpartition(".")
        if dot and stem and f".{suffix.lower()}" in IMAGE_SUFFIXES:
            names.append(stem)
        root = self.root.resolve()
        for name in names:
            found = []
            for suffix in MAP_SUFFIXES:
                path = (self.root / f"{name}{suffix}").resolve()
                if path.is_relative_to(root) and path.is_file():
                    found.append(path)
            if found:
                return found
        return []

    def index(self, sample_ids: list[str]) -> dict[str, str]:
        from harness.identity import digest_cache

        missing = []
        for sample_id in sample_ids:
            found = self._find(sample_id)
            if not found:
                missing.append(sample_id)
            elif len(found) > 1:
                raise HarnessError(f"maps: sample {sample_id!r} has two maps ({found[0].name}, {found[1].name}); keep one")
            else:
                self.files[sample_id] = found[0]
        if missing:
            raise HarnessError(
                f"maps: {self.root} has no map for {len(missing)} of {len(sample_ids)} sample(s): {_shown(missing)} "
                "(expected <sample id>.npy or <sample id>.safetensors)"
            )
        for path in self.files.values():
            _check_shape(_file_shape(path), path.name)
        cache = digest_cache(None)
        try:
            digests = {i: cache.digest(self.files[i]).sha256 for i in sample_ids}
        except OSError as exc:
            raise HarnessError(f"maps: cannot read {exc.filename}: {exc.strerror}") from None
        cache.save()
        return digests

    def load(self, sample_id: str) -> Any:
        path = self.files[sample_id]
        if path.suffix == ".npy":
            return _read_npy(path)
        return _single_tensor(path)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HarnessError(f"maps: cannot read {path.name}: {' '.join(str(exc).split())}") from None


def _single_tensor(path: Path) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise HarnessError(f"maps: cannot read {path.name}: {' '.join(str(exc).split())}") from None
    if len(tensors) != 1:
        raise HarnessError(f"maps: {path.name} holds {len(tensors)} tensors; a per-sample file holds one map")
    return next(iter(tensors.values()))


def _file_shape(path: Path) -> tuple[int, ...]:
    """The shape of the map in ``path``, from its header."""
    if path.suffix == ".npy":
        try:
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        except (OSError, ValueError) as exc:
            raise HarnessError(f"maps: cannot read {path.name}: {' '.join(str(exc).split())}") from None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
            if len(keys) != 1:
                raise HarnessError(f"maps: {path.name} holds {len(keys)} tensors; a per-sample file holds one map")
            return tuple(handle.get_slice(keys[0]).get_shape())
    except (OSError, SafetensorError) as exc:
        raise HarnessError(f"maps: cannot read {path.name}: {' '.join(str(exc).split())}") from None


class SafetensorsMaps:
    """One ``.safetensors`` file whose keys are sample ids."""

    def __init__(self, path: Path):
        self.path = path

    def index(self, sample_ids: list[str]) -> dict[str, str]:
        from safetensors import SafetensorError, safe_open

        from harness.identity import digest_cache

        try:
            with safe_open(str(self.path), "pt") as handle:
                keys = set(handle.keys())
                missing = [i for i in sample_ids if i not in keys]
                if missing:
                    raise HarnessError(
                        f"maps: {self.path.name} has no map for {len(missing)} of {len(sample_ids)} sample(s): "
                        f"{_shown(missing)} (its keys must be sample ids)"
                    )
                for sample_id in sample_ids:
                    _check_shape(tuple(handle.get_slice(sample_id).get_shape()), f"the map of sample {sample_id!r}")
        except (OSError, SafetensorError) as exc:
            raise HarnessError(f"maps: cannot read {self.path}: {' '.join(str(exc).split())}") from None
        cache = digest_cache(None)
        whole = cache.digest(self.path).sha256
        cache.save()
        return {i: f"{whole}:{i}" for i in sample_ids}

    def load(self, sample_id: str) -> Any:
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as handle:
            return handle.get_tensor(sample_id)


def open_maps(path: str) -> MapSource:
    """The maps at ``path``: a folder or one ``.safetensors`` file."""
    location = Path(path).expanduser()
    if location.is_dir():
        return FolderMaps(location)
    if location.is_file() and location.suffix == ".safetensors":
        return SafetensorsMaps(location)
    if not location.exists():
        raise HarnessError(f"maps: {path} does not exist; give a folder of <sample id>.npy/.safetensors or one .safetensors file")
    raise HarnessError(f"maps: {path} is neither a folder nor a .safetensors file")


class MapsAttributor(SampleMapsAttributor):
    """Maps computed elsewhere, by sample id: maps:PATH (a folder of <id>.npy / .safetensors, or one .safetensors keyed by id)."""

    id: ClassVar[str] = "maps"
    Options = PathMapsOptions

    def open_source(self) -> MapSource:
        return open_maps(self.options.path)
