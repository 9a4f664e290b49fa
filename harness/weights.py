"""Reading weight files safely and loading them with errors that say what differs."""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch

from harness.errors import HarnessError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch file loaded with ``weights_only=True``.

    A checkpoint that wraps its tensors (``{"state_dict": {...}}``, ``{"model": {...}}``) is
    unwrapped, and a DataParallel ``module.`` prefix is dropped. Training checkpoints that also pickle
    their ``argparse.Namespace`` arguments (timm's ``train.py``, e.g. the released FAN files) are
    accepted: ``Namespace`` is the one class allowed besides weights-only loading's tensors and containers.
    """
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise HarnessError(f"cannot read {path} as safetensors: {_one_line(exc)}") from None
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise HarnessError(_not_weights_only_message(path, exc)) from None
        except Exception as exc:
            raise HarnessError(f"cannot read {path} as a torch weights file: {_torch_reason(exc)}") from None
        tensors = _unwrap(obj, path)
    if any(k.startswith("module.") for k in tensors) and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    raise HarnessError(f"{path} holds no state dict (a mapping of names to tensors)")


def load_checked(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` strictly; on any difference raise one line naming keys and shapes.

    A checkpoint with no BatchNorm ``num_batches_tracked`` counter at all (saved by torch 0.4.0,
    e.g. the released ABN models) is not missing them: PyTorch fills them in when loading.
    """
    own = module.state_dict()
    counters = ".num_batches_tracked"
    no_counters = not any(k.endswith(counters) for k in state_dict)
    missing = [k for k in own if k not in state_dict and not (no_counters and k.endswith(counters))]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_first(shapes)}")
    if problems:
        raise HarnessError(f"weights {source} do not fit the model: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def state_dict_sha256(module: torch.nn.Module) -> str:
    """A digest of the module's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return digest.hexdigest()


def _first(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


# Where torch's weights-only unpickler names the object it refused, across torch versions:
# "Unsupported global: GLOBAL __main__.Net was not an allowed global by default" (2.4+),
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" (2.6+),
# "Unsupported class __main__.Net" (2.0-2.3), "... but got <class '__main__.Net'>" (NEWOBJ / BUILD).
_REFUSED_GLOBAL = (
    re.compile(r"\bGLOBAL\s+([A-Za-z_][\w.]*)"),
    re.compile(r"\bUnsupported class\s+([A-Za-z_][\w.]*)"),
    re.compile(r"\bbut got <class '([A-Za-z_][\w.]*)'>"),
)
# Sentences of torch's text that are advice, not a reason (never pass on "set weights_only=False").
_ADVICE = re.compile(r"weights_only|safe_globals|trust|documentation|file an issue|https?://|\(\d\)", re.IGNORECASE)
_WEIGHTS_ONLY_HINT = "save the state dict alone, or convert it to .safetensors"


def refused_global(message: str) -> str | None:
    """The ``module.name`` a weights-only load refused, read from torch's error text (None if not named)."""
    for pattern in _REFUSED_GLOBAL:
        found = pattern.search(message)
        if found:
            name = found[1].rstrip(".")
            return name if "." in name else f"builtins.{name}"  # torch drops the "builtins." it read
    return None


def _torch_reason(exc: BaseException, fallback: str | None = None, limit: int = 200) -> str:
    """torch's error text on one line without its advice sentences (e.g. to set ``weights_only=False``).

    ``fallback`` (default: the exception's type name) stands in when nothing but advice is left.
    """
    raw = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).replace("WeightsUnpickler error:", "\n")
    sentences = (" ".join(part.split()) for part in re.split(r"\n+|(?<=[.:;])\s+", raw))
    kept = " ".join(s for s in sentences if s and not _ADVICE.search(s) and s != "Weights only load failed.")
    kept = kept.strip() or fallback or type(exc).__name__
    return kept if len(kept) <= limit else kept[: limit - 3].rstrip() + "..."


def _not_weights_only_message(path: Path, exc: BaseException) -> str:
    """The one documented line for a pickle that weights-only loading refused (nothing of it has run)."""
    name = refused_global(_one_line(exc))
    if name is not None:
        return f"{path} is not a weights-only torch file: it pickles {name}; {_WEIGHTS_ONLY_HINT}"
    reason = _torch_reason(exc, fallback="it holds objects that weights-only loading refuses")
    return f"{path} is not a weights-only torch file: {reason}; {_WEIGHTS_ONLY_HINT}"


def _one_line(exc: BaseException) -> str:
    """The exception text on one line, without terminal escape codes."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())
