"""timm models with hub weights: the local cache first, a fast reachability check, a clear error."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Iterator
from urllib.parse import urlparse

import torch

from harness.errors import HarnessError

REACHABILITY_TIMEOUT_S = 3.0


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub answer from its local cache only, inside the block."""
    import huggingface_hub.constants as hf_constants

    before = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = before


def hub_reachable(timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    import huggingface_hub.constants as hf_constants

    url = urlparse(hf_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def create_timm_model(name: str, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model`` that fails within seconds, with instructions, when weights are out of reach."""
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        with hub_offline():
            return timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as exc:
        if "No pretrained weights exist" in str(exc):
            raise HarnessError(
                f"timm has no pretrained weights for {name!r}; pass --weights FILE or --random-init"
            ) from None
        cache_error: Exception | None = exc
    except (OSError, ValueError) as exc:
        cache_error = exc
    if not hub_reachable():
        raise HarnessError(
            f"pretrained weights for {name!r} are not in the local Hugging Face cache and the hub is "
            "unreachable: run once with network access, pass --weights FILE (.safetensors or a "
            "weights-only torch file), or use --random-init"
        ) from None
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise HarnessError(f"could not download weights for {name!r}: {' '.join(str(exc).split())[:300]}") from cache_error
