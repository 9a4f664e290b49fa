"""Grad-CAM (Selvaraju et al. 2017) for CNNs and ViT-style token models.

Layer choice (overridable with ``layer=MODULE.NAME``): a token model with ``blocks`` (ViT, DeiT,
FAN) uses the last block's ``norm1`` (prefix tokens dropped, patch tokens reshaped to the grid, as
in pytorch-grad-cam); other timm models use the module of their last ``feature_info`` stage; plain
modules use their last ``Conv2d``. Channels-last outputs (Swin: ``output_fmt == "NHWC"``) are detected.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F

from harness.components import Attributor, Options
from harness.errors import HarnessError
from harness.model import LoadedModel
from harness.scoring import target_scores


class GradCAMOptions(Options):
    layer: str | None = None
    """Module name to hook (see `harness list layers`); unset = chosen per architecture."""
    score: Literal["logit", "softmax"] = "logit"


def default_layer(module: torch.nn.Module) -> str:
    """The module Grad-CAM hooks by default for this architecture."""
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, (torch.nn.Sequential, torch.nn.ModuleList)) and len(blocks) and hasattr(blocks[-1], "norm1"):
        return f"blocks.{len(blocks) - 1}.norm1"
    info = getattr(module, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.get_dicts()[-1]
        if isinstance(last, dict) and last.get("module"):
            return str(last["module"])
    names = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if not names:
        raise HarnessError("gradcam: cannot choose a layer for this model; pass -o attributor.layer=NAME")
    return names[-1]


def layer_channels(net: torch.nn.Module, name: str) -> int | None:
    """The channel count of ``name``'s output when timm's feature_info knows that module."""
    info = getattr(net, "feature_info", None)
    if not info:
        return None
    stages = info if isinstance(info, list) else info.get_dicts()
    return next((d.get("num_chs") for d in stages if isinstance(d, dict) and d.get("module") == name), None)


def to_grid(activation: torch.Tensor, prefix_tokens: int, channels_hint: int | None, channels_last: bool = False) -> torch.Tensor:
    """(B, C, h, w) from a CNN map, a channels-last map, or (B, N, C) tokens (prefix dropped)."""
    if activation.dim() == 3:
        tokens = activation[:, prefix_tokens:]
        side = int(math.isqrt(tokens.shape[1]))
        if side * side != tokens.shape[1]:
            raise HarnessError(f"gradcam: {tokens.shape[1]} patch tokens do not form a square grid")
        return tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)
    if activation.dim() == 4:
        if channels_hint is not None:
            if activation.shape[-1] == channels_hint and activation.shape[1] != channels_hint:
                return activation.permute(0, 3, 1, 2)
            return activation
        return activation.permute(0, 3, 1, 2) if channels_last else activation
    raise HarnessError(f"gradcam: the hooked layer outputs shape {tuple(activation.shape)}, not a map or tokens")


class GradCAM(Attributor):
    """Grad-CAM: ReLU(sum_k alpha_k A_k), alpha_k = spatial mean of d score / d A_k, upsampled."""

    id: ClassVar[str] = "gradcam"
    Options = GradCAMOptions

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        net = model.module
        name = self.options.layer or default_layer(net)
        try:
            layer = net.get_submodule(name)
        except AttributeError:
            raise HarnessError(f"gradcam: model {model.id} has no module {name!r}") from None
        prefix = int(getattr(net, "num_prefix_tokens", 0) or 0)
        channels = layer_channels(net, name)
        maps = []
        for start in range(0, len(inputs), model.batch_size):
            x = inputs[start : start + model.batch_size]
            captured: list[torch.Tensor] = []
            handle = layer.register_forward_hook(lambda _m, _i, out, store=captured: store.append(out if torch.is_tensor(out) else out[0]))
            try:
                with torch.enable_grad():
                    x = x.detach().requires_grad_(True)
                    scores = target_scores(net(x), target[start : start + model.batch_size], self.options.score)
                    activation = captured[-1]
                    (grad,) = torch.autograd.grad(scores.sum(), activation)
            finally:
                handle.remove()
            nhwc = getattr(net, "output_fmt", None) == "NHWC"
            act = to_grid(activation.detach(), prefix, channels, nhwc)
            grad = to_grid(grad.detach(), prefix, channels, nhwc)
            alpha = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((alpha * act).sum(1, keepdim=True))
            maps.append(F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
        return torch.cat(maps)
