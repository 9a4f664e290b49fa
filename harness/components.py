"""The component kinds plugins register: models, attributors, maskers, metrics, datasets.

Every component has an ``id``, a ``version`` (bumped only when its numbers change), a pydantic
``Options`` model whose unknown fields are errors, and a docstring whose first line is its summary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Iterable, Sequence, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from PIL import Image

    from harness.data import Batch, Sample
    from harness.model import LoadedModel
    from harness.runner import MetricContext


class Options(BaseModel):
    """Base of every component's options: frozen, unknown fields are errors, and a boolean or a string
    is never taken for a number (``-o metric.steps=true`` is an error, not ``steps=1``); an integer
    is still accepted where a float is expected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_coercion_to_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field_info = cls.model_fields.get(info.field_name or "")
        if field_info is not None:
            problem = _number_coercion(value, field_info.annotation)
            if problem:
                raise PydanticCustomError("number_type", problem)
        return value


_NUMBERS = (int, float)


def _number_coercion(value: Any, annotation: Any) -> str | None:
    """Why ``value`` may only reach a field of type ``annotation`` by a bool/str -> number coercion."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _number_coercion(value, args[0])
    if origin in (Union, UnionType):
        branches = [a for a in args if a is not type(None)] if value is not None else list(args)
        problems = [_number_coercion(value, a) for a in branches]
        return None if any(p is None for p in problems) else problems[0]
    if origin in (list, tuple, set, frozenset) and isinstance(value, (list, tuple)):
        if not args:
            return None
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            pairs: Iterable[tuple[Any, Any]] = zip(value, args)
        else:
            pairs = ((v, args[0]) for v in value)
        return next((p for p in (_number_coercion(v, a) for v, a in pairs) if p), None)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return next((p for p in (_number_coercion(v, args[1]) for v in value.values()) if p), None)
    if annotation in _NUMBERS and isinstance(value, (bool, str)):
        wanted = "an integer" if annotation is int else "a number"
        return f"expected {wanted}, not a {'boolean' if isinstance(value, bool) else 'string'}"
    return None


# Inside ``Component`` the name ``Options`` is the class attribute, not this model.
_BaseOptions = Options


class Component:
    """Base of attributors, maskers, metrics and datasets."""

    kind: ClassVar[str] = "component"
    id: ClassVar[str]
    version: ClassVar[str] = "1"
    Options: ClassVar[type[Options]] = Options
    # An instance of the subclass's own ``Options`` model; ``Any`` to type checkers, which cannot follow
    # the per-subclass model (a subclass may declare ``options: MyOptions`` to have it checked).
    options: Any

    def __init__(self, options: _BaseOptions | None = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    @classmethod
    def option_fields(cls) -> dict[str, str]:
        """Option names with their defaults, for listings."""
        return {
            name: repr(f.default) if f.default is not None or not f.is_required() else "required"
            for name, f in cls.Options.model_fields.items()
        }


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model id.

    ``build(pretrained)`` returns an ``nn.Module``; with ``pretrained=True`` it loads the default
    weights (raising :class:`harness.errors.HarnessError` with instructions when they cannot be had).
    ``data_config`` overrides timm's resolved preprocessing for these weights.
    """

    id: str
    build: Callable[[bool], torch.nn.Module]
    description: str = ""
    weights: str = ""
    data_config: dict[str, Any] = field(default_factory=dict)
    version: str = "1"
    provider: str = ""

    kind: ClassVar[str] = "model"


class Attributor(Component):
    """Produces a (B, H, W) map per image; higher = more important for the target class."""

    kind: ClassVar[str] = "attributor"

    def attribute(
        self, model: "LoadedModel", inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]
    ) -> torch.Tensor:
        """Attribution maps for normalised ``inputs`` (B, 3, H, W) and target classes (B,)."""
        raise NotImplementedError


class Masker(Component):
    """A fill (the baseline removed pixels take) and a granularity (the regions ranked and moved)."""

    kind: ClassVar[str] = "masker"

    def baseline(self, model: "LoadedModel", inputs: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """The fully-removed image for normalised ``inputs`` (B, 3, H, W), in normalised space."""
        raise NotImplementedError


class Metric(Component):
    """Evaluates batches of images and summarises the per-sample records into a result."""

    kind: ClassVar[str] = "metric"
    higher_is_better: ClassVar[bool | None] = True
    needs_attributor: ClassVar[bool] = False
    needs_masker: ClassVar[bool] = False
    default_attributor: ClassVar[str | None] = None
    default_masker: ClassVar[str | None] = None
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = 1
    citation: ClassVar[str] = ""
    reduced_precision_warning: ClassVar[str | None] = None
    """Said once when the metric runs with ``--precision bf16/fp16`` (results it knows to be fragile there)."""

    def images_per_batch(self, requested: int) -> int:
        """How many images each ``evaluate`` call gets (default: ``--batch-size``)."""
        return requested

    def evaluate(self, batch: "Batch", ctx: "MetricContext") -> list[dict[str, Any]]:
        """One record per sample of ``batch``: ``{"prediction": ..., "values": {...}}``."""
        raise NotImplementedError

    def summarize(self, records: list[dict[str, Any]], ctx: "MetricContext") -> "Summary":
        """The headline value, its standard error, other values and artifacts."""
        raise NotImplementedError

    def plot(self, result: Any, records: list[dict[str, Any]], out_dir: Path) -> dict[str, str]:
        """Write PNGs for a finished result under ``out_dir/<run_id>/``; return {name: relative path}."""
        return {}


class Summary(BaseModel):
    """What a metric reports for a whole run."""

    model_config = ConfigDict(extra="forbid")

    value: float
    stderr: float | None = None
    values: dict[str, Any] = {}
    artifacts: dict[str, str] = {}


class Dataset(Component):
    """A list of samples (id, image location, label) and how to read one image."""

    kind: ClassVar[str] = "dataset"

    def samples(self) -> list["Sample"]:
        """All samples, in a stable order."""
        raise NotImplementedError

    def load(self, sample: "Sample") -> "Image.Image":
        """The RGB image of ``sample``; raises on an unreadable file."""
        from harness.data import load_rgb

        return load_rgb(sample.path)


COMPONENT_KINDS = ("model", "attributor", "masker", "metric", "dataset")
