"""Layer selection and hooks shared by the representation metrics (cka, norm_ratio, erf, attention_distance).

A *layer* is a module name (its output) or ``NAME:in`` (the first input of that module; e.g.
``blocks.3.norm2:in`` is a ViT block's residual stream after attention). Users select layers with
comma-separated glob patterns over module names (``-o metric.layers="blocks.*,blocks.*.attn"``):
``*`` matches within one dotted segment, ``**`` across segments, ``?`` one character, ``[..]`` a set;
the keywords ``default`` (the family default below) and ``blocks`` (block outputs only) expand per model.
``harness list layers --model ID`` shows the module names and each metric's defaults.

Defaults per architecture family (``default_layers``):

- transformer blocks (timm ViT / DeiT / Swin / EVA-style: a block with ``norm1, attn, norm2, mlp``):
  ``norm1``, attention output (``attn``; ``drop_path1`` for windowed attention, whose module output is
  per window), ``norm2:in`` (residual after attention), ``norm2``, MLP hidden (``mlp.act``) and the
  block output: 6 per block, as in Raghu et al. 2021;
- ResNet blocks (``BasicBlock`` / ``Bottleneck``): the inner activations before the residual add
  (``act1``, ``act2`` of a bottleneck) and the block output;
- ConvNeXt blocks: ``norm`` (after the depthwise conv), ``mlp.act`` (hidden) and the block output;
- other CNNs: the outputs of modules whose class name ends in ``Block`` / ``Bottleneck`` /
  ``InvertedResidual`` / ``DepthwiseSeparableConv``; failing that, the top-level children.

Layers are ordered by the order their hooks fire in a forward pass (execution order), not by name.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from harness.errors import HarnessError

CNN_BLOCK_SUFFIXES = ("Block", "Bottleneck", "InvertedResidual", "DepthwiseSeparableConv")
KEYWORDS = ("default", "blocks")


def split_patterns(value: Any) -> list[str]:
    """``"a,b"`` / ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (whitespace stripped, empties dropped)."""
    items = [value] if isinstance(value, str) else list(value or [])
    out = [p.strip() for item in items for p in str(item).split(",")]
    return [p for p in out if p]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over dotted module names: ``*`` within a segment, ``**`` across, ``?`` one char, ``[..]``."""
    i, out = 0, []
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def unwrap(model: Any) -> nn.Module:
    """The ``nn.Module`` of a LoadedModel (or the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


# -- architecture families --------------------------------------------------------------------------------
def _has_children(module: nn.Module, *names: str) -> bool:
    children = dict(module.named_children())
    return all(n in children for n in names)


def transformer_blocks(root: nn.Module) -> list[str]:
    """Names of pre-norm transformer blocks (children ``norm1, attn, norm2, mlp``), outermost only."""
    names = [n for n, m in root.named_modules() if n and _has_children(m, "norm1", "attn", "norm2", "mlp")]
    return _outermost(names)


def _outermost(names: list[str]) -> list[str]:
    kept: list[str] = []
    for name in names:
        if not any(name.startswith(k + ".") for k in kept):
            kept.append(name)
    return kept


def cnn_blocks(root: nn.Module) -> list[str]:
    """Names of residual CNN blocks (class name ending in Block/Bottleneck/...), outermost only."""
    names = [
        n for n, m in root.named_modules()
        if n and type(m).__name__.endswith(CNN_BLOCK_SUFFIXES) and not _is_stage(m)
    ]
    return _outermost(names)


def _is_stage(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Stage")


def is_windowed(attn: nn.Module) -> bool:
    """Whether an attention module works on windows (Swin's ``WindowAttention``: output per window).

    Decided by the class name: BEiT-style global attention also has a ``window_size`` attribute.
    """
    return "Window" in type(attn).__name__


def family(root: nn.Module) -> str:
    """``transformer`` / ``cnn`` / ``other`` from the blocks the model contains."""
    if transformer_blocks(root):
        return "transformer"
    if cnn_blocks(root):
        return "cnn"
    return "other"


def block_outputs(root: nn.Module) -> list[str]:
    """The outputs of the model's blocks (the ``blocks`` keyword)."""
    blocks = transformer_blocks(root) or cnn_blocks(root)
    if blocks:
        return blocks
    skip = {"head", "fc", "classifier", "head_drop", "global_pool", "pre_logits", "fc_norm", "dist_head", "head_dist"}
    return [n for n, _ in root.named_children() if n not in skip]


def _transformer_sublayers(root: nn.Module, block: str) -> list[str]:
    module: Any = root.get_submodule(block)  # timm blocks: attributes by architecture
    attn = f"{block}.drop_path1" if is_windowed(module.attn) and _has_children(module, "drop_path1") else f"{block}.attn"
    mlp = module.mlp
    hidden = f"{block}.mlp.act" if _has_children(mlp, "act") else (f"{block}.mlp.fc1" if _has_children(mlp, "fc1") else None)
    layers = [f"{block}.norm1", attn, f"{block}.norm2:in", f"{block}.norm2"]
    if hidden:
        layers.append(hidden)
    return layers + [block]


def _cnn_sublayers(root: nn.Module, block: str) -> list[str]:
    module: Any = root.get_submodule(block)
    children = dict(module.named_children())
    if _has_children(module, "conv_dw", "norm", "mlp"):  # ConvNeXt
        inner = [f"{block}.norm"] + ([f"{block}.mlp.act"] if _has_children(module.mlp, "act") else [])
        return inner + [block]
    acts = sorted((n for n in children if re.fullmatch(r"act\d+", n)), key=lambda n: int(n[3:]))
    if len(acts) >= 2 and _has_children(module, "conv1"):  # ResNet: the last act follows the residual add
        return [f"{block}.{a}" for a in acts[:-1]] + [block]
    return [block]


def default_layers(model: Any) -> list[str]:
    """The family default (see the module docstring), in definition order."""
    root = unwrap(model)
    blocks = transformer_blocks(root)
    if blocks:
        return [layer for b in blocks for layer in _transformer_sublayers(root, b)]
    blocks = cnn_blocks(root)
    if blocks:
        return [layer for b in blocks for layer in _cnn_sublayers(root, b)]
    return block_outputs(root)


def resolve_layers(model: Any, patterns: Sequence[str], defaults: Callable[[Any], list[str]] = default_layers) -> list[str]:
    """Layer names matching ``patterns`` (keywords expand through ``defaults`` / ``block_outputs``).

    Every pattern must match something: one that does not raises with a hint to
    ``harness list layers``. Duplicates are dropped; the order is definition order and is replaced by
    execution order once hooks fire (see :class:`LayerHooks`).
    """
    root = unwrap(model)
    names = [n for n, _ in root.named_modules() if n]
    chosen: list[str] = []
    for pattern in patterns or ["default"]:
        if pattern == "default":
            found = defaults(root)
        elif pattern == "blocks":
            found = block_outputs(root)
        else:
            base, _, suffix = pattern.partition(":")
            if suffix not in ("", "in"):
                raise HarnessError(f"layer pattern {pattern!r}: only the suffix ':in' (a module's input) is known")
            regex = glob_regex(base)
            found = [n + (":in" if suffix else "") for n in names if regex.match(n)]
        if not found:
            model_id = getattr(model, "id", type(root).__name__)
            raise HarnessError(
                f"layer pattern {pattern!r} matches no module of {model_id}; see `harness list layers --model {model_id}`"
            )
        chosen.extend(f for f in found if f not in chosen)
    return chosen


# -- hooks --------------------------------------------------------------------------------------------------
@dataclass
class LayerHooks:
    """Forward hooks calling ``fn(index, tensor)`` for each layer; records execution order.

    Use as a context manager around one or more forward passes. ``order`` lists layer indices in the
    order they fired during the first forward pass; ``check_once()`` after a pass raises if a layer
    fired zero or several times (a shared module or a branch the forward did not take).
    """

    root: nn.Module
    layers: list[str]
    fn: Callable[[int, torch.Tensor], None]

    def __post_init__(self) -> None:
        self.handles: list[Any] = []
        self.counts = [0] * len(self.layers)
        self.order: list[int] = []

    def _call(self, index: int, tensor: Any) -> None:
        if isinstance(tensor, (tuple, list)):
            tensor = tensor[0]
        if not isinstance(tensor, torch.Tensor):
            raise HarnessError(f"layer {self.layers[index]!r} does not produce a tensor")
        self.counts[index] += 1
        if self.counts[index] == 1 and index not in self.order:
            self.order.append(index)
        self.fn(index, tensor)

    def __enter__(self) -> "LayerHooks":
        for index, layer in enumerate(self.layers):
            name, _, suffix = layer.partition(":")
            try:
                module = self.root.get_submodule(name)
            except AttributeError:
                raise HarnessError(f"no module named {name!r}") from None
            if suffix == "in":
                handle = module.register_forward_pre_hook(lambda m, args, i=index: self._call(i, args[0] if args else None))
            else:
                handle = module.register_forward_hook(lambda m, args, out, i=index: self._call(i, out))
            self.handles.append(handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def reset_counts(self) -> None:
        """Start counting firings for the next forward pass."""
        self.counts = [0] * len(self.layers)

    def check_once(self) -> None:
        """Every layer fired exactly once since the last reset."""
        for layer, count in zip(self.layers, self.counts):
            if count != 1:
                what = "never ran" if count == 0 else f"ran {count} times"
                raise HarnessError(f"layer {layer!r} {what} in one forward pass; choose layers that run once per image")


@contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Disable autocast (hooks compute statistics in float32/float64 whatever the forward uses)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def prefix_tokens(model: Any) -> int:
    """timm's ``num_prefix_tokens`` (CLS, distillation, registers); 0 if the model has none."""
    root = unwrap(model)
    n = getattr(root, "num_prefix_tokens", None)
    if n is None:
        n = int(getattr(root, "cls_token", None) is not None) + int(getattr(root, "dist_token", None) is not None)
    return int(n)


def patch_grid(model: Any) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """((grid_h, grid_w), (patch_h, patch_w) in px) of a ViT-style patch embedding, else None."""
    root = unwrap(model)
    embed = getattr(root, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    patch = getattr(embed, "patch_size", None)
    if grid is None or patch is None:
        return None
    to2 = lambda v: (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))  # noqa: E731
    return to2(grid), to2(patch)


def short_label(layer: str) -> str:
    """A compact axis label: ``blocks.3.norm2:in`` -> ``b3.norm2:in``, ``stages.1.blocks.2`` -> ``s1.b2``."""
    label = re.sub(r"\bblocks\.(\d+)", r"b\1", layer)
    label = re.sub(r"\bstages\.(\d+)", r"s\1", label)
    label = re.sub(r"\blayers\.(\d+)", r"l\1", label)
    return label
