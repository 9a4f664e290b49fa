"""Execution modes and ``--batch-size auto`` (harness/execution.py): channels_last equals contiguous
fp32 within float rounding, reduced precision only for forward-only work, compile keeps results,
the run id changes with precision only, provenance records the mode, and the batch-size calibration
chooses, caches and halves as documented (fake clocks and fake out-of-memory errors: no timing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from harness import execution
from harness.errors import HarnessError
from harness.execution import (
    CalibrationCache, ExecutionMode, FullPrecisionAttributor, auto_batch_size, calibrate, calibration_key,
    fastest_size, full_precision, largest_fitting, parse_batch_size,
)

SIZE = 64  # timm test models take any input size; small inputs keep every mode fast (bf16 is emulated on AVX2)


def _load(model_id: str, mode: ExecutionMode | None, seed: int = 0):
    from harness.model import load_model
    from harness.registry import get_registry

    return load_model(get_registry().model_spec(model_id), random_init=True, seed=seed, execution=mode, batch_size=4)


def _inputs(n: int = 4) -> torch.Tensor:
    return torch.randn((n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1))


def _grad(model, x: torch.Tensor) -> torch.Tensor:
    from harness.scoring import input_gradients

    return input_gradients(model, x, torch.zeros(len(x), dtype=torch.long))


# -- memory format --------------------------------------------------------------------------------------------
def test_auto_memory_format_is_channels_last_for_cnns_and_contiguous_for_vits():
    cnn, vit = _load("test_resnet", ExecutionMode()), _load("test_vit", ExecutionMode())
    assert cnn.execution.memory_format == "channels_last"
    conv = next(m for m in cnn.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert vit.execution.memory_format == "contiguous"
    assert _load("test_resnet", None).execution.memory_format == "contiguous"  # load_model without a mode: as built
    assert _load("test_resnet", ExecutionMode(memory_format="contiguous")).execution.memory_format == "contiguous"


@pytest.mark.parametrize("model_id", ["test_resnet", "test_efficientnet"])
def test_channels_last_equals_contiguous_fp32_within_float_rounding(model_id):
    """The documented bound: logits within 1e-5 of the largest logit, input gradients within rel L2 1e-3."""
    plain = _load(model_id, ExecutionMode(memory_format="contiguous"))
    last = _load(model_id, ExecutionMode(memory_format="channels_last"))
    assert plain.weights_sha256 == last.weights_sha256  # the weights' digest ignores the memory layout
    x = _inputs()
    a, b = plain.logits(x), last.logits(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    ga, gb = _grad(plain, x), _grad(last, x)
    assert (ga - gb).norm() <= 1e-3 * ga.norm()


# -- precision -------------------------------------------------------------------------------------------------
def test_bf16_runs_forward_only_work_and_gradients_stay_fp32():
    fp32 = _load("test_resnet", ExecutionMode(memory_format="contiguous"))
    bf16 = _load("test_resnet", ExecutionMode(precision="bf16", memory_format="contiguous"))
    x = _inputs()
    reference, reduced = fp32.logits(x), bf16.logits(x)
    assert reduced.dtype == torch.float32
    assert not torch.equal(reference, reduced)  # inference mode: autocast bf16
    assert (reference - reduced).abs().max() <= 0.1 * reference.abs().max() + 1e-3
    with full_precision():  # what attributor calls run under
        assert torch.equal(bf16.logits(x), reference)
    assert torch.equal(_grad(bf16, x), _grad(fp32, x))  # graph-building passes stay fp32
    with torch.enable_grad():
        assert torch.equal(bf16.module(x), fp32.module(x))


def test_reduced_precision_gradients_on_request_and_fp16_on_cpu():
    fp32 = _load("test_resnet", ExecutionMode(memory_format="contiguous"))
    insist = _load("test_resnet", ExecutionMode(precision="bf16", memory_format="contiguous", reduced_precision_gradients=True))
    x = _inputs()
    assert not torch.equal(_grad(insist, x), _grad(fp32, x))
    fp16 = _load("test_resnet", ExecutionMode(precision="fp16"))
    out = fp16.logits(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(HarnessError, match="needs --precision"):
        ExecutionMode(reduced_precision_gradients=True).check()


class _Peek:
    """An attributor that returns the model's inference-mode logits (to see the precision it ran in)."""

    id, version = "peek", "1"
    options = None

    def attribute(self, model, inputs, target, seeds):
        return model.logits(inputs)

    def coarse(self, model, inputs, target, seeds):
        return model.logits(inputs)


def test_attributor_calls_run_in_fp32_under_reduced_precision():
    fp32 = _load("test_resnet", ExecutionMode(memory_format="contiguous"))
    bf16 = _load("test_resnet", ExecutionMode(precision="bf16", memory_format="contiguous"))
    x, wrapped = _inputs(), FullPrecisionAttributor(_Peek())
    assert (wrapped.id, wrapped.version) == ("peek", "1")
    assert torch.equal(wrapped.attribute(bf16, x, None, []), fp32.logits(x))
    assert torch.equal(wrapped.coarse(bf16, x, None, []), fp32.logits(x))
    assert not torch.equal(_Peek().attribute(bf16, x, None, []), fp32.logits(x))


def test_compile_keeps_names_and_results(monkeypatch):
    monkeypatch.setattr(execution, "COMPILE_BACKEND", "eager")  # the wrapping, without inductor's code generation
    plain = _load("test_resnet", ExecutionMode(memory_format="contiguous"))
    compiled = _load("test_resnet", ExecutionMode(memory_format="contiguous", compile=True))
    assert compiled.execution.compile
    assert execution._eager(compiled.module) == compiled.module._call_impl  # calibration skips compilation
    assert execution._eager(plain.module) is plain.module
    assert [n for n, _ in compiled.module.named_modules()] == [n for n, _ in plain.module.named_modules()]
    x = _inputs()
    assert (plain.logits(x) - compiled.logits(x)).abs().max() <= 1e-5 * plain.logits(x).abs().max()


# -- run identity and provenance ----------------------------------------------------------------------------------
def _run_id(**kw) -> str:
    from harness.runner import RunConfig, resolve

    return resolve(RunConfig(models=["test_resnet"], metric="accuracy", random_init=True, limit=1, **kw)).run_id


def test_precision_is_part_of_the_run_id_and_the_rest_is_not():
    base = _run_id()
    for same in (dict(batch_size=8), dict(batch_size="auto"), dict(execution=ExecutionMode(memory_format="channels_last")),
                 dict(execution=ExecutionMode(memory_format="contiguous")), dict(execution=ExecutionMode(compile=True))):
        assert _run_id(**same) == base, same
    reduced = {_run_id(execution=ExecutionMode(precision="bf16")), _run_id(execution=ExecutionMode(precision="fp16")),
               _run_id(execution=ExecutionMode(precision="bf16", reduced_precision_gradients=True))}
    assert len(reduced) == 3 and base not in reduced


def _provenance(out: Path) -> dict:
    (path,) = [p for p in out.glob("*.json")]
    return json.loads(path.read_text())["provenance"]


RUN = ("run", "--model", "test_resnet", "--random-init", "--metric", "insertion", "--limit", "1", "-o", "metric.steps=3", "--quiet")


def test_provenance_records_the_execution_mode_and_the_auto_batch_size(cli, tmp_path):
    res = cli(*RUN, "--out", tmp_path / "auto")
    assert res.exit_code == 0, res.stderr
    p = _provenance(tmp_path / "auto")
    assert p["batch_size_auto"] is True and isinstance(p["batch_size"], int) and p["batch_size"] >= 1
    assert (p["precision"], p["memory_format"], p["compile"]) == ("fp32", "channels_last", False)
    assert p["run_config"]["batch_size_auto"] is True and p["run_config"]["batch_size"] == 32  # metric steps stay 32
    assert p["run_config"]["execution"] == ExecutionMode().record()

    res = cli(*RUN, "--out", tmp_path / "bf16", "--precision", "bf16", "--batch-size", "4", "--memory-format", "contiguous")
    assert res.exit_code == 0, res.stderr
    p = _provenance(tmp_path / "bf16")
    assert (p["batch_size"], p["batch_size_auto"], p["precision"], p["memory_format"]) == (4, False, "bf16", "contiguous")
    board = cli("leaderboard", tmp_path / "bf16")
    assert "[bf16]" in board.stdout


@pytest.mark.parametrize("value,message", [("0", "at least 1"), ("x8", "auto or a whole number"), ("2.5", "auto or a whole number")])
def test_a_bad_batch_size_is_one_line(cli, tmp_path, value, message):
    res = cli(*RUN, "--out", tmp_path, "--batch-size", value)
    assert res.exit_code != 0 and message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


# -- batch-size calibration ------------------------------------------------------------------------------------------
def test_parse_batch_size():
    assert parse_batch_size("auto") == "auto" and parse_batch_size("AUTO") == "auto"
    assert parse_batch_size("16") == 16 and parse_batch_size(3) == 3
    for bad in ("0", "-2", "1e3", "", None, 2.5):
        with pytest.raises(HarnessError):
            parse_batch_size(bad)


def test_fastest_size_prefers_the_smallest_within_the_tie():
    assert fastest_size({1: 10.0, 2: 6.0, 4: 5.1, 8: 5.0, 16: 5.2}) == 4
    assert fastest_size({1: 10.0, 2: 6.0, 4: 5.6, 8: 5.0}) == 8
    assert fastest_size({1: 3.0, 2: 4.0}) == 1


class _FakeClock:
    def __init__(self, cost):
        self.now, self.cost, self.calls = 0.0, cost, []

    def __call__(self) -> float:
        return self.now

    def run(self, size: int) -> None:
        self.calls.append(size)
        self.now += self.cost(size)


def test_calibrate_alternates_rounds_over_the_sizes_and_keeps_each_best():
    spikes = {(2, 1): 5.0}  # size 2's pass in round 1 hit a load spike

    def cost(size: int) -> float:
        count = clock.calls.count(size)  # passes of this size so far, warm-up included
        return size * 1e-3 * spikes.get((size, count - 1), 1.0)

    clock = _FakeClock(cost)
    per_image = calibrate(clock.run, sizes=(1, 2, 4), clock=clock, rounds=3)
    assert clock.calls == [1, 2, 4] + [1, 2, 4] * 3  # warm-up each, then alternating rounds
    assert per_image == pytest.approx({1: 1e-3, 2: 1e-3, 4: 1e-3})  # the spike is not kept
    assert fastest_size(per_image) == 1


def test_calibrate_stops_at_slow_sizes_and_keeps_to_its_budget():
    clock = _FakeClock(lambda b: b * 0.3)  # 0.3 s per image: size 8's warm-up takes 2.4 s
    per_image = calibrate(clock.run, sizes=(1, 2, 4, 8, 16, 32), clock=clock, budget_s=100.0)
    assert list(per_image) == [1, 2, 4, 8]
    clock = _FakeClock(lambda b: 1.0)  # every pass 1 s: one round, then the 5 s budget is spent
    per_image = calibrate(clock.run, sizes=(1, 2, 4), clock=clock, budget_s=5.0, rounds=3)
    assert len(clock.calls) == 6 and per_image == pytest.approx({1: 1.0, 2: 0.5, 4: 0.25})


def test_auto_batch_size_is_calibrated_once_per_key_and_cached(monkeypatch, tmp_path):
    from conftest import wrap_module

    model = wrap_module(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)), size=8)
    model.module(torch.zeros(1, 3, 8, 8))
    calls = []

    def fake_calibration(m):
        calls.append(m.id)
        return {1: 3.0, 2: 1.0, 4: 1.01, 8: 2.0}

    monkeypatch.setattr(execution, "calibrate_cpu", fake_calibration)
    assert auto_batch_size(model, tmp_path) == 2
    assert auto_batch_size(model, tmp_path) == 2 and calls == ["constructed"]  # the second time from the cache
    key = calibration_key(model, model.device, torch.get_num_threads())
    assert f"threads={torch.get_num_threads()}" in key and "|fp32|" in key and "3x8x8" in key
    assert CalibrationCache.under(tmp_path).get(key) == 2
    model.execution = execution.AppliedExecution(precision="bf16")
    assert auto_batch_size(model, tmp_path) == 2 and len(calls) == 2  # another precision: calibrated again
    CalibrationCache.under(tmp_path).path.write_text("{damaged")
    assert auto_batch_size(model, tmp_path) == 2 and len(calls) == 3  # a damaged cache is a miss


def test_largest_fitting_halves_on_out_of_memory():
    tried = []

    def run(size: int) -> None:
        tried.append(size)
        if size > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert largest_fitting(run, 256) == 32 and tried == [256, 128, 64, 32]

    def broken(size: int) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        largest_fitting(broken, 8)


def test_execution_mode_round_trips_through_the_result_record():
    mode = ExecutionMode(precision="bf16", memory_format="contiguous", compile=True)
    assert ExecutionMode.from_record(mode.record()) == mode
    assert ExecutionMode.from_record(None) == ExecutionMode()
    with pytest.raises(HarnessError):
        ExecutionMode(precision="int8").check()


def test_reduced_precision_warns_for_metrics_whose_results_it_breaks(cli, tmp_path):
    """MSE sets flip under bf16 (measured): subexplanations says so; insertion does not."""
    res = cli("run", "--model", "test_resnet", "--random-init", "--metric", "subexplanations", "--limit", "1",
              "-o", "metric.count=false", "-o", "metric.max_roots=1", "-o", "metric.max_depth=2",
              "--precision", "bf16", "--batch-size", "16", "--quiet", "--out", tmp_path / "mse")
    assert res.exit_code == 0, res.stderr
    assert "--precision bf16 with subexplanations: minimal sufficient explanations" in res.stderr
    res = cli(*RUN, "--out", tmp_path / "ins", "--precision", "bf16", "--batch-size", "4")
    assert res.exit_code == 0 and "with insertion" not in res.stderr


def test_a_calibration_made_on_a_busy_machine_is_repeated_when_it_is_quiet(monkeypatch, tmp_path):
    """A loaded machine favours small batches (measured: Lite0 chose 8 at load 6 on 2 cores, where 32 is
    16% faster idle); such a cached size is measured again once the load per core is low."""
    from conftest import wrap_module

    model = wrap_module(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)), size=8)
    model.module(torch.zeros(1, 3, 8, 8))
    results = iter([{1: 3.0, 2: 1.0, 4: 1.5}, {1: 3.0, 2: 1.5, 4: 1.0}, {1: 1.0, 2: 3.0, 4: 3.0}])
    monkeypatch.setattr(execution, "calibrate_cpu", lambda m: next(results))
    cores = os.cpu_count() or 1
    monkeypatch.setattr(execution.os, "getloadavg", lambda: (3.0 * cores, 0.0, 0.0))  # busy
    assert auto_batch_size(model, tmp_path) == 2
    assert auto_batch_size(model, tmp_path) == 2  # still busy: the provisional size is used
    monkeypatch.setattr(execution.os, "getloadavg", lambda: (0.1 * cores, 0.0, 0.0))  # quiet now
    assert auto_batch_size(model, tmp_path) == 4  # measured again
    assert auto_batch_size(model, tmp_path) == 4  # a quiet calibration is kept (the third result is never asked for)
