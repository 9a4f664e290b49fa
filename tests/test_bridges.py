"""Bridges to Captum, pytorch-grad-cam and zennit (plugins/attributors/bridges/, issue 12 item 3).

Every bridged method returns exactly what its library returns when called directly on the same
model, inputs, targets and baselines (the harness only adapts targets, baselines, channel reduction
and batching); stochastic methods are called once per image under the image's seed. Also: the
automatic layer and reshape transform of token models (ViT, Swin), the one-line errors for
architectures a library cannot handle, registration through the hooks, and a missing library
reported with its install command.
"""

from __future__ import annotations

import random
import sys
from importlib import metadata

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.options import build_component
from harness.plugins import call_registrations, discover

from conftest import wrap_module

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
TARGET = torch.tensor([1, 3])
SEEDS = [11, 12]
BRIDGES = "harness_plugins.attributors.bridges"


def _timm_model(name: str, size: int, **kwargs):
    import timm

    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval().requires_grad_(False)  # as harness loads it
    model = wrap_module(module, size=size, batch_size=64)
    model.data_config = {**model.data_config, **IMAGENET}
    return module, model


def _inputs(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def cnn():
    """timm test_resnet (ReLU, batch norm, residual basic and bottleneck blocks), random init, 64 px."""
    module, model = _timm_model("test_resnet", 64)
    return module, model, _inputs(64)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _per_image(x: torch.Tensor, call) -> torch.Tensor:
    """The library called once per image, seeded with the image's seed (what the bridge does)."""
    outs = []
    for i, seed in enumerate(SEEDS):
        _seed(seed)
        outs.append(call(x[i : i + 1], TARGET[i : i + 1], seed))
    return torch.cat(outs)


def _same(bridged: torch.Tensor, direct: torch.Tensor) -> None:
    assert bridged.shape == direct.shape
    assert torch.isfinite(bridged).all()
    torch.testing.assert_close(bridged, direct.to(bridged.dtype), rtol=0, atol=0)


# -- Captum ----------------------------------------------------------------------------------------------
def _black(model, x):
    return (torch.zeros_like(x) - model.mean) / model.std


def _patch_mask(size: int, patch: int) -> torch.Tensor:
    rows = torch.arange(size) // patch
    return (rows[:, None] * (size // patch) + rows[None, :]).view(1, 1, size, size)


def _distribution(model, image, seed, noise_draws):
    """black + noise_draws noise images seeded from the sample's seed (the bridge's Shap baselines)."""
    from harness_plugins.attributors.bridges.common import derived_seed
    from harness_plugins.maskers.fills import NoiseFill

    noise = NoiseFill().baseline(model, image.expand(noise_draws, -1, -1, -1), [derived_seed(seed, k) for k in range(noise_draws)])
    return torch.cat([_black(model, image), noise])


def _captum_cases():
    """(id, options, direct(ca, module, model, x) -> (B, C, H, W), reduction)."""
    from harness_plugins.maskers.fills import gaussian_blur

    def softmax(module):
        return lambda inp: module(inp).softmax(-1)

    return [
        ("captum.IntegratedGradients", {"n_steps": 8},
         lambda ca, m, model, x: ca.IntegratedGradients(m).attribute(x, _black(model, x), target=TARGET, n_steps=8, internal_batch_size=64), "sum"),
        ("captum.IntegratedGradients", {"n_steps": 6, "method": "riemann_trapezoid", "baseline": "mean", "score": "softmax"},
         lambda ca, m, model, x: ca.IntegratedGradients(softmax(m)).attribute(x, torch.zeros_like(x), target=TARGET, n_steps=6,
                                                                               method="riemann_trapezoid", internal_batch_size=64), "sum"),
        ("captum.Saliency", {}, lambda ca, m, model, x: ca.Saliency(m).attribute(x, target=TARGET), "abs_max"),
        ("captum.Saliency", {"abs": False, "reduce": "sum"}, lambda ca, m, model, x: ca.Saliency(m).attribute(x, target=TARGET, abs=False), "sum"),
        ("captum.InputXGradient", {}, lambda ca, m, model, x: ca.InputXGradient(m).attribute(x, target=TARGET), "sum"),
        ("captum.DeepLift", {}, lambda ca, m, model, x: ca.DeepLift(m).attribute(x, _black(model, x), target=TARGET), "sum"),
        ("captum.DeepLiftShap", {"noise_draws": 2},
         lambda ca, m, model, x: _per_image(x, lambda xi, ti, s: ca.DeepLiftShap(m).attribute(xi, _distribution(model, xi, s, 2), target=ti)), "sum"),
        ("captum.GradientShap", {"n_samples": 3, "stdevs": 0.1, "noise_draws": 2},
         lambda ca, m, model, x: _per_image(x, lambda xi, ti, s: ca.GradientShap(m).attribute(
             xi, _distribution(model, xi, s, 2), n_samples=3, stdevs=0.1, target=ti)), "sum"),
        ("captum.GuidedBackprop", {}, lambda ca, m, model, x: ca.GuidedBackprop(m).attribute(x, target=TARGET), "abs_max"),
        ("captum.Deconvolution", {}, lambda ca, m, model, x: ca.Deconvolution(m).attribute(x, target=TARGET), "abs_max"),
        ("captum.GuidedGradCam", {}, lambda ca, m, model, x: ca.GuidedGradCam(m, m.layer4).attribute(x, target=TARGET), "abs_max"),
        ("captum.Occlusion", {"baseline": "blur"},
         lambda ca, m, model, x: ca.Occlusion(m).attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8),
                                                          baselines=gaussian_blur(x, 51, 50.0), target=TARGET, perturbations_per_eval=32), "mean"),
        ("captum.FeatureAblation", {},
         lambda ca, m, model, x: ca.FeatureAblation(m).attribute(x, _black(model, x), target=TARGET, feature_mask=_patch_mask(64, 16),
                                                                perturbations_per_eval=32), "mean"),
        ("captum.ShapleyValueSampling", {"n_samples": 2, "features": "patch:32"},
         lambda ca, m, model, x: _per_image(x, lambda xi, ti, s: ca.ShapleyValueSampling(m).attribute(
             xi, _black(model, xi), target=ti, feature_mask=_patch_mask(64, 32), n_samples=2, perturbations_per_eval=64)), "mean"),
        ("captum.ShapleyValues", {},
         lambda ca, m, model, x: ca.ShapleyValues(m).attribute(x, _black(model, x), target=TARGET, feature_mask=_patch_mask(64, 32),
                                                              perturbations_per_eval=32), "mean"),
        ("captum.Lime", {"n_samples": 12, "features": "patch:32"},
         lambda ca, m, model, x: _per_image(x, lambda xi, ti, s: ca.Lime(m).attribute(
             xi, _black(model, xi), target=ti, feature_mask=_patch_mask(64, 32), n_samples=12, perturbations_per_eval=64)), "mean"),
        ("captum.Lime", {"n_samples": 12, "features": "patch:32", "interpretable_model": "ridge", "kernel_width": 3.0},
         lambda ca, m, model, x: _per_image(x, lambda xi, ti, s: _lime_ridge(ca, m).attribute(
             xi, _black(model, xi), target=ti, feature_mask=_patch_mask(64, 32), n_samples=12, perturbations_per_eval=64)), "mean"),
        ("captum.KernelShap", {"n_samples": 12, "features": "patch:32"},
         lambda ca, m, model, x: _per_image(x, lambda xi, ti, s: ca.KernelShap(m).attribute(
             xi, _black(model, xi), target=ti, feature_mask=_patch_mask(64, 32), n_samples=12, perturbations_per_eval=64)), "mean"),
        ("captum.NoiseTunnel.Saliency", {"nt_samples": 3, "stdevs": 0.1, "stdevs_scale": "range"},
         lambda ca, m, model, x: _per_image(x, lambda xi, ti, s: ca.NoiseTunnel(ca.Saliency(m)).attribute(
             xi, nt_samples=3, stdevs=0.1 * float(xi.max() - xi.min()), target=ti)), "abs_max"),
        ("captum.NoiseTunnel.IntegratedGradients", {"nt_samples": 2, "n_steps": 4, "nt_type": "smoothgrad_sq"},
         lambda ca, m, model, x: _per_image(x, lambda xi, ti, s: ca.NoiseTunnel(ca.IntegratedGradients(m)).attribute(
             xi, nt_type="smoothgrad_sq", nt_samples=2, stdevs=1.0, baselines=_black(model, xi), target=ti, n_steps=4,
             internal_batch_size=64)), "sum"),
    ]


def _lime_ridge(ca, module):
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    return ca.Lime(module, interpretable_model=SkLearnRidge(alpha=0.01),
                   similarity_func=get_exp_kernel_similarity_function(kernel_width=3.0))


def _reduce(attribution: torch.Tensor, how: str) -> torch.Tensor:
    return {"sum": lambda a: a.sum(1), "mean": lambda a: a.mean(1), "abs_max": lambda a: a.abs().amax(1)}[how](attribution)


def test_captum_bridges_return_what_captum_returns(cnn):
    ca = pytest.importorskip("captum.attr")
    from harness_plugins.attributors.bridges import captum_bridge

    module, model, x = cnn
    by_id = {cls.id: cls for cls in captum_bridge.BRIDGED}
    for cid, options, direct, how in _captum_cases():
        cls = by_id[cid]
        bridged = cls(cls.Options(**options)).attribute(model, x, TARGET, SEEDS)
        expected = _reduce(direct(ca, module, model, x).detach(), how)
        assert bridged.shape == (2, 64, 64), cid
        try:
            _same(bridged, expected)
        except AssertionError as exc:
            raise AssertionError(f"{cid} {options}: {exc}") from None
        if cid not in ("captum.Lime",):  # default Lasso may zero every patch on a random model
            assert bridged.abs().max() > 0, cid


def test_captum_slic_features_are_per_image_superpixels(cnn):
    ca = pytest.importorskip("captum.attr")
    from skimage.segmentation import slic

    from harness_plugins.attributors.bridges.captum_bridge import FeatureAblation

    module, model, _ = cnn
    images = torch.full((2, 3, 64, 64), 0.2)
    images[0, :, :, :20] = 0.9  # a bright left band
    images[1, 0, 40:, :] = 0.9  # a red bottom band
    x = model.normalise(images)
    pixels = images.permute(0, 2, 3, 1).double().numpy()
    mask = torch.from_numpy(np.stack([slic(p, n_segments=6, start_label=0, channel_axis=-1) for p in pixels])).long()[:, None]
    assert mask.shape == (2, 1, 64, 64) and not torch.equal(mask[0], mask[1])
    bridged = FeatureAblation(FeatureAblation.Options(features="slic:6")).attribute(model, x, TARGET, SEEDS)
    direct = ca.FeatureAblation(module).attribute(x, _black(model, x), target=TARGET, feature_mask=mask, perturbations_per_eval=32)
    _same(bridged, direct.mean(1))


def test_captum_stochastic_methods_do_not_depend_on_batch_mates(cnn):
    pytest.importorskip("captum.attr")
    from harness_plugins.attributors.bridges.captum_bridge import GradientShap

    _, model, x = cnn
    attributor = GradientShap(GradientShap.Options(n_samples=2, noise_draws=1))
    together = attributor.attribute(model, x, TARGET, SEEDS)
    alone = attributor.attribute(model, x[1:], TARGET[1:], SEEDS[1:])
    _same(together[1:], alone)
    other_seed = attributor.attribute(model, x[1:], TARGET[1:], [99])
    assert not torch.equal(other_seed, alone)


class PlainCNN(torch.nn.Module):
    """Only layers Captum's LRP and zennit's rules know (conv, batch norm, ReLU, pooling, linear)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        )
        self.fc = torch.nn.Linear(16, 10)
        with torch.no_grad():  # a batch norm that is not the identity
            bn = self.features[1]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    module = PlainCNN().eval().requires_grad_(False)
    model = wrap_module(module, size=32, batch_size=64)
    model.data_config = {**model.data_config, **IMAGENET}
    return module, model, _inputs(32)


def test_captum_lrp_on_a_plain_cnn_and_a_one_line_error_otherwise(plain, cnn):
    ca = pytest.importorskip("captum.attr")
    from harness_plugins.attributors.bridges.captum_bridge import LRP

    module, model, x = plain
    _same(LRP().attribute(model, x, TARGET, SEEDS), ca.LRP(module).attribute(x, target=TARGET).sum(1))
    with pytest.raises(HarnessError, match=r"captum.LRP on model constructed: Module of type .*Identity.* has no rule") as info:
        LRP().attribute(cnn[1], cnn[2], TARGET, SEEDS)
    assert "\n" not in str(info.value)


def test_captum_guided_gradcam_refuses_token_models():
    pytest.importorskip("captum.attr")
    from harness_plugins.attributors.bridges.captum_bridge import GuidedGradCam

    _, model = _timm_model("test_vit", 160)
    with pytest.raises(HarnessError, match="not a \\(B, C, h, w\\) map"):
        GuidedGradCam().attribute(model, _inputs(160, 1), TARGET[:1], SEEDS[:1])


def test_captum_options_are_validated():
    pytest.importorskip("captum.attr")
    from harness_plugins.attributors.bridges.captum_bridge import FeatureAblation, IntegratedGradients, ShapleyValues

    with pytest.raises(HarnessError, match="unknown option attributor.steps"):
        build_component(IntegratedGradients, {"steps": 4}, "attributor")
    with pytest.raises(HarnessError, match="attributor.features"):
        build_component(FeatureAblation, {"features": "hexagon:3"}, "attributor")
    assert IntegratedGradients.Options().method == "gausslegendre" and IntegratedGradients.Options().n_steps == 50
    _, model = _timm_model("test_resnet", 32)
    with pytest.raises(HarnessError, match="16 features"):
        ShapleyValues(ShapleyValues.Options(features="patch:8")).attribute(model, _inputs(32, 1), TARGET[:1], SEEDS[:1])


def test_captum_ig_bridge_agrees_with_the_harness_gausslegendre_ig(cnn):
    pytest.importorskip("captum.attr")
    from harness_plugins.attributors.bridges.captum_bridge import IntegratedGradients as CaptumIG
    from harness_plugins.attributors.integrated_gradients import IGOptions, IntegratedGradients

    _, model, x = cnn
    ours = IntegratedGradients(IGOptions(steps=10, method="gausslegendre")).attribute(model, x, TARGET, SEEDS)
    bridged = CaptumIG(CaptumIG.Options(n_steps=10)).attribute(model, x, TARGET, SEEDS)
    torch.testing.assert_close(ours, bridged, rtol=1e-5, atol=1e-6 * float(bridged.abs().max()))


# -- pytorch-grad-cam ------------------------------------------------------------------------------------
def _pgc_targets(target, softmax=False):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

    kind = ClassifierOutputSoftmaxTarget if softmax else ClassifierOutputTarget
    return [kind(int(t)) for t in target]


def _pgc_direct(pgc, name, module, layers, x, target=TARGET, reshape=None, softmax=False, call=None, **kwargs):
    cam = getattr(pgc, name)(module, layers, reshape_transform=reshape, **kwargs)
    x = x.clone().requires_grad_(True)  # the model's parameters are frozen: the input carries the graph
    try:
        out = (call or (lambda c, inp: c(input_tensor=inp, targets=_pgc_targets(target, softmax))))(cam, x)
    finally:
        for handle in cam.activations_and_grads.handles if hasattr(cam, "activations_and_grads") else []:
            handle.remove()
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def test_pytorch_grad_cam_bridges_return_what_the_library_returns(cnn):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from harness_plugins.attributors.bridges import gradcam_bridge

    module, model, x = cnn
    layer = [module.layer4]
    by_id = {cls.id: cls for cls in gradcam_bridge.BRIDGED}
    plain = ["GradCAM", "HiResCAM", "GradCAMElementWise", "XGradCAM", "GradCAMPlusPlus", "LayerCAM", "EigenCAM",
             "EigenGradCAM", "ShapleyCAM", "SegEigenCAM", "FullGrad"]
    for name in plain:
        bridged = by_id[f"gradcam.{name}"]().attribute(model, x, TARGET, SEEDS)
        if name == "ShapleyCAM":  # differentiates gradients again: called on a trainable model, as the bridge does
            module.requires_grad_(True)
        try:
            _same(bridged, _pgc_direct(pgc, name, module, [] if name == "FullGrad" else layer, x))
        finally:
            module.requires_grad_(False)
            module.zero_grad(set_to_none=True)
    cases = [
        ("ScoreCAM", {}, lambda: _pgc_direct(pgc, "ScoreCAM", module, layer, x)),
        ("AblationCAM", {}, lambda: _pgc_direct(pgc, "AblationCAM", module, layer, x, batch_size=64)),
        ("KPCA_CAM", {"kernel": "rbf"}, lambda: _pgc_direct(pgc, "KPCA_CAM", module, layer, x, kernel="rbf")),
        ("FEM", {"k": 1.0}, lambda: _pgc_direct(pgc, "FEM", module, layer, x, k=1.0)),
        ("GradCAM", {"score": "softmax", "aug_smooth": True},
         lambda: _pgc_direct(pgc, "GradCAM", module, layer, x, call=lambda c, inp: c(inp, _pgc_targets(TARGET, True), aug_smooth=True))),
        ("GradCAMPlusPlus", {"layer": ["layer3", "layer4"], "eigen_smooth": True},
         lambda: _pgc_direct(pgc, "GradCAMPlusPlus", module, [module.layer3, module.layer4], x,
                             call=lambda c, inp: c(inp, _pgc_targets(TARGET), eigen_smooth=True))),
        ("RefineCAM", {}, lambda: _pgc_direct(pgc, "RefineCAM", module, [module.layer3, module.layer4], x,
                                              call=lambda c, inp: _released(c, c(inp, _pgc_targets(TARGET))))),
        ("SESS", {"num_scales": 2}, lambda: _pgc_direct(pgc, "SESS", module, layer, x, num_scales=2, batch_size=64,
                                                       call=lambda c, inp: _released(c, c(inp, _pgc_targets(TARGET))))),
    ]
    for name, options, direct in cases:
        cls = by_id[f"gradcam.{name}"]
        bridged = cls(cls.Options(**options)).attribute(model, x, TARGET, SEEDS)
        if name == "SESS":  # its patches are new tensors: called on a trainable model, as the bridge does
            module.requires_grad_(True)
        try:
            _same(bridged, direct())
        except AssertionError as exc:
            raise AssertionError(f"gradcam.{name} {options}: {exc}") from None
        finally:
            module.requires_grad_(False)
            module.zero_grad(set_to_none=True)
    assert all(p.grad is None and not p.requires_grad for p in module.parameters())  # the bridges left no trace
    # RandomCAM draws from numpy: one call per image under its seed
    random_cam = _per_image(x, lambda xi, ti, s: _pgc_direct(pgc, "RandomCAM", module, layer, xi, target=ti))
    _same(by_id["gradcam.RandomCAM"]().attribute(model, x, TARGET, SEEDS), random_cam)


def _released(cam, out):
    from harness_plugins.attributors.bridges.gradcam_bridge import release

    release(cam)
    return out


def test_finer_cam_compares_the_target_with_its_closest_classes(cnn):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from harness_plugins.attributors.bridges.gradcam_bridge import FinerCAM

    module, model, x = cnn
    top1 = model.logits(x).argmax(1)
    bridged = FinerCAM().attribute(model, x, top1, SEEDS)
    # the library's own targets (targets=None) are the top-1 class against its closest classes
    direct = _pgc_direct(pgc, "FinerCAM", module, [module.layer4], x, call=lambda c, inp: _released(c, c(inp)))
    _same(bridged, direct)
    assert not torch.equal(bridged, _pgc_direct(pgc, "GradCAM", module, [module.layer4], x, target=top1))


def test_pytorch_grad_cam_on_token_models_uses_the_harness_layer_and_reshape():
    pgc = pytest.importorskip("pytorch_grad_cam")
    from harness_plugins.attributors.bridges.gradcam_bridge import AblationCAM, GradCAM, ShapleyCAM

    vit, vit_model = _timm_model("test_vit", 160)
    x = _inputs(160)

    def vit_reshape(tokens):  # pytorch-grad-cam's documented ViT transform: drop the class token, grid the rest
        grid = tokens[:, 1:, :].reshape(tokens.shape[0], 10, 10, tokens.shape[2])
        return grid.transpose(2, 3).transpose(1, 2)

    layer = [vit.blocks[-1].norm1]
    _same(GradCAM().attribute(vit_model, x, TARGET, SEEDS), _pgc_direct(pgc, "GradCAM", vit, layer, x, reshape=vit_reshape))
    from pytorch_grad_cam.ablation_layer import AblationLayerVit

    _same(AblationCAM().attribute(vit_model, x, TARGET, SEEDS),
          _pgc_direct(pgc, "AblationCAM", vit, layer, x, reshape=vit_reshape, ablation_layer=AblationLayerVit(), batch_size=64))
    with pytest.raises(HarnessError, match="ShapleyCAM does not reshape"):
        ShapleyCAM().attribute(vit_model, x, TARGET, SEEDS)

    swin, swin_model = _timm_model("swin_tiny_patch4_window7_224", 64, embed_dim=16, depths=(1, 1, 1, 1),
                                   num_heads=(1, 1, 1, 1), img_size=64, window_size=4)
    xs = _inputs(64)
    _same(GradCAM().attribute(swin_model, xs, TARGET, SEEDS),
          _pgc_direct(pgc, "GradCAM", swin, [swin.layers[-1]], xs, reshape=lambda t: t.permute(0, 3, 1, 2)))


def test_pytorch_grad_cam_unknown_layer_is_one_line(cnn):
    pytest.importorskip("pytorch_grad_cam")
    from harness_plugins.attributors.bridges.gradcam_bridge import GradCAM

    _, model, x = cnn
    with pytest.raises(HarnessError, match="gradcam.GradCAM: model constructed has no module 'nonexistent'"):
        GradCAM(GradCAM.Options(layer="nonexistent")).attribute(model, x, TARGET, SEEDS)


# -- zennit ----------------------------------------------------------------------------------------------
def _zennit_direct(module, composite, x, target=TARGET, classes=10):
    from zennit.attribution import Gradient

    with Gradient(model=module, composite=composite) as attributor:
        _, relevance = attributor(x.clone(), torch.eye(classes)[target])
    return relevance.detach()


def test_zennit_bridges_return_what_zennit_returns(cnn, plain):
    pytest.importorskip("zennit")
    from zennit import composites
    from zennit.canonizers import SequentialMergeBatchNorm

    from harness_plugins.attributors.bridges import zennit_bridge as zb

    module, model, x = cnn
    low, high = _black(model, x), (torch.ones_like(x) - model.mean) / model.std
    cases = [
        (zb.EpsilonPlusFlat, {}, lambda c: composites.EpsilonPlusFlat(canonizers=c), "sum"),
        (zb.EpsilonGammaBox, {"gamma": 0.5}, lambda c: composites.EpsilonGammaBox(low=low, high=high, gamma=0.5, canonizers=c), "sum"),
        (zb.EpsilonAlpha2Beta1, {"zero_params": ["bias"]}, lambda c: composites.EpsilonAlpha2Beta1(zero_params=["bias"], canonizers=c), "sum"),
        (zb.EpsilonPlus, {"epsilon": 1e-3}, lambda c: composites.EpsilonPlus(epsilon=1e-3, canonizers=c), "sum"),
        (zb.EpsilonAlpha2Beta1Flat, {}, lambda c: composites.EpsilonAlpha2Beta1Flat(canonizers=c), "sum"),
        (zb.ExcitationBackprop, {}, lambda c: composites.ExcitationBackprop(canonizers=c), "sum"),
        (zb.GuidedBackprop, {}, lambda c: composites.GuidedBackprop(), "abs_max"),
        (zb.DeconvNet, {}, lambda c: composites.DeconvNet(), "abs_max"),
        (zb.BetaSmooth, {"beta_smooth": 5.0}, lambda c: composites.BetaSmooth(beta_smooth=5.0), "abs_max"),
    ]
    for cls, options, composite, how in cases:
        bridged = cls(cls.Options(**options)).attribute(model, x, TARGET, SEEDS)
        try:
            _same(bridged, _reduce(_zennit_direct(module, composite([zb.TimmResNetCanonizer()]), x), how))
        except AssertionError as exc:
            raise AssertionError(f"{cls.id} {options}: {exc}") from None
        assert bridged.abs().max() > 0
    # a user module: batch norms merged into the preceding convolutions
    pmodule, pmodel, px = plain
    _same(zb.EpsilonPlusFlat().attribute(pmodel, px, TARGET, SEEDS),
          _zennit_direct(pmodule, composites.EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]), px).sum(1))
    # canonizer=none: the model as it is (residual sums seen as plain additions) gives other numbers
    plain_numbers = zb.EpsilonPlusFlat(zb.EpsilonPlusFlat.Options(canonizer="none")).attribute(model, x, TARGET, SEEDS)
    _same(plain_numbers, _zennit_direct(module, composites.EpsilonPlusFlat(), x).sum(1))
    assert not torch.allclose(plain_numbers, zb.EpsilonPlusFlat().attribute(model, x, TARGET, SEEDS))


def test_timm_resnet_canonizer_keeps_the_function_and_adds_residual_sums(cnn):
    pytest.importorskip("zennit")
    from zennit.composites import EpsilonPlusFlat
    from zennit.layer import Sum

    from harness_plugins.attributors.bridges.zennit_bridge import TimmResNetCanonizer

    module, _, x = cnn
    with torch.no_grad():
        before = module(x)
    composite = EpsilonPlusFlat(canonizers=[TimmResNetCanonizer()])
    with composite.context(module) as modified, torch.no_grad():
        sums = [m for m in modified.modules() if isinstance(m, Sum)]
        during = modified(x)
    assert len(sums) == 4  # one per residual block of test_resnet
    torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, Sum) for m in module.modules())
    with torch.no_grad():
        torch.testing.assert_close(module(x), before, rtol=0, atol=0)  # weights restored


def test_zennit_refuses_architectures_its_rules_do_not_cover():
    pytest.importorskip("zennit")
    from harness_plugins.attributors.bridges.zennit_bridge import EpsilonPlusFlat, GuidedBackprop

    _, vit = _timm_model("test_vit", 160)
    x = _inputs(160, 1)
    with pytest.raises(HarnessError, match=r"zennit.EpsilonPlusFlat: zennit's LRP rules do not cover model constructed \(.*LayerNorm") as info:
        EpsilonPlusFlat().attribute(vit, x, TARGET[:1], SEEDS[:1])
    assert "\n" not in str(info.value) and "ResNet" in str(info.value)
    _, effnet = _timm_model("test_efficientnet", 64)
    with pytest.raises(HarnessError, match="EfficientNet"):
        EpsilonPlusFlat().attribute(effnet, _inputs(64, 1), TARGET[:1], SEEDS[:1])
    # modified-gradient composites only touch ReLUs: any architecture
    assert GuidedBackprop().attribute(vit, x, TARGET[:1], SEEDS[:1]).shape == (1, 160, 160)


# -- registration and missing libraries -----------------------------------------------------------------
REQUIRED = {
    "captum_bridge": ["captum.IntegratedGradients", "captum.Saliency", "captum.InputXGradient", "captum.DeepLift",
                      "captum.DeepLiftShap", "captum.GradientShap", "captum.GuidedBackprop", "captum.Deconvolution",
                      "captum.GuidedGradCam", "captum.Occlusion", "captum.FeatureAblation", "captum.ShapleyValueSampling",
                      "captum.Lime", "captum.KernelShap", "captum.LRP", "captum.NoiseTunnel.Saliency",
                      "captum.NoiseTunnel.IntegratedGradients"],
    "gradcam_bridge": ["gradcam.GradCAM", "gradcam.GradCAMPlusPlus", "gradcam.XGradCAM", "gradcam.HiResCAM",
                       "gradcam.ScoreCAM", "gradcam.AblationCAM", "gradcam.EigenCAM", "gradcam.EigenGradCAM",
                       "gradcam.LayerCAM", "gradcam.FullGrad", "gradcam.GradCAMElementWise", "gradcam.KPCA_CAM",
                       "gradcam.ShapleyCAM"],
    "zennit_bridge": ["zennit.EpsilonPlusFlat", "zennit.EpsilonGammaBox", "zennit.EpsilonAlpha2Beta1", "zennit.EpsilonPlus"],
}
LIBRARIES = {"captum_bridge": ("captum", "captum"), "gradcam_bridge": ("pytorch_grad_cam", "grad-cam"),
             "zennit_bridge": ("zennit", "zennit")}


def _load(module_name: str):
    ep = metadata.EntryPoint(name=module_name, value=f"{BRIDGES}.{module_name}", group="harness")
    pm, infos = discover([ep])
    accepted: list[str] = []
    call_registrations(pm, infos, lambda kind, obj, info: accepted.append(obj.id))
    return infos[0], accepted


@pytest.mark.parametrize("module_name", sorted(REQUIRED))
def test_each_bridge_registers_its_ids_through_the_hook(module_name):
    pytest.importorskip(LIBRARIES[module_name][0])
    info, ids = _load(module_name)
    assert info.errors == []
    assert set(REQUIRED[module_name]) <= set(ids)
    prefix = REQUIRED[module_name][0].split(".")[0]
    assert all(i.startswith(prefix + ".") for i in ids) and len(ids) == len(set(ids))


@pytest.mark.parametrize("module_name", sorted(REQUIRED))
def test_a_missing_library_is_reported_with_its_install_command(module_name, monkeypatch):
    library, extra = LIBRARIES[module_name]
    for name in list(sys.modules):
        if name == library or name.startswith(library + ".") or name == f"{BRIDGES}.{module_name}":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, library, None)  # `import library` now raises ImportError
    info, ids = _load(module_name)
    assert ids == []
    assert info.errors == []  # skipped, not an error: no warning on every command
    skipped = info.skipped
    assert skipped is not None and skipped.startswith("MissingLibrary:")
    assert f'pip install "harness[{extra}]"' in skipped and "\n" not in skipped


def test_bridged_ids_work_from_the_command_line(cli, tmp_path, fresh_registry, monkeypatch):
    for library, _ in LIBRARIES.values():
        pytest.importorskip(library)
    from harness import plugins

    original = plugins.metadata.entry_points
    installed = {ep.value for ep in original(group="harness")}
    extra = [metadata.EntryPoint(name=name, value=f"{BRIDGES}.{name}", group="harness")
             for name in REQUIRED if f"{BRIDGES}.{name}" not in installed]  # until pyproject lists them

    def entry_points(**kwargs):
        found = original(**kwargs)
        return [*found, *extra] if kwargs.get("group") == "harness" else found

    monkeypatch.setattr(plugins.metadata, "entry_points", entry_points)
    listing = cli("plugins")
    assert listing.exit_code == 0
    assert all(i in listing.stdout for i in ("captum.NoiseTunnel.Saliency", "gradcam.GradCAM", "zennit.EpsilonPlusFlat"))
    for attributor, options in (("captum.Occlusion", ["-o", "attributor.sliding_window_shapes=[3, 32, 32]", "-o", "attributor.strides=32"]), ("gradcam.GradCAM", []),
                                ("zennit.EpsilonPlusFlat", [])):
        res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "--attributor", attributor,
                  *options, "--limit", "1", "-o", "metric.steps=2", "--out", str(tmp_path), "--quiet")
        assert res.exit_code == 0, res.stderr
    res = cli("run", "--model", "test_vit", "--random-init", "--metric", "insertion", "--attributor", "zennit.EpsilonPlusFlat",
              "--limit", "1", "-o", "metric.steps=2", "--out", str(tmp_path), "--quiet")
    assert res.exit_code != 0
    assert "zennit's LRP rules do not cover model test_vit" in res.stderr and "Traceback" not in res.stderr


def test_an_installed_but_broken_library_fails_in_one_line_when_used(tmp_path, monkeypatch):
    """A package that is found but cannot be imported: a HarnessError naming the cause, not a traceback."""
    from harness.errors import HarnessError
    from harness_plugins.attributors.bridges.common import require

    (tmp_path / "brokenlib").mkdir()
    (tmp_path / "brokenlib" / "__init__.py").write_text("raise RuntimeError('compiled against another torch')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy = require("brokenlib", "BrokenLib", "broken")
    with pytest.raises(HarnessError) as info:
        lazy.anything
    message = str(info.value)
    assert "BrokenLib cannot be imported" in message and 'pip install "harness[broken]"' in message
    assert "\n" not in message
