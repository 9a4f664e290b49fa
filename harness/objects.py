"""The user's own objects as run components: an ``nn.Module`` as a model, tensors or a torch
``Dataset``/``DataLoader`` as a dataset, a callable as an attributor.

:func:`harness.evaluate` registers them in a copy of the registry (:func:`overlay`), so the runner
resolves and runs them exactly as it runs registered ids. Their run identity covers content: the
module's parameter digest, each sample's tensor digest, the callable's source text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Literal, Mapping, Sequence

import torch

from harness.components import Attributor, Dataset, ModelSpec, Options
from harness.data import Sample
from harness.errors import HarnessError
from harness.maps import Reduce, as_map, tensor_sha256

USER_PROVIDER = "python"
"""The provider named for objects given to ``harness.evaluate``."""

PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
"""What a user model's preprocessing config may set (timm data-config keys)."""


# -- models ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserModelSpec(ModelSpec):
    """A user's ``nn.Module`` as a model: ``build`` returns it; its parameter digest is its identity."""

    parameters_sha256: str = ""
    user_model: bool = True


def model_name(module: torch.nn.Module) -> str:
    """The id of a user module: its class name (characters outside ``[A-Za-z0-9_.-]`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", type(module).__name__) or "module"


def user_model_spec(module: torch.nn.Module, model_id: str, preprocessing: Mapping[str, Any] | None) -> UserModelSpec:
    """The spec of ``module`` with its preprocessing (keys of :data:`PREPROCESSING_KEYS`)."""
    from harness.weights import state_dict_sha256

    config = dict(preprocessing or {})
    unknown = sorted(set(config) - set(PREPROCESSING_KEYS))
    if unknown:
        raise HarnessError(f"preprocessing: unknown key(s) {', '.join(unknown)} (known: {', '.join(PREPROCESSING_KEYS)})")
    if "input_size" in config:
        size = tuple(int(v) for v in config["input_size"])
        if len(size) != 3 or min(size) < 1:
            raise HarnessError(f"preprocessing: input_size must be (C, H, W), got {config['input_size']!r}")
        config["input_size"] = size
    for key in ("mean", "std"):
        if key in config:
            config[key] = tuple(float(v) for v in config[key])
    cls = type(module)
    where = f"python:{cls.__module__}.{cls.__qualname__}"
    return UserModelSpec(
        id=model_id,
        build=lambda pretrained: module,
        description=f"{where} (user model)",
        weights=where,
        data_config=config,
        provider=USER_PROVIDER,
        parameters_sha256=state_dict_sha256(module),
    )


@contextlib.contextmanager
def borrowed(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Give ``modules`` to a run and hand them back as they were: training flags, ``requires_grad``,
    parameter and buffer tensors (device, memory format), and an instance ``forward`` or compiled
    call installed by the run's execution mode."""
    saved = []
    for root in modules:
        for module in root.modules():
            saved.append((
                module,
                module.training,
                {name: (p, p.data, p.requires_grad) for name, p in module._parameters.items() if p is not None},
                dict(module._buffers),
                module.__dict__.get("forward"),
                "forward" in module.__dict__,
                module.__dict__.get("_compiled_call_impl"),
            ))
    try:
        yield
    finally:
        for module, training, params, buffers, forward, had_forward, compiled in saved:
            module.training = training
            for name, (param, data, requires_grad) in params.items():
                param.data = data
                param.requires_grad_(requires_grad)
                module._parameters[name] = param
            module._buffers.update(buffers)
            if had_forward:
                module.forward = forward  # type: ignore[assignment]
            else:
                module.__dict__.pop("forward", None)
            module.__dict__["_compiled_call_impl"] = compiled


# -- data --------------------------------------------------------------------------------------------------
def _item_sha256(image: Any) -> str:
    """Content digest of one image: a tensor's dtype, shape and bytes, or a PIL image's mode, size and pixels."""
    if isinstance(image, torch.Tensor):
        return tensor_sha256(image)
    tobytes = getattr(image, "tobytes", None)
    if callable(tobytes) and hasattr(image, "mode") and hasattr(image, "size"):
        digest = hashlib.sha256(f"PIL|{image.mode}|{image.size}|".encode())
        digest.update(tobytes())
        return digest.hexdigest()
    raise HarnessError(f"data: an image must be a tensor (C, H, W) or a PIL image, got {type(image).__name__}")


def _label(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise HarnessError(f"data: {where}: a label must be one class index, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not float(value).is_integer():
        raise HarnessError(f"data: {where}: a label must be a class index, got {value!r}")
    return int(value)


def _image(value: Any, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() != 3:
            raise HarnessError(f"data: {where}: an image tensor must be (C, H, W), got shape {tuple(value.shape)}")
        return value.detach().to("cpu", torch.float32)
    if hasattr(value, "__array__") and not hasattr(value, "mode"):
        return _image(torch.as_tensor(value), where)
    return value


class ItemSource:
    """Images and labels by index: in-memory tensors, a map-style Dataset, or a DataLoader read once."""

    def __init__(self, data: Any, limit: int | None):
        self.limit = limit
        self._items: list[tuple[Any, int | None]] | None = None
        self._dataset: Any = None
        self.name = "tensors"
        if isinstance(data, torch.utils.data.DataLoader):
            self.name = f"torch.{type(data.dataset).__name__}"
            self._items = self._read_loader(data)
        elif isinstance(data, torch.utils.data.Dataset):
            if not hasattr(data, "__len__") or isinstance(data, torch.utils.data.IterableDataset):
                raise HarnessError("data: an iterable-style Dataset has no length; wrap it in a DataLoader")
            self.name = f"torch.{type(data).__name__}"
            self._dataset = data
        else:
            self._items = self._read_batch(data)

    def _read_batch(self, data: Any) -> list[tuple[Any, int | None]]:
        images, labels = (data[0], data[1]) if isinstance(data, (tuple, list)) and len(data) == 2 else (data, None)
        if not isinstance(images, torch.Tensor):
            if not hasattr(images, "__array__"):
                raise HarnessError(
                    f"data: expected an id/spec string, a (images, labels) batch, a torch Dataset or a DataLoader; "
                    f"got {type(data).__name__}"
                )
            images = torch.as_tensor(images)
        if images.dim() != 4:
            raise HarnessError(f"data: images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels is not None:
            labels = list(labels.tolist() if hasattr(labels, "tolist") else labels)
            if len(labels) != len(images):
                raise HarnessError(f"data: {len(images)} images but {len(labels)} labels")
        n = len(images) if self.limit is None else min(len(images), self.limit)
        return [(_image(images[i], f"image {i}"), _label(None if labels is None else labels[i], f"label {i}"))
                for i in range(n)]

    def _read_loader(self, loader: Any) -> list[tuple[Any, int | None]]:
        items: list[tuple[Any, int | None]] = []
        for batch in loader:
            images, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) >= 2 else (batch, None)
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise HarnessError("data: a DataLoader must yield (images (B, C, H, W), labels) batches")
            for k in range(len(images)):
                label = labels[k] if labels is not None else None
                items.append((_image(images[k], f"item {len(items)}"), _label(label, f"item {len(items)}")))
                if self.limit is not None and len(items) >= self.limit:
                    return items
        return items

    def __len__(self) -> int:
        if self._items is not None:
            return len(self._items)
        n = len(self._dataset)
        return n if self.limit is None else min(n, self.limit)

    def item(self, index: int) -> tuple[Any, int | None]:
        """(image, label) of item ``index``."""
        if self._items is not None:
            return self._items[index]
        value = self._dataset[index]
        image, label = (value[0], value[1]) if isinstance(value, (tuple, list)) and len(value) >= 2 else (value, None)
        return _image(image, f"item {index}"), _label(label, f"item {index}")


class ObjectDataset(Dataset):
    """Samples from the user's objects (bound by :func:`bound_dataset`); ids are the item indices."""

    source: ClassVar[ItemSource]

    def samples(self) -> list[Sample]:
        found, digests = [], {}
        for index in range(len(self.source)):
            image, label = self.source.item(index)
            sample = Sample(id=str(index), path=f"<{self.id} item {index}>", label=label)
            digests[sample.id] = _item_sha256(image)
            found.append(sample)
        self._digests = digests
        return found

    def content_digests(self, samples: Sequence[Sample]) -> dict[str, str]:
        """Each sample's content digest (the runner's sample identity for data that are no files)."""
        return {s.id: self._digests[s.id] for s in samples}

    def load(self, sample: Sample) -> Any:
        """The image (a tensor is taken as already preprocessed); it must be what was hashed."""
        image, _ = self.source.item(int(sample.id))
        if _item_sha256(image) != self._digests[sample.id]:
            raise HarnessError(
                f"data: item {sample.id} changed between two reads (random transforms?); use deterministic transforms"
            )
        return image


def bound_dataset(data: Any, limit: int | None, name: str | None = None) -> type[ObjectDataset]:
    """A dataset class serving ``data``, with id ``name`` (default ``tensors`` or ``torch.<Dataset class>``)."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", name):
        raise HarnessError(f"data_name {name!r}: use letters, digits and _ . + - (no ':' or '/')")
    source = ItemSource(data, limit)
    if len(source) == 0:
        raise HarnessError("data: no images")
    return type("ObjectDataset", (ObjectDataset,), {"id": name or source.name, "source": source, "__doc__": ObjectDataset.__doc__})


# -- attributors -------------------------------------------------------------------------------------------
class CallableOptions(Options):
    """Options of a callable attributor."""

    reduce: Reduce = "sum"
    """How a (B, C, H, W) result becomes (B, H, W)."""
    resize: Literal["none", "bilinear"] = "none"
    """none: maps at another size than the input are an error; bilinear: resize them."""


def callable_name(function: Callable[..., Any]) -> str:
    """``callable.<qualified name>`` of a function, or of a callable object's class."""
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return "callable." + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def callable_sha256(function: Callable[..., Any]) -> str:
    """A digest of the callable's source text (its class's for a callable object; its bytecode when
    there is no source). State it captures (closures, attributes) is not covered."""
    target = function if inspect.isfunction(function) or inspect.ismethod(function) else type(function)
    try:
        text = inspect.getsource(target)
    except (OSError, TypeError):
        code = getattr(function, "__code__", None)
        text = repr((code.co_code, code.co_consts)) if code is not None else repr(target)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class CallableAttributor(Attributor):
    """The user's ``function(module, inputs, targets) -> maps`` (bound by :func:`bound_callable`)."""

    Options = CallableOptions
    cacheable: ClassVar[bool] = False
    function: ClassVar[Callable[..., Any]]

    def content_identity(self) -> dict[str, Any]:
        """The callable's source digest (part of the run id)."""
        return {"code_sha256": callable_sha256(self.function)}

    def attribute(self, model: Any, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Call the function on the module, seeded by the batch's per-sample seeds; reduce and check its maps."""
        seed = int.from_bytes(hashlib.sha256(",".join(map(str, seeds)).encode()).digest()[:8], "little") & (2**63 - 1)
        devices = [inputs.device.index or 0] if inputs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(seed)
            raw = type(self).function(model.module, inputs.detach().clone(), target)
        if isinstance(raw, torch.Tensor):
            raw = raw.detach()
        shape = tuple(getattr(raw, "shape", ()))
        if len(shape) not in (3, 4) or shape[0] != len(inputs):
            raise HarnessError(f"attributor {self.id}: returned shape {shape} for {len(inputs)} inputs; "
                               "expected (B, H, W) or (B, C, H, W)")
        size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        o = self.options
        maps = [as_map(raw[i], size, o.reduce, o.resize, f"attributor {self.id}: the map of input {i}")
                for i in range(len(inputs))]
        return torch.stack(maps).to(inputs.device)


def bound_callable(function: Callable[..., Any]) -> type[CallableAttributor]:
    """An attributor class calling ``function`` (id ``callable.<name>``)."""
    return type("CallableAttributor", (CallableAttributor,), {
        "id": callable_name(function), "function": staticmethod(function), "__doc__": CallableAttributor.__doc__,
    })


# -- the registry overlay ----------------------------------------------------------------------------------
def overlay(registry: Any, models: Sequence[ModelSpec] = (), components: Sequence[tuple[str, Any]] = ()) -> Any:
    """A copy of ``registry`` where ``models`` and ``components`` ((kind, class) pairs) are registered
    under their ids (taking precedence, for this run only)."""
    from harness.registry import Registered

    table = {kind: dict(entries) for kind, entries in registry.components.items()}
    for spec in models:
        table["model"][spec.id] = Registered(spec, USER_PROVIDER)
    for kind, cls in components:
        table[kind][cls.id] = Registered(cls, USER_PROVIDER)
    return dataclasses.replace(registry, components=table)
