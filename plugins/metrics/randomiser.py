"""Seeded layer randomisation for the Model Parameter Randomisation Test (Adebayo et al. 2018).

A *unit* is a group of parameters randomised together (one point of the MPRT curve). Unit sets:

- ``blocks`` (default): the model's own structure. Blocks as found by ``layers.py`` (timm transformer
  blocks; ResNet/ConvNeXt/EfficientNet-style residual blocks); the classifier (timm's
  ``get_classifier()``) is the unit ``logits``; the other parameters after the last block (final norm,
  ``conv_head``, ...) form ``pre_logits``; the parameters before the first block (stem convolution,
  patch embedding, class token, position embedding: top-level modules and the root's own
  parameters) form ``stem``; the other parameters outside blocks (ConvNeXt's downsampling layers,
  stages without recognised blocks) are grouped by the outermost module that contains no block. Without recognisable blocks, each top-level child with parameters
  is a unit.
- ``stages``: as ``blocks`` with the model's stages (outermost ``*Stage`` modules, ResNet's ``layerN``)
  in place of blocks; models without stages (ViTs) use their blocks.
- ``modules``: every module that owns parameters and has ``reset_parameters`` (Quantus's layers:
  every conv, linear and norm layer on its own).
- glob patterns over module names (``layers.py`` syntax): each matched module is one unit.

Units are ordered by the position of their first parameter in ``named_parameters()`` (definition
order, input to output); the cascade runs that list backwards (logits first).

Re-initialisation (``init``): ``reset_parameters`` (default) runs the module's own PyTorch/timm
initialiser (Kaiming-uniform conv/linear weights, ones/zeros for norm affines), as the reference code
reruns each variable's own initialiser and as Quantus does; parameters whose module has no
``reset_parameters`` (ViT class/position tokens, LayerScale) are drawn from N(0, ``normal_std``^2).
``normal`` draws every parameter from N(0, ``normal_std``^2). Each module's values are drawn on the
CPU from a generator seeded by (``--seed``, module name), so they do not depend on the device, the
batch, the unit grouping or the cascade position. BatchNorm running statistics are not trainable
variables and are kept, as in the reference code (``running_stats=reset`` resets them as
``reset_parameters`` does in Quantus).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
from torch import nn

from harness.errors import HarnessError

from .layers import cnn_blocks, glob_regex, transformer_blocks, unwrap


@dataclass(frozen=True)
class Unit:
    """Parameters (and, with running statistics reset, buffers) randomised together."""

    label: str
    tensors: tuple[str, ...]


def derived_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a module or parameter name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:mprt:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _classifier_name(root: nn.Module) -> str | None:
    getter = getattr(root, "get_classifier", None)
    if getter is None:
        return None
    try:
        classifier = getter()
    except Exception:
        return None
    if not isinstance(classifier, nn.Module) or not any(True for _ in classifier.parameters()):
        return None
    return next((n for n, m in root.named_modules() if m is classifier and n), None)


def _outside_group(module: str, blocks: list[str]) -> str:
    """The outermost prefix of ``module`` that contains no block ("" for parameters of the root)."""
    if not module:
        return ""
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        if not any(_inside(b, prefix) for b in blocks):
            return prefix
    return module


def stage_names(root: nn.Module) -> list[str]:
    """Outermost ``*Stage`` modules (timm ConvNeXt, Swin, ...), else ResNet's ``layerN`` children; [] if none."""
    stages = [n for n, m in root.named_modules() if n and type(m).__name__.endswith("Stage")]
    stages = [n for n in stages if not any(n.startswith(o + ".") for o in stages)]
    return stages or [n for n, _ in root.named_children() if re.fullmatch(r"layer\d+", n)]


def block_units(root: nn.Module, extra: tuple[str, ...] = (), stages: bool = False) -> list[Unit]:
    """The ``blocks`` (or ``stages``) unit set (see the module docstring), in definition order."""
    blocks = (stage_names(root) if stages else []) or transformer_blocks(root) or cnn_blocks(root)
    classifier = _classifier_name(root)
    names = [n for n, _ in root.named_parameters()]
    groups: dict[str, list[str]] = {}
    position: dict[str, int] = {}
    for index, name in enumerate(names):
        module = _module_of(name)
        if classifier is not None and _inside(module, classifier):
            key = "logits"
        else:
            key = next((b for b in blocks if _inside(module, b)), None) or _outside_group(module, blocks)
            key = key or "(root)"
        groups.setdefault(key, []).append(name)
        position.setdefault(key, index)
    order = sorted(groups, key=lambda k: position[k])
    if blocks:
        block_positions = [position[b] for b in blocks if b in position]
        first, last = min(block_positions), max(block_positions)
        merged: dict[str, list[str]] = {}
        for key in order:
            if key in blocks or key == "logits" or "." in key:
                label = key  # a block, the classifier, or a group nested beside blocks (a stage's downsampling)
            elif position[key] < first:
                label = "stem"
            elif position[key] > last:
                label = "pre_logits"
            else:
                label = key
            merged.setdefault(label, []).extend(groups[key])
        groups = merged
        position = {k: min(names.index(n) for n in v) for k, v in groups.items()}
        order = sorted(groups, key=lambda k: position[k])
    return [Unit(k, tuple(groups[k]) + _buffers_of(root, groups[k], extra)) for k in order]


def _buffers_of(root: nn.Module, params: list[str], extra: tuple[str, ...]) -> tuple[str, ...]:
    """The ``extra`` buffers (e.g. running_mean) of the modules owning ``params``."""
    if not extra:
        return ()
    modules = dict.fromkeys(_module_of(p) for p in params)
    buffers = {n for n, _ in root.named_buffers()}
    return tuple(f"{m}.{b}" if m else b for m in modules for b in extra if (f"{m}.{b}" if m else b) in buffers)


def module_units(root: nn.Module, extra: tuple[str, ...] = ()) -> list[Unit]:
    """Quantus's layers: each module owning parameters and having ``reset_parameters``, in definition order."""
    units = []
    for name, module in root.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if own and hasattr(module, "reset_parameters"):
            units.append(Unit(name or "(root)", tuple(own) + _buffers_of(root, own, extra)))
    return units


def pattern_units(root: nn.Module, pattern: str, extra: tuple[str, ...] = ()) -> list[Unit]:
    """One unit per module whose name matches ``pattern`` (all its parameters)."""
    regex = glob_regex(pattern)
    units = []
    for name, module in root.named_modules():
        if name and regex.match(name):
            params = [f"{name}.{p}" for p, _ in module.named_parameters()]
            if params:
                units.append(Unit(name, tuple(params) + _buffers_of(root, params, extra)))
    return units


def resolve_units(model: Any, patterns: list[str], running_stats: str = "keep") -> list[Unit]:
    """Units for ``patterns`` (keywords ``blocks`` / ``stages`` / ``modules`` or globs), in definition order."""
    root = unwrap(model)
    extra = ("running_mean", "running_var") if running_stats == "reset" else ()
    found: dict[str, Unit] = {}
    for pattern in patterns or ["blocks"]:
        if pattern in ("blocks", "stages"):
            units = block_units(root, extra, stages=pattern == "stages")
        elif pattern == "modules":
            units = module_units(root, extra)
        else:
            units = pattern_units(root, pattern, extra)
        if not units:
            model_id = getattr(model, "id", type(root).__name__)
            raise HarnessError(
                f"layer pattern {pattern!r} matches no module with parameters of {model_id}; "
                f"see `harness list layers --model {model_id}`"
            )
        for unit in units:
            found.setdefault(unit.label, unit)
    index = {n: i for i, (n, _) in enumerate(root.named_parameters())}
    return sorted(found.values(), key=lambda u: min(index.get(t, len(index)) for t in u.tensors))


def random_values(root: nn.Module, units: list[Unit], seed: int, init: str = "reset_parameters",
                  normal_std: float = 0.02) -> dict[str, torch.Tensor]:
    """The randomised value of every tensor of ``units`` (on the tensors' devices); see the module docstring."""
    wanted = {t for u in units for t in u.tensors}
    tensors = dict(root.named_parameters()) | dict(root.named_buffers())
    out: dict[str, torch.Tensor] = {}
    for module_name, module in root.named_modules():
        own = {f"{module_name}.{n}" if module_name else n: n for n, _ in
               [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}
        mine = [full for full in own if full in wanted]
        if not mine:
            continue
        if init == "reset_parameters" and hasattr(module, "reset_parameters"):
            clone = copy.deepcopy(module).to("cpu")
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(derived_seed(seed, module_name))
                clone.reset_parameters()
            state = dict(clone.named_parameters(recurse=False)) | dict(clone.named_buffers(recurse=False))
            for full in mine:
                out[full] = state[own[full]].detach().to(tensors[full].device, tensors[full].dtype)
        else:
            for full in mine:
                target = tensors[full]
                generator = torch.Generator().manual_seed(derived_seed(seed, full))
                value = torch.empty(target.shape, dtype=torch.float32).normal_(0.0, normal_std, generator=generator)
                out[full] = value.to(target.device, target.dtype)
    return out


def working_copy(model: Any) -> nn.Module:
    """A deep copy of the model's module that computes with its own parameters.

    Wrappers installed on a module instance at run time (``--precision``'s autocast replaces
    ``forward`` with a closure over the original module) would make the copy call the original, so
    they are dropped and the run's reduced precision, if any, is installed again on the copy. A
    compiled module (``--compile``) is copied without its compiled forward: the copy runs eagerly.
    """
    root = unwrap(model)
    compiled = {m: m.__dict__["_compiled_call_impl"] for m in root.modules() if m.__dict__.get("_compiled_call_impl") is not None}
    for m in compiled:
        m._compiled_call_impl = None
    try:
        work = copy.deepcopy(root)
    finally:
        for m, impl in compiled.items():
            m._compiled_call_impl = impl
    for m in work.modules():
        m.__dict__.pop("forward", None)
    execution = getattr(model, "execution", None)
    precision = getattr(execution, "precision", "fp32")
    if precision != "fp32":
        from harness.execution import install_autocast

        device = getattr(model, "device", torch.device("cpu"))
        install_autocast(work, device.type, precision, bool(getattr(execution, "reduced_precision_gradients", False)))
    return work


class Randomiser:
    """A working copy of a model whose units are swapped between original and random values.

    The run's model is never modified: the copy is made once (:func:`working_copy`) and every unit's
    values are restored from the original module.
    """

    def __init__(self, model: Any, units: list[Unit], values: dict[str, torch.Tensor], marker: str):
        self.model = model
        self.units = units
        self.values = values
        work = working_copy(model)
        self.copy: Any = dataclasses.replace(model, module=work, weights_sha256=marker, _transform=None) \
            if dataclasses.is_dataclass(model) and not isinstance(model, type) else work
        self._work = dict(work.named_parameters()) | dict(work.named_buffers())
        self._original = dict(unwrap(model).named_parameters()) | dict(unwrap(model).named_buffers())

    @torch.no_grad()
    def randomise(self, unit: Unit) -> None:
        """Give ``unit`` its random values in the working copy."""
        for name in unit.tensors:
            self._work[name].copy_(self.values[name])

    @torch.no_grad()
    def restore(self, unit: Unit) -> None:
        """Give ``unit`` its original values back."""
        for name in unit.tensors:
            self._work[name].copy_(self._original[name])

    def steps(self, order: Literal["cascading", "independent"]) -> Iterator[Unit]:
        """Yield each unit (top-down) with the working copy randomised for it; restored at the end.

        ``cascading``: the unit and every unit above it are random; ``independent``: only the unit.
        """
        done: list[Unit] = []
        try:
            for unit in reversed(self.units):
                self.randomise(unit)
                done.append(unit)
                yield unit
                if order == "independent":
                    self.restore(unit)
                    done.pop()
        finally:
            for unit in done:
                self.restore(unit)
