"""What the bridges share: install errors, fills as baselines, channel reductions, feature masks and
per-image seeding. Imports none of the bridged libraries."""

from __future__ import annotations

import contextlib
import importlib
import io
import random
import warnings
from types import ModuleType
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from harness.errors import HarnessError
from harness.model import LoadedModel

FillName = Literal["black", "mean", "blur", "noise"]
"""A baseline, computed by the harness fill of that name (plugins/maskers/fills.py, default options)."""

Reduce = Literal["sum", "mean", "abs_sum", "abs_max", "l2"]
"""How a (B, C, H, W) attribution becomes a (B, H, W) map."""

FEATURES_PATTERN = r"^(pixel|patch:[1-9]\d*|grid:[1-9]\d*|slic:[1-9]\d*)$"
"""Feature masks of perturbation methods: pixel, patch:P (P x P squares), grid:G (G x G equal hard
cells), slic:N (about N SLIC superpixels per image); every feature spans the colour channels."""


class MissingLibrary(ImportError):
    """A bridge's library cannot be imported; the message names the install command."""

    def __init__(self, library: str, extra: str, detail: str = ""):
        self.library, self.extra = library, extra
        self.install = f'pip install "harness[{extra}]"'
        reason = "is not installed" if not detail else f"cannot be imported ({detail})"
        super().__init__(f"{library} {reason}; install it with: {self.install}")


def _installed(module: str) -> bool:
    """Whether ``module``'s top-level package can be found, without importing it."""
    import importlib.util
    import sys

    top = module.split(".")[0]
    if top in sys.modules:
        return sys.modules[top] is not None
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


class LazyModule(ModuleType):
    """A bridged library module imported on first use (importing pytorch-grad-cam, Captum and zennit
    costs seconds of every ``harness`` command's start-up, and every rank's in a distributed run)."""

    def __init__(self, module: str, library: str, extra: str):
        super().__init__(module)
        self._target = (module, library, extra)
        self._loaded: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._loaded is None:
            module, library, extra = self._target
            try:
                self._loaded = importlib.import_module(module)
            except Exception as exc:  # installed but broken (a failing import, a missing dependency): one line
                missing = getattr(exc, "name", None)
                detail = "" if missing == module.split(".")[0] else " ".join(str(exc).split())
                raise HarnessError(str(MissingLibrary(library, extra, detail or type(exc).__name__))) from None
        return self._loaded

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(self._load(), name)


def require(module: str, library: str, extra: str) -> ModuleType:
    """``module``, imported on first use; :class:`MissingLibrary` (naming ``pip install "harness[extra]"``)
    right away when its package is not installed (the plugin is listed as skipped). A package that is
    installed but fails to import is found on first use: a one-line :class:`HarnessError` naming the
    reason and the install command (``harness plugins`` lists its attributors until then)."""
    if not _installed(module):
        raise MissingLibrary(library, extra)
    return LazyModule(module, library, extra)


# -- baselines -------------------------------------------------------------------------------------------
def fill_baseline(model: LoadedModel, inputs: torch.Tensor, seeds: Sequence[int], fill: str) -> torch.Tensor:
    """The baseline image of each input, in normalised space, from the harness fill ``fill``."""
    from harness_plugins.maskers.fills import BlackFill, BlurFill, MeanFill, NoiseFill

    masker = {"black": BlackFill, "mean": MeanFill, "blur": BlurFill, "noise": NoiseFill}[fill]()
    return masker.baseline(model, inputs, seeds).to(inputs.dtype)


def derived_seed(seed: int, k: int) -> int:
    """The k-th seed drawn from a sample's seed (k = 0 is the seed itself)."""
    return int(seed) if k == 0 else (int(seed) * 1_000_003 + k) % (2**63)


def baseline_distribution(
    model: LoadedModel, image: torch.Tensor, seed: int, fills: Sequence[str], noise_draws: int
) -> torch.Tensor:
    """(K, C, H, W) baselines of one image (1, C, H, W): one per deterministic fill listed, and
    ``noise_draws`` noise images (seeds derived from the sample's) when ``noise`` is listed."""
    parts = []
    for fill in dict.fromkeys(fills):
        if fill == "noise":
            seeds = [derived_seed(seed, k) for k in range(noise_draws)]
            parts.append(fill_baseline(model, image.expand(noise_draws, *image.shape[1:]), seeds, "noise"))
        else:
            parts.append(fill_baseline(model, image, [seed], fill))
    if not parts or sum(len(p) for p in parts) == 0:
        raise HarnessError("the baseline distribution is empty: list at least one fill (noise needs noise_draws >= 1)")
    return torch.cat(parts)


# -- maps ------------------------------------------------------------------------------------------------
def reduce_channels(attribution: torch.Tensor, how: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): signed sum or mean, sum of magnitudes, max magnitude, or L2 norm."""
    attribution = attribution.detach()
    if attribution.dim() == 3:
        return attribution
    if how == "sum":
        return attribution.sum(1)
    if how == "mean":
        return attribution.mean(1)
    if how == "abs_sum":
        return attribution.abs().sum(1)
    if how == "abs_max":
        return attribution.abs().amax(1)
    if how == "l2":
        return attribution.norm(dim=1)
    raise ValueError(f"unknown reduction {how!r}")


def feature_mask(spec: str, model: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    """Integer feature ids, (1, 1, H, W) shared or (B, 1, H, W) per image for ``slic:N``."""
    height, width = inputs.shape[-2:]
    kind, _, size_text = spec.partition(":")
    size = int(size_text or 1)
    rows, cols = torch.arange(height, device=inputs.device), torch.arange(width, device=inputs.device)
    if kind == "pixel":
        ids = rows[:, None] * width + cols[None, :]
    elif kind == "patch":
        if size > min(height, width):
            raise HarnessError(f"features {spec!r}: a patch of {size} is larger than the {height}x{width} input")
        ids = (rows[:, None] // size) * (-(-width // size)) + cols[None, :] // size
    elif kind == "grid":
        if size > min(height, width):
            raise HarnessError(f"features {spec!r}: {size} cells do not fit the {height}x{width} input")
        ids = (rows[:, None] * size // height) * size + cols[None, :] * size // width
    elif kind == "slic":
        return slic_mask(model, inputs, size)
    else:
        raise HarnessError(f"features {spec!r}: use pixel, patch:P, grid:G or slic:N")
    return ids.view(1, 1, height, width)


def slic_mask(model: LoadedModel, inputs: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(B, 1, H, W) SLIC superpixel ids (scikit-image, compactness 10) of each image's pixels."""
    from skimage.segmentation import slic

    pixels = model.denormalise(inputs.detach()).clamp(0, 1).permute(0, 2, 3, 1).cpu().double().numpy()
    masks = [slic(image, n_segments=n_segments, start_label=0, channel_axis=-1) for image in pixels]
    return torch.from_numpy(np.stack(masks)).long().unsqueeze(1).to(inputs.device)


# -- running the libraries -----------------------------------------------------------------------------
@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch (CPU and ``device``), numpy and ``random`` with ``seed``; restore their states after."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % 2**63)
        np.random.seed(int(seed) % 2**32)
        random.seed(int(seed))
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


@contextlib.contextmanager
def quiet(*messages: str) -> Iterator[None]:
    """Silence a library's progress bars and prints (stdout, stderr) and the warnings matching ``messages``."""
    with warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=message)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


@contextlib.contextmanager
def parameters_requiring_grad(module: torch.nn.Module, requires_grad: bool) -> Iterator[None]:
    """Set ``requires_grad`` of every parameter during a library call; flags and ``.grad`` restored
    after, so a library calling ``backward()`` leaves no trace. Off (as harness loads models): the
    input carries the graph; on: for library code that needs the parameters in the graph (it builds
    new tensors from the input, or differentiates gradients again)."""
    saved = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    for p, _, _ in saved:
        p.requires_grad_(requires_grad)
    try:
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def rows_per_call(model: LoadedModel, images: int) -> int:
    """Perturbed copies per image in one forward pass so that a pass has about ``model.batch_size`` rows."""
    return max(1, model.batch_size // max(1, images))


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__
