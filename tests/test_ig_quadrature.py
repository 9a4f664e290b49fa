"""Integrated Gradients quadrature (plugins/attributors/integrated_gradients.py, issue 12 item 4).

- ``method=gausslegendre``: numpy's Legendre nodes and weights mapped to [0, 1], exact for paths
  whose integrand is a polynomial of degree <= 2m - 1 (a Riemann sum is not);
- with the same steps and baseline, ``integrated_gradients`` and Captum's IntegratedGradients agree
  to float rounding (Gauss-Legendre and the right Riemann sum alike); Captum's trapezoid rule uses
  m points, the harness's m + 1, so those two differ by design.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.options import build_component
from harness_plugins.attributors.integrated_gradients import (
    IGOptions,
    IntegratedGradients,
    ig_baseline,
    integrated_gradients,
    path_points,
)

from conftest import wrap_module

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


class Cubic(torch.nn.Module):
    """Logit c = (w . x)^3 + (v . x)^2 per class: along a straight path the integrand of IG is a
    polynomial of degree 2 in alpha, so 2 Gauss-Legendre points integrate it exactly."""

    def __init__(self, classes: int = 3, size: int = 8):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(classes, 3 * size * size, generator=gen) / size)
        self.v = torch.nn.Parameter(torch.randn(classes, 3 * size * size, generator=gen) / size)

    def forward(self, x):
        flat = x.flatten(1)
        return (flat @ self.w.T) ** 3 + (flat @ self.v.T) ** 2


def test_gauss_legendre_points_are_numpys_mapped_to_the_unit_interval():
    for steps in (1, 2, 5, 25):
        alphas, weights = path_points(steps, "gausslegendre")
        nodes, w = np.polynomial.legendre.leggauss(steps)
        assert alphas.dtype == weights.dtype == torch.float32
        np.testing.assert_allclose(alphas.numpy(), (1 + nodes) / 2, rtol=1e-6)
        np.testing.assert_allclose(weights.numpy(), w / 2, rtol=1e-6)
        assert abs(float(weights.double().sum()) - 1) < 1e-6 and (alphas > 0).all() and (alphas < 1).all()


def test_gausslegendre_is_exact_on_a_polynomial_path_where_riemann_is_not():
    size = 8
    model = wrap_module(Cubic(size=size), size=size)
    model.data_config = {**model.data_config, **IMAGENET}
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 2])
    base = ig_baseline(model, x, "black")
    with torch.no_grad():
        rows = torch.arange(2)
        gap = (model.module(x)[rows, target] - model.module(base)[rows, target]).double()
    gauss = integrated_gradients(model, x, target, IGOptions(steps=2, method="gausslegendre"))
    riemann = integrated_gradients(model, x, target, IGOptions(steps=2, method="riemann_right"))
    # completeness: the attributions sum to f(x) - f(x0) exactly for the exact integral
    torch.testing.assert_close(gauss.double().sum((1, 2, 3)), gap, rtol=1e-4, atol=1e-4 * float(gap.abs().max()))
    assert ((riemann.double().sum((1, 2, 3)) - gap).abs() > 0.05 * gap.abs()).all()


def test_the_method_option_accepts_gausslegendre_and_keeps_riemann_right_as_default():
    assert IGOptions().method == "riemann_right"
    attributor = build_component(IntegratedGradients, {"method": "gausslegendre", "steps": 4}, "attributor")
    assert attributor.options.method == "gausslegendre"
    with pytest.raises(HarnessError, match="attributor.method"):
        build_component(IntegratedGradients, {"method": "gauss"}, "attributor")


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_right"])
def test_integrated_gradients_agrees_with_captum_to_float_rounding(method):
    captum_attr = pytest.importorskip("captum.attr")
    import timm

    torch.manual_seed(0)
    module = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    model = wrap_module(module, size=48, batch_size=64)
    model.data_config = {**model.data_config, **IMAGENET}
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 7])
    ours = integrated_gradients(model, x, target, IGOptions(steps=12, method=method))
    theirs = captum_attr.IntegratedGradients(module).attribute(
        x, ig_baseline(model, x, "black"), target=target, n_steps=12, method=method
    )
    scale = float(theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * scale)
    # the map of the attributor is the signed channel sum of the same numbers
    attributor = IntegratedGradients(IGOptions(steps=12, method=method))
    torch.testing.assert_close(attributor.attribute(model, x, target, [0, 0]), theirs.sum(1), rtol=1e-5, atol=1e-6 * scale)
