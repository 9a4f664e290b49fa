"""Batch-norm folding (harness/folding.py): the folded copy computes the original function within float
rounding, forward and input gradients; it is used only when nothing can tell (no hooks, weights
unchanged, the same module); a conv output with a second consumer is not folded; runs record it and
agree with --no-fold-batchnorm."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from harness.execution import ExecutionMode, apply_execution
from harness.folding import FOLD_TOLERANCE, fold_batchnorm

SIZE = 64


def _trained_looking(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (a random init's BN is ~identity,
    which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return module


def _model(model_id: str, mode: ExecutionMode):
    from harness.model import load_model
    from harness.registry import get_registry

    model = load_model(get_registry().model_spec(model_id), random_init=True, batch_size=4)
    _trained_looking(model.module)
    model.execution, model.folded = apply_execution(model.module, mode, model.device, (3, SIZE, SIZE))
    return model


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn((n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_id", ["test_resnet", "test_efficientnet"])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_folded_copy_equals_the_original_within_float_rounding(model_id, memory_format):
    model = _model(model_id, ExecutionMode(memory_format=memory_format))
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.module.modules())
    assert model.folded is not None and model.execution.folded_batchnorm == bns > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.folded.module.modules())
    assert model.forward_module() is model.folded.module
    x = _x()
    with torch.inference_mode():
        plain, fast = model.module(x), model.folded.module(x)
    assert (plain - fast).abs().max() <= FOLD_TOLERANCE * plain.abs().max()

    def grad(module):
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(module(xx)[:, 0].sum(), xx)
        return g

    a, b = grad(model.module), grad(model.folded.module)
    assert (a - b).norm() <= 1e-3 * a.norm()


def test_a_wrong_fold_would_be_caught_by_the_test_data():
    """Guard for the test above: with these statistics, BN is far from the identity."""
    model = _model("test_resnet", ExecutionMode(fold_batchnorm=False))
    assert model.folded is None
    bn = next(m for m in model.module.modules() if isinstance(m, nn.BatchNorm2d))
    probe = torch.randn(2, bn.num_features, 4, 4)
    assert (bn(probe) - probe).abs().max() > 0.1


def test_copy_is_used_only_when_nothing_can_tell():
    model = _model("test_resnet", ExecutionMode())
    assert model.forward_module() is model.folded.module
    layer = next(m for m in model.module.modules() if isinstance(m, nn.Conv2d))
    handle = layer.register_forward_hook(lambda *a: None)
    assert model.forward_module() is model.module  # a hooked layer must see the original activations
    handle.remove()
    assert model.forward_module() is model.folded.module
    layer.weight.data.mul_(2.0)  # through .data: no version bump, caught by the values
    assert model.forward_module() is model.module
    layer.weight.data.div_(2.0)
    assert model.forward_module() is model.folded.module
    with torch.no_grad():
        layer.weight.mul_(2.0)  # MPRT-style in-place change of the weights
    assert model.forward_module() is model.module
    # a different module in the same LoadedModel (dataclasses.replace, as a randomisation test may do)
    import copy
    from dataclasses import replace

    other = replace(model, module=copy.deepcopy(model.module))
    assert other.forward_module() is other.module


def test_training_mode_batchnorm_is_never_replaced():
    model = _model("test_resnet", ExecutionMode())
    model.module.train()
    assert model.forward_module() is model.module
    model.module.eval()


class TwoConsumers(nn.Module):
    """The conv output feeds the BN and a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.head((self.bn(y) + y).mean((2, 3)))


class OneConsumer(TwoConsumers):
    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


def test_a_conv_output_with_a_second_consumer_is_not_folded():
    x = _x(2)
    assert fold_batchnorm(_trained_looking(OneConsumer()).eval(), x).folded == 1
    assert fold_batchnorm(_trained_looking(TwoConsumers()).eval(), x) is None


def test_models_without_batchnorm_get_no_copy():
    model = _model("test_vit", ExecutionMode())
    assert model.folded is None and model.execution.folded_batchnorm == 0
    assert model.forward_module() is model.module


def test_run_records_folding_and_agrees_with_no_fold(cli, tmp_path):
    common = ["run", "--model", "test_resnet", "--random-init", "--metric", "deletion", "--attributor", "saliency",
              "--limit", "2", "--batch-size", "4", "-o", "metric.steps=8", "--quiet"]
    folded = cli(*common, "--out", str(tmp_path / "a"))
    plain = cli(*common, "--no-fold-batchnorm", "--out", str(tmp_path / "b"))
    assert folded.exit_code == 0 and plain.exit_code == 0, folded.output + plain.output
    (a,), (b,) = (list((tmp_path / d).glob("*.json")) for d in "ab")
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["run_id"] == rb["run_id"]  # float rounding only: the same run
    assert ra["provenance"]["folded_batchnorm"][0] > 0 and rb["provenance"]["folded_batchnorm"] == [0]
    assert ra["provenance"]["run_config"]["execution"]["fold_batchnorm"] is True
    assert abs(ra["value"] - rb["value"]) <= 1e-5


class InPlaceBetween(TwoConsumers):
    """conv -> ReLU(inplace) -> BN: the BN's input is the conv's output object, changed in place."""

    def forward(self, x):
        return self.head(self.bn(torch.relu_(self.conv(x))).mean((2, 3)))


class ExpandedBuffer(OneConsumer):
    """A stride-0 buffer (more elements than its storage holds)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(1).expand(3))

    def forward(self, x):
        return super().forward(x) * self.scale[:2]


def test_an_in_place_op_between_conv_and_bn_is_not_folded():
    from harness.folding import _pairs

    assert _pairs(_trained_looking(InPlaceBetween()).eval(), _x(2)) == []


def test_unusual_buffers_do_not_break_loading():
    folded = fold_batchnorm(_trained_looking(ExpandedBuffer()).eval(), _x(2))
    assert folded is not None and folded.folded == 1 and folded.serves(folded.source)


def test_module_state_changes_are_noticed():
    model = _model("test_resnet", ExecutionMode())
    drop = next(m for m in model.module.modules() if m is not model.module)
    drop.train()  # a submodule switched to training mode (dropout would sample)
    assert model.forward_module() is model.module
    drop.eval()
    assert model.forward_module() is model.folded.module
    layer = next(m for m in model.module.modules() if isinstance(m, nn.Conv2d))
    layer.forward = lambda x: x  # a patched forward
    assert model.forward_module() is model.module
