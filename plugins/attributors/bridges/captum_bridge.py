"""Captum's input-space attribution methods as attributors ``captum.<Class>``.

Every Captum constructor and ``attribute()`` argument that matters for an image classifier is an
option under Captum's own name (``n_steps``, ``method``, ``multiply_by_inputs``, ``sliding_window_shapes``,
``strides``, ``n_samples``, ``stdevs``, ``perturbations_per_eval``, ``nt_type`` ...). The harness adapts:

- targets: the run's target class of each image;
- baselines: ``baseline`` names a harness fill (black / mean / blur / noise, computed by
  plugins/maskers/fills.py; Captum's own default, zeros in the model's input space, is ``mean``);
  the Shapley-sampling gradient methods take a distribution (``baselines`` list plus ``noise_draws``);
- feature masks of the perturbation methods: ``features`` = pixel | patch:P | grid:G | slic:N;
- channel reduction to a (B, H, W) map: ``reduce`` (sum / mean / abs_sum / abs_max / l2);
- ``score=softmax`` wraps the forward function (methods built on a forward function only);
- batching: deterministic methods get the whole batch in one call (their internal batch sizes
  default to the run's ``--batch-size``); methods that draw random numbers (GradientShap, NoiseTunnel,
  ShapleyValueSampling, Lime, KernelShap) run one call per image under that image's seed, so a map
  does not depend on its batch mates; DeepLiftShap runs one call per image because each image has
  its own baseline distribution.

NoiseTunnel is registered around each gradient method as ``captum.NoiseTunnel.<Inner>`` with the
inner method's options plus ``nt_type``, ``nt_samples``, ``nt_samples_batch_size``, ``stdevs`` and
``stdevs_scale`` (``range``: a fraction of each image's max - min, as the harness's smoothgrad).
Not bridged: FeaturePermutation (permutes features across the batch, so a map depends on the
other images) and the layer/neuron methods (not input-space maps).
"""

from __future__ import annotations

import warnings
from importlib import metadata
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
from pydantic import Field

import harness
from harness.batching import map_in_chunks
from harness.components import Attributor, Options
from harness.errors import HarnessError
from harness.model import LoadedModel
from harness_plugins.attributors.bridges.common import (
    FEATURES_PATTERN,
    FillName,
    Reduce,
    baseline_distribution,
    feature_mask,
    fill_baseline,
    one_line,
    reduce_channels,
    require,
    rows_per_call,
    seeded,
)

captum = require("captum", "Captum", "captum")
captum_attr = require("captum.attr", "Captum", "captum")

try:
    LIBRARY_VERSION = metadata.version("captum")  # without importing Captum (see common.LazyModule)
except metadata.PackageNotFoundError:
    LIBRARY_VERSION = "unknown"
NOISY_WARNINGS = (
    r"Input Tensor \d+ did not already require gradients",
    r"Setting forward, backward hooks and attributes on non-linear",
    r"Setting backward hooks on ReLU activations",
    r"You are providing multiple inputs for Lime / Kernel SHAP",
    r"Internal batch size cannot be less than the number of input examples",
)
LIBRARY_ERRORS = (TypeError, ValueError, AssertionError, NotImplementedError)


# -- options -------------------------------------------------------------------------------------------
class CaptumOptions(Options):
    reduce: Reduce = "sum"
    """Channel reduction of the (B, 3, H, W) attribution: sum | mean | abs_sum | abs_max | l2."""


class ScoreOptions(CaptumOptions):
    score: Literal["logit", "softmax"] = "logit"
    """What the forward function returns: logits (Captum's usual use) or softmax probabilities."""


class BaselineOptions(ScoreOptions):
    baseline: FillName = "black"
    """The reference image: a harness fill (black, mean = Captum's zeros, blur, noise)."""


class PerturbationOptions(BaselineOptions):
    perturbations_per_eval: int | None = Field(None, ge=1)
    """Perturbed copies per forward pass; unset = about --batch-size rows per pass."""


class MaskedOptions(PerturbationOptions):
    reduce: Reduce = "mean"
    features: str = Field("patch:16", pattern=FEATURES_PATTERN)
    """Feature mask: pixel | patch:P | grid:G (hard cells) | slic:N; each feature spans the channels."""


class DistributionOptions(CaptumOptions):
    baselines: list[FillName] = ["black", "noise"]
    """The baseline distribution: one image per listed fill (noise: noise_draws images)."""
    noise_draws: int = Field(4, ge=0)
    multiply_by_inputs: bool = True


# -- base ----------------------------------------------------------------------------------------------
class CaptumAttributor(Attributor):
    """Base of the Captum bridges: builds the Captum object, calls ``attribute()``, reduces channels."""

    version: ClassVar[str] = f"1+captum-{LIBRARY_VERSION}"
    Options: ClassVar[type[Options]] = CaptumOptions
    method: ClassVar[str] = ""
    per_image: ClassVar[bool] = False
    """One library call per image (random draws, or per-image baseline distributions)."""
    stochastic: ClassVar[bool] = False
    """Draws from the global random generators: each per-image call is seeded with the image's seed."""

    def build(self, model: LoadedModel) -> Any:
        """The Captum attribution object for ``model``."""
        raise NotImplementedError

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        """``attribute()`` keyword arguments besides inputs and target."""
        return {}

    def run(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Captum's (B, C, H, W) attribution of one library call."""
        method = self.build(model)
        kwargs = self.call_kwargs(model, inputs, seeds)
        with warnings.catch_warnings(), torch.enable_grad():
            for message in NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            try:
                out = method.attribute(inputs.detach(), target=target.to(inputs.device), **kwargs)
            except LIBRARY_ERRORS as exc:
                raise HarnessError(f"{self.id} on model {model.id}: {one_line(exc)}") from None
        return out.detach()

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        if self.per_image:
            maps = []
            for i in range(len(inputs)):
                if self.stochastic:
                    with seeded(int(seeds[i]), inputs.device):
                        maps.append(self.run(model, inputs[i : i + 1], target[i : i + 1], seeds[i : i + 1]))
                else:
                    maps.append(self.run(model, inputs[i : i + 1], target[i : i + 1], seeds[i : i + 1]))
            attribution = torch.cat(maps)
        else:
            attribution = map_in_chunks(
                len(inputs), model.batch_size, lambda a, b: self.run(model, inputs[a:b], target[a:b], seeds[a:b])
            )
        return reduce_channels(attribution, self.options.reduce)


def forward_function(model: LoadedModel, score: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model itself (logits) or its softmax, as Captum's forward function."""
    if score == "logit":
        return model.module
    return lambda x: model.module(x).softmax(-1)


# -- gradient methods ------------------------------------------------------------------------------------
class IGOptions(BaselineOptions):
    n_steps: int = Field(50, ge=1)
    method: Literal["gausslegendre", "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid"] = "gausslegendre"
    """Captum's quadrature; gausslegendre is Captum's default (riemann_* need n_steps >= 2)."""
    multiply_by_inputs: bool = True
    internal_batch_size: int | None = Field(None, ge=1)
    """Rows per forward pass (Captum's internal_batch_size); unset = --batch-size."""


class IntegratedGradients(CaptumAttributor):
    """Captum IntegratedGradients: (x - x0) x path integral of gradients (Gauss-Legendre, 50 steps, black x0)."""

    id: ClassVar[str] = "captum.IntegratedGradients"
    Options = IGOptions

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.IntegratedGradients(forward_function(model, self.options.score), multiply_by_inputs=self.options.multiply_by_inputs)

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        o = self.options
        if o.n_steps < 2 and o.method != "gausslegendre":
            raise HarnessError(f"{self.id}: method {o.method} needs n_steps >= 2")
        return {"baselines": fill_baseline(model, inputs, seeds, o.baseline), "n_steps": o.n_steps, "method": o.method,
                "internal_batch_size": o.internal_batch_size or model.batch_size}


class SaliencyOptions(ScoreOptions):
    reduce: Reduce = "abs_max"
    abs: bool = True
    """Captum's abs: absolute gradients (True) or signed ones."""


class Saliency(CaptumAttributor):
    """Captum Saliency: |d score / d input|, max over channels."""

    id: ClassVar[str] = "captum.Saliency"
    Options = SaliencyOptions

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.Saliency(forward_function(model, self.options.score))

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        return {"abs": self.options.abs}


class InputXGradient(CaptumAttributor):
    """Captum InputXGradient: input x gradient, summed over channels."""

    id: ClassVar[str] = "captum.InputXGradient"
    Options = ScoreOptions

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.InputXGradient(forward_function(model, self.options.score))


class DeepLiftOptions(CaptumOptions):
    baseline: FillName = "black"
    multiply_by_inputs: bool = True
    eps: float = Field(1e-10, gt=0)


class DeepLift(CaptumAttributor):
    """Captum DeepLift (Rescale rule) against a fill baseline (black), summed over channels."""

    id: ClassVar[str] = "captum.DeepLift"
    Options = DeepLiftOptions

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.DeepLift(model.module, multiply_by_inputs=self.options.multiply_by_inputs, eps=self.options.eps)

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        return {"baselines": fill_baseline(model, inputs, seeds, self.options.baseline)}


class DeepLiftShap(CaptumAttributor):
    """Captum DeepLiftShap: DeepLift averaged over a baseline distribution (black + 4 noise images)."""

    id: ClassVar[str] = "captum.DeepLiftShap"
    Options = DistributionOptions
    per_image = True

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.DeepLiftShap(model.module, multiply_by_inputs=self.options.multiply_by_inputs)

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        o = self.options
        baselines = baseline_distribution(model, inputs, int(seeds[0]), o.baselines, o.noise_draws)
        if len(baselines) < 2:
            raise HarnessError(f"{self.id}: Captum needs at least 2 baselines; list more fills or set noise_draws >= 2")
        return {"baselines": baselines}


class GradientShapOptions(DistributionOptions):
    score: Literal["logit", "softmax"] = "logit"
    n_samples: int = Field(5, ge=1)
    """Random points per image (a baseline, a point on its path to the image, noise)."""
    stdevs: float = Field(0.0, ge=0)
    """Standard deviation of the Gaussian noise added to each sample (input-space units)."""


class GradientShap(CaptumAttributor):
    """Captum GradientShap: expected gradients x (x - x0) over random baselines and path points."""

    id: ClassVar[str] = "captum.GradientShap"
    Options = GradientShapOptions
    per_image = stochastic = True

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.GradientShap(forward_function(model, self.options.score), multiply_by_inputs=self.options.multiply_by_inputs)

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        o = self.options
        baselines = baseline_distribution(model, inputs, int(seeds[0]), o.baselines, o.noise_draws)
        return {"baselines": baselines, "n_samples": o.n_samples, "stdevs": o.stdevs}


class GuidedOptions(CaptumOptions):
    reduce: Reduce = "abs_max"


class GuidedBackprop(CaptumAttributor):
    """Captum GuidedBackprop: gradients with ReLUs passing only positive gradients; max-abs over channels."""

    id: ClassVar[str] = "captum.GuidedBackprop"
    Options = GuidedOptions

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.GuidedBackprop(model.module)


class Deconvolution(CaptumAttributor):
    """Captum Deconvolution (Zeiler & Fergus): ReLU applied to the backward signal; max-abs over channels."""

    id: ClassVar[str] = "captum.Deconvolution"
    Options = GuidedOptions

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.Deconvolution(model.module)


class GuidedGradCamOptions(GuidedOptions):
    layer: str | None = None
    """Layer of the Grad-CAM part; unset = the harness gradcam's choice (CNNs only: a (B, C, h, w) output)."""
    interpolate_mode: Literal["nearest", "bilinear", "bicubic", "area"] = "nearest"
    attribute_to_layer_input: bool = False


class GuidedGradCam(CaptumAttributor):
    """Captum GuidedGradCam: guided backprop x upsampled Grad-CAM of a CNN layer; max-abs over channels."""

    id: ClassVar[str] = "captum.GuidedGradCam"
    Options = GuidedGradCamOptions

    def build(self, model: LoadedModel) -> Any:
        from harness_plugins.attributors.gradcam import default_layer

        net = model.module
        name = self.options.layer or default_layer(net)
        try:
            layer = net.get_submodule(name)
        except AttributeError:
            raise HarnessError(f"{self.id}: model {model.id} has no module {name!r}") from None
        self._check_spatial(model, layer, name)
        return captum_attr.GuidedGradCam(net, layer)

    def _check_spatial(self, model: LoadedModel, layer: torch.nn.Module, name: str) -> None:
        if getattr(model.module, "output_fmt", None) == "NHWC" or int(getattr(model.module, "num_prefix_tokens", 0) or 0):
            raise HarnessError(f"{self.id}: layer {name!r} of model {model.id} is not a (B, C, h, w) map; "
                               "Captum's Grad-CAM needs a CNN layer (use gradcam.* for token models)")

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        return {"interpolate_mode": self.options.interpolate_mode, "attribute_to_layer_input": self.options.attribute_to_layer_input}


class LRP(CaptumAttributor):
    """Captum LRP with its default rules (epsilon for conv/linear); only models built from the layers it knows."""

    id: ClassVar[str] = "captum.LRP"
    Options = CaptumOptions

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.LRP(model.module)


# -- perturbation methods --------------------------------------------------------------------------------
class OcclusionOptions(PerturbationOptions):
    reduce: Reduce = "mean"
    sliding_window_shapes: tuple[int, int, int] = (3, 16, 16)
    """(channels, height, width) of the occluding window."""
    strides: int | tuple[int, int, int] = (3, 8, 8)


class Occlusion(CaptumAttributor):
    """Captum Occlusion: score drop when a 16 x 16 window (stride 8) takes the baseline; mean over channels."""

    id: ClassVar[str] = "captum.Occlusion"
    Options = OcclusionOptions

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.Occlusion(forward_function(model, self.options.score))

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        o = self.options
        return {"sliding_window_shapes": tuple(o.sliding_window_shapes), "strides": o.strides,
                "baselines": fill_baseline(model, inputs, seeds, o.baseline),
                "perturbations_per_eval": o.perturbations_per_eval or rows_per_call(model, len(inputs))}


class MaskedAttributor(CaptumAttributor):
    """A perturbation method over a feature mask, with a fill baseline."""

    Options: ClassVar[type[Options]] = MaskedOptions

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        o = self.options
        return {"baselines": fill_baseline(model, inputs, seeds, o.baseline),
                "feature_mask": feature_mask(o.features, model, inputs),
                "perturbations_per_eval": o.perturbations_per_eval or rows_per_call(model, len(inputs))}


class FeatureAblation(MaskedAttributor):
    """Captum FeatureAblation: score drop when one feature (16 x 16 patch) takes the baseline."""

    id: ClassVar[str] = "captum.FeatureAblation"

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.FeatureAblation(forward_function(model, self.options.score))


class SamplingOptions(MaskedOptions):
    n_samples: int = Field(25, ge=1)


class ShapleyValueSampling(MaskedAttributor):
    """Captum ShapleyValueSampling: Shapley values of 16 x 16 patches from 25 random permutations."""

    id: ClassVar[str] = "captum.ShapleyValueSampling"
    Options = SamplingOptions
    per_image = stochastic = True

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.ShapleyValueSampling(forward_function(model, self.options.score))

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        return {**super().call_kwargs(model, inputs, seeds), "n_samples": self.options.n_samples}


class ExactShapleyOptions(MaskedOptions):
    features: str = Field("grid:2", pattern=FEATURES_PATTERN)
    """Feature mask; exact Shapley values enumerate every permutation, so at most 10 features."""


class ShapleyValues(MaskedAttributor):
    """Captum ShapleyValues: exact Shapley values over all permutations of a few features (2 x 2 cells)."""

    id: ClassVar[str] = "captum.ShapleyValues"
    Options = ExactShapleyOptions
    MAX_FEATURES: ClassVar[int] = 10

    def build(self, model: LoadedModel) -> Any:
        return captum_attr.ShapleyValues(forward_function(model, self.options.score))

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        kwargs = super().call_kwargs(model, inputs, seeds)
        n = int(kwargs["feature_mask"].max()) + 1
        if n > self.MAX_FEATURES:
            raise HarnessError(f"{self.id}: {n} features ({self.options.features}) need {n}! permutations; "
                               f"use at most {self.MAX_FEATURES} (e.g. features=grid:2) or captum.ShapleyValueSampling")
        return kwargs


def _needs_sklearn(attributor_id: str) -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise HarnessError(f'{attributor_id} needs scikit-learn; install it with: pip install "harness[captum]"') from None


class LimeOptions(SamplingOptions):
    interpretable_model: Literal["lasso", "ridge", "linear_regression"] = "lasso"
    """The surrogate (scikit-learn through Captum): Lasso (Captum's default), Ridge or least squares."""
    alpha: float = Field(0.01, ge=0)
    """Regularisation of lasso / ridge (Captum's default surrogate: Lasso(alpha=0.01))."""
    kernel_width: float = Field(1.0, gt=0)
    distance_mode: Literal["cosine", "euclidean"] = "cosine"
    """Similarity kernel exp(-d^2 / (2 width^2)) on this distance (Captum's default: cosine, width 1)."""


class Lime(MaskedAttributor):
    """Captum Lime: a sparse linear surrogate (Lasso) fitted to 25 random on/off patterns of 16 x 16 patches."""

    id: ClassVar[str] = "captum.Lime"
    Options = LimeOptions
    per_image = stochastic = True

    def build(self, model: LoadedModel) -> Any:
        _needs_sklearn(self.id)
        from captum._utils.models.linear_model import SkLearnLasso, SkLearnLinearRegression, SkLearnRidge
        from captum.attr._core.lime import get_exp_kernel_similarity_function

        o = self.options
        surrogate = {"lasso": lambda: SkLearnLasso(alpha=o.alpha), "ridge": lambda: SkLearnRidge(alpha=o.alpha),
                     "linear_regression": SkLearnLinearRegression}[o.interpretable_model]()
        similarity = get_exp_kernel_similarity_function(distance_mode=o.distance_mode, kernel_width=o.kernel_width)
        return captum_attr.Lime(forward_function(model, o.score), interpretable_model=surrogate, similarity_func=similarity)

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        return {**super().call_kwargs(model, inputs, seeds), "n_samples": self.options.n_samples}


class KernelShap(MaskedAttributor):
    """Captum KernelShap: Shapley values of 16 x 16 patches from a kernel-weighted regression on 25 samples."""

    id: ClassVar[str] = "captum.KernelShap"
    Options = SamplingOptions
    per_image = stochastic = True

    def build(self, model: LoadedModel) -> Any:
        _needs_sklearn(self.id)
        return captum_attr.KernelShap(forward_function(model, self.options.score))

    def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        return {**super().call_kwargs(model, inputs, seeds), "n_samples": self.options.n_samples}


# -- NoiseTunnel -----------------------------------------------------------------------------------------
class NoiseTunnelFields(Options):
    nt_type: Literal["smoothgrad", "smoothgrad_sq", "vargrad"] = "smoothgrad"
    nt_samples: int = Field(5, ge=1)
    nt_samples_batch_size: int | None = Field(None, ge=1)
    """Noisy copies per library call; unset = all nt_samples at once."""
    stdevs: float = Field(1.0, ge=0)
    """Noise standard deviation: input-space units (Captum's, stdevs_scale=absolute) or a fraction of each image's max - min (range)."""
    stdevs_scale: Literal["absolute", "range"] = "absolute"


def noise_tunnel(inner: type[CaptumAttributor]) -> type[CaptumAttributor]:
    """``captum.NoiseTunnel.<Inner>``: Captum's NoiseTunnel around ``inner``, one seeded call per image."""
    options = type(f"NoiseTunnel{inner.__name__}Options", (inner.Options, NoiseTunnelFields), {"__module__": __name__})

    class Tunnel(inner):  # type: ignore[valid-type, misc]
        id: ClassVar[str] = f"captum.NoiseTunnel.{inner.__name__}"
        Options = options
        per_image = stochastic = True

        def build(self, model: LoadedModel) -> Any:
            return captum_attr.NoiseTunnel(super().build(model))

        def call_kwargs(self, model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
            o = self.options
            stdevs = o.stdevs
            if o.stdevs_scale == "range":
                stdevs = o.stdevs * float(inputs.max() - inputs.min())  # one image per call
            return {**super().call_kwargs(model, inputs, seeds), "nt_type": o.nt_type, "nt_samples": o.nt_samples,
                    "nt_samples_batch_size": o.nt_samples_batch_size, "stdevs": stdevs}

    Tunnel.__name__ = Tunnel.__qualname__ = f"NoiseTunnel{inner.__name__}"
    Tunnel.__doc__ = f"Captum NoiseTunnel around {inner.__name__} (smoothgrad, 5 samples, stdev 1.0 in input units)."
    return Tunnel


TUNNELLED = (Saliency, InputXGradient, IntegratedGradients, DeepLift, GuidedBackprop, Deconvolution, GuidedGradCam)
NOISE_TUNNELS = tuple(noise_tunnel(cls) for cls in TUNNELLED)

BRIDGED: tuple[type[CaptumAttributor], ...] = (
    IntegratedGradients, Saliency, InputXGradient, DeepLift, DeepLiftShap, GradientShap, GuidedBackprop,
    Deconvolution, GuidedGradCam, Occlusion, FeatureAblation, ShapleyValueSampling, ShapleyValues, Lime,
    KernelShap, LRP, *NOISE_TUNNELS,
)


@harness.hookimpl
def register_attributors(register: Callable[[type[Attributor]], None]) -> None:
    for attributor in BRIDGED:
        register(attributor)
