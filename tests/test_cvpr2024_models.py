"""The CVPR 2024 (Jiang, Khorram, Li Fuxin) variants: ConvNeXt-T-3(-GN/-BN), Swin-T-4(-GN/-BN).

Each variant is built once and shared by the module's tests (the GN/BN variants reuse the random
weights of the LayerNorm one); ``load_model`` builds each for real when it loads a checkpoint.
Parameter counts and key formats of timm's own builders come from meta-device models.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from harness.errors import HarnessError
from harness.model import load_model
from harness.registry import get_registry
from harness.weights import state_dict_sha256
from harness_plugins.models import cvpr2024
from harness_plugins.models.cvpr2024 import BatchNormChannelsLast, GroupNormChannelsLast

CONVNEXT_IDS = ["convnext_t_3", "convnext_t_3_gn", "convnext_t_3_bn"]
SWIN_IDS = ["swin_t_4", "swin_t_4_gn", "swin_t_4_bn"]
ALL_IDS = CONVNEXT_IDS + SWIN_IDS
NORM_OF = {"convnext_t_3": "ln", "convnext_t_3_gn": "gn", "convnext_t_3_bn": "bn",
           "swin_t_4": "ln", "swin_t_4_gn": "gn", "swin_t_4_bn": "bn"}
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)

# The norm layers each family has after the swap (same names for ln, gn and bn).
CONVNEXT_DEPTHS, CONVNEXT_DIMS = (3, 3, 9, 3), (96, 192, 384, 768)
CONVNEXT_NORMS = (  # in module order: stem, then per stage its downsampler (stages 2-4) and blocks, head
    ["stem.1"]
    + [name for s, d in enumerate(CONVNEXT_DEPTHS)
       for name in [f"stages.{s}.downsample.0"] * (s > 0) + [f"stages.{s}.blocks.{b}.norm" for b in range(d)]]
    + ["head.norm"]
)
SWIN_DEPTHS, SWIN_HEADS = (2, 2, 6, 2), (3, 6, 12, 24)
SWIN_NORMS = (  # in module order: patch embedding, per stage its patch merging (stages 2-4) and blocks, final
    ["patch_embed.norm"]
    + [name for s, d in enumerate(SWIN_DEPTHS)
       for name in [f"layers.{s}.downsample.norm"] * (s > 0)
       + [f"layers.{s}.blocks.{b}.norm{k}" for b in range(d) for k in (1, 2)]]
    + ["norm"]
)


def _norms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NORM_TYPES)}


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """Non-default norm affines and BN statistics, so a norm tensor that fails to load shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _norms(model).values():
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, _BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.num_batches_tracked.fill_(1000)


@pytest.fixture(scope="module")
def built():
    """``built(id)`` -> that variant with random weights and randomised norms (eval), built once per module.

    convnext_t_3 and swin_t_4 are timm's random init (seed 0). Their GN/BN variants are built on the
    meta device and take the same random tensors (timm's init of 28M weights costs over a CPU second;
    ``load_model`` below still runs every variant's real ``build(False)``).
    """
    cache: dict[str, nn.Module] = {}

    def get(model_id: str) -> nn.Module:
        if model_id in cache:
            return cache[model_id]
        spec = get_registry().model_spec(model_id)
        base = "convnext_t_3" if model_id.startswith("convnext") else "swin_t_4"
        if model_id == base:
            torch.manual_seed(0)
            model = spec.build(False)
        else:
            with torch.device("meta"):
                model = spec.build(False)
            own = model.state_dict()
            state = {k: v.clone() for k, v in get(base).state_dict().items()}
            if base == "convnext_t_3":
                state = cvpr2024.convnext_mlp_weights(state, conv=True)
            state.update({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in own.items() if k not in state})  # BN stats
            model.to_empty(device="cpu")
            model.load_state_dict(state, strict=True, assign=True)
            for m in model.modules():
                if hasattr(m, "init_non_persistent_buffers"):  # Swin's relative-position indices and shift masks
                    m.init_non_persistent_buffers()
        _randomise_norms(model, seed=1)
        cache[model_id] = model.eval()
        return cache[model_id]

    yield get
    cache.clear()


def _meta(name: str, **kwargs) -> nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- registration --------------------------------------------------------------------------------
def test_ids_are_listed_by_the_cli(cli):
    result = cli("list", "models", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {row["id"]: row for row in json.loads(result.stdout)}
    names = {"convnext_t_3": "ConvNeXt-T-3 ", "convnext_t_3_gn": "ConvNeXt-T-3-GN",
             "convnext_t_3_bn": "ConvNeXt-T-3-BN", "swin_t_4": "Swin-T-4 ", "swin_t_4_gn": "Swin-T-4-GN",
             "swin_t_4_bn": "Swin-T-4-BN"}
    for model_id, name in names.items():
        row = rows[model_id]
        assert row["provider"].endswith(":cvpr2024_models")
        assert row["description"].startswith(name) and "CVPR 2024" in row["description"]
        assert "--weights" in row["description"]
    assert "GroupNorm (32 groups" in rows["convnext_t_3_gn"]["description"]
    assert "BatchNorm" in rows["swin_t_4_bn"]["description"]
    assert "4x4 windows in stages 1-2" in rows["swin_t_4"]["description"]


@pytest.mark.parametrize("model_id", ALL_IDS)
def test_pretrained_build_explains_there_are_no_public_weights(model_id):
    spec = get_registry().model_spec(model_id)
    with pytest.raises(HarnessError, match=r"no public pretrained weights: pass --weights FILE") as info:
        spec.build(True)
    assert model_id in str(info.value) and "--random-init" in str(info.value)
    with pytest.raises(HarnessError, match="no public pretrained weights"):
        load_model(spec)  # the default (pretrained) path of `harness run`
    base = "ConvNeXt" if model_id.startswith("convnext") else "Swin"
    assert spec.data_config["input_size"] == (3, 224, 224)
    assert spec.data_config["crop_pct"] == (0.875 if base == "ConvNeXt" else 0.9)


# -- ConvNeXt-T-3 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_id", CONVNEXT_IDS)
def test_convnext_t_3_has_3x3_depthwise_kernels_in_all_18_blocks(built, model_id):
    model = built(model_id)
    depthwise = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels]
    assert [n for n, _ in depthwise] == [
        f"stages.{s}.blocks.{b}.conv_dw" for s, d in enumerate(CONVNEXT_DEPTHS) for b in range(d)
    ]
    assert len(depthwise) == 18
    for (name, conv), channels in zip(depthwise, [c for c, d in zip(CONVNEXT_DIMS, CONVNEXT_DEPTHS) for _ in range(d)]):
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1), name
        assert tuple(conv.weight.shape) == (channels, 1, 3, 3), name
    # no other spatial kernel is larger than the stem's 4x4 patchify / the 2x2 downsamplers
    others = {m.kernel_size for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    assert others <= {(4, 4), (2, 2), (1, 1)}


@pytest.mark.parametrize("model_id", CONVNEXT_IDS)
def test_convnext_t_3_norm_layers(built, model_id):
    from timm.layers import LayerNorm, LayerNorm2d

    norm = NORM_OF[model_id]
    norms = _norms(built(model_id))
    assert list(norms) == CONVNEXT_NORMS and len(norms) == 23
    if norm == "ln":  # timm's layout: channels-first LayerNorm2d outside the blocks, channels-last LayerNorm inside
        for name, m in norms.items():
            assert type(m) is (LayerNorm if ".blocks." in name else LayerNorm2d), name
            assert m.eps == 1e-6
        return
    for name, m in norms.items():
        assert not isinstance(m, nn.LayerNorm), name
        if norm == "gn":
            assert isinstance(m, nn.GroupNorm) and not isinstance(m, _BatchNorm), name
            assert m.num_groups == 32, name
        else:
            assert isinstance(m, nn.BatchNorm2d) and not isinstance(m, nn.GroupNorm), name
            assert m.track_running_stats, name
        assert m.eps == 1e-5 and not isinstance(m, (GroupNormChannelsLast, BatchNormChannelsLast)), name
    # conv_mlp: the block MLP is two 1x1 convs, so every norm sees NCHW input
    block = built(model_id).stages[2].blocks[4]
    assert block.use_conv_mlp and isinstance(block.mlp.fc1, nn.Conv2d) and block.mlp.fc1.kernel_size == (1, 1)


# -- Swin-T-4 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_id", SWIN_IDS)
def test_swin_t_4_windows_and_relative_position_tables(built, model_id):
    model = built(model_id)
    assert len(model.layers) == 4
    for stage, (depth, heads, window) in enumerate(zip(SWIN_DEPTHS, SWIN_HEADS, (4, 4, 7, 7))):
        blocks = list(model.layers[stage].blocks)
        assert len(blocks) == depth
        for i, block in enumerate(blocks):
            where = f"stage {stage + 1} block {i}"
            assert tuple(block.window_size) == (window, window), where
            assert tuple(block.attn.window_size) == (window, window), where
            assert tuple(block.attn.relative_position_bias_table.shape) == ((2 * window - 1) ** 2, heads), where
            assert tuple(block.attn.relative_position_index.shape) == (window * window, window * window), where
            # shifted windows on odd blocks; stage 4's 7x7 map is a single window, so it never shifts
            shift = 0 if i % 2 == 0 or stage == 3 else window // 2
            assert tuple(block.shift_size) == (shift, shift), where
    tables = [b.attn.relative_position_bias_table.shape[0] for layer in model.layers for b in layer.blocks]
    assert tables == [49] * 4 + [169] * 8


@pytest.mark.parametrize("model_id", SWIN_IDS)
def test_swin_t_4_norm_layers(built, model_id):
    norm = NORM_OF[model_id]
    norms = _norms(built(model_id))
    assert list(norms) == SWIN_NORMS and len(norms) == 29
    for name, m in norms.items():
        if norm == "ln":
            assert type(m) is nn.LayerNorm, name
        elif norm == "gn":
            assert type(m) is GroupNormChannelsLast and m.num_groups == 32, name
        else:
            assert type(m) is BatchNormChannelsLast and m.track_running_stats, name
    widths = {name: m.weight.shape[0] for name, m in norms.items()}
    # patch embedding 96; patch merging normalises its 4C input; blocks their stage width; final 768
    assert [widths[f"layers.{s}.downsample.norm"] for s in (1, 2, 3)] == [384, 768, 1536]
    assert [widths[f"layers.{s}.blocks.0.norm1"] for s in range(4)] == [96, 192, 384, 768]
    assert widths["patch_embed.norm"] == 96 and widths["norm"] == 768


# -- parameter counts and key formats --------------------------------------------------------------------
def test_parameter_counts_differ_from_timm_by_the_kernel_and_window_changes(built):
    # ConvNeXt: each depth-wise conv holds C*k*k weights (+ C biases), so 7x7 -> 3x3 saves C*(49 - 9)
    # per block: 40 * (3*96 + 3*192 + 9*384 + 3*768) = 40 * 6624 = 264,960.
    assert _n_params(_meta("convnext_tiny")) - _n_params(built("convnext_t_3")) == 264_960
    # Swin: each block's table holds (2w-1)^2 x heads; w 7 -> 4 in stages 1-2 saves (169 - 49) rows
    # x (2 blocks x 3 heads + 2 blocks x 6 heads) = 120 * 18 = 2,160.
    assert _n_params(_meta("swin_tiny_patch4_window7_224")) - _n_params(built("swin_t_4")) == 2_160
    assert _n_params(built("convnext_t_3")) == 28_324_168
    assert _n_params(built("swin_t_4")) == 28_286_194
    # LN, GN and BN each have one weight and one bias per channel, and a 1x1 conv as many parameters
    # as the Linear it replaces: the norm swap leaves the counts unchanged.
    assert {_n_params(built(i)) for i in CONVNEXT_IDS} == {28_324_168}
    assert {_n_params(built(i)) for i in SWIN_IDS} == {28_286_194}


def test_state_dicts_match_timms_own_builders(built):
    # a checkpoint trained with timm's builders loads unchanged
    assert _shapes(built("convnext_t_3")) == _shapes(_meta("convnext_tiny", kernel_sizes=3))
    assert _shapes(built("convnext_t_3_gn")) == _shapes(
        _meta("convnext_tiny", kernel_sizes=3, conv_mlp=True, norm_layer="groupnorm"))
    assert _shapes(built("convnext_t_3_bn")) == _shapes(
        _meta("convnext_tiny", kernel_sizes=3, conv_mlp=True, norm_layer="batchnorm2d"))
    assert _shapes(built("swin_t_4")) == _shapes(_meta("swin_tiny_patch4_window7_224", window_size=(4, 4, 7, 7)))
    # Swin GN: the LayerNorm keys and shapes; BN: those plus the running statistics of the 29 norms
    swin = _shapes(built("swin_t_4"))
    assert _shapes(built("swin_t_4_gn")) == swin
    bn = _shapes(built("swin_t_4_bn"))
    extra = {k: v for k, v in bn.items() if k not in swin}
    assert {k: v for k, v in bn.items() if k in swin} == swin
    stats = {f"{n}.{s}" for n in SWIN_NORMS for s in ("running_mean", "running_var", "num_batches_tracked")}
    assert set(extra) == stats and len(extra) == 87
    # ConvNeXt GN/BN vs LN: MLP weights are (out, in, 1, 1) instead of (out, in)
    ln, gn = _shapes(built("convnext_t_3")), _shapes(built("convnext_t_3_gn"))
    assert set(ln) == set(gn)
    assert gn["stages.0.blocks.0.mlp.fc1.weight"] == (384, 96, 1, 1)
    assert ln["stages.0.blocks.0.mlp.fc1.weight"] == (384, 96)
    assert {k for k in ln if ln[k] != gn[k]} == {
        f"stages.{s}.blocks.{b}.mlp.fc{j}.weight"
        for s, d in enumerate(CONVNEXT_DEPTHS) for b in range(d) for j in (1, 2)
    }


def test_builder_options():
    with torch.device("meta"):
        one = cvpr2024.build_convnext_t_3("gn", gn_groups=1)
        swin_one = cvpr2024.build_swin_t_4("gn", gn_groups=1)
    assert {m.num_groups for m in _norms(one).values()} == {1}
    assert {m.num_groups for m in _norms(swin_one).values()} == {1}
    with pytest.raises(HarnessError, match="gn_groups=5 must divide 96"):
        cvpr2024.build_convnext_t_3("gn", gn_groups=5)
    with pytest.raises(HarnessError, match="unknown norm 'in'"):
        cvpr2024.build_swin_t_4("in")


def test_a_timm_without_per_stage_windows_is_an_error(monkeypatch):
    import timm

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: create(name, **{**kw, "window_size": 7}))
    with torch.device("meta"), pytest.raises(HarnessError, match=r"windows \(\(7, 7\), .* not \(4, 4, 7, 7\)"):
        cvpr2024.build_swin_t_4()


# -- the channels-last wrappers and the Linear-MLP ConvNeXt layout -------------------------------------------
def test_channels_last_norms_equal_the_channels_first_ones():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, 64, generator=gen) * 3 + 1  # (B, H, W, C)
    gn = GroupNormChannelsLast(64, num_groups=8)
    ref = nn.GroupNorm(8, 64)
    with torch.no_grad():
        for m in (gn, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 64))
            m.bias.copy_(torch.linspace(-1, 1, 64))
    expected = ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert torch.allclose(gn(x), expected, atol=1e-5)
    assert gn(x).is_contiguous()
    # the (B, H*W, C) tokens Swin passes before its MLP normalise the same way
    assert torch.allclose(gn(x.reshape(4, 30, 64)), expected.reshape(4, 30, 64), atol=1e-5)

    bn, bn_ref = BatchNormChannelsLast(64), nn.BatchNorm2d(64)
    for train in (True, False):
        bn.train(train), bn_ref.train(train)
        expected = bn_ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert torch.allclose(bn(x), expected, atol=1e-5), f"train={train}"
        assert torch.allclose(bn.running_mean, bn_ref.running_mean)
        assert torch.allclose(bn.running_var, bn_ref.running_var)
    assert torch.allclose(bn(x.reshape(4, 30, 64)), expected.reshape(4, 30, 64), atol=1e-5)


def test_convnext_linear_mlp_layout_computes_the_same_function(built):
    source = built("convnext_t_3_bn")  # conv_mlp=True, norms randomised
    with torch.device("meta"):  # no init: every tensor comes from `source` (ConvNeXt has no computed buffers)
        linear = cvpr2024.build_convnext_t_3("bn", conv_mlp=False).eval()
    norms = _norms(linear)
    assert list(norms) == CONVNEXT_NORMS
    assert all(type(m) is BatchNormChannelsLast for n, m in norms.items() if ".blocks." in n)
    assert all(type(m) is nn.BatchNorm2d for n, m in norms.items() if ".blocks." not in n)
    state = cvpr2024.convnext_mlp_weights(source.state_dict(), conv=False)
    linear.load_state_dict(state, strict=True, assign=True)
    back = cvpr2024.convnext_mlp_weights(linear.state_dict(), conv=True)
    assert _shapes(source) == {k: tuple(v.shape) for k, v in back.items()}
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(linear(x), source(x), atol=1e-4, rtol=1e-4)


# -- forward passes and checkpoints ------------------------------------------------------------------------
@pytest.mark.parametrize("model_id", ALL_IDS)
def test_forward_and_safetensors_checkpoint_round_trip(built, model_id, tmp_path):
    from safetensors.torch import save_file

    model = built(model_id)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()

    path = tmp_path / f"{model_id}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.manual_seed(12345)  # the model load_model builds starts from other random weights
    spec = get_registry().model_spec(model_id)
    loaded = load_model(spec, weights=path)
    path.unlink()
    assert loaded.weights == str(path) and not loaded.random_init
    assert loaded.weights_sha256 == state_dict_sha256(model)
    assert loaded.input_size == (3, 224, 224) and loaded.data_config["interpolation"] == "bicubic"
    with torch.no_grad():
        again = loaded.module(x[:1])  # eval mode: each image's logits are independent of the batch
    assert torch.allclose(out[:1], again, atol=1e-5, rtol=1e-5)
