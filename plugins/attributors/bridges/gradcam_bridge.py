"""pytorch-grad-cam's CAM family as attributors ``gradcam.<Name>``.

The target layer is the harness gradcam's automatic choice (plugins/attributors/gradcam.py:
the last ``feature_info`` stage of a timm CNN, the last block's ``norm1`` of a ViT/DeiT/FAN, the
last stage of a Swin), overridable with ``layer=NAME`` or a list of names. Token and channels-last
outputs get the same reshape transform as the harness gradcam (prefix tokens dropped, patch tokens
reshaped to the grid; NHWC permuted to NCHW). Targets are the run's target classes
(``ClassifierOutputTarget``, or ``ClassifierOutputSoftmaxTarget`` with ``score=softmax``). The map is
what the library returns: one (H, W) CAM per image, min-max scaled to [0, 1] and resized with OpenCV.

Each call gets a chunk of up to ``--batch-size`` images (ScoreCAM, AblationCAM and SESS use
``--batch-size`` for their inner batches); RandomCAM draws from numpy's generator, so it runs one
call per image under that image's seed. FinerCAM's comparison classes are the ones whose logits are
closest to the target's (as the library does for its own top-1 target). Not bridged:
DeepFeatureFactorization (concepts, not a class map), GuidedBackpropReLUModel (see
``captum.GuidedBackprop``).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
import torch
from pydantic import Field

import harness
from harness.batching import map_in_chunks
from harness.components import Attributor, Options
from harness.errors import HarnessError
from harness.model import LoadedModel
from harness_plugins.attributors.bridges.common import parameters_requiring_grad, quiet, require, seeded
from harness_plugins.attributors.gradcam import default_layer, layer_channels, to_grid

pgc = require("pytorch_grad_cam", "pytorch-grad-cam", "grad-cam")
targets_module = require("pytorch_grad_cam.utils.model_targets", "pytorch-grad-cam", "grad-cam")

try:
    LIBRARY_VERSION = metadata.version("grad-cam")
except metadata.PackageNotFoundError:  # installed without metadata (e.g. a source checkout)
    LIBRARY_VERSION = "unknown"

BaseMethod = Literal[
    "GradCAM", "HiResCAM", "GradCAMElementWise", "XGradCAM", "GradCAMPlusPlus", "LayerCAM", "EigenCAM",
    "EigenGradCAM", "ScoreCAM", "ShapleyCAM", "KPCA_CAM", "FEM", "SegEigenCAM",
]
"""CAM classes a meta-method (FinerCAM, RefineCAM, SESS) may run on."""


# -- options -------------------------------------------------------------------------------------------
class LayerOptions(Options):
    layer: str | list[str] | None = None
    """Module name(s) to hook (see `harness list layers`); unset = the harness gradcam's choice."""
    score: Literal["logit", "softmax"] = "logit"
    """The target: the class's logit (ClassifierOutputTarget) or its softmax probability."""
    eigen_smooth: bool = False
    """The first principal component of the weighted activations instead of their sum."""


class CAMOptions(LayerOptions):
    aug_smooth: bool = False
    """Test-time augmentation (horizontal flip x brightness 0.9 / 1 / 1.1), averaged."""


# -- base ----------------------------------------------------------------------------------------------
class PGCAttributor(Attributor):
    """Base of the pytorch-grad-cam bridges: layer choice, reshape transform, targets, batching."""

    version: ClassVar[str] = f"1+grad-cam-{LIBRARY_VERSION}"
    Options: ClassVar[type[Options]] = CAMOptions
    cam_class: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    """Draws from numpy's global generator: one call per image, seeded with the image's seed."""
    trainable: ClassVar[bool] = False
    """Parameters require gradients during the call (the library differentiates gradients again)."""

    def layer_names(self, model: LoadedModel) -> list[str]:
        """The target layers' module names."""
        layer = getattr(self.options, "layer", None)
        if layer is None:
            return [default_layer(model.module)]
        return [layer] if isinstance(layer, str) else list(layer)

    def construct(self, model: LoadedModel, layers: list[torch.nn.Module], reshape: Callable | None, inputs: torch.Tensor) -> Any:
        """The library's CAM object."""
        return getattr(pgc, self.cam_class)(model.module, layers, reshape_transform=reshape)

    def targets(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor) -> list[Any]:
        """One library target per image."""
        kind = targets_module.ClassifierOutputTarget if self.options.score == "logit" else targets_module.ClassifierOutputSoftmaxTarget
        return [kind(int(t)) for t in target.tolist()]

    def call(self, cam: Any, inputs: torch.Tensor, targets: list[Any]) -> np.ndarray:
        """The library's (B, H, W) CAMs."""
        return cam(input_tensor=inputs, targets=targets, aug_smooth=self.options.aug_smooth, eigen_smooth=self.options.eigen_smooth)

    def run(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One library call on a chunk of images."""
        names = self.layer_names(model)
        layers = [resolve_layer(model, name, self.id) for name in names]
        reshape = reshape_transform(model, names) if names else None
        with quiet(), torch.enable_grad(), parameters_requiring_grad(model.module, self.trainable):
            cam = self.construct(model, layers, reshape, inputs)
            try:
                # the input carries the graph: the library differentiates by backward() from the target
                out = self.call(cam, inputs.detach().clone().requires_grad_(True), self.targets(model, inputs, target))
            finally:
                release(cam)
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(inputs.device)

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        if self.stochastic:
            maps = []
            for i in range(len(inputs)):
                with seeded(int(seeds[i]), inputs.device):
                    maps.append(self.run(model, inputs[i : i + 1], target[i : i + 1]))
            return torch.cat(maps)
        return map_in_chunks(len(inputs), model.batch_size, lambda a, b: self.run(model, inputs[a:b], target[a:b]))


def resolve_layer(model: LoadedModel, name: str, attributor_id: str) -> torch.nn.Module:
    """The module ``name`` of the model, or a one-line error."""
    try:
        return model.module.get_submodule(name)
    except AttributeError:
        raise HarnessError(f"{attributor_id}: model {model.id} has no module {name!r}") from None


def reshape_transform(model: LoadedModel, names: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, C, h, w) from a layer's output: the harness gradcam's ``to_grid`` (tokens, NHWC, NCHW)."""
    net = model.module
    prefix = int(getattr(net, "num_prefix_tokens", 0) or 0)
    nhwc = getattr(net, "output_fmt", None) == "NHWC"
    channels = layer_channels(net, names[0]) if len(names) == 1 else None
    return lambda activation: to_grid(activation, prefix, channels, nhwc)


def release(cam: Any) -> None:
    """Remove the library's hooks from the model (meta-methods hold inner CAMs).

    Done here rather than by the library's ``release()``, whose in-place ``detach_()`` of the kept
    tensors fails on views (ShapleyCAM keeps undetached layer outputs, views for token models)."""
    hooks = getattr(cam, "activations_and_grads", None)
    if hooks is not None:
        for handle in hooks.handles:
            handle.remove()
        hooks.handles.clear()
        hooks.activations, hooks.gradients = [], []
    inner = getattr(cam, "base_cam", None)
    if inner is not None:
        release(inner)
    for each in getattr(cam, "base_cam_per_layer", None) or []:
        release(each)


def channels_last_output(model: LoadedModel, layer: torch.nn.Module, image: torch.Tensor) -> bool:
    """Whether ``layer`` outputs tokens or a channels-last map (one forward pass of one image)."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out if torch.is_tensor(out) else out[0]))
    try:
        with torch.no_grad():
            model.module(image)
    finally:
        handle.remove()
    out = seen[-1]
    return out.dim() == 3 or (out.dim() == 4 and getattr(model.module, "output_fmt", None) == "NHWC")


# -- the CAM family ------------------------------------------------------------------------------------
def _plain(name: str, summary: str) -> type[PGCAttributor]:
    """A bridge for a CAM class with the standard constructor (model, target_layers, reshape_transform)."""
    return type(name, (PGCAttributor,), {"__doc__": summary, "__module__": __name__, "id": f"gradcam.{name}", "cam_class": name})


GradCAM = _plain("GradCAM", "pytorch-grad-cam GradCAM: ReLU(sum_k mean(dY/dA_k) A_k), min-max scaled.")
HiResCAM = _plain("HiResCAM", "pytorch-grad-cam HiResCAM: ReLU(sum_k dY/dA_k * A_k), element-wise gradients.")
GradCAMElementWise = _plain("GradCAMElementWise", "pytorch-grad-cam GradCAMElementWise: sum_k ReLU(dY/dA_k * A_k).")
XGradCAM = _plain("XGradCAM", "pytorch-grad-cam XGradCAM: gradients weighted by normalised activations.")
GradCAMPlusPlus = _plain("GradCAMPlusPlus", "pytorch-grad-cam Grad-CAM++: second-order weighting of positive gradients.")
LayerCAM = _plain("LayerCAM", "pytorch-grad-cam LayerCAM: ReLU(dY/dA) * A summed over channels.")
EigenCAM = _plain("EigenCAM", "pytorch-grad-cam EigenCAM: first principal component of the activations (class-agnostic).")
EigenGradCAM = _plain("EigenGradCAM", "pytorch-grad-cam EigenGradCAM: first principal component of gradients x activations.")
SegEigenCAM = _plain("SegEigenCAM", "pytorch-grad-cam SegEigenCAM: sign-corrected principal component of |grad| x activations.")


class ShapleyCAM(PGCAttributor):
    """pytorch-grad-cam ShapleyCAM: gradient minus half the Hessian-vector product, as channel weights (CNN layers)."""

    id: ClassVar[str] = "gradcam.ShapleyCAM"
    cam_class: ClassVar[str] = "ShapleyCAM"
    trainable = True  # its Hessian-vector product needs gradients that carry a graph, as in a trainable model

    def construct(self, model: LoadedModel, layers: list[torch.nn.Module], reshape: Callable | None, inputs: torch.Tensor) -> Any:
        if any(channels_last_output(model, layer, inputs[:1].detach()) for layer in layers):
            raise HarnessError(f"{self.id}: pytorch-grad-cam's ShapleyCAM does not reshape token or channels-last "
                               f"outputs (model {model.id}); choose a layer with a (B, C, h, w) output")
        return pgc.ShapleyCAM(model.module, layers, reshape_transform=reshape)


class ScoreCAM(PGCAttributor):
    """pytorch-grad-cam ScoreCAM: channel weights from the scores of activation-masked inputs."""

    id: ClassVar[str] = "gradcam.ScoreCAM"
    cam_class: ClassVar[str] = "ScoreCAM"

    def construct(self, model: LoadedModel, layers: list[torch.nn.Module], reshape: Callable | None, inputs: torch.Tensor) -> Any:
        cam = pgc.ScoreCAM(model.module, layers, reshape_transform=reshape)
        cam.batch_size = model.batch_size
        return cam


class AblationOptions(CAMOptions):
    ratio_channels_to_ablate: float = Field(1.0, gt=0, le=1)
    """Fraction of channels ablated (1 = all, the published method)."""


class AblationCAM(PGCAttributor):
    """pytorch-grad-cam AblationCAM: channel weights from the score drop when each channel is ablated."""

    id: ClassVar[str] = "gradcam.AblationCAM"
    Options = AblationOptions
    cam_class: ClassVar[str] = "AblationCAM"

    def construct(self, model: LoadedModel, layers: list[torch.nn.Module], reshape: Callable | None, inputs: torch.Tensor) -> Any:
        from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit

        token_like = channels_last_output(model, layers[0], inputs[:1].detach())
        return pgc.AblationCAM(model.module, layers, reshape_transform=reshape,
                               ablation_layer=AblationLayerVit() if token_like else AblationLayer(),
                               batch_size=model.batch_size, ratio_channels_to_ablate=self.options.ratio_channels_to_ablate)


class KPCAOptions(CAMOptions):
    kernel: Literal["sigmoid", "rbf", "poly", "linear", "cosine"] = "sigmoid"
    gamma: float | None = Field(None, gt=0)
    """Kernel coefficient (scikit-learn's KernelPCA; unset = 1 / channels)."""


class KPCA_CAM(PGCAttributor):  # the library's class name
    """pytorch-grad-cam KPCA-CAM: first kernel principal component of the activations (class-agnostic)."""

    id: ClassVar[str] = "gradcam.KPCA_CAM"
    Options = KPCAOptions
    cam_class: ClassVar[str] = "KPCA_CAM"

    def construct(self, model: LoadedModel, layers: list[torch.nn.Module], reshape: Callable | None, inputs: torch.Tensor) -> Any:
        return pgc.KPCA_CAM(model.module, layers, reshape_transform=reshape, kernel=self.options.kernel, gamma=self.options.gamma)


class FEMOptions(CAMOptions):
    k: float = 2.0
    """Channels count where activations exceed mean + k std (the k-sigma rule)."""


class FEM(PGCAttributor):
    """pytorch-grad-cam FEM: activations weighted by their k-sigma exceedance (class-agnostic)."""

    id: ClassVar[str] = "gradcam.FEM"
    Options = FEMOptions
    cam_class: ClassVar[str] = "FEM"

    def construct(self, model: LoadedModel, layers: list[torch.nn.Module], reshape: Callable | None, inputs: torch.Tensor) -> Any:
        return pgc.FEM(model.module, layers, reshape_transform=reshape, k=self.options.k)


class RandomCAM(PGCAttributor):
    """pytorch-grad-cam RandomCAM: random channel weights in [-1, 1] (a control), seeded per image."""

    id: ClassVar[str] = "gradcam.RandomCAM"
    cam_class: ClassVar[str] = "RandomCAM"
    stochastic = True


class FullGradOptions(Options):
    score: Literal["logit", "softmax"] = "logit"
    aug_smooth: bool = False
    eigen_smooth: bool = False


class FullGrad(PGCAttributor):
    """pytorch-grad-cam FullGrad: |input x gradient| plus bias-gradients of every conv / batch-norm layer."""

    id: ClassVar[str] = "gradcam.FullGrad"
    Options = FullGradOptions
    cam_class: ClassVar[str] = "FullGrad"

    def layer_names(self, model: LoadedModel) -> list[str]:
        return []  # FullGrad uses every Conv2d / BatchNorm2d with a bias

    def construct(self, model: LoadedModel, layers: list[torch.nn.Module], reshape: Callable | None, inputs: torch.Tensor) -> Any:
        return pgc.FullGrad(model.module, [], reshape_transform=None)


class FinerOptions(LayerOptions):
    base_method: BaseMethod = "GradCAM"
    alpha: float = 1.0
    """Weight of the comparison classes: the target is score(target) - alpha x mean score(comparisons)."""
    comparison_categories: list[int] = Field([1, 2, 3], min_length=1)
    """Ranks of the comparison classes among the classes sorted by |logit - target logit| (0 = the target)."""


class FinerCAM(PGCAttributor):
    """pytorch-grad-cam Finer-CAM: the base CAM of the target against its most similar classes."""

    id: ClassVar[str] = "gradcam.FinerCAM"
    Options = FinerOptions
    cam_class: ClassVar[str] = "FinerCAM"

    def construct(self, model: LoadedModel, layers: list[torch.nn.Module], reshape: Callable | None, inputs: torch.Tensor) -> Any:
        return pgc.FinerCAM(model.module, layers, reshape_transform=reshape, base_method=getattr(pgc, self.options.base_method))

    def targets(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor) -> list[Any]:
        return finer_targets(model.logits(inputs).cpu().numpy(), target.tolist(), self.options.comparison_categories, self.options.alpha)

    def call(self, cam: Any, inputs: torch.Tensor, targets: list[Any]) -> np.ndarray:
        return cam(inputs, targets, eigen_smooth=self.options.eigen_smooth)


def finer_targets(logits: np.ndarray, target: list[int], comparison_categories: list[int], alpha: float) -> list[Any]:
    """FinerWeightedTarget per image: the target against the classes ranked ``comparison_categories``
    by |logit - target logit| (the library's own ranking, applied to the given target)."""
    classes = logits.shape[-1]
    ranks = [c for c in comparison_categories if c < classes]
    order = np.argsort(np.abs(logits - logits[np.arange(len(target)), target][:, None]), axis=-1)
    return [targets_module.FinerWeightedTarget(int(t), [int(order[i, r]) for r in ranks], alpha) for i, t in enumerate(target)]


class RefineOptions(LayerOptions):
    base_method: BaseMethod = "GradCAMPlusPlus"


class RefineCAM(PGCAttributor):
    """pytorch-grad-cam RefineCAM: the product of the base CAM over several layers (last two stages)."""

    id: ClassVar[str] = "gradcam.RefineCAM"
    Options = RefineOptions
    cam_class: ClassVar[str] = "RefineCAM"

    def layer_names(self, model: LoadedModel) -> list[str]:
        if self.options.layer is not None:
            return super().layer_names(model)
        info = getattr(model.module, "feature_info", None)
        stages = (info if isinstance(info, list) else info.get_dicts()) if info else []
        names = [str(d["module"]) for d in stages if isinstance(d, dict) and d.get("module")]
        if len(names) < 2:
            raise HarnessError(f"{self.id}: cannot choose layers for model {model.id}; pass -o attributor.layer='[\"A\", \"B\"]'")
        return names[-2:]

    def construct(self, model: LoadedModel, layers: list[torch.nn.Module], reshape: Callable | None, inputs: torch.Tensor) -> Any:
        return pgc.RefineCAM(model.module, layers, reshape_transform=reshape, base_method=getattr(pgc, self.options.base_method))

    def call(self, cam: Any, inputs: torch.Tensor, targets: list[Any]) -> np.ndarray:
        return cam(inputs, targets, eigen_smooth=self.options.eigen_smooth)


class SESSOptions(LayerOptions):
    base_method: BaseMethod = "GradCAM"
    scales: list[int] | None = None
    """Sizes the shorter side is resized to; unset = num_scales sizes from the window size up."""
    num_scales: int = Field(12, ge=1)
    scale_step_ratio: float = Field(2.0 / 7.0, gt=0)
    window_size: int | None = Field(None, ge=1)
    """Square sliding window; unset = the input's shorter side."""
    step_size: int | None = Field(None, ge=1)
    pre_filter_ratio: float = Field(0.0, ge=0, lt=1)
    theta: float = 0.0
    pool: Literal["mean", "max"] = "mean"
    smooth: bool = True
    use_softmax_scores: bool = True


class SESS(PGCAttributor):
    """pytorch-grad-cam SESS: the base CAM over multi-scale sliding windows, fused (12 scales)."""

    id: ClassVar[str] = "gradcam.SESS"
    Options = SESSOptions
    cam_class: ClassVar[str] = "SESS"
    trainable = True  # the patches are new tensors: the graph runs through the parameters

    def construct(self, model: LoadedModel, layers: list[torch.nn.Module], reshape: Callable | None, inputs: torch.Tensor) -> Any:
        o = self.options
        return pgc.SESS(model.module, layers, reshape_transform=reshape, base_method=getattr(pgc, o.base_method),
                        scales=o.scales, num_scales=o.num_scales, scale_step_ratio=o.scale_step_ratio,
                        window_size=o.window_size, step_size=o.step_size, pre_filter_ratio=o.pre_filter_ratio,
                        theta=o.theta, pool=o.pool, smooth=o.smooth, use_softmax_scores=o.use_softmax_scores,
                        batch_size=model.batch_size)

    def call(self, cam: Any, inputs: torch.Tensor, targets: list[Any]) -> np.ndarray:
        return cam(inputs, targets, eigen_smooth=self.options.eigen_smooth)


ALL: tuple[type[PGCAttributor], ...] = (
    GradCAM, HiResCAM, GradCAMElementWise, XGradCAM, GradCAMPlusPlus, LayerCAM, EigenCAM, EigenGradCAM,
    ShapleyCAM, SegEigenCAM, ScoreCAM, AblationCAM, KPCA_CAM, FEM, RandomCAM, FullGrad, FinerCAM, RefineCAM, SESS,
)


def _shipped(names: Sequence[str]) -> set[str]:
    """Which of ``names`` the installed pytorch-grad-cam exports, read from its ``__init__.py`` without
    importing it (the import takes seconds: it pulls in torchvision and OpenCV); imported if unreadable."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("pytorch_grad_cam")
        assert spec is not None and spec.origin is not None
        with open(spec.origin, encoding="utf-8") as handle:
            source = handle.read()
    except (AssertionError, OSError, ImportError, ValueError, UnicodeDecodeError):
        return {name for name in names if hasattr(pgc, name)}
    return {name for name in names if re.search(rf"\bimport\b[^\n]*\b{re.escape(name)}\b", source)}


_SHIPPED = _shipped([cls.cam_class for cls in ALL])
BRIDGED: tuple[type[PGCAttributor], ...] = tuple(cls for cls in ALL if cls.cam_class in _SHIPPED)
"""The methods the installed pytorch-grad-cam ships (older releases lack e.g. FinerCAM, SESS)."""


@harness.hookimpl
def register_attributors(register: Callable[[type[Attributor]], None]) -> None:
    for attributor in BRIDGED:
        register(attributor)
