"""Plain gradient attributors: saliency (Simonyan et al. 2014) and gradient x input."""

from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch

from harness.components import Attributor, Options
from harness.model import LoadedModel
from harness.scoring import input_gradients


class GradientOptions(Options):
    score: Literal["logit", "softmax"] = "logit"
    """Differentiate the target's logit (Simonyan et al., Captum) or its softmax probability."""


class Saliency(Attributor):
    """Saliency: |d score / d input|, max over colour channels (Simonyan et al. 2014)."""

    id: ClassVar[str] = "saliency"
    Options = GradientOptions

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return input_gradients(model, inputs, target, self.options.score).abs().amax(dim=1)


class InputXGradient(Attributor):
    """Gradient x input, summed over colour channels (Shrikumar et al. 2016)."""

    id: ClassVar[str] = "input_x_gradient"
    Options = GradientOptions

    def attribute(self, model: LoadedModel, inputs: torch.Tensor, target: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return (input_gradients(model, inputs, target, self.options.score) * inputs).sum(dim=1)
