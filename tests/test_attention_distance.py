"""Mean attention distance (plugins/metrics/attention_distance.py): hand-built attention patterns with
known answers, an independent recomputation on a timm ViT, DeiT distilled prefix tokens, Swin's
within-window convention, and the CLI (including the error for a model without attention)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from _rep_helpers import image_folder, run_metric, smooth_images
from conftest import wrap_module


def _metric():
    from harness_plugins.metrics.attention_distance import AttentionDistance

    return AttentionDistance()


class FixedAttention(nn.Module):
    """An 'attention module' whose post-softmax probabilities are a fixed pattern per head."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.num_heads = logits.shape[0]
        self.fused_attn = True  # the metric must switch this off (and restore it)
        self.register_buffer("logits", logits)
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, x):
        if self.fused_attn:
            return x  # no probabilities exist on the fused path
        probs = self.attn_drop(self.logits.softmax(-1).expand(x.shape[0], -1, -1, -1))
        return x + 0 * probs.sum()


class HandViT(nn.Module):
    """224 px input, 14 x 14 patches of 16 px, one CLS token, one attention layer with 3 fixed heads."""

    def __init__(self):
        super().__init__()
        n = 197
        uniform = torch.zeros(n, n)
        self_only = torch.full((n, n), -1e4).fill_diagonal_(0)
        with_cls = torch.zeros(n, n)
        with_cls[:, 0] = math.log(0.3 / 0.7 * 196)  # 30% of every row on the CLS token, the rest uniform
        self.num_prefix_tokens = 1
        self.patch_embed = nn.Module()
        self.patch_embed.grid_size = (14, 14)
        self.patch_embed.patch_size = (16, 16)
        self.blocks = nn.Sequential(FixedAttention(torch.stack([uniform, self_only, with_cls])))
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        tokens = x.mean((2, 3))[:, None, :].expand(-1, 197, -1)
        return self.head(self.blocks(tokens)[:, 0])


def test_uniform_attention_is_116_5_px_and_self_only_is_0(tmp_path):
    module = HandViT()
    loaded = wrap_module(module, size=224)
    summary, records = run_metric(_metric(), [loaded], smooth_images(2, 224), batch_size=2, out_dir=tmp_path)
    uniform, self_only, with_cls = summary.values["mad"][0]
    assert uniform == pytest.approx(116.5, abs=0.05)
    assert self_only == pytest.approx(0.0, abs=1e-9)
    assert with_cls == pytest.approx(uniform, abs=1e-6)  # prefix dropped, rows renormalised
    prefix = summary.values["prefix_mass"][0]
    assert prefix[0] == pytest.approx(1 / 197, abs=1e-6) and prefix[1] == pytest.approx(0.0, abs=1e-9)
    assert prefix[2] == pytest.approx(0.3, abs=1e-6)
    assert summary.value == pytest.approx((uniform + self_only + with_cls) / 3, abs=1e-9)
    assert summary.values["mad_sorted"][0] == sorted(summary.values["mad"][0])
    assert module.blocks[0].fused_attn is True  # restored after the run
    assert (tmp_path / summary.artifacts["attention_distance"]).exists()


def test_grid_distance_reference_value():
    from harness_plugins.metrics.attention_distance import grid_distances

    d = grid_distances(14, 14, 16, 16)
    assert float(d.mean()) == pytest.approx(116.5, abs=0.05)  # mean pixel distance of uniform attention
    assert float(d[0, 1]) == 16 and float(d[0, 15]) == pytest.approx(16 * math.sqrt(2))


def _reference_mad(vit: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """(layers, heads) MAD recomputed from each block's qkv output, independently of the metric's hooks."""
    qkvs: list[torch.Tensor] = []
    handles = [b.attn.qkv.register_forward_hook(lambda m, a, o: qkvs.append(o.detach().double())) for b in vit.blocks]
    with torch.inference_mode():
        vit(inputs)
    for h in handles:
        h.remove()
    prefix = vit.num_prefix_tokens
    (gh, gw), (ph, pw) = vit.patch_embed.grid_size, vit.patch_embed.patch_size
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([ys.flatten() * ph, xs.flatten() * pw], 1).double()
    dist = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1).sqrt()
    out = []
    for block, qkv in zip(vit.blocks, qkvs):
        b, n, _ = qkv.shape
        heads = block.attn.num_heads
        q, k, _ = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * block.attn.scale).softmax(-1)
        patch = attn[..., prefix:, prefix:]
        patch = patch / patch.sum(-1, keepdim=True)
        out.append((patch * dist).sum(-1).mean(-1).mean(0))  # mean over queries, then images
    return torch.stack(out)


def test_matches_an_independent_recomputation_on_a_timm_vit(tmp_path):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("test_vit").eval()
    # sharpen the random attention so distances differ clearly from the uniform value
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight.normal_(0, 0.3)
    loaded = wrap_module(vit, size=160)
    images = smooth_images(3, 160, seed=4)
    summary, _ = run_metric(_metric(), [loaded], images, batch_size=2, out_dir=tmp_path)
    ours = torch.tensor(summary.values["mad"], dtype=torch.float64)
    ref = _reference_mad(vit, loaded.preprocess(images))
    assert ours.shape == ref.shape == (len(vit.blocks), vit.blocks[0].attn.num_heads)
    assert torch.allclose(ours, ref, atol=1e-3), (ours - ref).abs().max()
    assert ours.std() > 1.0  # the check is not trivially the uniform value
    assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in vit.blocks)


def test_deit_distilled_drops_two_prefix_tokens(tmp_path):
    import timm

    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", depth=2).eval()
    with torch.no_grad():
        for block in deit.blocks:
            block.attn.qkv.weight.zero_()  # exactly uniform attention over 198 tokens
            block.attn.qkv.bias.zero_()
    loaded = wrap_module(deit, size=224)
    summary, _ = run_metric(_metric(), [loaded], smooth_images(1, 224), batch_size=1, out_dir=tmp_path)
    assert summary.values["prefix_tokens"] == 2
    for row in summary.values["mad"]:
        assert row == pytest.approx([116.5] * 3, abs=0.05)
    for row in summary.values["prefix_mass"]:
        assert row == pytest.approx([2 / 198] * 3, abs=1e-6)


def test_swin_within_window_convention(tmp_path):
    import timm

    from harness_plugins.metrics.attention_distance import grid_distances

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=112, embed_dim=16, depths=(2, 2),
                             num_heads=(1, 2)).eval()
    with torch.no_grad():
        for name, p in swin.named_parameters():
            if "qkv" in name or "relative_position_bias_table" in name:
                p.zero_()  # uniform attention within each window (shifted windows: within each region)
    loaded = wrap_module(swin, size=112)
    summary, _ = run_metric(_metric(), [loaded], smooth_images(1, 112), batch_size=1, out_dir=tmp_path)
    mad = summary.values["mad"]
    assert summary.values["windowed"] == [True] * 4 and summary.values["prefix_mass"] is None
    d = grid_distances(7, 7, 1, 1)
    assert mad[0] == pytest.approx([float(d.mean()) * 4], abs=1e-6)  # stage 0: 4 px per token, unshifted
    assert mad[2] == pytest.approx([float(d.mean()) * 8] * 2, abs=1e-6)  # stage 1: 8 px per token
    # shifted windows: uniform over the keys of the query's own region (the -100 mask), same window grid
    mask = swin.layers[0].blocks[1].attn_mask  # (windows, 49, 49), 0 = same region
    same = (mask == 0).double()
    expected = ((same * d).sum(-1) / same.sum(-1)).mean() * 4
    assert mad[1][0] == pytest.approx(float(expected), abs=1e-4)
    assert mad[1][0] < mad[0][0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("attn_images"), 2, size=64)


def test_cli_deit_tiny_random_init(cli, folder, tmp_path):
    res = cli("run", "--model", "deit_tiny_patch16_224", "--random-init", "--metric", "attention_distance",
              "--data", f"folder:{folder}", "--batch-size", "2", "--out", tmp_path, "--quiet")
    assert res.exit_code == 0, res.stderr
    result = json.loads(open(res.stdout.strip().rsplit("-> ", 1)[1]).read())
    values = result["values"]
    assert len(values["mad"]) == 12 and all(len(row) == 3 for row in values["mad"])
    assert values["layers"][0] == "blocks.0.attn"
    assert 100 < result["value"] < 130  # near-uniform attention at random init: about 116.5 px
    assert len(values["prefix_mass"]) == 12
    assert (tmp_path / result["artifacts"]["attention_distance"]).exists()
    assert result["metric"]["higher_is_better"] is None


def test_cli_model_without_attention_is_a_clear_error(cli, folder, tmp_path):
    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "attention_distance",
              "--data", f"folder:{folder}", "--out", tmp_path, "--quiet")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a model with self-attention" in lines[0] and "test_resnet" in lines[0]
