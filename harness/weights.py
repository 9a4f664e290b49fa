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
            text = _one_line(exc)
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            if found is None:
                raise HarnessError(f"cannot read {path} as a torch weights file: {text[:200]}") from None
            raise HarnessError(
                f"{path} is not a weights-only torch file: it pickles {found[1]}; "
                "save the state dict alone, or convert it to .safetensors"
            ) from None
        except Exception as exc:
            raise HarnessError(f"cannot read {path} as a torch weights file: {_one_line(exc)[:200]}") from None
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


def _one_line(exc: BaseException) -> str:
    """The exception text on one line, without terminal escape codes."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())
