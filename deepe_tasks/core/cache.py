"""A worker's cache of what jobs read from an object store (``DEEPE_CACHE_DIR/inputs``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from deepe_tasks.core.objects import ObjectStore

COMPLETE = ".deepe-complete"  # in a cache entry, once everything in it was fetched


class InputCache:
    """A worker's copies of objects it read (base models, datasets), keyed by their ETags, so
    that ten jobs on one base model fetch it once; least recently used evicted beyond ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.hits = self.misses = 0

    def fetch(self, store: ObjectStore, rel: str) -> Path:
        """The local copy of the object or folder at ``rel`` (fetched now if the cache has no
        copy of this version); for a single object, the file keeps its name."""
        files = store.files(rel)
        if not files:
            raise FileNotFoundError(f"{store.url_of(rel)} does not exist (no object there, nor under it)")
        digest = hashlib.sha256(store.url_of(rel).encode())
        for name, info in sorted(files.items()):
            digest.update(f"\0{name}\0{info.get('ETag') or info.get('etag') or ''}\0{info.get('size')}".encode())
        entry = self.root / digest.hexdigest()[:32]
        single = list(files) == [""]
        name = rel.rstrip("/").rsplit("/", 1)[-1]
        found = entry / name if single else entry
        if (entry / COMPLETE).exists():
            self.hits += 1
            os.utime(entry / COMPLETE)  # its last use, for the eviction
            return found
        self.misses += 1
        staging = self.root / f".{entry.name}.{uuid.uuid4().hex[:8]}"
        try:
            store.get(rel, staging / name if single else staging)
            (staging / COMPLETE).write_text(store.url_of(rel) + "\n")
            try:
                os.rename(staging, entry)
            except OSError:  # another job process of this host fetched it meanwhile
                if not (entry / COMPLETE).exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.evict(keep=entry)
        return found

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used entries until the cache fits its bound."""
        entries = []
        for entry in self.root.iterdir() if self.root.is_dir() else []:
            marker = entry / COMPLETE
            if entry.name.startswith(".") or not marker.exists():
                continue
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            entries.append((marker.stat().st_mtime, size, entry))
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry == keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= size
            removed.append(entry)
        return removed
