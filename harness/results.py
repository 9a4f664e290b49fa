"""The result-file schema, atomic writes, and the per-sample records file."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import HarnessError

SCHEMA_VERSION = 1
READABLE_SCHEMA_VERSIONS = (1,)
"""Versions ``read_result`` accepts (older files stay readable when the schema grows)."""

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,199}")
"""What the runner writes: ``<metric>-<models>-<hash>`` with every other character replaced by ``_``.

A run id is a plain file-name token: no ``/`` or ``\\``, no ``..``, no leading ``.``, no control
characters, at most 200 characters (so ``<run_id>.samples.rank<k>-of-<n>.jsonl`` fits a file name).
"""

VERIFICATION_SUFFIX = ".verification.json"
"""``harness verify`` writes ``<run_id>.verification.json`` beside the result file."""

MAX_JSON_DEPTH = 64
"""Result and verification files nest a few levels; anything deeper is rejected, not recursed into."""


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()


class _Open(BaseModel):
    """Required keys are checked; extra keys are kept (newer writers may add some)."""

    model_config = ConfigDict(extra="allow")


def is_safe_run_id(run_id: object) -> bool:
    """Whether ``run_id`` is a plain file-name token (see ``RUN_ID_PATTERN``)."""
    return isinstance(run_id, str) and RUN_ID_PATTERN.fullmatch(run_id) is not None and ".." not in run_id


def check_run_id(run_id: object) -> str:
    """``run_id`` if it is a plain file-name token, else one-line ``HarnessError``."""
    if not is_safe_run_id(run_id):
        raise HarnessError(f"run_id {run_id!r} is not a plain file name (letters, digits, _ . + -; no '..' or leading '.')")
    return run_id  # type: ignore[return-value]


def is_safe_relative_path(text: object) -> bool:
    """A relative POSIX path that stays inside its folder: no absolute path, ``..``, ``\\``, NUL or control characters."""
    if not isinstance(text, str) or not text or len(text) > 1000:
        return False
    if text.startswith("/") or "\\" in text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        return False
    if re.match(r"[A-Za-z]:", text):  # a Windows drive
        return False
    return all(part not in ("", ".", "..") for part in text.split("/"))


def sibling_path(result_path: Path, run_id: str, suffix: str) -> Path:
    """``<folder of result_path>/<run_id><suffix>``, after checking ``run_id`` is a plain file name."""
    return Path(result_path).with_name(check_run_id(run_id) + suffix)


def _not_negative(value: Any) -> Any:
    if value is not None and value < 0:  # NaN passes here: writers turn it into null
        raise ValueError("must not be negative")
    return value


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

    @field_validator("n_samples")
    @classmethod
    def _count(cls, value: int) -> int:
        return _not_negative(value)

    @model_validator(mode="after")
    def _optional_keys(self) -> "DatasetEntry":
        content = (self.model_extra or {}).get("samples_sha256")
        if content is not None and not isinstance(content, str):
            raise ValueError("samples_sha256 must be a string or null")
        return self


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

    @field_validator("duration_s")
    @classmethod
    def _duration(cls, value: float) -> float:
        return _not_negative(value)

    @model_validator(mode="after")
    def _optional_keys(self) -> "Provenance":
        precision = (self.model_extra or {}).get("precision")
        if precision is not None and not isinstance(precision, str):
            raise ValueError("precision must be a string or null")
        return self


class Result(_Open):
    """One run's result file: ``<out>/<run_id>.json``."""

    schema_version: int
    run_id: str
    models: list[ModelEntry] = Field(min_length=1)
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

    @field_validator("stderr")
    @classmethod
    def _stderr(cls, value: float | None) -> float | None:
        return _not_negative(value)

    @field_validator("run_id")
    @classmethod
    def _plain_run_id(cls, run_id: str) -> str:
        if not is_safe_run_id(run_id):
            raise ValueError("must be a plain file name: letters, digits, _ . + - (no '/', '\\', '..', leading '.')")
        return run_id

    @field_validator("artifacts")
    @classmethod
    def _relative_artifacts(cls, artifacts: dict[str, str]) -> dict[str, str]:
        for name, relative in artifacts.items():
            if not is_safe_relative_path(relative):
                raise ValueError(f"artifact {name!r}: {relative!r} is not a relative path inside the results folder")
        return artifacts

    @field_validator("values")
    @classmethod
    def _known_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        n = values.get("n_nonfinite")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError("n_nonfinite must be a non-negative integer")
        return values


class Verification(_Open):
    """``<run_id>.verification.json``, written by ``harness verify`` next to a result file."""

    run_id: str
    status: Literal["passed", "failed"]
    n_checked: int
    n_mismatched: int
    max_abs_diff: float | None
    same_versions: bool

    @field_validator("n_checked", "n_mismatched", "max_abs_diff")
    @classmethod
    def _counts(cls, value: Any) -> Any:
        return _not_negative(value)


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


def result_json(result: Result) -> str:
    """The text of a result file (strict JSON: NaN/inf become null)."""
    return json.dumps(_finite(result.model_dump(mode="json")), indent=2) + "\n"


def write_result(result: Result, out_dir: Path) -> Path:
    """Write ``result`` atomically as ``<out_dir>/<run_id>.json``."""
    path = Path(out_dir) / f"{check_run_id(result.run_id)}.json"
    atomic_write_text(path, result_json(result))
    return path


class _DuplicateKey(ValueError):
    pass


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _DuplicateKey(f"duplicate key {duplicate!r}")
    return data


def _depth_ok(data: Any) -> bool:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return False
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


def load_json(path: Path) -> Any:
    """Parse a JSON file strictly: no NaN/Infinity, no out-of-range numbers, no duplicate keys, at
    most ``MAX_JSON_DEPTH`` levels. Every failure (including deep nesting) is one ``HarnessError``."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text, parse_constant=_no_constants, parse_float=_finite_float, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{path}: not JSON ({exc})") from None
    except RecursionError:
        raise HarnessError(f"{path}: not JSON (nested too deeply)") from None
    except Exception as exc:  # NaN/Infinity, huge numbers, duplicate keys, anything else the parser raises
        raise HarnessError(f"{path}: not strict JSON ({exc})") from None
    if not _depth_ok(data):
        raise HarnessError(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _schema_error(path: Path, exc: ValidationError) -> HarnessError:
    """One line naming every wrong field (up to three)."""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return HarnessError(f"{path}: schema error at {'; '.join(parts)}{more}")


def validate_result_data(data: Any, path: Path | str = "result") -> Result:
    """Validate parsed JSON as a result: strict types (no numeric strings, no booleans as numbers)."""
    if isinstance(data, dict) and data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        version = data.get("schema_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise HarnessError(f"{path}: schema_version {version} is newer than this harness reads ({SCHEMA_VERSION}); upgrade harness")
        if "schema_version" in data:
            raise HarnessError(f"{path}: schema error at schema_version: {version!r} is not one of {list(READABLE_SCHEMA_VERSIONS)}")
    try:
        return Result.model_validate(data, strict=True)
    except ValidationError as exc:
        raise _schema_error(Path(path), exc) from None


def read_result(path: Path) -> Result:
    """Read and validate one result file; any problem raises one line naming the file (and the field)."""
    return validate_result_data(load_json(path), path)


def verification_path(result_path: Path, run_id: str) -> Path:
    """Where ``harness verify`` records its check of a result: ``<run_id>.verification.json`` beside it."""
    return sibling_path(result_path, run_id, VERIFICATION_SUFFIX)


def read_verification(path: Path, run_id: str | None = None) -> Verification:
    """Read a verification record strictly; ``run_id``, when given, must match the record's."""
    data = load_json(path)
    try:
        record = Verification.model_validate(data, strict=True)
    except ValidationError as exc:
        raise _schema_error(Path(path), exc) from None
    if run_id is not None and record.run_id != run_id:
        raise HarnessError(f"{path}: verification of run {record.run_id!r}, not {run_id!r}")
    return record


def is_result_file(path: Path) -> bool:
    """Whether ``path`` looks like a result file (``*.json``; not a samples, verification or temp file)."""
    return path.suffix == ".json" and not path.name.startswith(".") and not path.name.endswith(VERIFICATION_SUFFIX)


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
