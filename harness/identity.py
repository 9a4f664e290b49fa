"""Content identity: the sha256 of weights files and sample images, hashed once and cached.

A run's id covers what determines its numbers: the bytes of its weights files (not their path) and
the bytes of every sample. Digests are kept in ``<cache dir>/content-digests.json`` keyed by
(absolute path, size, mtime_ns), so a big folder is read in full only once; a damaged or unreadable
cache file is ignored (everything is hashed again) and failing to save it is not an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

CACHE_NAME = "content-digests.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    """A file's sha256 and the (size, mtime_ns) it had when it was hashed."""

    path: str
    size: int
    mtime_ns: int
    sha256: str

    def unchanged(self) -> bool:
        """Whether the file still has the size and modification time it had when hashed."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)


def _hash_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """sha256 of files, remembered by (absolute path, size, mtime_ns) in one JSON file."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, list[Any]] = {}
        self._dirty = False
        if path is not None:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    self._entries = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 3}
            except (OSError, ValueError):
                self._entries = {}

    def digest(self, path: str | Path) -> FileDigest:
        """The file's digest (from the cache when its size and mtime are unchanged); OSError if unreadable."""
        absolute = os.path.abspath(os.fspath(path))
        st = os.stat(absolute)
        cached = self._entries.get(absolute)
        if cached is not None and cached[0] == st.st_size and cached[1] == st.st_mtime_ns and isinstance(cached[2], str):
            return FileDigest(absolute, st.st_size, st.st_mtime_ns, cached[2])
        sha = _hash_file(absolute)
        after = os.stat(absolute)
        if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
            self._entries[absolute] = [st.st_size, st.st_mtime_ns, sha]
            self._dirty = True
        return FileDigest(absolute, after.st_size, after.st_mtime_ns, sha)

    def save(self) -> None:
        """Write the cache atomically if anything was added (errors are ignored: it is only a cache)."""
        if self.path is None or not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(self._entries, handle, separators=(",", ":"))
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._dirty = False
        except OSError:
            pass


def digest_cache(cache_dir: Path | None) -> DigestCache:
    """The digest cache in ``cache_dir`` (default: the attribution cache folder)."""
    from harness.cache import default_cache_dir

    return DigestCache(Path(cache_dir or default_cache_dir()) / CACHE_NAME)


@dataclass
class SampleDigests:
    """Per-sample content digests of a run, and the file state each was taken from."""

    sha256: dict[str, str]
    files: dict[str, FileDigest]

    def unchanged(self, sample_id: str) -> bool:
        """Whether the sample's file is as it was when hashed (True for samples that are no file)."""
        found = self.files.get(sample_id)
        return found is None or found.unchanged()


def digest_samples(samples: Iterable[Any], cache: DigestCache) -> SampleDigests:
    """Content digests of ``samples`` (objects with ``id`` and ``path``).

    A sample's digest is the sha256 of its file; ``unreadable`` when it cannot be read (the run then
    skips it as an unreadable image); for a path that is no file, a digest of the path text marked
    ``path:`` (datasets whose samples are not files).
    """
    found = SampleDigests({}, {})
    for sample in samples:
        path = sample.path
        if not os.path.isfile(path):
            found.sha256[sample.id] = "path:" + hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()
            continue
        try:
            digest = cache.digest(path)
        except OSError:
            found.sha256[sample.id] = "unreadable"
            continue
        found.sha256[sample.id] = digest.sha256
        found.files[sample.id] = digest
    cache.save()
    return found


def combined_sha256(digests: Iterable[str]) -> str:
    """One digest over per-sample digests in order (``dataset.samples_sha256`` of a result)."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def identity_sha256(identity: dict[str, Any]) -> str:
    """The full digest of a run's identity (the run id holds its first 12 hex digits)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
