"""FAN: Fully Attentional Networks (Zhou et al., "Understanding The Robustness in Vision
Transformers", ICML 2022), written for current timm / torch.

The reference code (NVlabs/FAN) pins timm 0.5.4 and does not build on timm 1.x; this module is an
independent implementation of the same architecture whose state dict has exactly the reference's
key names, order and shapes, so the released checkpoints load with ``--weights FILE`` unchanged.

Architecture (one FAN block; ``N`` patch tokens of width ``C``, ``h`` heads of width ``d = C / h``)::

    x = x + gamma1 * TokenMixing(norm1(x))        # multi-head self-attention: q, kv, softmax, proj
    x = x + gamma2 * ChannelProcessing(norm2(x))  # channel attention, below

ChannelProcessing(x): ``v = norm_v(mlp_v(x))`` where ``mlp_v`` is ``fc1 -> h + gamma * DWConv(h) ->
fc2`` and DWConv = depth-wise 3x3 -> GELU -> BatchNorm -> depth-wise 3x3 (on the token grid);
per head, ``q = softmax_N(Linear(x))`` and ``k = mean_channels(softmax_N(x))`` give
``A = sigmoid(q^T k) * temperature``: one weight per channel, in ``[0, temperature]``. The output is
``A * v`` (no output projection).

Patch embedding: four stride-2 3x3 conv+BN layers with GELU between them (``p16``), or, for the
hybrids, ConvNeXt stages 1-2 (stride 8, 256 channels) then a 2x2 stride-2 projection; Fourier
positional encoding added to the patch tokens. The FAN blocks see no CLS token (``num_prefix_tokens
= 0``); a CLS token is prepended after them for two CaiT class-attention blocks, and the head reads
``norm(x)[:, 0]``.

Checked against the reference (NVlabs/FAN ``models/fan.py`` under timm 0.5.4, eval mode, the same
random weights): all eight variants give the same logits to within 4e-6; ``tests/test_fan.py`` keeps
the reference's logits for two tiny configurations. (On CPU with current torch the reference's
ConvNeXt ``LayerNorm2d`` sees channels-last conv outputs and falls back to an unbiased-variance
branch; this module implements its contiguous-input branch, the one the GPU training used.)

Reading attention (for metrics). The model follows timm's VisionTransformer conventions:

- ``blocks.N.attn`` (:class:`TokenMixing`) has ``num_heads``, ``scale`` and a ``fused_attn`` flag
  (as timm's ``Attention``). With ``fused_attn = False`` the post-softmax token attention
  ``(B, heads, N, N)`` is the output of ``blocks.N.attn.attn_drop`` (an ``nn.Dropout``): hook it.
- ``blocks.N.mlp`` (:class:`ChannelProcessing`): its ``channel_attn_drop`` output is the channel
  attention ``(B, heads, C / heads, 1)``, one weight per channel in ``[0, temperature]`` (per head).
- ``model.num_prefix_tokens == 0``; ``model.patch_embed.patch_size`` is the pixel stride of one
  token ((16, 16) for every variant, hybrids included) and ``patch_embed.grid_size`` the token grid
  at the default input size (14 x 14 at 224). The grid follows the input size at run time.
- ``cls_attn_blocks.N.attn`` (:class:`ClassAttn`) are CaiT class-attention layers: their
  ``cls_attn_drop`` output is ``(B, heads, 1, 1 + N)`` (the CLS query only; also with ``fused_attn``
  off). Only the token attention's dropout is called ``attn_drop``, so a generic reader that
  looks for ``num_heads`` modules with an ``attn_drop`` child finds exactly ``blocks.N.attn``.
  (Dropout modules hold no parameters: the state dict is the reference's all the same.)

Checkpoints: the released ``.pth.tar`` files (github.com/zhoudaquan/fully_attentional_network_ckpt,
release v1.0.0) are timm ``train.py`` checkpoints: ``{"state_dict": ..., "state_dict_ema": ...,
"optimizer": ..., "args": argparse.Namespace, ...}``. ``--weights FILE`` reads them as they are
(weights-only loading that allows ``argparse.Namespace``), takes ``state_dict`` and loads it strictly:
the key mapping is the identity. No weights are downloaded by the harness; ``pretrained`` builds
raise an error naming the release file to download.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import harness
from harness.components import ModelSpec
from harness.errors import HarnessError

PAPER = "Zhou et al., Understanding The Robustness in Vision Transformers, ICML 2022"
RELEASES = "https://github.com/zhoudaquan/fully_attentional_network_ckpt/releases/download/v1.0.0/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
}


def _use_fused_attn() -> bool:
    try:
        from timm.layers import use_fused_attn

        return bool(use_fused_attn())
    except Exception:  # pragma: no cover - older timm
        return hasattr(F, "scaled_dot_product_attention")


def _trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> None:
    """N(0, std^2) truncated at +-2 std, by inverse-CDF sampling (torch's rejection sampler is far slower)."""
    low, high = (math.erf(-2 / math.sqrt(2)), math.erf(2 / math.sqrt(2)))
    with torch.no_grad():
        tensor.uniform_(low, high).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-2 * std, 2 * std)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (identity in eval mode)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_path(x, self.p, self.training)


# -- patch embeddings -------------------------------------------------------------------------------
def _conv3x3_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias) + BatchNorm; keys ``.0.weight`` and ``.1.*``."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class ConvPatchEmbed(nn.Module):
    """Stride-2 3x3 conv+BN layers with GELU between them: 4 layers for patch 16 (widths C/8, C/4, C/2, C)."""

    WIDTHS = {16: (8, 4, 2, 1), 8: (4, 2, 1), 4: (4, 1)}

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if patch_size not in self.WIDTHS:
            raise ValueError(f"FAN's conv patch embedding supports patch sizes 4, 8, 16, not {patch_size}")
        layers: list[nn.Module] = []
        cin = in_chans
        for i, div in enumerate(self.WIDTHS[patch_size]):
            if i:
                layers.append(nn.GELU())
            layers.append(_conv3x3_bn(cin, embed_dim // div, 2))
            cin = embed_dim // div
        self.proj = nn.Sequential(*layers)
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (height, width)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (B, C, H, W) map (ConvNeXt's channels-first norm)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    """1x1 conv -> GELU -> 1x1 conv (ConvNeXt's channels-first MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm = nn.Identity()
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.norm(self.fc1(x)))))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: dw 7x7 -> LayerNorm2d -> ConvMlp (4x) -> layer scale ``gamma``, residual."""

    def __init__(self, dim: int, ls_init_value: float = 1e-6, drop_path: float = 0.0):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.mlp = ConvMlp(dim, 4 * dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x)))
        return x + self.drop_path(y * self.gamma.view(1, -1, 1, 1))


class ConvNeXtStage(nn.Module):
    """Optional downsampling (LayerNorm2d + 2x2 stride-2 conv) then ``depth`` blocks."""

    def __init__(self, cin: int, cout: int, stride: int, depth: int, drop_paths: list[float]):
        super().__init__()
        if cin != cout or stride > 1:
            self.downsample: nn.Module = nn.Sequential(LayerNorm2d(cin), nn.Conv2d(cin, cout, stride, stride))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(cout, drop_path=p) for p in drop_paths[:depth]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class HybridBackbone(nn.Module):
    """The first stages of a ConvNeXt (stem 4x4/4 conv + LayerNorm2d, then stages), no head."""

    def __init__(self, depths: tuple[int, ...] = (3, 3), dims: tuple[int, ...] = (128, 256), drop_path_rate: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        total = sum(depths)
        rates = [drop_path_rate * i / max(1, total - 1) for i in range(total)]
        stages, cin, start = [], dims[0], 0
        for i, depth in enumerate(depths):
            stages.append(ConvNeXtStage(cin, dims[i], 2 if i > 0 else 1, depth, rates[start : start + depth]))
            cin, start = dims[i], start + depth
        self.stages = nn.Sequential(*stages)
        self.norm_pre = nn.Identity()
        self.num_features = dims[len(depths) - 1]
        self.reduction = 4 * 2 ** (len(depths) - 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


class HybridEmbed(nn.Module):
    """ConvNeXt feature map (stride 8) -> 2x2 stride-2 conv projection to the embedding width."""

    def __init__(self, backbone: HybridBackbone, img_size: int = 224, proj_patch: int = 2, embed_dim: int = 384):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Conv2d(backbone.num_features, embed_dim, proj_patch, proj_patch)
        stride = backbone.reduction * proj_patch
        self.img_size = (img_size, img_size)
        self.proj_patch_size = (proj_patch, proj_patch)
        self.patch_size = (stride, stride)  # pixels per token, as timm's PatchEmbed.patch_size
        self.grid_size = (img_size // stride, img_size // stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(self.backbone.forward_features(x))
        height, width = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (height, width)


class PositionalEncodingFourier(nn.Module):
    """Sine/cosine encoding of the (row, column) grid position, projected by a 1x1 conv to the width."""

    def __init__(self, hidden_dim: int = 32, dim: int = 768, temperature: float = 10000.0):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.scale = 2 * math.pi
        self.temperature = temperature
        self.hidden_dim = hidden_dim
        self.dim = dim
        self.eps = 1e-6

    def forward(self, batch: int, height: int, width: int) -> torch.Tensor:
        """(batch, dim, height, width) encoding."""
        device = self.token_projection.weight.device
        rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        cols = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        rows = rows / (rows[-1] + self.eps) * self.scale
        cols = cols / (cols[-1] + self.eps) * self.scale
        dim_t = torch.arange(self.hidden_dim, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos_y = rows[:, None] / dim_t  # (H, hidden)
        pos_x = cols[:, None] / dim_t  # (W, hidden)
        pos_y = torch.stack([pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()], dim=2).flatten(1)
        pos_x = torch.stack([pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()], dim=2).flatten(1)
        grid = torch.cat(
            [pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)], dim=2
        )  # (H, W, 2 * hidden)
        pos = self.token_projection(grid.permute(2, 0, 1).unsqueeze(0).to(self.token_projection.weight.dtype))
        return pos.expand(batch, -1, -1, -1)


# -- FAN blocks -------------------------------------------------------------------------------------
class DWConv(nn.Module):
    """Depth-wise 3x3 -> GELU -> BatchNorm -> depth-wise 3x3 on the (H, W) token grid."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, n, channels = x.shape
        x = x.transpose(1, 2).reshape(batch, channels, height, width)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(batch, channels, n).transpose(1, 2)


class FANMlp(nn.Module):
    """``fc1 -> h + gamma * DWConv(h) -> fc2`` (the reference applies no activation after fc1)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.gamma = nn.Parameter(torch.ones(hidden))
        self.act = nn.GELU()  # present in the reference, unused in its forward
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.fc1(x)
        x = self.drop(self.gamma * self.dwconv(x, height, width)) + x
        return self.drop(self.fc2(x))


class TokenMixing(nn.Module):
    """Multi-head self-attention over the patch tokens (separate ``q`` and ``kv`` projections).

    Like timm's ``Attention``: ``fused_attn`` selects ``F.scaled_dot_product_attention``; with it off,
    the explicit post-softmax probabilities ``(B, heads, N, N)`` pass through ``attn_drop``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = _use_fused_attn()
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        batch, n, channels = x.shape
        q = self.q(x).reshape(batch, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(batch, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
            )
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(batch, n, channels)
        return self.proj_drop(self.proj(x))


class ChannelProcessing(nn.Module):
    """FAN's attentional channel processing: ``A * v`` with one attention weight per channel.

    ``v = norm_v(mlp_v(x))``; per head ``A = sigmoid(softmax_N(q)^T @ mean_channels(softmax_N(k))) *
    temperature`` with ``q = self.q(x)`` and ``k = x``; ``A`` (B, heads, C/heads, 1) is the output of
    ``channel_attn_drop``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, mlp_hidden_dim: int | None = None,
                 attn_drop: float = 0.0, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.drop_path = DropPath(drop_path)  # unused in forward, as in the reference
        self.mlp_v = FANMlp(dim, mlp_hidden_dim or dim, drop=drop)
        self.norm_v = nn.LayerNorm(dim)  # eps 1e-5: the reference uses nn.LayerNorm's default here
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        # the reference calls this `attn_drop` (no parameters); another name here keeps generic
        # self-attention readers (a `num_heads` module with an `attn_drop` child) from taking it
        # for token attention
        self.channel_attn_drop = nn.Dropout(attn_drop)

    def channel_attention(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``sigmoid(softmax_N(q)^T @ mean_c(softmax_N(k))) * temperature`` -> (B, heads, d, 1)."""
        q = q.softmax(dim=-2).transpose(-1, -2)  # (B, h, d, N)
        k = k.softmax(dim=-2).mean(dim=-1, keepdim=True)  # (B, h, N, 1)
        return torch.sigmoid(q @ k) * self.temperature

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, n, channels = x.shape
        head_dim = channels // self.num_heads
        q = self.q(x).reshape(batch, n, self.num_heads, head_dim).transpose(1, 2)
        k = x.reshape(batch, n, self.num_heads, head_dim).transpose(1, 2)
        attn = self.channel_attn_drop(self.channel_attention(q, k))  # (B, h, d, 1)
        v = self.norm_v(self.mlp_v(x, height, width))
        v = v.reshape(batch, n, self.num_heads, head_dim).permute(0, 2, 3, 1)  # (B, h, d, N)
        return (attn * v).permute(0, 3, 1, 2).reshape(batch, n, channels)


class FANBlock(nn.Module):
    """``x + gamma1 * TokenMixing(norm1(x))``, then ``x + gamma2 * ChannelProcessing(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, eta: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TokenMixing(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ChannelProcessing(dim, num_heads, qkv_bias=qkv_bias, mlp_hidden_dim=int(dim * mlp_ratio),
                                     attn_drop=attn_drop, drop=drop, drop_path=drop_path)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), height, width))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's ViT MLP)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class ClassAttn(nn.Module):
    """CaiT class attention: the CLS token queries all tokens (separate q, k, v projections)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = _use_fused_attn()
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        # `attn_drop` in timm/the reference (no parameters); renamed so that readers of token
        # self-attention (`num_heads` + `attn_drop`) skip this CLS-query attention
        self.cls_attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, channels = x.shape
        q = self.q(x[:, :1]).reshape(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(batch, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(batch, n, self.num_heads, self.head_dim).transpose(1, 2)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.cls_attn_drop.p if self.training else 0.0, scale=self.scale
            )
        else:
            attn = self.cls_attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            out = attn @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, 1, channels)))


class ClassAttentionBlock(nn.Module):
    """CaiT class-attention block with layer scale, as configured in FAN (``tokens_norm=True``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, eta: float = 1.0, tokens_norm: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttn(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.tokens_norm = tokens_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm1 = self.norm1(x)
        x_attn = torch.cat([self.attn(x_norm1), x_norm1[:, 1:]], dim=1)
        x = x + self.drop_path(self.gamma1 * x_attn)
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        cls_token = self.gamma2 * self.mlp(x[:, :1])
        return x + self.drop_path(torch.cat([cls_token, x[:, 1:]], dim=1))


class FAN(nn.Module):
    """A Fully Attentional Network: patch embedding, FAN blocks, two class-attention blocks, head."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        backbone_depths: tuple[int, ...] | None = None,
        cls_attn_layers: int = 2,
        eta: float = 1.0,
        tokens_norm: bool = True,
        head_init_scale: float = 1.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_prefix_tokens = 0  # the FAN blocks see patch tokens only
        self.num_features = self.embed_dim = embed_dim
        # own parameter first: `cls_token` is the first key of the state dict, as in the reference
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if backbone_depths is None:
            self.patch_embed: nn.Module = ConvPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        else:
            self.patch_embed = HybridEmbed(HybridBackbone(backbone_depths, (128, 256)), img_size, 2, embed_dim)
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            FANBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, eta)
            for _ in range(depth)
        )
        self.cls_attn_blocks = nn.ModuleList(
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, eta, tokens_norm)
            for _ in range(cls_attn_layers)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = dict(DATA_CONFIG, num_classes=num_classes, first_conv="patch_embed.proj.0.0", classifier="head")
        self.default_cfg = self.pretrained_cfg
        self._init_weights(head_init_scale)

    @torch.no_grad()
    def _init_weights(self, head_init_scale: float) -> None:
        _trunc_normal_(self.cls_token)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and name.startswith("patch_embed.backbone"):
                _trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and ".dwconv." in name:
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                m.weight.normal_(0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    m.bias.zero_()
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, 1 + N, C) after the class-attention blocks (CLS first)."""
        batch = x.shape[0]
        x, (height, width) = self.patch_embed(x)
        pos = self.pos_embed(batch, height, width).reshape(batch, -1, x.shape[1]).transpose(1, 2)
        x = self.pos_drop(x + pos)
        for block in self.blocks:
            x = block(x, height, width)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        for block in self.cls_attn_blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head


# -- variants ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One released FAN configuration and its reference parameter count (1000 classes)."""

    name: str
    alias: str
    label: str
    embed_dim: int
    depth: int
    num_heads: int
    n_params: int
    checkpoint: str | None
    backbone_depths: tuple[int, ...] | None = None
    head_init_scale: float = 1.0

    def kwargs(self) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "backbone_depths": self.backbone_depths,
            "head_init_scale": self.head_init_scale,
        }


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("fan_tiny_12_p16_224", "fan_t", "FAN-T-ViT", 192, 12, 4, 7_319_920, "fan_vit_tiny.pth.tar"),
        Variant("fan_small_12_p16_224", "fan_s", "FAN-S-ViT", 384, 12, 8, 28_345_336, "fan_vit_small.pth.tar"),
        Variant("fan_base_18_p16_224", "fan_b", "FAN-B-ViT", 448, 18, 8, 54_350_320, "fan_vit_base.pth.tar"),
        Variant("fan_large_24_p16_224", "fan_l", "FAN-L-ViT", 480, 24, 10, 80_574_100, None),
        Variant("fan_tiny_8_p4_hybrid", "fan_t_hybrid", "FAN-T-Hybrid", 192, 8, 8, 7_467_240,
                "fan_hybrid_tiny.pth.tar", (3, 3)),
        Variant("fan_small_12_p4_hybrid", "fan_s_hybrid", "FAN-S-Hybrid", 384, 10, 8, 26_117_944,
                "fan_hybrid_small.pth.tar", (3, 3)),
        Variant("fan_base_16_p4_hybrid", "fan_b_hybrid", "FAN-B-Hybrid", 448, 16, 8, 50_475_048,
                "fan_hybrid_base.pth.tar", (3, 3)),
        Variant("fan_large_16_p4_hybrid", "fan_l_hybrid", "FAN-L-Hybrid", 480, 22, 10, 76_855_140,
                "fan_hybrid_large_in22k_1k.pth.tar", (3, 5), 0.001),
    )
}
ALIASES = {v.alias: v.name for v in VARIANTS.values()}


def create_fan(name: str, **overrides: Any) -> FAN:
    """Build the FAN variant ``name`` (or its alias) with random weights; ``overrides`` go to :class:`FAN`."""
    variant = VARIANTS[ALIASES.get(name, name)]
    return FAN(**{**variant.kwargs(), **overrides})


def _no_weights(variant: Variant, model_id: str) -> HarnessError:
    if variant.checkpoint:
        where = f"the authors' release: {RELEASES}{variant.checkpoint}"
        if variant.checkpoint.endswith("in22k_1k.pth.tar"):
            where += " (the ImageNet-22k -> 1k fine-tuned weights; no ImageNet-1k-only weights were released)"
    else:
        where = "no checkpoint was released for this variant (bring your own)"
    return HarnessError(
        f"{model_id} has no downloadable weights in the harness; {where}. Download it once and pass "
        f"--weights FILE (its state_dict loads unchanged), or use --random-init"
    )


def build(name: str, pretrained: bool, model_id: str | None = None) -> FAN:
    """``build(pretrained)`` of a ModelSpec: random weights, or an error saying where the weights are."""
    variant = VARIANTS[name]
    if pretrained:
        raise _no_weights(variant, model_id or name)
    return create_fan(name)


def spec(name: str, model_id: str | None = None) -> ModelSpec:
    """The ModelSpec of variant ``name`` registered as ``model_id`` (the name itself or its alias)."""
    variant = VARIANTS[name]
    model_id = model_id or name
    alias_note = "" if model_id == name else f" (alias of {name})"
    where = f"{RELEASES}{variant.checkpoint}" if variant.checkpoint else "not released"
    return ModelSpec(
        id=model_id,
        build=lambda pretrained: build(name, pretrained, model_id),
        description=(
            f"{variant.label}{alias_note}: dim {variant.embed_dim}, {variant.depth} FAN blocks, {variant.num_heads} heads, "
            f"{variant.n_params:,} params ({PAPER}); weights: --weights FILE ({where})"
        ),
        weights=f"fan:{name}",
        data_config=dict(DATA_CONFIG),
    )


@harness.hookimpl
def register_models(register):
    for name, variant in VARIANTS.items():
        register(spec(name))
        register(spec(name, variant.alias))
