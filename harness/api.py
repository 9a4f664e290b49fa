"""The Python API: evaluate a registered id or your own model, data and explanations in one call.

:func:`evaluate` builds the same :class:`harness.runner.RunConfig` as ``harness run`` and runs it
through the same runner; objects given in place of ids (an ``nn.Module``, tensors, a torch
``Dataset``/``DataLoader``, a callable, precomputed maps) are registered for that one run in a copy
of the registry (:mod:`harness.objects`). With ids only, the run id and the numbers equal those of
the equivalent ``harness run``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from pydantic import PrivateAttr

from harness.errors import HarnessError
from harness.results import Result

ModelArg = Union[str, torch.nn.Module]
"""A model: a registered id / alias / timm name, or any ``nn.Module`` (a user model)."""


class Evaluation(Result):
    """The result of :func:`evaluate`: every field of a result file (``value``, ``stderr``, ``run_id``,
    ``models``, ``metric``, ``values``, ``provenance`` ...), plus the per-sample ``records`` (the
    samples file's lines) and ``path`` (the result file, when written)."""

    _records: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _path: Path | None = PrivateAttr(default=None)

    @property
    def records(self) -> list[dict[str, Any]]:
        """One record per sample: ``sample_id``, ``label``, ``prediction``, ``values`` (the metric's per-sample values)."""
        return self._records

    @property
    def path(self) -> Path | None:
        """The result file written by ``out=`` or :meth:`save` (None when kept in memory only)."""
        return self._path

    def per_sample(self, key: str) -> list[Any]:
        """The per-sample value ``key`` (e.g. ``"auc"``) of every record, in sample order."""
        return [r["values"].get(key) for r in self._records]

    def save(self, out: str | Path) -> Path:
        """Write ``<out>/<run_id>.json`` and ``<out>/<run_id>.samples.jsonl`` (atomically); return the result file."""
        from harness.results import atomic_write_text, write_result

        folder = Path(out)
        lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self._records)
        atomic_write_text(folder / f"{self.run_id}.samples.jsonl", lines)
        self._path = write_result(self, folder)
        return self._path


def _option_pairs(target: str | None, values: Mapping[str, Any] | None) -> list[str]:
    """``-o`` strings for ``values`` (JSON values, parsed back exactly as ``-o`` parses them)."""
    prefix = f"{target}." if target else ""
    return [f"{prefix}{name}={json.dumps(value, default=str)}" for name, value in (values or {}).items()]


def _is_maps(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, Mapping)) or (hasattr(value, "__array__") and hasattr(value, "shape"))


def evaluate(
    model: ModelArg | Sequence[ModelArg],
    data: Any,
    metric: str,
    attributor: str | Callable[..., Any] | Any | None = None,
    masker: str | None = None,
    *,
    out: str | Path | None = None,
    batch_size: int | str = "auto",
    device: str = "auto",
    seed: int = 0,
    limit: int | None = None,
    data_name: str | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    weights: str | Path | Sequence[str | Path] | None = None,
    random_init: bool = False,
    precision: str = "fp32",
    memory_format: str = "auto",
    fold_batchnorm: bool = True,
    metric_options: Mapping[str, Any] | None = None,
    attributor_options: Mapping[str, Any] | None = None,
    masker_options: Mapping[str, Any] | None = None,
    model_options: Mapping[str, Any] | None = None,
    data_options: Mapping[str, Any] | None = None,
    resume: bool = False,
    cache: bool = True,
    quiet: bool = False,
    **options: Any,
) -> Evaluation:
    """Evaluate ``metric`` on ``model`` and ``data`` (with ``attributor`` and ``masker`` where the metric
    takes them); return the result with its per-sample records.

    Args:
        model: a registered id (``"resnet50"``, any timm name), or an ``nn.Module`` (a user model: its row
            names the class, marked ``[user model <parameters digest>]``); a list for multi-model metrics.
            The module is handed back as it was (training mode, ``requires_grad``, device).
        data: an id/spec (``"samples"``, ``"imagenet:PATH"``, ``"folder:PATH"``, ``"imagefolder:PATH"``); an ``(images, labels)``
            batch (tensors or arrays, images (N, C, H, W), labels (N,) or None) or images alone; a map-style
            ``torch.utils.data.Dataset`` or a ``DataLoader`` yielding ``(image, label)``. Tensor images are
            taken as already preprocessed (normalised with the model's mean and std); PIL images go through
            the model's preprocessing. Sample ids are the item indices ``"0"``, ``"1"``, ...
        data_name: the dataset id recorded for data given as objects (default ``tensors``, or
            ``torch.<Dataset class>``); the leaderboard puts results on the same id and sample
            contents in one table.
        metric: a metric id (``harness list metrics``).
        attributor: an id (``"saliency"``, ``"captum.DeepLift"``, ``"maps:PATH"``); a callable
            ``f(module, inputs, targets) -> maps`` (inputs (B, C, H, W) normalised, targets (B,) class
            indices; maps (B, H, W) or (B, C, H, W), numpy or torch); or precomputed maps: an (N, H, W) or
            (N, C, H, W) array in sample order, or ``{sample id: map}``. (C, H, W) maps are reduced by the
            signed channel sum (``attributor_options={"reduce": "abs_max"}`` etc.); maps must be at the input
            size unless ``attributor_options={"resize": "bilinear"}``.
        masker: a masker id (``blur``, ``black``, ...), default per metric.
        out: a folder: write ``<run_id>.json`` and ``<run_id>.samples.jsonl`` there (``harness leaderboard``
            reads them). None: nothing is kept on disk (:meth:`Evaluation.save` writes later).
        batch_size, device, seed, limit, weights, random_init, precision, memory_format, fold_batchnorm, resume, cache,
            quiet: as the ``harness run`` options of the same names (``weights`` and ``random_init`` apply
            to registered ids only).
        preprocessing: for ``nn.Module`` models: ``input_size`` (C, H, W), ``mean``, ``std`` (and
            ``interpolation``, ``crop_pct``, ``crop_mode`` for PIL images); unset keys follow timm's
            defaults (ImageNet mean/std); ``input_size`` defaults to the tensors' size.
        metric_options, attributor_options, masker_options, model_options, data_options: component
            options, validated by the same pydantic models as ``-o TARGET.NAME=VALUE``.
        **options: options by bare name (``steps=50``), routed as ``-o NAME=VALUE`` is: to the one
            component of the run that has it.

    Returns:
        An :class:`Evaluation`: the result file's fields (``value``, ``stderr``, ``values``, ...) and
        ``records``.

    Raises:
        HarnessError: for any problem of the input (unknown ids, bad options, shapes), one line.
    """
    from harness.execution import ExecutionMode
    from harness.maps import bound_maps
    from harness.objects import borrowed, bound_callable, bound_dataset, model_name, overlay, user_model_spec
    from harness.registry import get_registry
    from harness.runner import RunConfig, run

    entries = list(model) if isinstance(model, (list, tuple)) else [model]
    if not entries:
        raise HarnessError("evaluate: give at least one model")
    objects: list[str] = []
    components: list[tuple[str, Any]] = []

    if isinstance(data, str):
        if data_name is not None:
            raise HarnessError("evaluate: data_name= names data given as objects; an id/spec names itself")
        data_spec = data
    else:
        if data_name is not None and data_name in get_registry().components["dataset"]:
            raise HarnessError(f"data_name {data_name!r} is a registered dataset id; choose another name")
        dataset_cls = bound_dataset(data, limit, data_name)
        components.append(("dataset", dataset_cls))
        data_spec, objects = dataset_cls.id, [*objects, "data"]

    model_ids: list[str] = []
    specs = []
    modules: list[torch.nn.Module] = []
    for entry in entries:
        if isinstance(entry, str):
            model_ids.append(entry)
            continue
        if not isinstance(entry, torch.nn.Module):
            raise HarnessError(f"evaluate: a model is an id or an nn.Module, got {type(entry).__name__}")
        if weights or random_init:
            raise HarnessError("evaluate: weights= and random_init= apply to registered model ids, not to an nn.Module")
        pipeline = dict(preprocessing or {})
        if "input_size" not in pipeline and not isinstance(data, str):
            first, _ = dataset_cls.source.item(0)
            if isinstance(first, torch.Tensor):
                pipeline["input_size"] = tuple(first.shape)
        name, k = model_name(entry), 2
        while name in model_ids:
            name, k = f"{model_name(entry)}_{k}", k + 1
        specs.append(user_model_spec(entry, name, pipeline))
        modules.append(entry)
        model_ids.append(name)
    if modules:
        objects.append("model")
    elif preprocessing:
        raise HarnessError("evaluate: preprocessing= applies to nn.Module models; registered ids bring their own")

    attributor_spec: str | None
    if attributor is None or isinstance(attributor, str):
        attributor_spec = attributor
    elif _is_maps(attributor):
        components.append(("attributor", bound_maps(attributor)))
        attributor_spec, objects = "maps", [*objects, "attributor"]
    elif callable(attributor):
        cls = bound_callable(attributor)
        components.append(("attributor", cls))
        attributor_spec, objects = cls.id, [*objects, "attributor"]
    else:
        raise HarnessError(f"evaluate: an attributor is an id, a callable or an array of maps, got {type(attributor).__name__}")

    pairs = [
        *_option_pairs("metric", metric_options), *_option_pairs("attributor", attributor_options),
        *_option_pairs("masker", masker_options), *_option_pairs("model", model_options),
        *_option_pairs("dataset", data_options), *_option_pairs(None, options),
    ]
    weights_list = [] if weights is None else [str(weights)] if isinstance(weights, (str, Path)) else [str(w) for w in weights]
    registry = get_registry()
    if specs or components:
        registry = overlay(registry, specs, components)
    scratch_dir = tempfile.TemporaryDirectory(prefix="harness-evaluate-") if out is None else contextlib.nullcontext(None)
    with scratch_dir as scratch:
        folder = Path(str(scratch)) if out is None else Path(out)
        config = RunConfig(
            models=model_ids, metric=metric, attributor=attributor_spec, masker=masker, data=data_spec,
            limit=limit, batch_size=batch_size, device=device, seed=seed, weights=weights_list,
            random_init=random_init, options=pairs, out=folder, resume=resume, quiet=quiet,
            argv=["harness.evaluate"], cache=cache, execution=ExecutionMode(precision=precision, memory_format=memory_format,
                                                                   fold_batchnorm=fold_batchnorm),
            python_objects=tuple(objects),
        )
        with borrowed(modules):
            path = run(config, registry)
        if path is None:  # a non-zero rank under torchrun
            raise HarnessError("evaluate: this process is not rank 0 of a distributed run; rank 0 has the result")
        return _load(path, keep=out is not None)


def _load(path: Path, keep: bool) -> Evaluation:
    """The result at ``path`` with its samples file's records."""
    from harness.records import read_lines
    from harness.results import load_json

    evaluation = Evaluation.model_validate(load_json(path), strict=True)
    evaluation._records = read_lines(path.with_name(f"{evaluation.run_id}.samples.jsonl"))
    evaluation._path = path if keep else None
    return evaluation


def available(kind: str) -> list[str]:
    """Registered ids of ``kind`` (models, attributors, maskers, metrics, datasets, suites; singular works too)."""
    from harness.registry import get_registry

    reg = get_registry()
    singular = kind[:-1] if kind.endswith("s") else kind
    if singular == "suite":
        return sorted(reg.suites)
    if singular not in reg.components:
        raise HarnessError(f"unknown kind {kind!r}; use models, attributors, maskers, metrics, datasets or suites")
    return reg.ids(singular)
