"""The result-file schema, atomic writes, and the per-sample records file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.errors import HarnessError

SCHEMA_VERSION = 1


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()


class _Open(BaseModel):
    """Required keys are checked; extra keys are kept (newer writers may add some)."""

    model_config = ConfigDict(extra="allow")


class ModelEntry(_Open):
    id: str
    source: str
    weights: str
    weights_sha256: str | None
    random_init: bool


class MetricEntry(_Open):
    id: str
    version: str
    higher_is_better: bool | None
    options: dict[str, Any]


class ComponentEntry(_Open):
    id: str
    version: str
    options: dict[str, Any]


class DatasetEntry(_Open):
    id: str
    n_samples: int
    sample_ids_sha256: str


class Provenance(_Open):
    harness: str
    plugins: dict[str, str | None]
    python: str
    torch: str
    timm: str
    device: str
    seed: int
    batch_size: int
    started_at: str
    duration_s: float
    argv: list[str]


class Result(_Open):
    """One run's result file: ``<out>/<run_id>.json``."""

    schema_version: int
    run_id: str
    models: list[ModelEntry]
    metric: MetricEntry
    attributor: ComponentEntry | None
    masker: ComponentEntry | None
    dataset: DatasetEntry
    value: float | None
    stderr: float | None
    values: dict[str, Any]
    artifacts: dict[str, str]
    provenance: Provenance
    status: Literal["ok", "error"]
    error: str | None = None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj: Any) -> Any:
    """NaN/inf -> None so files stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_result(result: Result, out_dir: Path) -> Path:
    """Write ``result`` atomically as ``<out_dir>/<run_id>.json``."""
    path = out_dir / f"{result.run_id}.json"
    atomic_write_text(path, json.dumps(_finite(result.model_dump(mode="json")), indent=2) + "\n")
    return path


def read_result(path: Path) -> Result:
    """Read and validate one result file; schema problems raise one line naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{path}: not JSON ({exc})") from None
    try:
        result = Result.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise HarnessError(f"{path}: schema error at {where}: {first['msg']}{more}") from None
    if result.schema_version != SCHEMA_VERSION:
        raise HarnessError(f"{path}: schema_version {result.schema_version} is not {SCHEMA_VERSION}")
    return result


def is_result_file(path: Path) -> bool:
    """Whether ``path`` looks like a result file (``*.json``, not a samples file or temp file)."""
    return path.suffix == ".json" and not path.name.startswith(".")


class SamplesFile:
    """``<out>/<run_id>.samples.jsonl``: one JSON line per sample, appended and fsynced per batch.

    A line cut short by a crash is dropped (and cut off the file) when the file is read for resuming.
    """

    def __init__(self, path: Path):
        self.path = path

    def read(self, repair: bool = False) -> list[dict[str, Any]]:
        """All complete records; with ``repair``, truncate a trailing partial line."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        records, good_end, pos = [], 0, 0
        for line in raw.splitlines(keepends=True):
            pos += len(line)
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end = pos
        if repair and good_end != len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
        return records

    def reset(self) -> None:
        """Start an empty file."""
        atomic_write_text(self.path, "")

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` in one write and fsync."""
        if not records:
            return
        data = "".join(json.dumps(_finite(r), separators=(",", ":")) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
