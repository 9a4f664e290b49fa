"""How a run's models execute: precision, memory format, ``torch.compile``, and ``--batch-size auto``.

Execution modes (``harness run --precision/--memory-format/--compile``):

* **memory format** ``auto`` (default) puts CNNs in ``channels_last`` (models with more ``Conv2d``
  than ``Linear`` layers: ResNets, EfficientNets, VGG, MobileNets) and leaves ViTs, Swin, ConvNeXt
  and other token/MLP-block models ``contiguous``. It changes float rounding only: logits stay within 1e-5
  relative of the contiguous fp32 run (tested), input gradients within rel L2 1e-3.
* **precision** ``bf16``/``fp16`` runs forward-only work (perturbation sweeps, searches, counting,
  CKA and other hooked features: everything under ``torch.inference_mode``/``no_grad``) in
  ``torch.autocast``; outputs are cast back to float32. Forward passes that build a graph
  (gradients) and every attributor call stay fp32, because reduced-precision input gradients are not
  faithful (bf16: cosine 0.81 to fp32); ``reduced_precision_gradients`` lifts that, on request. Reduced
  precision changes numbers, so it is part of the run id and recorded in the result.
* **compile** wraps the module with ``torch.compile`` (in place: module names and hooks keep working).
* **fold batch norm** (default on) keeps a second copy of a CNN with every eval-mode BatchNorm2d merged
  into the convolution before it (:mod:`harness.folding`), run by plain forward and input-gradient
  passes (sweeps, searches, gradient attributors) whenever nothing could tell the difference: no hook
  on the model, weights unchanged since loading. Float rounding only (logits within 1e-4 relative of
  the unfolded run, checked on load; input gradients rel L2 ~3e-4 on efficientnet_lite0); 1.27-1.36x
  faster forward passes on the CPU measured. Not combined with ``compile``.

``--batch-size auto`` (the default) picks the forward-pass size: on a CPU the size that is fastest
per image for the model, from a short calibration (uncompiled) cached per model, input size, device,
threads, precision, memory format and torch version; on CUDA the largest size (up to
:data:`CUDA_MAX`) whose forward+backward fits in memory, halving from the top on out-of-memory
errors. Metric steps stay at :data:`AUTO_METRIC_IMAGES` images, so ``auto`` changes no number
beyond float rounding (CKA's minibatch among them).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.folding import FoldedModule

PRECISIONS = ("fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

COMPILE_BACKEND = "inductor"
"""The ``torch.compile`` backend of ``--compile`` (tests use ``"eager"`` to skip code generation)."""

@dataclass(frozen=True)
class ExecutionMode:
    """How to execute a run's models (``harness run`` options of the same names)."""

    precision: str = "fp32"
    memory_format: str = "auto"
    compile: bool = False
    reduced_precision_gradients: bool = False
    fold_batchnorm: bool = True

    def check(self) -> None:
        """One-line errors for values outside the choices."""
        if self.precision not in PRECISIONS:
            raise HarnessError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise HarnessError(f"--memory-format must be one of {', '.join(MEMORY_FORMATS)}, got {self.memory_format!r}")
        if self.reduced_precision_gradients and not self.reduced:
            raise HarnessError("--reduced-precision-gradients needs --precision bf16 or fp16")

    @property
    def reduced(self) -> bool:
        """Whether forward-only work runs in reduced precision."""
        return self.precision != "fp32"

    def identity(self) -> dict[str, Any] | None:
        """What of the mode changes numbers (part of the run id): reduced precision and where it
        applies; None for fp32 (memory format, compile and batch size change rounding only)."""
        if not self.reduced:
            return None
        return {"precision": self.precision, "gradients": self.precision if self.reduced_precision_gradients else "fp32"}

    def record(self) -> dict[str, Any]:
        """The mode as requested (``provenance.run_config.execution``)."""
        return asdict(self)

    @classmethod
    def from_record(cls, data: Mapping[str, Any] | None) -> "ExecutionMode":
        """The mode a result recorded (fp32/auto defaults for results written before modes existed)."""
        if not data:
            return cls()
        keys = ("precision", "memory_format", "compile", "reduced_precision_gradients", "fold_batchnorm")
        return cls(**{k: data[k] for k in keys if k in data})


@dataclass(frozen=True)
class AppliedExecution:
    """What a loaded model runs with (``memory_format`` resolved from ``auto``)."""

    precision: str = "fp32"
    memory_format: str = "contiguous"
    compile: bool = False
    reduced_precision_gradients: bool = False
    folded_batchnorm: int = 0
    """Batch-norm layers merged into convolutions in the model's folded copy (0: no copy)."""


# -- memory format -------------------------------------------------------------------------------------
def is_cnn(module: torch.nn.Module) -> bool:
    """Whether the module has more Conv2d than Linear layers (ResNets, EfficientNets, VGG, MobileNets;
    not ViTs, Swin or ConvNeXt, whose blocks are mostly Linear layers)."""
    conv = sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    linear = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    return conv > linear


def resolve_memory_format(requested: str, module: torch.nn.Module) -> str:
    """``auto`` -> ``channels_last`` for CNNs (:func:`is_cnn`), else ``contiguous``."""
    if requested != "auto":
        return requested
    return "channels_last" if is_cnn(module) else "contiguous"


# -- precision ---------------------------------------------------------------------------------------------
_full_precision_depth = 0


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Inside this block, models loaded with reduced precision run in fp32 (attributors use it)."""
    global _full_precision_depth
    _full_precision_depth += 1
    try:
        yield
    finally:
        _full_precision_depth -= 1


def _as_float(value: Any) -> Any:
    """Floating tensors (also inside tuples, lists, dicts) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_as_float(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_float(v) for k, v in value.items()}
    return value


def install_autocast(module: torch.nn.Module, device_type: str, precision: str, gradients: bool = False) -> None:
    """Run ``module``'s forward in ``torch.autocast(precision)`` when no graph is built (inference
    mode / no_grad), or always with ``gradients``; never inside :func:`full_precision`. Outputs are float32."""
    original = module.forward
    dtype = DTYPES[precision]

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if _full_precision_depth or (torch.is_grad_enabled() and not gradients):
            with torch.autocast(device_type, enabled=False):
                return original(*args, **kwargs)
        with torch.autocast(device_type, dtype=dtype):
            out = original(*args, **kwargs)
        return _as_float(out)

    module.forward = forward


def native_reduced_precision(precision: str, device: torch.device) -> bool:
    """Whether the device computes ``precision`` natively (on a CPU without AVX-512 BF16/FP16 support
    oneDNN emulates it, and a forward pass is 10-20x slower than fp32)."""
    if precision == "fp32" or device.type != "cpu":
        return True
    try:
        check = torch.ops.mkldnn._is_mkldnn_bf16_supported if precision == "bf16" else torch.ops.mkldnn._is_mkldnn_fp16_supported
        return bool(check())
    except (AttributeError, RuntimeError):
        return True


class FullPrecisionAttributor:
    """Wraps an attributor so that its calls run the models in fp32 (reduced-precision runs)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.id, self.version, self.options = inner.id, inner.version, inner.options
        if hasattr(inner, "coarse"):
            self.coarse = self._guarded(inner.coarse)

    @staticmethod
    def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with full_precision():
                return method(*args, **kwargs)

        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def attribute(self, *args: Any, **kwargs: Any) -> Any:
        """The inner attributor's map, computed in fp32."""
        with full_precision():
            return self.inner.attribute(*args, **kwargs)


# -- applying a mode ------------------------------------------------------------------------------------------
def apply_execution(module: torch.nn.Module, mode: ExecutionMode, device: torch.device,
                    input_size: tuple[int, ...] | None = None) -> tuple[AppliedExecution, "FoldedModule | None"]:
    """Put ``module`` (on ``device``, eval, frozen) in ``mode``: memory format, batch-norm folding (a
    checked copy, made on an input of ``input_size``), autocast, compile."""
    from harness.folding import fold_batchnorm

    mode.check()
    memory_format = resolve_memory_format(mode.memory_format, module)
    if memory_format == "channels_last":
        module.to(memory_format=torch.channels_last)
    folded = None
    if mode.fold_batchnorm and not mode.compile and input_size is not None:
        generator = torch.Generator().manual_seed(0)
        example = torch.randn((2, *input_size), generator=generator).to(device)
        if memory_format == "channels_last":
            example = example.contiguous(memory_format=torch.channels_last)
        folded = fold_batchnorm(module, example)
    if mode.reduced:
        install_autocast(module, device.type, mode.precision, mode.reduced_precision_gradients)
        if folded is not None:
            install_autocast(folded.module, device.type, mode.precision, mode.reduced_precision_gradients)
            from harness.folding import module_state

            folded.state = module_state(module)  # the autocast wrapper is part of the state the copy serves
    if mode.compile:
        module.compile(backend=COMPILE_BACKEND)
    applied = AppliedExecution(mode.precision, memory_format, mode.compile, mode.reduced_precision_gradients,
                               folded.folded if folded is not None else 0)
    return applied, folded


# -- batch size ---------------------------------------------------------------------------------------------
AUTO = "auto"
AUTO_METRIC_IMAGES = 32
"""Images per metric step under ``--batch-size auto`` (CKA's minibatch): fixed, so that auto never
changes a number; only the forward-pass size is calibrated."""
CPU_SIZES = (1, 2, 4, 8, 16, 32)
"""Forward-pass sizes tried on a CPU (per-image time is flat beyond 8-16 on the machines measured)."""
CPU_TIE = 0.05
"""Sizes within this fraction of the fastest per-image time count as equally fast; the smallest wins."""
CPU_BUDGET_S = 15.0
"""A calibration runs no further round once it has spent this long (at least one round runs)."""
CUDA_MAX = 256
"""The largest forward-pass size tried on a GPU."""
CALIBRATION_VERSION = 3
"""Part of the cache key: a changed calibration procedure measures again (3: the module that runs,
batch-norm-folded where the mode folds, is what is timed)."""
BUSY_PER_CORE = 1.0
"""A calibration made while the 1-minute load average per core was above this is provisional: it is
measured again once the machine is quiet (:data:`QUIET_PER_CORE`); a busy machine favours small sizes."""
QUIET_PER_CORE = 0.75


def parse_batch_size(value: Any) -> int | str:
    """``auto`` or a positive integer (from the command line or a RunConfig)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        size = int(value)
        if isinstance(value, float) or str(size) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise HarnessError(f"--batch-size must be auto or a whole number of at least 1, got {value!r}") from None
    if size < 1:
        raise HarnessError(f"--batch-size must be at least 1, got {size}")
    return size


def metric_batch_size(batch_size: int | str) -> int:
    """Images per metric step: the integer itself, or :data:`AUTO_METRIC_IMAGES` for ``auto``."""
    return AUTO_METRIC_IMAGES if batch_size == AUTO else int(batch_size)


def fastest_size(per_image_s: Mapping[int, float], tie: float = CPU_TIE) -> int:
    """The smallest size whose per-image time is within ``tie`` of the fastest."""
    best = min(per_image_s.values())
    return min(size for size, t in per_image_s.items() if t <= best * (1 + tie))


def calibrate(
    run: Callable[[int], None],
    sizes: tuple[int, ...] = CPU_SIZES,
    clock: Callable[[], float] = time.perf_counter,
    budget_s: float = CPU_BUDGET_S,
    rounds: int = 3,
) -> dict[int, float]:
    """Seconds per image of ``run(size)``: one warm-up pass per size (sizes whose warm-up took over
    2 s end the list), then ``rounds`` rounds over all sizes, each size keeping its best pass, so a
    load spike on a shared machine hits every size alike. Rounds stop early after ``budget_s``."""
    started, tried = clock(), []
    for size in sizes:
        t = clock()
        run(size)  # warm-up: kernels chosen and memory grown for this shape
        tried.append(size)
        if clock() - t > 2.0:
            break
    best = {size: float("inf") for size in tried}
    for _ in range(rounds):
        for size in tried:
            t = clock()
            run(size)
            best[size] = min(best[size], clock() - t)
        if clock() - started > budget_s:
            break
    return {size: seconds / size for size, seconds in best.items()}


def largest_fitting(run: Callable[[int], None], start: int = CUDA_MAX) -> int:
    """The largest size from ``start`` down (halving) for which ``run(size)`` does not run out of memory."""
    from harness.batching import is_out_of_memory

    size = max(1, int(start))
    while True:
        try:
            run(size)
            return size
        except Exception as exc:
            if not is_out_of_memory(exc) or size == 1:
                raise
            size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def calibration_key(model: Any, device: torch.device, threads: int) -> str:
    """What a calibration holds for: model id, input size, device, threads, precision, memory format, torch."""
    applied = getattr(model, "execution", None) or AppliedExecution()
    c, h, w = model.input_size
    return (f"{model.id}|{c}x{h}x{w}|{device}|threads={threads}|{applied.precision}|{applied.memory_format}"
            f"|torch={torch.__version__}|calibration={CALIBRATION_VERSION}")


@dataclass
class CalibrationCache:
    """Calibrated batch sizes in one JSON file (``<cache dir>/calibration/batch_size.json``)."""

    path: Path

    @classmethod
    def under(cls, cache_dir: Path) -> "CalibrationCache":
        return cls(Path(cache_dir) / "calibration" / "batch_size.json")

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> int | None:
        """The cached size for ``key`` (None if missing or damaged)."""
        entry = self.read().get(key)
        size = entry.get("batch_size") if isinstance(entry, dict) else None
        return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None

    def provisional(self, key: str) -> bool:
        """Whether ``key``'s size was measured on a busy machine (load per core above :data:`BUSY_PER_CORE`)."""
        entry = self.read().get(key)
        load, cores = (entry.get("load_average_1min"), entry.get("cpu_count")) if isinstance(entry, dict) else (None, None)
        if not isinstance(load, (int, float)) or isinstance(load, bool):
            return False
        per_core = load / cores if isinstance(cores, int) and not isinstance(cores, bool) and cores >= 1 else load / (os.cpu_count() or 1)
        return per_core > BUSY_PER_CORE

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Store ``entry`` under ``key`` (atomic rename; an unwritable folder only loses the cache)."""
        data = self.read()
        data[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass


def _eager(module: torch.nn.Module) -> Callable[..., Any]:
    """The module's call without ``torch.compile`` (calibrating a compiled module would compile
    every probed size); hooks and the autocast wrapper still apply."""
    return module._call_impl if getattr(module, "_compiled_call_impl", None) is not None else module


def _probe_input(model: Any, rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((rows, *model.input_size), generator=generator).to(model.device)


def calibrate_cpu(model: Any) -> dict[int, float]:
    """Per-image seconds of the model's forward pass (inference mode) at the :data:`CPU_SIZES`, of the
    module plain passes run (the batch-norm-folded copy where there is one)."""
    module = model.forward_module() if callable(getattr(model, "forward_module", None)) else model.module
    x, forward = _probe_input(model, max(CPU_SIZES)), _eager(module)

    def run(size: int) -> None:
        with torch.inference_mode():
            forward(x[:size])

    return calibrate(run)


def probe_cuda(model: Any, start: int = CUDA_MAX) -> int:
    """The largest size up to ``start`` whose forward+backward (input gradients) fits in GPU memory."""
    forward = _eager(model.module)

    def run(size: int) -> None:
        x = torch.zeros((size, *model.input_size), device=model.device, requires_grad=True)
        with torch.enable_grad():
            forward(x).float().sum().backward()
        del x
        torch.cuda.synchronize(model.device)

    try:
        return largest_fitting(run, start)
    finally:
        torch.cuda.empty_cache()


def _load_per_core() -> float:
    """The 1-minute load average per core now (0 where the platform does not report it)."""
    if not hasattr(os, "getloadavg"):
        return 0.0
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def auto_batch_size(model: Any, cache_dir: Path | None) -> int:
    """The forward-pass size for ``model`` on its device (CPU: cached calibration; CUDA: memory probe)."""
    if model.device.type == "cuda":
        return probe_cuda(model)
    if model.device.type != "cpu":
        return AUTO_METRIC_IMAGES  # other accelerators: the former default
    cache = CalibrationCache.under(cache_dir) if cache_dir is not None else None
    key = calibration_key(model, model.device, torch.get_num_threads())
    cached = cache.get(key) if cache is not None else None
    if cached is not None and not (cache is not None and cache.provisional(key) and _load_per_core() < QUIET_PER_CORE):
        return cached
    per_image = calibrate_cpu(model)
    size = fastest_size(per_image)
    if cache is not None:
        cache.put(key, {"batch_size": size, "ms_per_image": {str(k): round(v * 1000, 3) for k, v in per_image.items()},
                        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                        "cpu_count": os.cpu_count()})
    return size
