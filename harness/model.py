"""A loaded model: the module on its device, its preprocessing, its weights' provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from harness.batching import map_in_chunks
from harness.components import ModelSpec, Options
from harness.execution import AppliedExecution, ExecutionMode, apply_execution
from harness.folding import FoldedModule
from harness.weights import load_checked, read_state_dict, state_dict_sha256


class ModelOptions(Options):
    """Options of the run's models (``-o model.NAME=VALUE``), applied to every model of the run."""

    resize: Literal["timm", "opencv_linear"] = "timm"
    """timm: the model's own data config (resize, centre crop, PIL interpolation with antialiasing).
    opencv_linear: ``cv2.resize(img, input_size)`` bit for bit (a squash resize without antialiasing,
    OpenCV's fixed-point INTER_LINEAR), as the published SAG / I-GOS code prepares its inputs."""


@dataclass
class LoadedModel:
    """A model ready for metrics: ``logits``/``probs`` in chunks, ``preprocess`` for PIL images."""

    id: str
    spec: ModelSpec
    module: torch.nn.Module
    device: torch.device
    data_config: dict[str, Any]
    weights: str
    weights_sha256: str | None
    random_init: bool
    batch_size: int = 32
    resize: str = "timm"
    """How images become inputs: ``timm`` (the model's data config: resize, crop, PIL interpolation)
    or ``opencv_linear`` (the published explanation code's ``cv2.resize`` squash to the input size)."""
    execution: AppliedExecution = field(default_factory=AppliedExecution)
    """How the module runs: precision, memory format (``auto`` resolved), compiled or not."""
    folded: FoldedModule | None = field(default=None, repr=False)
    """The batch-norm-folded copy of ``module`` (:mod:`harness.folding`), when the mode made one."""
    _transform: Any = field(default=None, repr=False)

    def forward_module(self) -> torch.nn.Module:
        """The module plain forward and input-gradient passes should call: the batch-norm-folded copy
        when it computes the same function as ``module`` right now (no hooks, weights unchanged),
        otherwise ``module`` itself. Code that hooks layers or reads parameters uses ``module``."""
        if self.folded is not None and self.folded.serves(self.module):
            return self.folded.module
        return self.module

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's inputs."""
        return tuple(self.data_config["input_size"])

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel normalisation mean, shaped (1, 3, 1, 1) on the model's device."""
        return torch.tensor(self.data_config["mean"], device=self.device).view(1, -1, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        """Per-channel normalisation std, shaped (1, 3, 1, 1) on the model's device."""
        return torch.tensor(self.data_config["std"], device=self.device).view(1, -1, 1, 1)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel space [0, 1] -> the model's input space."""
        return (pixels - self.mean) / self.std

    def denormalise(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's input space -> pixel space [0, 1]."""
        return inputs * self.std + self.mean

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Normalised input batch (B, 3, H, W) on the device from PIL images (tensors, as given to
        ``harness.evaluate``, are taken as already preprocessed)."""
        if images and all(isinstance(img, torch.Tensor) for img in images):
            return torch.stack(list(images)).to(self.device, torch.float32)
        if self.resize == "opencv_linear":
            return self.normalise(torch.stack([self._opencv_pixels(img) for img in images]).to(self.device))
        if self._transform is None:
            import timm.data

            self._transform = timm.data.create_transform(**self.data_config, is_training=False)
        return torch.stack([self._transform(img) for img in images]).to(self.device)

    def _opencv_pixels(self, image: Any) -> torch.Tensor:
        """(3, H, W) pixels in [0, 1]: OpenCV's INTER_LINEAR squash resize of the 8-bit RGB image."""
        import numpy as np

        from harness.resize import opencv_linear_resize

        _, height, width = self.input_size
        array = opencv_linear_resize(np.asarray(image.convert("RGB")), width, height)
        return torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1)

    def preprocessing(self) -> dict[str, Any]:
        """The input pipeline, as recorded in result files."""
        if self.resize == "opencv_linear":
            return {"resize": "opencv_linear", "input_size": list(self.input_size), "crop": None,
                    "mean": list(self.data_config["mean"]), "std": list(self.data_config["std"])}
        keys = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
        return {"resize": "timm", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items() if k in keys}}

    def logits(self, inputs: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Logits of ``inputs`` without gradients, in chunks of ``chunk_size`` (default batch size)."""
        forward = self.forward_module()
        with torch.inference_mode():
            return map_in_chunks(
                len(inputs), chunk_size or self.batch_size, lambda a, b: forward(inputs[a:b]).float()
            )

    def probs(self, inputs: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Softmax probabilities of ``inputs`` without gradients."""
        return self.logits(inputs, chunk_size).softmax(-1)

    def provenance(self) -> dict[str, Any]:
        """The ``models[]`` entry of a result file."""
        return {
            "id": self.id,
            "source": self.spec.weights or self.spec.description,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "random_init": self.random_init,
            "preprocessing": self.preprocessing(),
            **({"user_model": True} if getattr(self.spec, "user_model", False) else {}),  # harness.evaluate(module)
        }


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    from harness.errors import HarnessError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HarnessError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:K") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device {name!r} requested but CUDA is not available")
    return device


def load_model(
    spec: ModelSpec,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    batch_size: int = 32,
    resize: str = "timm",
    execution: ExecutionMode | None = None,
) -> LoadedModel:
    """Build ``spec`` with its default weights, a user's ``weights`` file, or a seeded random init,
    then put it in ``execution`` mode (None: as built, contiguous fp32, not compiled)."""
    import timm.data

    from harness.errors import HarnessError

    if weights is not None and random_init:
        raise HarnessError("--weights and --random-init exclude each other")
    if weights is not None:
        module = spec.build(False)
        load_checked(module, read_state_dict(weights), str(weights))
        weights_desc = str(weights)
    elif random_init:
        torch.manual_seed(seed)
        module = spec.build(False)
        weights_desc = f"random-init(seed={seed})"
    else:
        module = spec.build(True)
        weights_desc = spec.weights or "pretrained"
    module.eval().to(device)
    for p in module.parameters():
        p.requires_grad_(False)
    config = dict(timm.data.resolve_data_config(model=module))
    config.update(spec.data_config)
    digest = state_dict_sha256(module)  # before any change of memory format or compilation
    applied, folded = (apply_execution(module, execution, device, tuple(config["input_size"])) if execution is not None
                       else (AppliedExecution(), None))
    return LoadedModel(
        id=spec.id,
        spec=spec,
        module=module,
        device=device,
        data_config=config,
        weights=weights_desc,
        weights_sha256=digest,
        random_init=random_init,
        batch_size=batch_size,
        resize=resize,
        execution=applied,
        folded=folded,
    )
