"""zennit's composites as attributors ``zennit.<Composite>``: LRP (and modified-gradient) maps.

The map is zennit's ``Gradient`` attributor with the composite, started from the one-hot vector of
the target class (zennit's documented use), reduced over channels (``reduce``, signed sum by default
for the LRP composites, max-abs for the modified gradients). ``canonizer=auto`` picks zennit's
canonizers for the architecture: batch norms merged into the preceding convolution
(``SequentialMergeBatchNorm``) and residual additions made explicit ``Sum`` modules so that a rule
applies to them (zennit's ``ResNetCanonizer`` for torchvision ResNets; the same construction for
timm ResNets, ``TimmResNetCanonizer`` here).

zennit's rules see modules, not functional operations, so the LRP composites are refused (one-line
error) for models outside what those rules cover: layer/group norms, attention, squeeze-excitation
and timm/torchvision architectures other than ResNet and VGG (ViT, Swin, ConvNeXt, EfficientNet ...).
User modules built from conv / linear / batch-norm / activation / pooling modules are accepted as
they are; residual additions written inside a custom ``forward`` are invisible to zennit.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
from pydantic import Field

import harness
from harness.batching import map_in_chunks
from harness.components import Attributor, Options
from harness.errors import HarnessError
from harness.model import LoadedModel
from harness_plugins.attributors.bridges.common import Reduce, reduce_channels, require

zennit = require("zennit", "zennit", "zennit")
composites = require("zennit.composites", "zennit", "zennit")
attribution = require("zennit.attribution", "zennit", "zennit")
canonizers = require("zennit.canonizers", "zennit", "zennit")
zennit_layer = require("zennit.layer", "zennit", "zennit")

try:
    LIBRARY_VERSION = metadata.version("zennit")
except metadata.PackageNotFoundError:
    LIBRARY_VERSION = "unknown"

UNSUPPORTED_LAYERS: tuple[type[torch.nn.Module], ...] = (
    torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
    torch.nn.LocalResponseNorm, torch.nn.MultiheadAttention, torch.nn.Embedding,
)
SUPPORTED_HINT = ("supported: timm and torchvision ResNets (without squeeze-excitation) and VGGs, and user modules "
                  "built from conv, linear, batch-norm, activation and pooling modules")


# -- canonizers ----------------------------------------------------------------------------------------
def _timm_basic_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """timm ResNet BasicBlock.forward with the residual addition as a zennit ``Sum`` module."""
    shortcut = x
    x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
    x = self.aa(x)
    x = self.bn2(self.conv2(x))
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    return self.act2(self.canonizer_sum(torch.stack([shortcut, x], dim=-1)))


def _timm_bottleneck_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """timm ResNet Bottleneck.forward with the residual addition as a zennit ``Sum`` module."""
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.act2(self.drop_block(self.bn2(self.conv2(x))))
    x = self.aa(x)
    x = self.bn3(self.conv3(x))
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    return self.act3(self.canonizer_sum(torch.stack([shortcut, x], dim=-1)))


@functools.cache
def _timm_canonizer_class() -> type:
    """The canonizer classes, defined on first use (they subclass zennit's, and importing zennit
    imports torchvision: seconds of every command's start-up)."""

    class TimmResNetBlockCanonizer(canonizers.AttributeCanonizer):  # type: ignore[name-defined]
        """Give timm ResNet blocks an explicit ``Sum`` module for the residual addition (as zennit does for torchvision)."""

        def __init__(self) -> None:
            super().__init__(self._attribute_map)

        @staticmethod
        def _attribute_map(name: str, module: torch.nn.Module) -> dict[str, Any] | None:
            from timm.models.resnet import BasicBlock, Bottleneck

            forward = {BasicBlock: _timm_basic_forward, Bottleneck: _timm_bottleneck_forward}.get(type(module))
            if forward is None:
                return None
            return {"forward": forward.__get__(module), "canonizer_sum": zennit_layer.Sum()}

    class TimmResNetCanonizer(canonizers.CompositeCanonizer):  # type: ignore[name-defined]
        """Batch norms merged into their convolutions and explicit residual sums, for timm ResNets."""

        def __init__(self) -> None:
            super().__init__((canonizers.SequentialMergeBatchNorm(), TimmResNetBlockCanonizer()))

    return TimmResNetCanonizer


def TimmResNetCanonizer() -> Any:  # noqa: N802 - used like the class it builds
    """A canonizer for timm ResNets: batch norms merged into their convolutions and explicit residual sums."""
    return _timm_canonizer_class()()


def _family(net: torch.nn.Module) -> str:
    """``timm`` / ``torchvision`` / ``user`` by where the model's class is defined."""
    module = type(net).__module__
    return "timm" if module.startswith("timm.") else "torchvision" if module.startswith("torchvision.") else "user"


def unsupported_parts(net: torch.nn.Module) -> list[str]:
    """What of ``net`` zennit's LRP rules do not cover (empty = supported)."""
    problems: set[str] = set()
    family = _family(net)
    if family == "timm":
        from timm.models.resnet import ResNet
        from timm.models.vgg import VGG

        if isinstance(net, ResNet):
            if any(getattr(block, "se", None) is not None for block in net.modules()):
                problems.add("squeeze-excitation / attention blocks")
        elif not isinstance(net, VGG):
            problems.add(f"the timm architecture {type(net).__name__}")
    elif family == "torchvision":
        import torchvision.models as tv

        if not isinstance(net, (tv.ResNet, tv.VGG, tv.AlexNet)):
            problems.add(f"the torchvision architecture {type(net).__name__}")
    for module in net.modules():
        if isinstance(module, UNSUPPORTED_LAYERS) or "Attention" in type(module).__name__:
            problems.add(type(module).__name__)
    return sorted(problems)


def auto_canonizers(net: torch.nn.Module) -> list[Any]:
    """zennit canonizers for ``net``'s architecture."""
    if _family(net) == "timm":
        from timm.models.resnet import ResNet

        if isinstance(net, ResNet):
            return [TimmResNetCanonizer()]
    if _family(net) == "torchvision":
        import torchvision.models as tv

        if isinstance(net, tv.ResNet):
            from zennit.torchvision import ResNetCanonizer

            return [ResNetCanonizer()]
    return [canonizers.SequentialMergeBatchNorm()]


# -- options -------------------------------------------------------------------------------------------
class ZennitOptions(Options):
    reduce: Reduce = "sum"
    """Channel reduction of the (B, 3, H, W) relevance: sum | mean | abs_sum | abs_max | l2."""
    canonizer: Literal["auto", "none"] = "auto"
    """auto = batch norms merged and residual sums made explicit for the architecture; none = the model as is."""


class RuleOptions(ZennitOptions):
    epsilon: float = Field(1e-6, gt=0)
    """Stabiliser of the epsilon rule (dense layers)."""
    stabilizer: float = Field(1e-6, gt=0)
    """Stabiliser of the other rules."""
    zero_params: list[str] | None = None
    """Parameters the rules treat as zero, e.g. ["bias"]."""


class GammaBoxOptions(RuleOptions):
    gamma: float = Field(0.25, ge=0)


class ExcitationOptions(ZennitOptions):
    stabilizer: float = Field(1e-6, gt=0)
    zero_params: list[str] | None = None


class ModifiedGradientOptions(ZennitOptions):
    reduce: Reduce = "abs_max"
    canonizer: Literal["auto", "none"] = "none"


class BetaSmoothOptions(ModifiedGradientOptions):
    beta_smooth: float = Field(10.0, gt=0)
    """ReLU gradients replaced by sigmoid(beta_smooth x)."""


# -- attributors ---------------------------------------------------------------------------------------
class ZennitAttributor(Attributor):
    """Base of the zennit bridges: the composite's ``Gradient`` from the target's one-hot vector."""

    version: ClassVar[str] = f"1+zennit-{LIBRARY_VERSION}"
    Options: ClassVar[type[Options]] = RuleOptions
    composite: ClassVar[str] = ""
    rule_based: ClassVar[bool] = True
    """LRP rules on every layer (architecture checked) rather than modified ReLU gradients."""

    def composite_kwargs(self, model: LoadedModel, inputs: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of the composite besides ``canonizers``."""
        o = self.options
        return {"epsilon": o.epsilon, "stabilizer": o.stabilizer, "zero_params": o.zero_params}

    def make_composite(self, model: LoadedModel, inputs: torch.Tensor) -> Any:
        """The zennit composite, with this architecture's canonizers unless ``canonizer=none``."""
        chosen = auto_canonizers(model.module) if self.options.canonizer == "auto" else []
        return getattr(composites, self.composite)(canonizers=chosen, **self.composite_kwargs(model, inputs))

    def run(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """zennit's (B, C, H, W) relevance of one chunk."""
        composite = self.make_composite(model, inputs)
        target = target.to(inputs.device)

        def one_hot(output: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(output).scatter_(1, target.view(-1, 1), 1.0)

        with torch.enable_grad(), attribution.Gradient(model=model.module, composite=composite) as attributor:
            _, relevance = attributor(inputs.detach().clone(), one_hot)
        return relevance.detach()

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        if self.rule_based:
            problems = unsupported_parts(model.module)
            if problems:
                raise HarnessError(f"{self.id}: zennit's LRP rules do not cover model {model.id} "
                                   f"({', '.join(problems)}); {SUPPORTED_HINT}")
        relevance = map_in_chunks(len(inputs), model.batch_size, lambda a, b: self.run(model, inputs[a:b], target[a:b]))
        return reduce_channels(relevance, self.options.reduce)


class EpsilonGammaBox(ZennitAttributor):
    """zennit EpsilonGammaBox: ZBox on the first conv (pixel bounds), gamma (0.25) on convs, epsilon on dense layers."""

    id: ClassVar[str] = "zennit.EpsilonGammaBox"
    Options = GammaBoxOptions
    composite: ClassVar[str] = "EpsilonGammaBox"

    def composite_kwargs(self, model: LoadedModel, inputs: torch.Tensor) -> dict[str, Any]:
        low = model.normalise(torch.zeros_like(inputs))
        high = model.normalise(torch.ones_like(inputs))
        return {**super().composite_kwargs(model, inputs), "low": low, "high": high, "gamma": self.options.gamma}


class EpsilonPlus(ZennitAttributor):
    """zennit EpsilonPlus: z+ on convolutions, epsilon on dense layers."""

    id: ClassVar[str] = "zennit.EpsilonPlus"
    composite: ClassVar[str] = "EpsilonPlus"


class EpsilonPlusFlat(ZennitAttributor):
    """zennit EpsilonPlusFlat: flat on the first layer, z+ on convolutions, epsilon on dense layers."""

    id: ClassVar[str] = "zennit.EpsilonPlusFlat"
    composite: ClassVar[str] = "EpsilonPlusFlat"


class EpsilonAlpha2Beta1(ZennitAttributor):
    """zennit EpsilonAlpha2Beta1: alpha=2, beta=1 on convolutions, epsilon on dense layers."""

    id: ClassVar[str] = "zennit.EpsilonAlpha2Beta1"
    composite: ClassVar[str] = "EpsilonAlpha2Beta1"


class EpsilonAlpha2Beta1Flat(ZennitAttributor):
    """zennit EpsilonAlpha2Beta1Flat: flat on the first layer, alpha=2 beta=1 on convolutions, epsilon on dense layers."""

    id: ClassVar[str] = "zennit.EpsilonAlpha2Beta1Flat"
    composite: ClassVar[str] = "EpsilonAlpha2Beta1Flat"


class ExcitationBackprop(ZennitAttributor):
    """zennit ExcitationBackprop: z+ on every linear layer (Zhang et al. 2016)."""

    id: ClassVar[str] = "zennit.ExcitationBackprop"
    Options = ExcitationOptions
    composite: ClassVar[str] = "ExcitationBackprop"

    def composite_kwargs(self, model: LoadedModel, inputs: torch.Tensor) -> dict[str, Any]:
        return {"stabilizer": self.options.stabilizer, "zero_params": self.options.zero_params}


class GuidedBackprop(ZennitAttributor):
    """zennit GuidedBackprop: ReLU gradients clipped to positive values; max-abs over channels."""

    id: ClassVar[str] = "zennit.GuidedBackprop"
    Options: ClassVar[type[Options]] = ModifiedGradientOptions
    composite: ClassVar[str] = "GuidedBackprop"
    rule_based = False

    def composite_kwargs(self, model: LoadedModel, inputs: torch.Tensor) -> dict[str, Any]:
        return {}


class DeconvNet(GuidedBackprop):
    """zennit DeconvNet: ReLU applied to the backward signal (Zeiler & Fergus); max-abs over channels."""

    id: ClassVar[str] = "zennit.DeconvNet"
    composite: ClassVar[str] = "DeconvNet"


class BetaSmooth(GuidedBackprop):
    """zennit BetaSmooth: ReLU gradients replaced by sigmoid(10 x) (Dombrowski et al. 2019); max-abs over channels."""

    id: ClassVar[str] = "zennit.BetaSmooth"
    Options = BetaSmoothOptions
    composite: ClassVar[str] = "BetaSmooth"

    def composite_kwargs(self, model: LoadedModel, inputs: torch.Tensor) -> dict[str, Any]:
        return {"beta_smooth": self.options.beta_smooth}


BRIDGED: tuple[type[ZennitAttributor], ...] = (
    EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat, EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, ExcitationBackprop,
    GuidedBackprop, DeconvNet, BetaSmooth,
)


@harness.hookimpl
def register_attributors(register: Callable[[type[Attributor]], None]) -> None:
    for attributor in BRIDGED:
        register(attributor)
