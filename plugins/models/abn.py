"""ABN: Attention Branch Network (Fukui et al., CVPR 2019) on timm ResNets, and the ``abn`` attributor.

Architecture (ResNet-50 sizes at 224 x 224; K classes)::

    g   = layer3(layer2(layer1(stem(x))))                       feature extractor, (B, 1024, 14, 14)
    a   = relu(bn_att2(att_conv(bn_att(att_layer4(g)))))         attention branch: stage 4 copy, stride 1
    M   = sigmoid(bn_att3(att_conv3(a)))                         attention map, (B, 1, 14, 14) in [0, 1]
    att = att_gap(att_conv2(a))                                  attention-branch logits (1x1 conv, GAP)
    g'  = (1 + M) * g                                            attention mechanism
    out = fc(avgpool(layer4(g')))                                perception-branch logits = prediction

``forward(x)`` returns the perception logits (what every metric scores); ``forward_branches(x)``
returns all of it as :class:`ABNOutput`; ``attention_map(x)`` returns ``M``. Both pools are
adaptive (the reference hard-codes 14 x 14 and 7 x 7, i.e. 224 x 224 inputs). The three ResNets
come from timm (``resnet50/101/152``, the torchvision layout); ``att_layer4`` is their stage 4 built
again with stride 1.

Fine-tuning: ``abn_loss(model.forward_branches(x), y)`` = CE(attention logits) + CE(perception
logits), the paper's training loss; :func:`init_from_resnet` starts the trunk, ``layer4``/``fc`` and
the attention branch's ``att_layer4`` from a plain ResNet's state dict (e.g. timm ``resnet50.tv_in1k``).

Checkpoints: the authors' released ImageNet models (``model_best.pth.tar``, links below) hold
``{"state_dict": {"module.conv1.weight": ...}, ...}``. The key mapping is the identity after
dropping DataParallel's ``module.`` prefix (the harness does both unwrapping steps): the modules
are named as in the reference (``conv1, bn1, layer1-3`` | ``att_layer4, bn_att, att_conv, bn_att2,
att_conv2, att_conv3, bn_att3`` | ``layer4, fc``), in the reference's order, with the same shapes.
Files saved by torch 0.4.0 lack BatchNorm's ``num_batches_tracked``; those are filled in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import harness
from harness.components import Attributor, ModelSpec, Options
from harness.errors import HarnessError

PAPER = "Fukui et al., Attention Branch Network: Learning of Attention Mechanism for Visual Explanation, CVPR 2019"
DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


class ABNOutput(NamedTuple):
    """Everything one ABN forward pass computes (the reference returns ``(att, logits, [M, g, g'])``)."""

    attention_logits: torch.Tensor
    """(B, K) logits of the attention branch (1x1 conv K -> K, global average pool)."""
    logits: torch.Tensor
    """(B, K) logits of the perception branch: the prediction."""
    attention_map: torch.Tensor
    """(B, 1, h, w) attention map M in [0, 1] (h = w = 14 at 224 x 224)."""
    features: torch.Tensor
    """(B, C, h, w) feature-extractor output g (stage 3)."""
    weighted_features: torch.Tensor
    """(B, C, h, w) perception-branch input g' = (1 + M) * g."""


def _stride_one(stage: nn.Sequential) -> nn.Sequential:
    """``stage`` with its downsampling stride removed (first block's 3x3 conv and shortcut conv)."""
    first = stage[0]
    for conv in (getattr(first, "conv2", None), getattr(first, "conv1", None)):
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
            conv.stride = (1, 1)
            break
    downsample = getattr(first, "downsample", None)
    if downsample is not None:
        for m in downsample.modules():
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
            elif isinstance(m, nn.AvgPool2d):  # timm's avg-down shortcut variants
                m.stride, m.kernel_size = 1, 1
    return stage


def _init_conv_bn(module: nn.Module) -> None:
    """The reference initialisation: He (fan-out) normal convolutions, BatchNorm weight 1 and bias 0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class ABNResNet(nn.Module):
    """An Attention Branch Network on a timm ResNet (``resnet50``, ``resnet101``, ``resnet152``)."""

    def __init__(self, arch: str = "resnet50", num_classes: int = 1000):
        super().__init__()
        import timm

        base: Any = timm.create_model(arch, pretrained=False, num_classes=num_classes)  # a timm ResNet
        width = base.num_features  # 2048 for bottleneck ResNets
        stage3 = base.feature_info[-2]["num_chs"]  # 1024
        # Registration order = the reference's state-dict order.
        self.conv1 = base.conv1
        self.bn1 = base.bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = base.maxpool
        self.layer1 = base.layer1
        self.layer2 = base.layer2
        self.layer3 = base.layer3
        self.att_layer4 = _stride_one(copy.deepcopy(base.layer4))
        self.bn_att = nn.BatchNorm2d(width)
        self.att_conv = nn.Conv2d(width, num_classes, kernel_size=1, bias=False)
        self.bn_att2 = nn.BatchNorm2d(num_classes)
        self.att_conv2 = nn.Conv2d(num_classes, num_classes, kernel_size=1, bias=False)
        self.att_conv3 = nn.Conv2d(num_classes, 1, kernel_size=3, padding=1, bias=False)
        self.bn_att3 = nn.BatchNorm2d(1)
        self.att_gap = nn.AdaptiveAvgPool2d(1)
        self.sigmoid = nn.Sigmoid()
        self.layer4 = base.layer4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = base.fc
        for name in ("att_layer4", "bn_att", "att_conv", "bn_att2", "att_conv2", "att_conv3", "bn_att3"):
            _init_conv_bn(getattr(self, name))

        self.arch = arch
        self.num_classes = num_classes
        self.num_features = width
        self.feature_channels = stage3
        self.pretrained_cfg = dict(DATA_CONFIG, num_classes=num_classes, first_conv="conv1", classifier="fc")
        self.default_cfg = self.pretrained_cfg
        # Grad-CAM and other feature readers: the perception branch's last stage
        self.feature_info = [
            {"num_chs": stage3, "reduction": 16, "module": "layer3"},
            {"num_chs": width, "reduction": 32, "module": "layer4"},
        ]

    def forward_branches(self, x: torch.Tensor) -> ABNOutput:
        """Attention logits, perception logits, the map M, the features g and g' = (1 + M) * g."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        g = self.layer3(self.layer2(self.layer1(x)))
        a = self.bn_att(self.att_layer4(g))
        a = self.relu(self.bn_att2(self.att_conv(a)))
        attention_map = self.sigmoid(self.bn_att3(self.att_conv3(a)))
        attention_logits = self.att_gap(self.att_conv2(a)).flatten(1)
        weighted = g * attention_map + g
        logits = self.fc(self.avgpool(self.layer4(weighted)).flatten(1))
        return ABNOutput(attention_logits, logits, attention_map, g, weighted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The perception branch's logits (the model's prediction)."""
        return self.forward_branches(x).logits

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """M(x), (B, 1, h, w) in [0, 1]; only the trunk and the attention branch are evaluated."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        g = self.layer3(self.layer2(self.layer1(x)))
        a = self.relu(self.bn_att2(self.att_conv(self.bn_att(self.att_layer4(g)))))
        return self.sigmoid(self.bn_att3(self.att_conv3(a)))

    def get_classifier(self) -> nn.Module:
        return self.fc


def abn_loss(output: ABNOutput, targets: torch.Tensor, **cross_entropy: Any) -> torch.Tensor:
    """The ABN training loss: CE(attention logits, y) + CE(perception logits, y).

    ``cross_entropy`` goes to both ``F.cross_entropy`` calls (e.g. ``label_smoothing=0.1``)::

        out = model.forward_branches(images)
        loss = abn_loss(out, labels)
        loss.backward()
    """
    return F.cross_entropy(output.attention_logits, targets, **cross_entropy) + F.cross_entropy(
        output.logits, targets, **cross_entropy
    )


def init_from_resnet(model: ABNResNet, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy a plain ResNet's weights (torchvision/timm names) into ``model`` to fine-tune from.

    ``conv1, bn1, layer1-4, fc`` load as they are; ``att_layer4`` starts as a copy of ``layer4``
    (same shapes: only the stride differs). Returns the keys left at their initial values (the
    attention branch's own convolutions and norms).
    """
    own = model.state_dict()
    update = {}
    for key, value in state_dict.items():
        for name in (key, key.replace("layer4.", "att_layer4.", 1) if key.startswith("layer4.") else None):
            if name is not None and name in own and tuple(own[name].shape) == tuple(value.shape):
                update[name] = value
    model.load_state_dict(update, strict=False)
    return [k for k in own if k not in update]


# -- variants ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One ABN model id and its reference parameter count (1000 classes)."""

    name: str
    arch: str
    n_params: int
    checkpoint: str
    top1_error: float


VARIANTS = {
    v.name: v
    for v in (
        Variant("abn_resnet50", "resnet50", 43_584_866, "https://drive.google.com/open?id=1SRtzbnE-IpB5talp7PLNK1mzMV3UPQNV", 23.1),
        Variant("abn_resnet101", "resnet101", 62_576_994, "https://drive.google.com/open?id=1B5jBHTfskKAgNpsFm9iADn1lskn2UWyk", 21.8),
        Variant("abn_resnet152", "resnet152", 78_220_642, "https://drive.google.com/open?id=1ZFq0ubZitsuOwPhrQopQOqVW5-KXflFr", 21.4),
    )
}


def create_abn(name: str, num_classes: int = 1000) -> ABNResNet:
    """Build ABN variant ``name`` with random weights."""
    return ABNResNet(VARIANTS[name].arch, num_classes)


def build(name: str, pretrained: bool) -> ABNResNet:
    """``build(pretrained)`` of a ModelSpec: random weights, or an error saying where the weights are."""
    variant = VARIANTS[name]
    if pretrained:
        raise HarnessError(
            f"{name} has no downloadable weights in the harness; the authors' ImageNet model is at "
            f"{variant.checkpoint} (model_best.pth.tar): download it once and pass --weights FILE "
            "(it loads unchanged), or use --random-init"
        )
    return create_abn(name)


def spec(name: str) -> ModelSpec:
    variant = VARIANTS[name]
    return ModelSpec(
        id=name,
        build=lambda pretrained: build(name, pretrained),
        description=(
            f"ABN on timm {variant.arch} ({PAPER}): {variant.n_params:,} params, reported top-1 error "
            f"{variant.top1_error}; weights: --weights FILE ({variant.checkpoint})"
        ),
        weights=f"abn:{name}",
        data_config=dict(DATA_CONFIG),
    )


# -- the attributor ---------------------------------------------------------------------------------
class ABNMapOptions(Options):
    pass


def is_abn(module: nn.Module) -> bool:
    """Whether ``module`` exposes an ABN attention map (``attention_map(x) -> (B, 1, h, w)``)."""
    return callable(getattr(module, "attention_map", None)) and callable(getattr(module, "forward_branches", None))


class ABNAttention(Attributor):
    """ABN's attention map M(x), bilinearly upsampled to the input (class-agnostic; ABN models only)."""

    id: ClassVar[str] = "abn"
    Options = ABNMapOptions

    def attribute(self, model, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        net = model.module
        if not is_abn(net):
            raise HarnessError(
                f"attributor 'abn' needs an Attention Branch Network ({', '.join(VARIANTS)}); "
                f"model {model.id!r} ({type(net).__name__}) has no attention branch"
            )
        height, width = inputs.shape[-2:]
        maps = []
        step = max(1, model.batch_size)
        with torch.inference_mode():
            for start in range(0, len(inputs), step):
                m = net.attention_map(inputs[start : start + step]).float()
                m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
                maps.append(m[:, 0])
        return torch.cat(maps).clone()  # cloned outside inference mode: an ordinary tensor


@harness.hookimpl
def register_models(register):
    for name in VARIANTS:
        register(spec(name))


@harness.hookimpl
def register_attributors(register):
    register(ABNAttention)
