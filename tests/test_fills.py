"""Fills (plugins/maskers/fills.py): blur, black, mean and noise baselines in normalised space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from harness_plugins.maskers.fills import BlackFill, BlurFill, MeanFill, NoiseFill, gaussian_blur, gaussian_kernel

from conftest import wrap_module

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture
def imagenet_model():
    """A LoadedModel with ImageNet normalisation (the module is never called by fills)."""
    model = wrap_module(torch.nn.Identity(), size=64)
    model.data_config = {**model.data_config, "mean": MEAN, "std": STD}
    return model


def reference_blur(images: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Independent 2-D Gaussian blur: OpenCV's kernel, reflect-101 borders (scipy 'mirror')."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    g /= g.sum()
    kernel = np.outer(g, g)
    out = np.empty_like(images, dtype=np.float64)
    for b in range(images.shape[0]):
        for c in range(images.shape[1]):
            out[b, c] = ndimage.correlate(images[b, c].astype(np.float64), kernel, mode="mirror")
    return out


def test_gaussian_kernel_matches_opencv_definition():
    k = gaussian_kernel(51, 50.0).double().numpy()
    offsets = np.arange(51) - 25.0
    expected = np.exp(-(offsets**2) / (2 * 50.0**2))
    expected /= expected.sum()
    np.testing.assert_allclose(k, expected, atol=1e-7)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)


def test_blur_k51_sigma50_equals_independent_implementation(imagenet_model):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
    fill = BlurFill()
    assert (fill.options.kernel_size, fill.options.sigma) == (51, 50.0)
    got = fill.baseline(imagenet_model, torch.from_numpy(images), [1, 2]).numpy()
    assert got.shape == images.shape
    np.testing.assert_allclose(got, reference_blur(images, 51, 50.0), atol=1e-5)


def test_blur_non_square_and_small_sigma():
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(1, 3, 40, 56)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(images), 9, 2.0).numpy()
    np.testing.assert_allclose(got, reference_blur(images, 9, 2.0), atol=1e-5)
    # and a blur actually changes a random image
    assert np.abs(got - images).max() > 0.05


def test_blur_of_an_image_smaller_than_half_the_kernel():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(1, 3, 20, 20)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(images), 51, 50.0).numpy()
    np.testing.assert_allclose(got, reference_blur(images, 51, 50.0), atol=1e-5)


def test_blur_of_constant_is_constant(imagenet_model):
    images = torch.full((1, 3, 64, 64), 0.7)
    images[:, 1] = -1.3
    got = BlurFill().baseline(imagenet_model, images, [0])
    assert torch.allclose(got, images, atol=1e-5)


def test_blur_commutes_with_normalisation(imagenet_model):
    """Blurring normalised inputs equals normalising the blurred pixels."""
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64)
    fill = BlurFill()
    blurred_inputs = fill.baseline(imagenet_model, imagenet_model.normalise(pixels), [0, 1])
    normalised_blur = imagenet_model.normalise(gaussian_blur(pixels, 51, 50.0))
    assert torch.allclose(blurred_inputs, normalised_blur, atol=1e-5)


def test_black_fill_is_minus_mean_over_std(imagenet_model):
    inputs = torch.randn(2, 3, 64, 64)
    got = BlackFill().baseline(imagenet_model, inputs, [0, 1])
    assert got.shape == inputs.shape
    for c in range(3):
        assert torch.allclose(got[:, c], torch.full((2, 64, 64), -MEAN[c] / STD[c]), atol=1e-6)
    # it is black in pixel space
    assert torch.allclose(imagenet_model.denormalise(got), torch.zeros_like(got), atol=1e-6)


def test_mean_fill_is_zero(imagenet_model):
    inputs = torch.randn(2, 3, 64, 64)
    got = MeanFill().baseline(imagenet_model, inputs, [0, 1])
    assert got.shape == inputs.shape
    assert torch.equal(got, torch.zeros_like(inputs))


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_noise_fill_seeded_and_in_normalised_range(imagenet_model, distribution):
    fill = NoiseFill(NoiseFill.Options(distribution=distribution))
    inputs = torch.zeros(3, 3, 64, 64)
    a = fill.baseline(imagenet_model, inputs, [11, 12, 11])
    b = fill.baseline(imagenet_model, inputs, [11, 12, 11])
    assert torch.equal(a, b)  # deterministic per seed
    assert torch.equal(a[0], a[2])  # same seed, same noise, whatever the batch position
    assert not torch.allclose(a[0], a[1])  # different seeds differ
    other = fill.baseline(imagenet_model, inputs[:1], [12])
    assert torch.equal(other[0], a[1])  # independent of the batch
    pixels = imagenet_model.denormalise(a)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert pixels.std() > 0.1  # actually noisy
    lo = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    assert bool(((a >= lo - 1e-5) & (a <= hi + 1e-5)).all())


def test_noise_uniform_mean_and_gaussian_spread(imagenet_model):
    inputs = torch.zeros(1, 3, 64, 64)
    uniform = imagenet_model.denormalise(NoiseFill().baseline(imagenet_model, inputs, [5]))
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(uniform.std()) == pytest.approx((1 / 12) ** 0.5, abs=0.02)
    gauss = imagenet_model.denormalise(
        NoiseFill(NoiseFill.Options(distribution="gaussian", std=0.1)).baseline(imagenet_model, inputs, [5])
    )
    assert float(gauss.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(gauss.std()) == pytest.approx(0.1, abs=0.02)
