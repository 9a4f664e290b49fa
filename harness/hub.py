"""timm models with hub weights: the local cache first, a fast reachability check, a clear error."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
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


def host_reachable(url: str, timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (never with HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Whether the Hugging Face endpoint is reachable within ``timeout`` seconds."""
    import huggingface_hub.constants as hf_constants

    return host_reachable(hf_constants.ENDPOINT or "https://huggingface.co", timeout)


def _unavailable(name: str, where: str) -> HarnessError:
    return HarnessError(
        f"pretrained weights for {name!r} are not in the local cache and {where} is unreachable: run once "
        "with network access, pass --weights FILE (.safetensors or a weights-only torch file), or use --random-init"
    )


def create_timm_model(name: str, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model`` that fails within seconds, with instructions, when weights are out of reach.

    Weights on the Hugging Face hub are looked up in the local cache first (hub offline); weights
    hosted at a plain URL count as cached when torch.hub's checkpoint folder has the file. Only if
    they are missing is the host probed (3 s) before timm downloads them.
    """
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    direct = name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
    cfg = None if direct else _pretrained_cfg(name)
    if cfg is None and not direct:
        raise HarnessError(f"timm has no pretrained weights for {name!r}; pass --weights FILE or --random-init")
    if cfg is not None and not getattr(cfg, "hf_hub_id", None) and getattr(cfg, "url", None):
        cached = Path(torch.hub.get_dir(), "checkpoints", Path(urlparse(cfg.url).path).name)
        if not cached.is_file() and not host_reachable(cfg.url):
            raise _unavailable(name, urlparse(cfg.url).hostname or cfg.url)
        return timm.create_model(name, pretrained=True, **kwargs)
    try:
        with hub_offline():
            return timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as exc:
        cache_error: Exception | None = exc
    except (OSError, ValueError) as exc:
        cache_error = exc
    if not hub_reachable():
        raise _unavailable(name, "the Hugging Face hub") from None
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:
        raise HarnessError(f"could not download weights for {name!r}: {' '.join(str(exc).split())[:300]}") from cache_error


def _pretrained_cfg(name: str) -> Any:
    """timm's pretrained config for ``name`` (``arch`` = its default tag), or None when it has none."""
    import timm

    try:
        arch, _, tag = name.partition(".")
        tags = timm.list_pretrained(f"{arch}.*")
        if not tags or (tag and name not in tags):
            return None
        return timm.models.get_pretrained_cfg(name if tag else tags[0])
    except Exception:
        return None
