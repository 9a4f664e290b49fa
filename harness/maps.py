"""Attribution maps computed elsewhere, looked up by sample id.

The ``maps`` attributor (``--attributor maps:PATH``, plugins/attributors/maps.py) and precomputed maps
given to :func:`harness.evaluate` share this: the runner tells the attributor its run's samples
(:meth:`SampleMapsAttributor.bind_samples`), which maps every per-sample seed back to a sample id;
the maps' content digest becomes part of the run identity (``attributor.maps_sha256``).

A map is ``(H, W)``, or ``(C, H, W)`` reduced over channels (``reduce``, default ``sum``: the signed
sum, as Captum's and the bridges' default). It must be at the model's input size, unless
``resize=bilinear`` (then it is resized bilinearly, ``align_corners=False``, as CAMs are upsampled).
A map serves one request per sample: its own image, for one model and one target; a metric that asks
again for a changed image, another model or another target (robustness, randomisation) stops with
one line, since maps computed elsewhere cannot answer it.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Literal, Protocol, Sequence

import torch

from harness.components import Attributor, Options
from harness.errors import HarnessError

Reduce = Literal["sum", "mean", "abs_sum", "abs_max", "l2"]
"""How a (C, H, W) map becomes (H, W): signed sum or mean, sum of magnitudes, max magnitude, L2 norm."""


class MapsOptions(Options):
    """Options of maps computed elsewhere (``maps:PATH`` adds ``path``)."""

    reduce: Reduce = "sum"
    """How a (C, H, W) map becomes (H, W)."""
    resize: Literal["none", "bilinear"] = "none"
    """none: a map at another size than the model's input is an error; bilinear: resize it."""
    name: str | None = None
    """A label for the method that made the maps (shown in the leaderboard's column)."""


def reduce_map(values: torch.Tensor, how: str) -> torch.Tensor:
    """(C, H, W) -> (H, W) by ``how``; (H, W) is returned as it is."""
    if values.dim() == 2:
        return values
    if how == "sum":
        return values.sum(0)
    if how == "mean":
        return values.mean(0)
    if how == "abs_sum":
        return values.abs().sum(0)
    if how == "abs_max":
        return values.abs().amax(0)
    if how == "l2":
        return values.norm(dim=0)
    raise HarnessError(f"unknown reduction {how!r}; use sum, mean, abs_sum, abs_max or l2")


def as_map(values: Any, size: tuple[int, int], reduce: str, resize: str, what: str) -> torch.Tensor:
    """One (H, W) float32 map at ``size`` from an (H, W) or (C, H, W) array; ``what`` names it in errors."""
    try:
        tensor = torch.as_tensor(values.copy() if hasattr(values, "flags") and not values.flags.writeable else values)
    except (TypeError, RuntimeError, ValueError):
        raise HarnessError(f"{what} is no numeric array ({type(values).__name__})") from None
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise HarnessError(f"{what} has dtype {tensor.dtype}; expected real numbers")
    if tensor.dim() not in (2, 3):
        raise HarnessError(f"{what} has shape {tuple(tensor.shape)}; expected (H, W) or (C, H, W)")
    tensor = reduce_map(tensor.detach().to("cpu", torch.float32), reduce)
    if tuple(tensor.shape) != tuple(size):
        if resize != "bilinear":
            raise HarnessError(
                f"{what} is {tensor.shape[0]}x{tensor.shape[1]} but the model's input is {size[0]}x{size[1]}; "
                "save maps at the input size, or resize them with -o attributor.resize=bilinear"
            )
        tensor = torch.nn.functional.interpolate(tensor[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    if not torch.isfinite(tensor).all():
        raise HarnessError(f"{what} has non-finite values (NaN or inf)")
    return tensor


def tensor_sha256(values: Any) -> str:
    """Digest of an array's dtype, shape and bytes (numpy or torch)."""
    tensor = torch.as_tensor(values).detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        flat = tensor.view(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if tensor.dtype != torch.bool else flat.numpy().tobytes())
    return digest.hexdigest()


class MapSource(Protocol):
    """Where maps come from: checked for a run's sample ids, then read one at a time."""

    def index(self, sample_ids: list[str]) -> dict[str, str]:
        """A content digest per sample id; one-line HarnessError for missing ids or wrong shapes."""

    def load(self, sample_id: str) -> Any:
        """The map of ``sample_id`` (numpy or torch, (H, W) or (C, H, W))."""


class ArrayMaps:
    """Maps held in memory: an (N, H, W) / (N, C, H, W) array in the run's sample order, or {sample id: map}."""

    def __init__(self, maps: Any):
        self.maps = maps

    def index(self, sample_ids: list[str]) -> dict[str, str]:
        """Check there is one map per sample (by position for arrays, by id for a mapping)."""
        if isinstance(self.maps, dict):
            missing = [i for i in sample_ids if i not in self.maps]
            if missing:
                raise HarnessError(f"maps: no map for {len(missing)} sample(s) of this run: {_first(missing)}")
            self._by_id = {i: self.maps[i] for i in sample_ids}
        else:
            shape = tuple(getattr(self.maps, "shape", ()))
            if len(shape) not in (3, 4):
                raise HarnessError(f"maps: shape {shape}; expected (N, H, W) or (N, C, H, W)")
            if shape[0] != len(sample_ids):
                raise HarnessError(f"maps: {shape[0]} maps for {len(sample_ids)} samples; give one map per sample, in order")
            self._by_id = {i: self.maps[k] for k, i in enumerate(sample_ids)}
        for sample_id, values in self._by_id.items():
            if len(getattr(values, "shape", ())) not in (2, 3):
                raise HarnessError(f"maps: the map of sample {sample_id!r} has shape {tuple(getattr(values, 'shape', ()))}; "
                                   "expected (H, W) or (C, H, W)")
        return {i: tensor_sha256(v) for i, v in self._by_id.items()}

    def load(self, sample_id: str) -> Any:
        """The map of ``sample_id``."""
        return self._by_id[sample_id]


def _first(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


class SampleMapsAttributor(Attributor):
    """Maps computed elsewhere, one per sample id (see :mod:`harness.maps`); subclasses open the source."""

    id: ClassVar[str] = "maps"
    version: ClassVar[str] = "1"
    Options: ClassVar[type[Options]] = MapsOptions
    cacheable: ClassVar[bool] = False
    """Stored maps are not put in the attribution cache."""

    _source: MapSource | None = None
    _sha256: str | None = None

    def open_source(self) -> MapSource:
        """The maps of this attributor."""
        raise NotImplementedError

    def bind_samples(self, samples: Sequence[Any], seed: int) -> None:
        """Called by the runner with the run's samples before anything runs: checks every sample has
        a map and fixes the maps' digest; per-sample seeds identify samples in :meth:`attribute`."""
        from harness.data import sample_seed
        from harness.identity import combined_sha256

        source = self.open_source()
        ids = [s.id for s in samples]
        digests = source.index(ids)
        self._source = source
        self._sha256 = combined_sha256(f"{i}:{digests[i]}" for i in ids)
        self._ids = {sample_seed(seed, i): i for i in ids}
        self._seen: dict[str, tuple[int, str, int]] = {}

    def content_identity(self) -> dict[str, Any]:
        """What identifies the maps' content (recorded in the result, part of the run id)."""
        return {"maps_sha256": self._sha256}

    def attribute(self, model: Any, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """The stored map of each input's sample, at the input's size."""
        if self._source is None:
            raise HarnessError("maps: not bound to a run's samples (the runner calls bind_samples first)")
        size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        maps = []
        for i, seed in enumerate(seeds):
            sample_id = self._ids.get(int(seed))
            if sample_id is None:
                raise HarnessError("maps: the metric asked for a map of an input that is no sample of this run; "
                                   "maps computed elsewhere serve only the run's own images")
            self._check_request(sample_id, model, inputs[i], int(target[i]))
            o = self.options
            maps.append(as_map(self._source.load(sample_id), size, o.reduce, o.resize, f"maps: the map of sample {sample_id!r}"))
        return torch.stack(maps).to(inputs.device) if maps else inputs.new_zeros((0, *size))

    def _check_request(self, sample_id: str, model: Any, image: torch.Tensor, target: int) -> None:
        request = (id(model), tensor_sha256(image.detach().float()), target)
        first = self._seen.setdefault(sample_id, request)
        if first != request:
            what = "model" if first[0] != request[0] else ("image" if first[1] != request[1] else "target class")
            raise HarnessError(
                f"maps: sample {sample_id!r} was asked for again with another {what}; a stored map explains one "
                "image for one model and target, so this metric cannot use maps computed elsewhere"
            )


class PrecomputedMaps(SampleMapsAttributor):
    """Maps given to ``harness.evaluate`` as an array or {sample id: map} (bound by :func:`bound_maps`)."""

    maps: ClassVar[Any] = None

    def open_source(self) -> MapSource:
        return ArrayMaps(self.maps)


def bound_maps(maps: Any) -> type[PrecomputedMaps]:
    """A ``maps`` attributor class holding ``maps`` (for the Python API's registry overlay)."""
    return type("PrecomputedMaps", (PrecomputedMaps,), {"maps": maps, "__doc__": PrecomputedMaps.__doc__})
