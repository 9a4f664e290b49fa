"""Shared fixtures: an in-process CLI, offline hub, and wrapping hand-built modules as models."""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

# OpenMP threads must wait passively (set before torch loads): spinning waiters cost up to 60x on a
# busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# No test may touch the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HARNESS_MALLOC_TUNING", "0")
# Cached attributions go to a fresh folder per test session, never the user's cache.
os.environ["HARNESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="harness-test-cache-")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """Run ``harness ARGS`` in this process, as the console script would (errors -> one line + exit code)."""
    from harness.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    """``cli("run", "--model", ...)`` -> CliResult(exit_code, stdout, stderr)."""
    return run_cli


@pytest.fixture
def fresh_registry():
    """Rebuild the plugin registry before and after a test (for tests that change plugins or env)."""
    from harness.registry import get_registry

    get_registry.cache_clear()
    yield
    get_registry.cache_clear()


def wrap_module(module: torch.nn.Module, size: int = 32, batch_size: int = 16, model_id: str = "constructed"):
    """A LoadedModel around a hand-built module taking (B, 3, size, size) inputs (mean 0, std 1)."""
    from harness.components import ModelSpec
    from harness.model import LoadedModel

    module.eval()
    return LoadedModel(
        id=model_id,
        spec=ModelSpec(id=model_id, build=lambda pretrained: module),
        module=module,
        device=torch.device("cpu"),
        data_config={"input_size": (3, size, size), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
                     "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"},
        weights="constructed",
        weights_sha256=None,
        random_init=False,
        batch_size=batch_size,
    )


@pytest.fixture
def skimage_photo():
    """Path of one of scikit-image's bundled photos: skimage_photo('chelsea.png')."""
    import skimage.data

    root = Path(skimage.data.__file__).parent
    return lambda name: root / name


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """``modules(name, source)`` writes a uniquely named module on sys.path and returns its import name
    (for plugin tests that need real importable modules)."""
    import sys
    import textwrap
    import uuid

    folder = tmp_path / "plugin_modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    token = uuid.uuid4().hex[:8]
    made: list[str] = []

    def make(name: str, source: str) -> str:
        module = f"hp_{token}_{name}"
        (folder / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        made.append(module)
        return module

    yield make
    for module in made:
        sys.modules.pop(module, None)
