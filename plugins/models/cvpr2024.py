"""The model variants of Jiang, Khorram & Li Fuxin, "Comparing the Decision-Making Mechanisms by
Transformers and CNNs via Explanation Methods" (CVPR 2024), built on timm's ConvNeXt and Swin.

Six ids, none with public weights (``build(True)`` raises; bring a checkpoint with ``--weights FILE``
or use ``--random-init``):

``convnext_t_3``
    ConvNeXt-T (timm ``convnext_tiny``: depths (3, 3, 9, 3), dims (96, 192, 384, 768)) with 3 x 3
    depth-wise kernels in all 18 blocks. Built as ``timm.create_model("convnext_tiny",
    kernel_sizes=3)``, so its state dict is exactly timm's (block MLP = ``nn.Linear``).
``convnext_t_3_gn`` / ``convnext_t_3_bn``
    ConvNeXt-T-3 with every LayerNorm replaced by GroupNorm / BatchNorm. Built the way timm itself
    builds a ConvNeXt with another norm: ``timm.create_model("convnext_tiny", kernel_sizes=3,
    conv_mlp=True, norm_layer=...)`` (timm only accepts a non-LayerNorm ``norm_layer`` with
    ``conv_mlp=True``, because then every norm sees channels-first NCHW input). The block MLP is then
    two 1 x 1 convolutions: the same parameters as ``nn.Linear`` but ``mlp.fc1/fc2.weight`` have shape
    (out, in, 1, 1). Norm layers afterwards (23): ``stem.1``, ``stages.{1,2,3}.downsample.0``,
    ``stages.S.blocks.B.norm`` (18) and ``head.norm`` (applied to the pooled (B, 768, 1, 1) map), all
    ``GroupNorm`` / ``BatchNorm2d``, eps 1e-5. ``build_convnext_t_3(norm, conv_mlp=False)`` instead
    keeps the ``nn.Linear`` MLP and normalises the block's channels-last tensor with the wrappers
    below (identical function; :func:`convnext_mlp_weights` converts checkpoints between the layouts).
``swin_t_4``
    Swin-T (timm ``swin_tiny_patch4_window7_224``) with window 4 in stages 1-2 and 7 in stages 3-4:
    ``timm.create_model("swin_tiny_patch4_window7_224", window_size=(4, 4, 7, 7))`` (timm 1.x takes one
    window size per stage). Relative-position tables of stages 1-2 have (2*4-1)^2 = 49 rows instead
    of 169; shifts are 2 there (3 in stage 3, none in stage 4 whose 7 x 7 map is one window).
``swin_t_4_gn`` / ``swin_t_4_bn``
    Swin-T-4 with all 29 LayerNorms (``patch_embed.norm``, ``layers.{1,2,3}.downsample.norm``,
    ``layers.S.blocks.B.norm1/norm2`` (24), ``norm``) replaced by :class:`GroupNormChannelsLast` /
    :class:`BatchNormChannelsLast`: timm 1.x Swin keeps tokens channels-last ((B, H, W, C), and
    (B, H*W, C) before the MLP), so the wrappers move C to dim 1, apply GroupNorm / BatchNorm2d
    (BatchNorm over C with statistics over B, H, W; GroupNorm over C/G channels x H x W) and move it
    back.

GroupNorm uses 32 groups by default (Wu & He's standard setting and timm's ``"groupnorm"``), so
each group normalises C/32 channels over all positions; ``gn_groups=1`` is the "LayerNorm over
(C, H, W)" form. It is a builder option (it must divide 96).

Key formats: all variants use timm's module names. GroupNorm has the same ``weight``/``bias`` as
LayerNorm; BatchNorm adds ``running_mean``, ``running_var`` and ``num_batches_tracked`` to every
norm. ``convnext_t_3_gn`` / ``_bn`` equal the state dicts of ``timm.create_model("convnext_tiny",
kernel_sizes=3, conv_mlp=True, norm_layer="groupnorm" / "batchnorm2d")``. ``swin_t_4_gn`` has
exactly the keys and shapes of ``swin_t_4`` (a LayerNorm checkpoint would load without error, so
pick the id that matches how the weights were trained). ``convnext_t_3`` keeps timm's LayerNorm layout:
``LayerNorm2d`` (channels-first) for the stem, downsamplers and head, channels-last ``LayerNorm`` in
the blocks, eps 1e-6. Checkpoints from the original repositories (facebookresearch/ConvNeXt,
microsoft/Swin-Transformer: ``downsample_layers``/``dwconv``/``pwconv`` names, Swin's downsampler at
the end of a stage, persistent ``relative_position_index``/``attn_mask``) convert once with timm's
``checkpoint_filter_fn(state_dict, model)`` of ``timm.models.convnext`` / ``timm.models.swin_transformer``
and ``safetensors.torch.save_file``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn

import harness
from harness.components import ModelSpec
from harness.errors import HarnessError

PAPER = "Jiang et al., CVPR 2024"
CONVNEXT_ARCH = "convnext_tiny"
SWIN_ARCH = "swin_tiny_patch4_window7_224"
CONVNEXT_KERNEL = 3
SWIN_WINDOWS = (4, 4, 7, 7)
NORMS = ("ln", "gn", "bn")
DEFAULT_GN_GROUPS = 32
NARROWEST_NORM = 96  # every norm of both networks has a multiple of 96 channels

# The base models' preprocessing (timm's convnext_tiny.fb_in1k / swin_tiny_patch4_window7_224.ms_in1k),
# so a variant and its base (the `convnext_t` / `swin_t` aliases) see the same inputs.
_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_AT_224 = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_mode": "center", **_IMAGENET}
CONVNEXT_DATA = {**_AT_224, "crop_pct": 0.875}
SWIN_DATA = {**_AT_224, "crop_pct": 0.9}


class GroupNormChannelsLast(nn.GroupNorm):
    """GroupNorm of a channels-last tensor (B, ..., C): groups of C/G channels over all positions.

    Swin hands its norms (B, H, W, C) maps and, before the MLP, (B, H*W, C) tokens; both give the
    GroupNorm of the (B, C, H, W) feature map.
    """

    def __init__(
        self, num_channels: int, num_groups: int = DEFAULT_GN_GROUPS, eps: float = 1e-5, affine: bool = True, **kwargs
    ):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(-1, 1)).movedim(1, -1).contiguous()


class BatchNormChannelsLast(nn.BatchNorm2d):
    """BatchNorm over C of a channels-last tensor (B, ..., C): statistics over the batch and all positions."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected a (B, ..., C) input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(-1, 1)).movedim(1, -1).contiguous()


def _check(norm: str, gn_groups: int) -> None:
    if norm not in NORMS:
        raise HarnessError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    if norm == "gn" and (gn_groups < 1 or NARROWEST_NORM % gn_groups):
        divisors = [g for g in range(1, NARROWEST_NORM + 1) if NARROWEST_NORM % g == 0]
        raise HarnessError(f"gn_groups={gn_groups} must divide {NARROWEST_NORM} channels: one of {divisors}")


def norm_layers(
    norm: str, gn_groups: int = DEFAULT_GN_GROUPS
) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """(channels-first, channels-last) constructors ``f(num_channels)`` for ``norm`` in gn, bn."""
    from timm.layers import GroupNorm

    _check(norm, gn_groups)
    if norm == "gn":
        return partial(GroupNorm, num_groups=gn_groups), partial(GroupNormChannelsLast, num_groups=gn_groups)
    if norm == "bn":
        return nn.BatchNorm2d, BatchNormChannelsLast
    raise HarnessError("LayerNorm needs no replacement layers")


def build_convnext_t_3(
    norm: str = "ln", *, gn_groups: int = DEFAULT_GN_GROUPS, conv_mlp: bool | None = None
) -> nn.Module:
    """ConvNeXt-T with 3 x 3 depth-wise kernels and ``norm`` (ln, gn, bn) everywhere, untrained.

    ``conv_mlp`` (default: False for ln, True for gn/bn, as timm builds them) selects 1 x 1-conv block
    MLPs with channels-first norms (True) or ``nn.Linear`` MLPs with the block norm applied
    channels-last (False; gn/bn then use the channels-last wrappers).
    """
    import timm
    from timm.layers import LayerNorm2d

    _check(norm, gn_groups)
    if conv_mlp is None:
        conv_mlp = norm != "ln"
    kwargs: dict[str, Any] = {"kernel_sizes": CONVNEXT_KERNEL}
    if conv_mlp:
        kwargs["conv_mlp"] = True
    if norm == "ln":
        return timm.create_model(CONVNEXT_ARCH, pretrained=False, **kwargs)
    first, last = norm_layers(norm, gn_groups)
    if conv_mlp:
        return timm.create_model(CONVNEXT_ARCH, pretrained=False, norm_layer=first, **kwargs)
    # timm refuses a non-LayerNorm norm_layer with Linear MLPs: build with LayerNorm, then swap each norm
    # for its counterpart in the same memory format (LayerNorm2d: NCHW; the blocks' LayerNorm: NHWC).
    model = timm.create_model(CONVNEXT_ARCH, pretrained=False, **kwargs)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LayerNorm):
            make = first if isinstance(module, LayerNorm2d) else last
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module.normalized_shape[0]))
    return model


def build_swin_t_4(norm: str = "ln", *, gn_groups: int = DEFAULT_GN_GROUPS) -> nn.Module:
    """Swin-T with windows (4, 4, 7, 7) per stage and ``norm`` (ln, gn, bn) everywhere, untrained."""
    import timm

    _check(norm, gn_groups)
    kwargs: dict[str, Any] = {"window_size": SWIN_WINDOWS}
    if norm != "ln":
        kwargs["norm_layer"] = norm_layers(norm, gn_groups)[1]
    model: Any = timm.create_model(SWIN_ARCH, pretrained=False, **kwargs)  # a timm SwinTransformer
    built = tuple(tuple(stage.blocks[0].attn.window_size) for stage in model.layers)
    if built != tuple((w, w) for w in SWIN_WINDOWS):  # a timm without per-stage window sizes
        raise HarnessError(
            f"timm {timm.__version__} built Swin windows {built}, not {SWIN_WINDOWS} per stage: "
            "Swin-T-4 needs a timm whose SwinTransformer takes one window size per stage (1.0.31 does)"
        )
    return model


def convnext_mlp_weights(state_dict: dict[str, torch.Tensor], conv: bool) -> dict[str, torch.Tensor]:
    """A ConvNeXt state dict with its block-MLP weights as 1 x 1 convs (``conv``) or as Linear weights.

    Converts checkpoints between ``conv_mlp=True`` (how ``convnext_t_3_gn``/``_bn`` are built) and
    ``conv_mlp=False`` (Linear MLPs, e.g. ConvNeXt code that keeps the block norm channels-last).
    """
    out = {}
    for key, tensor in state_dict.items():
        if ".blocks." in key and key.endswith((".mlp.fc1.weight", ".mlp.fc2.weight")):
            if conv and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
            elif not conv and tensor.ndim == 4:
                tensor = tensor.flatten(1)
        out[key] = tensor
    return out


_GN = f"GroupNorm ({DEFAULT_GN_GROUPS} groups"
# id -> (family, norm, paper name, what it is)
VARIANTS = {
    "convnext_t_3": ("convnext", "ln", "ConvNeXt-T-3",
                     "ConvNeXt-T with 3x3 depth-wise kernels in all 18 blocks (LayerNorm)"),
    "convnext_t_3_gn": ("convnext", "gn", "ConvNeXt-T-3-GN",
                        f"ConvNeXt-T-3 with every LayerNorm replaced by {_GN}; 1x1-conv MLPs)"),
    "convnext_t_3_bn": ("convnext", "bn", "ConvNeXt-T-3-BN",
                        "ConvNeXt-T-3 with every LayerNorm replaced by BatchNorm (1x1-conv MLPs)"),
    "swin_t_4": ("swin", "ln", "Swin-T-4",
                 "Swin-T with 4x4 windows in stages 1-2 and 7x7 in stages 3-4 (LayerNorm)"),
    "swin_t_4_gn": ("swin", "gn", "Swin-T-4-GN",
                    f"Swin-T-4 with every LayerNorm replaced by {_GN} over C, H, W)"),
    "swin_t_4_bn": ("swin", "bn", "Swin-T-4-BN",
                    "Swin-T-4 with every LayerNorm replaced by BatchNorm over channels"),
}


def no_public_weights(model_id: str) -> HarnessError:
    """The error of ``build(pretrained=True)``: there are no weights to download."""
    family, _, name, _ = VARIANTS[model_id]
    base = f"timm {CONVNEXT_ARCH}" if family == "convnext" else f"timm {SWIN_ARCH}"
    return HarnessError(
        f"{model_id} ({name}, {PAPER}) has no public pretrained weights: pass --weights FILE with a checkpoint "
        f"you trained (.safetensors or a weights-only torch state dict, {base} key names), or use --random-init"
    )


def build(model_id: str, pretrained: bool) -> nn.Module:
    """The untrained architecture of ``model_id``; ``pretrained=True`` raises (no public weights)."""
    if pretrained:
        raise no_public_weights(model_id)
    family, norm, _, _ = VARIANTS[model_id]
    return build_convnext_t_3(norm) if family == "convnext" else build_swin_t_4(norm)


def spec(model_id: str) -> ModelSpec:
    family, _, name, what = VARIANTS[model_id]
    return ModelSpec(
        id=model_id,
        build=lambda pretrained: build(model_id, pretrained),
        description=f"{name} ({PAPER}): {what}; no public weights, pass --weights FILE",
        data_config=dict(CONVNEXT_DATA if family == "convnext" else SWIN_DATA),
    )


@harness.hookimpl
def register_models(register):
    for model_id in VARIANTS:
        register(spec(model_id))
