"""FAN models (plugins/models/fan.py): exact parameter counts, the released checkpoints' key names,
order and shapes (written out here from the reference model definition), strict loading of a
checkpoint in the released file format, outputs equal to the reference implementation's on fixed
weights, and the token / channel attention that metrics read."""

from __future__ import annotations

import argparse

import pytest
import torch

from harness.errors import HarnessError

# METHODS.md section 8: the reference implementation's counts with 1000 classes.
COUNTS = {
    "fan_tiny_12_p16_224": 7_319_920,
    "fan_small_12_p16_224": 28_345_336,
    "fan_base_18_p16_224": 54_350_320,
    "fan_large_24_p16_224": 80_574_100,
    "fan_tiny_8_p4_hybrid": 7_467_240,
    "fan_small_12_p4_hybrid": 26_117_944,
    "fan_base_16_p4_hybrid": 50_475_048,
    "fan_large_16_p4_hybrid": 76_855_140,
}
# (dim, FAN blocks, heads, ConvNeXt stage depths of the hybrid stem or None)
CONFIGS = {
    "fan_tiny_12_p16_224": (192, 12, 4, None),
    "fan_small_12_p16_224": (384, 12, 8, None),
    "fan_base_18_p16_224": (448, 18, 8, None),
    "fan_large_24_p16_224": (480, 24, 10, None),
    "fan_tiny_8_p4_hybrid": (192, 8, 8, (3, 3)),
    "fan_small_12_p4_hybrid": (384, 10, 8, (3, 3)),
    "fan_base_16_p4_hybrid": (448, 16, 8, (3, 3)),
    "fan_large_16_p4_hybrid": (480, 22, 10, (3, 5)),
}
ALIASES = {"fan_t": "fan_tiny_12_p16_224", "fan_s": "fan_small_12_p16_224", "fan_b": "fan_base_18_p16_224",
           "fan_l": "fan_large_24_p16_224", "fan_t_hybrid": "fan_tiny_8_p4_hybrid", "fan_s_hybrid": "fan_small_12_p4_hybrid",
           "fan_b_hybrid": "fan_base_16_p4_hybrid", "fan_l_hybrid": "fan_large_16_p4_hybrid"}


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def _linear(prefix: str, cout: int, cin: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (cout, cin)), (f"{prefix}.bias", (cout,))]


def _ln(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,))]


def released_keys(dim: int, depth: int, heads: int, hybrid: tuple[int, ...] | None, classes: int = 1000):
    """The state dict of NVlabs/FAN's ``models/fan.py`` (timm 0.5.4), in order: (name, shape)."""
    keys: list[tuple[str, tuple[int, ...]]] = [("cls_token", (1, 1, dim))]
    if hybrid is None:  # ConvPatchEmbed: Sequential(conv3x3+BN, GELU, ...) -> indices 0, 2, 4, 6
        cin = 3
        for i, width in enumerate((dim // 8, dim // 4, dim // 2, dim)):
            keys += [(f"patch_embed.proj.{2 * i}.0.weight", (width, cin, 3, 3))] + _bn(f"patch_embed.proj.{2 * i}.1", width)
            cin = width
    else:  # HybridEmbed: ConvNeXt (stem, 2 stages, dims 128/256, conv MLP) + 2x2 projection
        b = "patch_embed.backbone"
        keys += [(f"{b}.stem.0.weight", (128, 3, 4, 4)), (f"{b}.stem.0.bias", (128,))] + _ln(f"{b}.stem.1", 128)
        for s, (n_blocks, c) in enumerate(zip(hybrid, (128, 256))):
            if s == 1:
                keys += _ln(f"{b}.stages.1.downsample.0", 128)
                keys += [(f"{b}.stages.1.downsample.1.weight", (256, 128, 2, 2)), (f"{b}.stages.1.downsample.1.bias", (256,))]
            for j in range(n_blocks):
                p = f"{b}.stages.{s}.blocks.{j}"
                keys += [(f"{p}.gamma", (c,)), (f"{p}.conv_dw.weight", (c, 1, 7, 7)), (f"{p}.conv_dw.bias", (c,))]
                keys += _ln(f"{p}.norm", c)
                keys += [(f"{p}.mlp.fc1.weight", (4 * c, c, 1, 1)), (f"{p}.mlp.fc1.bias", (4 * c,)),
                         (f"{p}.mlp.fc2.weight", (c, 4 * c, 1, 1)), (f"{p}.mlp.fc2.bias", (c,))]
        keys += [("patch_embed.proj.weight", (dim, 256, 2, 2)), ("patch_embed.proj.bias", (dim,))]
    keys += [("pos_embed.token_projection.weight", (dim, 64, 1, 1)), ("pos_embed.token_projection.bias", (dim,))]
    hidden = 4 * dim
    for i in range(depth):
        p = f"blocks.{i}"
        keys += [(f"{p}.gamma1", (dim,)), (f"{p}.gamma2", (dim,))] + _ln(f"{p}.norm1", dim)
        keys += _linear(f"{p}.attn.q", dim, dim) + _linear(f"{p}.attn.kv", 2 * dim, dim) + _linear(f"{p}.attn.proj", dim, dim)
        keys += _ln(f"{p}.norm2", dim)
        m = f"{p}.mlp"
        keys += [(f"{m}.temperature", (heads, 1, 1)), (f"{m}.mlp_v.gamma", (hidden,))] + _linear(f"{m}.mlp_v.fc1", hidden, dim)
        keys += [(f"{m}.mlp_v.dwconv.conv1.weight", (hidden, 1, 3, 3)), (f"{m}.mlp_v.dwconv.conv1.bias", (hidden,))]
        keys += _bn(f"{m}.mlp_v.dwconv.bn", hidden)
        keys += [(f"{m}.mlp_v.dwconv.conv2.weight", (hidden, 1, 3, 3)), (f"{m}.mlp_v.dwconv.conv2.bias", (hidden,))]
        keys += _linear(f"{m}.mlp_v.fc2", dim, hidden) + _ln(f"{m}.norm_v", dim) + _linear(f"{m}.q", dim, dim)
    for i in range(2):
        p = f"cls_attn_blocks.{i}"
        keys += [(f"{p}.gamma1", (dim,)), (f"{p}.gamma2", (dim,))] + _ln(f"{p}.norm1", dim)
        for name in ("q", "k", "v", "proj"):
            keys += _linear(f"{p}.attn.{name}", dim, dim)
        keys += _ln(f"{p}.norm2", dim) + _linear(f"{p}.mlp.fc1", hidden, dim) + _linear(f"{p}.mlp.fc2", dim, hidden)
    keys += _ln("norm", dim) + _linear("head", classes, dim)
    return keys


def _meta(name: str):
    from harness_plugins.models.fan import create_fan

    with torch.device("meta"):
        return create_fan(name)


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_counts_equal_the_reference(name):
    assert sum(p.numel() for p in _meta(name).parameters()) == COUNTS[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_names_order_and_shapes_are_the_released_ones(name):
    expected = released_keys(*CONFIGS[name])
    got = [(k, tuple(v.shape)) for k, v in _meta(name).state_dict().items()]
    assert got[0][0] == "cls_token"
    assert [k for k, _ in got] == [k for k, _ in expected]
    assert got == expected


def test_registry_has_every_variant_and_alias():
    from harness.registry import get_registry

    reg = get_registry()
    for alias, name in ALIASES.items():
        assert reg.provider("model", alias).endswith(":fan") and reg.provider("model", name).endswith(":fan")
        assert name in reg.model_spec(alias).description


def test_pretrained_says_where_the_weights_are_and_to_pass_weights():
    from harness.registry import get_registry

    with pytest.raises(HarnessError) as err:
        get_registry().model_spec("fan_t").build(True)
    message = str(err.value)
    assert "fully_attentional_network_ckpt/releases/download/v1.0.0/fan_vit_tiny.pth.tar" in message
    assert "--weights" in message and "--random-init" in message
    with pytest.raises(HarnessError, match="no checkpoint was released"):
        get_registry().model_spec("fan_l").build(True)


def test_checkpoint_in_the_released_format_loads_strictly(tmp_path):
    """A timm train.py checkpoint: {'state_dict', 'state_dict_ema', 'optimizer', 'args': Namespace, ...}."""
    from harness.model import load_model
    from harness.registry import get_registry

    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in released_keys(*CONFIGS["fan_tiny_12_p16_224"]):
        state[key] = torch.tensor(7) if key.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
    for key in state:
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 0.5
    checkpoint = {
        "epoch": 299, "arch": "fan_tiny_12_p16_224", "version": 2, "metric": 79.2,
        "state_dict": state,
        "state_dict_ema": {k: v.clone() for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "args": argparse.Namespace(model="fan_tiny_12_p16_224", lr=1e-3, drop_path=0.1, img_size=224),
    }
    path = tmp_path / "fan_vit_tiny.pth.tar"
    torch.save(checkpoint, path)
    loaded = load_model(get_registry().model_spec("fan_t"), weights=path)
    own = loaded.module.state_dict()
    assert list(own) == list(state)
    assert all(torch.equal(own[k], state[k]) for k in state)
    assert loaded.weights == str(path)


def test_a_checkpoint_with_a_wrong_shape_is_refused_naming_the_key(tmp_path):
    from harness.model import load_model
    from harness.registry import get_registry

    state = {k: torch.zeros(shape) for k, shape in released_keys(*CONFIGS["fan_tiny_12_p16_224"])}
    state["blocks.3.mlp.temperature"] = torch.ones(8, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(HarnessError, match=r"blocks\.3\.mlp\.temperature \(8, 1, 1\) vs model \(4, 1, 1\)"):
        load_model(get_registry().model_spec("fan_t"), weights=tmp_path / "bad.pth")


# -- numerical equality with the reference ---------------------------------------------------------
def seeded_state(module, seed=0):
    """Deterministic weights for every state-dict entry (fan-in scaled matrices, norms/scales near 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        t = torch.randn(v.shape, generator=g)
        if v.dim() >= 2 and k != "cls_token":
            t = t / v[0].numel() ** 0.5
        else:
            t = 0.2 * t + (1.0 if k.rsplit(".", 1)[-1] in ("weight", "gamma", "gamma1", "gamma2") else 0.0)
        if k.endswith("running_var"):
            t = t.abs() + 0.1
        out[k] = t
    return out


# Logits of NVlabs/FAN's models/fan.py (run under timm 0.5.4, eval mode; its ConvNeXt LayerNorm2d on
# contiguous inputs, i.e. the GPU path) for these tiny configurations, seeded_state(seed=0) weights
# and torch.randn(2, 3, 64, 64) from a generator seeded with 1.
REFERENCE_LOGITS = {
    "vit": [1.44941, 1.14215, -0.43465, -1.39528, -2.02156, 1.13536, 0.87579, -0.63271, -1.72677, -2.32166],
    "hybrid": [-0.79771, -1.62885, 0.66262, 1.6231, 1.92297, -0.58777, -1.7397, 0.74065, 1.86256, 1.44352],
}


@pytest.mark.parametrize("kind", ["vit", "hybrid"])
@pytest.mark.parametrize("fused", [True, False])
def test_outputs_equal_the_reference_implementation(kind, fused):
    from harness_plugins.models.fan import FAN

    if kind == "vit":
        model = FAN(img_size=64, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    else:
        model = FAN(img_size=64, embed_dim=32, depth=1, num_heads=2, num_classes=5, backbone_depths=(1, 1))
    model.load_state_dict(seeded_state(model))
    model.eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    assert logits.flatten().tolist() == pytest.approx(REFERENCE_LOGITS[kind], abs=1e-4)


# -- attention that metrics read --------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    from harness_plugins.models.fan import FAN

    torch.manual_seed(0)
    model = FAN(img_size=64, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    with torch.no_grad():
        for block in model.blocks:  # distinct positive temperatures per head
            block.mlp.temperature.copy_(torch.tensor([0.5, 2.5]).view(2, 1, 1))
    return model


def test_channel_attention_is_one_weight_per_channel_within_zero_and_temperature(small):
    seen, inputs, outputs = {}, {}, {}
    handles = []
    def keep(store, i, take=lambda a, o: o):
        def hook(module, args, output):
            store[i] = take(args, output)
        return hook

    for i, block in enumerate(small.blocks):
        handles.append(block.mlp.channel_attn_drop.register_forward_hook(keep(seen, i)))
        handles.append(block.mlp.register_forward_hook(keep(inputs, i, lambda a, o: a[0])))
        handles.append(block.mlp.register_forward_hook(keep(outputs, i)))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        small(x)
    for h in handles:
        h.remove()
    assert set(seen) == {0, 1}
    for i, block in enumerate(small.blocks):
        attn = seen[i]
        assert attn.shape == (3, 2, 16, 1)  # (B, heads, C / heads, 1): one weight per channel (32)
        temperature = block.mlp.temperature.view(1, 2, 1, 1)
        assert (attn >= 0).all() and (attn <= temperature).all()
        assert (attn[:, 1] > 0.5).any()  # head 1 uses its larger range: the bound is per head
        # independent recomputation: A = sigmoid(softmax_N(q)^T mean_c softmax_N(x)) * T, output A * v
        z = inputs[i]
        b, n, c = z.shape
        q = block.mlp.q(z).view(b, n, 2, 16).softmax(1)
        k = z.view(b, n, 2, 16).softmax(1).mean(-1, keepdim=True)
        expected = torch.sigmoid(torch.einsum("bnhd,bnhe->bhde", q, k)) * temperature
        torch.testing.assert_close(attn, expected, rtol=1e-5, atol=1e-6)
        v = block.mlp.norm_v(block.mlp.mlp_v(z, 4, 4)).view(b, n, 2, 16)
        torch.testing.assert_close(outputs[i], (v * expected[..., 0][:, None]).reshape(b, n, c), rtol=1e-5, atol=1e-6)


def test_token_attention_follows_timm_conventions(small):
    assert small.num_prefix_tokens == 0
    assert small.patch_embed.patch_size == (16, 16) and small.patch_embed.grid_size == (4, 4)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = small(x)
    probs = {}
    attn_modules = [n for n, m in small.named_modules() if hasattr(m, "num_heads") and hasattr(m, "attn_drop")]
    assert attn_modules == ["blocks.0.attn", "blocks.1.attn"]  # not the channel or class attention
    for block in small.blocks:
        block.attn.fused_attn = False
    def keep(i):
        def hook(module, args, output):
            probs[i] = output
        return hook

    handles = [b.attn.attn_drop.register_forward_hook(keep(i)) for i, b in enumerate(small.blocks)]
    try:
        with torch.no_grad():
            explicit = small(x)
    finally:
        for h in handles:
            h.remove()
        for block in small.blocks:
            block.attn.fused_attn = True
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)
    for p in probs.values():
        assert p.shape == (2, 2, 16, 16)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 16))


def test_hybrid_geometry_and_any_input_size():
    from harness_plugins.models.fan import FAN

    hybrid = _meta("fan_small_12_p4_hybrid")
    assert hybrid.patch_embed.patch_size == (16, 16) and hybrid.patch_embed.grid_size == (14, 14)
    assert hybrid.num_prefix_tokens == 0 and hybrid.pretrained_cfg["crop_pct"] == 1.0
    model = FAN(img_size=64, embed_dim=32, depth=1, num_heads=2, num_classes=3, backbone_depths=(1, 1)).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 96, 64)).shape == (1, 3)  # positional encoding follows the grid
