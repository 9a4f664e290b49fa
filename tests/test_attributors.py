"""Attributors (plugins/attributors/*.py): each checked against a property that a wrong
implementation breaks, on hand-built models whose gradients or evidence are known.

- saliency / input_x_gradient against a per-image autograd loop;
- integrated gradients: exact on a linear model, completeness converging with the step count;
- SmoothGrad: sigma = 0 is saliency, the noise scale is sigma * (max - min), per-sample seeding;
- Grad-CAM: a reference computed with hooks, the known region highlighted, timm CNNs and ViTs;
- RISE: a reference loop over the masks, the known region highlighted, the masks' statistics;
- I-GOS: the known grid cell found, the objective decreasing, map range and seeding;
- random: seeded, per sample, in [0, 1);
- every attributor through `harness run`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness_plugins.attributors import BUNDLED
from harness_plugins.attributors.gradcam import GradCAM, default_layer
from harness_plugins.attributors.gradients import InputXGradient, Saliency
from harness_plugins.attributors.igos import IGOS, IGOSOptions, igos_masks, tv_norm
from harness_plugins.attributors.integrated_gradients import IGOptions, IntegratedGradients, integrated_gradients
from harness_plugins.attributors.random_map import RandomMap
from harness_plugins.attributors.rise import RISE, rise_masks
from harness_plugins.attributors.smoothgrad import SmoothGrad

from conftest import wrap_module

SIZE = 16
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- models --------------------------------------------------------------------------------------------
class SmoothNet(torch.nn.Module):
    """A small conv net with smooth activations (softplus, tanh): IG's completeness applies."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, x):
        h = F.softplus(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return 4 * self.fc(h.mean((2, 3)))


def smooth_model(batch_size=16, imagenet_norm=False):
    torch.manual_seed(0)
    model = wrap_module(SmoothNet(), size=SIZE, batch_size=batch_size)
    if imagenet_norm:  # a non-trivial normalisation: "black" is -mean/std, not 0
        model.data_config = {**model.data_config, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return model


def _inputs(n=3, seed=1, size=SIZE):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen) * 4 - 2


def _grad_loop(module, inputs, target, kind="logit"):
    """d score / d x, one image at a time (the independent reference)."""
    grads = []
    for x, t in zip(inputs, target.tolist()):
        x = x[None].clone().requires_grad_(True)
        out = module(x)
        score = out.softmax(1)[0, t] if kind == "softmax" else out[0, t]
        (g,) = torch.autograd.grad(score, x)
        grads.append(g[0])
    return torch.stack(grads)


# -- saliency, input x gradient ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["logit", "softmax"])
def test_saliency_and_input_x_gradient_match_per_image_autograd(kind):
    model = smooth_model(batch_size=2)  # 5 images in chunks of 2
    inputs, target = _inputs(5), torch.tensor([0, 1, 2, 3, 4])
    grads = _grad_loop(model.module, inputs, target, kind)
    saliency = Saliency(Saliency.Options(score=kind)).attribute(model, inputs, target, [0] * 5)
    ixg = InputXGradient(InputXGradient.Options(score=kind)).attribute(model, inputs, target, [0] * 5)
    assert saliency.shape == ixg.shape == (5, SIZE, SIZE)
    torch.testing.assert_close(saliency, grads.abs().amax(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ixg, (grads * inputs).sum(1), rtol=1e-5, atol=1e-7)
    # the two are genuinely different maps (the test would notice a mix-up)
    assert not torch.allclose(saliency, ixg.abs(), atol=1e-4)


# -- integrated gradients ----------------------------------------------------------------------------------
class LinearNet(torch.nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.fc = torch.nn.Linear(3 * SIZE * SIZE, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("steps,method", [(1, "riemann_right"), (3, "riemann_right"), (7, "trapezoid")])
def test_ig_on_a_linear_model_is_weight_times_delta(steps, method):
    torch.manual_seed(0)
    model = wrap_module(LinearNet(), size=SIZE, batch_size=4)
    model.data_config = {**model.data_config, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    inputs, target = _inputs(3), torch.tensor([2, 0, 3])
    black = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    weights = model.module.fc.weight.detach()[target].view(3, 3, SIZE, SIZE)
    options = IGOptions(steps=steps, method=method)
    attributions = integrated_gradients(model, inputs, target, options)
    torch.testing.assert_close(attributions, weights * (inputs - black), rtol=1e-5, atol=1e-6)
    # the "mean" baseline is zero in normalised space
    mean_base = integrated_gradients(model, inputs, target, IGOptions(steps=steps, method=method, baseline="mean"))
    torch.testing.assert_close(mean_base, weights * inputs, rtol=1e-5, atol=1e-6)


def test_ig_completeness_converges_with_steps():
    model = smooth_model(batch_size=45, imagenet_norm=True)  # 45 divides no path's row count
    inputs = _inputs(2)
    black = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1).expand_as(inputs)
    with torch.no_grad():
        gap = model.module(inputs) - model.module(black)
    target = gap.abs().argmax(1)  # the class whose logit moves most along the path
    expected = gap.gather(1, target[:, None])[:, 0]
    assert expected.abs().min() > 0.5  # a path with a real change to account for

    def error(steps, method):
        attributions = integrated_gradients(model, inputs, target, IGOptions(steps=steps, method=method))
        assert attributions.shape == inputs.shape
        return (attributions.sum((1, 2, 3)) - expected).abs()

    for method, fine_steps in (("riemann_right", 100), ("trapezoid", 200)):
        coarse, fine = error(10, method), error(fine_steps, method)
        assert (fine < coarse).all(), (method, coarse, fine)
        assert (fine / expected.abs() < 0.01).all(), (method, fine, expected)
    # the trapezoid rule is second order: far more accurate than the right Riemann sum at equal steps
    assert (error(10, "trapezoid") < error(10, "riemann_right") / 3).all()


def test_ig_quadrature_points():
    """One step: the right Riemann sum evaluates the gradient at x only; the trapezoid at x0 and x."""
    model = smooth_model(batch_size=4, imagenet_norm=True)
    inputs, target = _inputs(2), torch.tensor([1, 3])
    black = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1).expand_as(inputs)
    at_x, at_base = _grad_loop(model.module, inputs, target), _grad_loop(model.module, black.contiguous(), target)
    right = integrated_gradients(model, inputs, target, IGOptions(steps=1))
    trapezoid = integrated_gradients(model, inputs, target, IGOptions(steps=1, method="trapezoid"))
    torch.testing.assert_close(right, (inputs - black) * at_x, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(trapezoid, (inputs - black) * (at_x + at_base) / 2, rtol=1e-5, atol=1e-7)
    assert (at_x - at_base).abs().max() > 0.2 * at_x.abs().max()  # the ends differ: the checks tell the rules apart


def test_ig_map_is_the_channel_reduction_of_the_attributions():
    model = smooth_model(batch_size=5)
    inputs, target = _inputs(2), torch.tensor([1, 4])
    options = IGOptions(steps=6)
    attributions = integrated_gradients(model, inputs, target, options)
    mapped = IntegratedGradients(options).attribute(model, inputs, target, [0, 0])
    torch.testing.assert_close(mapped, attributions.sum(1), rtol=1e-6, atol=1e-7)
    absolute = IntegratedGradients(IGOptions(steps=6, reduce="abs_sum")).attribute(model, inputs, target, [0, 0])
    torch.testing.assert_close(absolute, attributions.abs().sum(1), rtol=1e-6, atol=1e-7)
    # defaults of seed 004: 25 steps, black baseline
    defaults = IGOptions()
    assert defaults.steps == 25 and defaults.baseline == "black"


# -- SmoothGrad ------------------------------------------------------------------------------------------
def test_smoothgrad_without_noise_is_saliency():
    model = smooth_model(batch_size=4)
    inputs, target = _inputs(3), torch.tensor([0, 2, 4])
    saliency = Saliency().attribute(model, inputs, target, [5, 6, 7])
    smooth = SmoothGrad(SmoothGrad.Options(samples=3, sigma=0.0)).attribute(model, inputs, target, [5, 6, 7])
    torch.testing.assert_close(smooth, saliency, rtol=1e-5, atol=1e-6)


def test_smoothgrad_seeding_is_per_sample():
    inputs, target, seeds = _inputs(3), torch.tensor([0, 2, 4]), [11, 57, 203]
    options = SmoothGrad.Options(samples=4, sigma=0.15)
    big = SmoothGrad(options).attribute(smooth_model(batch_size=16), inputs, target, seeds)
    again = SmoothGrad(options).attribute(smooth_model(batch_size=16), inputs, target, seeds)
    small = SmoothGrad(options).attribute(smooth_model(batch_size=2), inputs, target, seeds)
    assert torch.equal(big, again)
    torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-5)
    # one image alone (with its own seed) gets the same map as inside the batch
    alone = SmoothGrad(options).attribute(smooth_model(), inputs[1:2], target[1:2], seeds[1:2])
    torch.testing.assert_close(alone[0], big[1], rtol=1e-5, atol=1e-5)
    # other seeds, other noise; and the noise does change the map
    other = SmoothGrad(options).attribute(smooth_model(), inputs, target, [21, 22, 23])
    for i in range(3):
        assert (other[i] - big[i]).abs().max() > 0.05 * big[i].abs().max()
    plain = Saliency().attribute(smooth_model(), inputs, target, seeds)
    assert (plain - big).abs().max() > 0.05 * big.abs().max()


class HalfSquare(torch.nn.Module):
    """Class 0's logit is 0.5 * |x|^2, so d logit / dx = x: the gradient shows the noise itself."""

    def forward(self, x):
        energy = 0.5 * x.pow(2).flatten(1).sum(1)
        return torch.stack([energy, torch.zeros_like(energy)], 1)


def test_smoothgrad_noise_scale_is_sigma_times_each_images_range():
    model = wrap_module(HalfSquare(), size=32, batch_size=8)
    gen = torch.Generator().manual_seed(3)
    inputs = torch.stack([torch.rand(3, 32, 32, generator=gen), 4 * torch.rand(3, 32, 32, generator=gen) - 2])
    spans = inputs.flatten(1).amax(1) - inputs.flatten(1).amin(1)
    n, sigma = 6, 0.15
    maps = SmoothGrad(SmoothGrad.Options(samples=n, sigma=sigma, magnitude="raw_sum")).attribute(
        model, inputs, torch.zeros(2, dtype=torch.long), [1, 2]
    )
    # per copy the map is sum_c (x_c + std * eps_c); the mean over n copies deviates from sum_c x
    # by std * (mean of 3n unit normals per pixel): its spread estimates std
    residual = maps - inputs.sum(1)
    estimated = residual.flatten(1).std(1) * math.sqrt(n / 3)
    torch.testing.assert_close(estimated, sigma * spans, rtol=0.1, atol=0)
    assert residual.flatten(1).mean(1).abs().max() < 0.05 * float(sigma * spans.min())  # zero-mean noise


# -- Grad-CAM -------------------------------------------------------------------------------------------------
class QuadrantCNN(torch.nn.Module):
    """Convolutions see only the top-left quadrant (the input is multiplied by a fixed mask first);
    class 0 reads every channel with a positive weight after global average pooling."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., :16, :16] = 1
        self.register_buffer("mask", mask)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.ReLU(),
        )
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.fc.weight[0] = self.fc.weight[0].abs() + 0.1

    def forward(self, x):
        return self.fc(self.features(x * self.mask).mean((2, 3)))


def _gradcam_reference(module, layer_name, inputs, target, prefix=0, channels_last=False):
    """Grad-CAM from hooks, one image at a time."""
    layer = module.get_submodule(layer_name)
    cams = []
    for x, t in zip(inputs, target.tolist()):
        store = {}
        handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        try:
            out = module(x[None])
            (grad,) = torch.autograd.grad(out[0, t], store["a"])
        finally:
            handle.remove()
        act = store["a"].detach()
        if act.dim() == 3:  # tokens: drop the prefix, rows of the patch grid
            side = int(math.isqrt(act.shape[1] - prefix))
            act = act[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grad = grad[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        elif channels_last:  # (B, H, W, C) stage outputs (Swin)
            act, grad = act.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)
        weights = grad.mean((2, 3), keepdim=True)
        cam = F.relu((weights * act).sum(1, keepdim=True))
        cams.append(F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(cams)


def test_gradcam_highlights_the_only_region_the_model_sees():
    torch.manual_seed(0)
    model = wrap_module(QuadrantCNN(), size=32, batch_size=2)
    inputs = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.zeros(3, dtype=torch.long)
    assert default_layer(model.module) == "features.3"  # the last convolution
    cams = GradCAM().attribute(model, inputs, target, [0, 0, 0])
    assert cams.shape == (3, 32, 32) and (cams >= 0).all()
    torch.testing.assert_close(cams, _gradcam_reference(model.module, "features.3", inputs, target), rtol=1e-4, atol=1e-6)
    total = cams.sum((1, 2))
    assert (total > 0).all()
    # the quadrant is a quarter of the image but holds most of the map; what leaks out is the
    # 3 x 3 convolution's and the 2x upsampling's reach (a few pixels), and nothing beyond it
    assert (cams[:, :16, :16].sum((1, 2)) > 0.6 * total).all()
    assert (cams[:, :20, :20].sum((1, 2)) > 0.95 * total).all()
    assert cams[:, 22:, :].abs().max() == 0 and cams[:, :, 22:].abs().max() == 0


@pytest.mark.parametrize(
    "name,layer,prefix",
    [("test_resnet", "layer4", 0), ("test_convnext", "stages.3", 0), ("test_vit", "blocks.5.norm1", 1)],
)
def test_gradcam_on_timm_models(name, layer, prefix):
    import timm

    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False).eval()
    model = wrap_module(module, size=160, batch_size=2)
    assert default_layer(module) == layer
    assert int(getattr(module, "num_prefix_tokens", 0) or 0) == prefix
    inputs = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 7])
    cams = GradCAM().attribute(model, inputs, target, [0, 0])
    assert cams.shape == (2, 160, 160)
    assert torch.isfinite(cams).all() and (cams >= 0).all() and cams.max() > 0
    reference = _gradcam_reference(module, layer, inputs, target, prefix)
    torch.testing.assert_close(cams, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))


def _tiny_swin():
    import timm

    torch.manual_seed(0)
    module = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(1, 1, 1, 1),
                               num_heads=(1, 1, 1, 1), img_size=64, window_size=4, num_classes=10).eval()
    return module, wrap_module(module, size=64, batch_size=2)


@pytest.mark.parametrize(
    "layer",
    [
        None,  # layers.3: the last stage, (B, 2, 2, 128) channels-last
        "layers.2",  # an earlier stage (B, 4, 4, 64), channels-last too
    ],
)
def test_gradcam_on_a_channels_last_swin(layer):
    module, model = _tiny_swin()
    assert default_layer(module) == "layers.3"
    inputs = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([4])
    cams = GradCAM(GradCAM.Options(layer=layer)).attribute(model, inputs, target, [0])
    reference = _gradcam_reference(module, layer or "layers.3", inputs, target, channels_last=True)
    assert cams.shape == (1, 64, 64) and reference.max() > 0
    torch.testing.assert_close(cams, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))


def test_gradcam_unknown_layer_is_a_harness_error(cli, tmp_path):
    model = wrap_module(QuadrantCNN(), size=32)
    with pytest.raises(HarnessError, match="nonexistent"):
        GradCAM(GradCAM.Options(layer="nonexistent")).attribute(model, torch.rand(1, 3, 32, 32), torch.tensor([0]), [0])
    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "--attributor", "gradcam",
              "-o", "attributor.layer=nonexistent", "--limit", "1", "-o", "metric.steps=2", "--out", str(tmp_path), "--quiet")
    assert res.exit_code != 0
    assert "nonexistent" in res.stderr and "Traceback" not in res.stderr


# -- RISE -----------------------------------------------------------------------------------------------------
class RegionBrightness(torch.nn.Module):
    """Class 0's logit is the mean of the top-left 12 x 12 region; class 1's the bottom-right one's."""

    def forward(self, x):
        a = x[:, :, :12, :12].mean((1, 2, 3))
        b = x[:, :, -12:, -12:].mean((1, 2, 3))
        return torch.stack([a, b, torch.zeros_like(a)], 1)


def test_rise_masks_statistics():
    for p in (0.5, 0.25):
        masks = rise_masks(300, 7, p, 32, 40, seed=3)
        assert masks.shape == (300, 1, 32, 40)
        assert masks.min() >= 0 and masks.max() <= 1 + 1e-6  # bilinear upsampling of {0, 1} (float rounding)
        assert abs(float(masks.mean()) - p) < 0.03
        assert masks.std() > 0.2  # binary-ish grids, not a constant
    assert torch.equal(rise_masks(20, 7, 0.5, 32, 32, seed=3), rise_masks(20, 7, 0.5, 32, 32, seed=3))
    assert not torch.equal(rise_masks(20, 7, 0.5, 32, 32, seed=3), rise_masks(20, 7, 0.5, 32, 32, seed=4))


def test_rise_equals_the_weighted_mask_average_and_finds_the_region():
    model = wrap_module(RegionBrightness(), size=32, batch_size=7)  # chunks straddle images
    inputs = 0.5 + torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1])
    options = RISE.Options(masks=200, cells=4, p=0.5, mask_seed=5, score="logit")
    maps = RISE(options).attribute(model, inputs, target, [0, 0])
    assert maps.shape == (2, 32, 32)
    masks = rise_masks(200, 4, 0.5, 32, 32, seed=5)
    for b in range(2):
        with torch.no_grad():  # score of every masked copy of image b, then the score-weighted mask sum
            scores = model.module(inputs[b : b + 1] * masks)[:, target[b]]
        reference = (scores.view(-1, 1, 1) * masks[:, 0]).sum(0) / (200 * 0.5)
        torch.testing.assert_close(maps[b], reference, rtol=1e-4, atol=1e-5)
    # the region the class reads is where the map is high
    inside0, outside0 = maps[0, :12, :12].mean(), maps[0, 16:, 16:].mean()
    inside1, outside1 = maps[1, -12:, -12:].mean(), maps[1, :16, :16].mean()
    assert inside0 > outside0 * 1.2 and inside1 > outside1 * 1.2
    # deterministic for the same mask seed, different for another
    assert torch.equal(RISE(options).attribute(model, inputs, target, [9, 9]), maps)
    other = RISE(options.model_copy(update={"mask_seed": 6})).attribute(model, inputs, target, [0, 0])
    assert not torch.allclose(other, maps)


# -- I-GOS ------------------------------------------------------------------------------------------------------
class CellNet(torch.nn.Module):
    """Class 0's logit reads only a 5 x 5 patch centred on grid-4 cell (row 1, column 2) of 32 px
    (align_corners tents are centred at 0, 10.3, 20.7, 31)."""

    def forward(self, x):
        evidence = 4 * x[:, :, 8:13, 19:24].mean((1, 2, 3))
        return torch.cat([evidence[:, None], torch.zeros(len(x), 9)], 1)


def _cell_inputs():
    x = 0.2 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[:, :, 7:14, 18:25] += 0.8  # the evidence is bright, so the blurred baseline removes it
    return x


@pytest.mark.parametrize("noise,ranking", [("all_channels", "unclamped"), ("reference", "clamped"), ("all_channels", "clamped")])
def test_igos_finds_the_cell_the_model_reads(noise, ranking):
    model = wrap_module(CellNet(), size=32, batch_size=8)
    inputs, target = _cell_inputs(), torch.zeros(2, dtype=torch.long)
    attributor = IGOS(IGOSOptions(iterations=5, grid=4, integration_points=4, noise=noise, ranking=ranking))
    coarse = attributor.coarse(model, inputs, target, [1, 2])
    assert coarse.shape == (2, 4, 4)
    if ranking == "clamped":  # 1 - m; the unclamped ranking may leave [0, 1] by the last step
        assert (coarse >= 0).all() and (coarse <= 1).all()
    for b in range(2):
        order = coarse[b].flatten().argsort(descending=True).tolist()
        assert order[0] == 1 * 4 + 2, coarse[b]
        assert coarse[b, 1, 2] > 0
    maps = attributor.attribute(model, inputs, target, [1, 2])
    assert maps.shape == (2, 32, 32)
    torch.testing.assert_close(maps, F.interpolate(coarse[:, None].float(), size=(32, 32), mode="bilinear", align_corners=True)[:, 0])
    # deterministic for the same seeds
    assert torch.equal(attributor.attribute(model, inputs, target, [1, 2]), maps)


def test_igos_objective_decreases_and_seeds_matter():
    model = wrap_module(CellNet(), size=32, batch_size=8)
    inputs, target = _cell_inputs(), torch.zeros(2, dtype=torch.long)
    from harness_plugins.maskers.fills import gaussian_blur

    base = gaussian_blur(inputs, 11, 5.0)

    def objective(mask):  # independent of the implementation: l1 + tv + softmax of the composite
        up = F.interpolate(mask[:, None], size=(32, 32), mode="bilinear", align_corners=True)
        with torch.no_grad():
            score = model.module(inputs * up + base * (1 - up)).softmax(1)[:, 0]
        tv = ((mask[:, :-1] - mask[:, 1:]) ** 2).flatten(1).mean(1) + ((mask[:, :, :-1] - mask[:, :, 1:]) ** 2).flatten(1).mean(1)
        return (1 - mask).abs().flatten(1).mean(1) + 20 * tv + score

    losses = [objective(torch.ones(2, 4, 4))]
    for iterations in (1, 2, 3):
        options = IGOSOptions(iterations=iterations, grid=4, integration_points=4, baseline="blur")
        losses.append(objective(igos_masks(model, inputs, target, [1, 2], options)))
    for before, after in zip(losses, losses[1:]):
        assert (after <= before + 1e-6).all(), losses
    assert (losses[-1] < losses[0] - 1e-4).all(), losses
    # the regulariser's TV is the mean squared difference of neighbours
    mask = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    torch.testing.assert_close(tv_norm(mask, 2.0), torch.tensor([0.5 + 0.5]))
    # another seed draws other noise, hence a (slightly) different mask
    options = IGOSOptions(iterations=2, grid=4, integration_points=4)
    masks = igos_masks(model, inputs, target, [1, 2], options)
    assert not torch.equal(masks, igos_masks(model, inputs, target, [3, 4], options))
    # per-image seeds and line searches: neither the chunk size nor the other images matter
    small = igos_masks(wrap_module(CellNet(), size=32, batch_size=3), inputs, target, [1, 2], options)
    alone = igos_masks(model, inputs[1:], target[1:], [2], options)
    torch.testing.assert_close(small, masks, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[0], masks[1], rtol=1e-5, atol=1e-6)


# -- random ---------------------------------------------------------------------------------------------------------
def test_random_map_is_seeded_per_sample_and_in_unit_interval():
    model = wrap_module(QuadrantCNN(), size=32)
    inputs, target = torch.rand(3, 3, 32, 20), torch.zeros(3, dtype=torch.long)
    maps = RandomMap().attribute(model, inputs, target, [1, 2, 3])
    assert maps.shape == (3, 32, 20)
    assert (maps >= 0).all() and (maps < 1).all() and maps.std() > 0.2
    assert torch.equal(RandomMap().attribute(model, inputs, target, [1, 2, 3]), maps)
    assert torch.equal(RandomMap().attribute(model, inputs[1:2], target[1:2], [2])[0], maps[1])
    assert not torch.equal(maps[0], maps[1])
    assert not torch.equal(RandomMap().attribute(model, inputs, target, [4, 5, 6]), maps)


# -- every attributor through the CLI ---------------------------------------------------------------------------------
CLI_OPTIONS = {
    "rise": ["-o", "attributor.masks=16"],
    "igos": ["-o", "attributor.integration_points=2"],
    "integrated_gradients": ["-o", "attributor.steps=4"],
    "smoothgrad": ["-o", "attributor.samples=3"],
}


def test_every_bundled_attributor_is_covered():
    assert {a.id for a in BUNDLED} == {"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad",
                                        "gradcam", "rise", "igos", "random"}


@pytest.mark.parametrize("attributor", [a.id for a in BUNDLED])
def test_attributor_runs_through_the_cli(cli, tmp_path, attributor):
    import json

    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "--attributor", attributor,
              "--limit", "1", "-o", "metric.steps=4", *CLI_OPTIONS.get(attributor, []), "--out", str(tmp_path), "--quiet")
    assert res.exit_code == 0, res.stderr
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert result["status"] == "ok" and result["attributor"]["id"] == attributor
    assert math.isfinite(result["value"]) and 0 <= result["value"] <= 1
