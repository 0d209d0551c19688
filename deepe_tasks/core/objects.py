"""Object storage (``DEEPE_STORAGE=s3://bucket/prefix``): the store, and a worker's cache of it.

Through fsspec (s3fs for S3 and the S3-compatible servers), with credentials and endpoint from
the standard AWS variables and files: deepe reads no secret of its own and logs none. An object
store has no rename, so nothing here relies on one: a folder is complete when a marker object
written after all its files exists, and a model is published by creating its ``deepe.json``
with a conditional write (If-None-Match: *), which exactly one writer can win.

Every call is retried with backoff on what may pass (a cut connection, throttling, a 5xx);
what cannot (no such bucket, access denied, the object exists) fails at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from deepe_tasks.core.errors import DeepeError

log = logging.getLogger(__name__)

T = TypeVar("T")
BACKOFF = 0.5  # seconds before the second try; doubled each time, up to BACKOFF_MAX
BACKOFF_MAX = 15.0


class StorageError(DeepeError):
    """The object store refused or failed an operation (after its retries)."""


def _final(e: BaseException) -> bool:
    """Whether trying again cannot help: an answer (no such object, it exists, access denied), or
    an error of deepe's own rather than of the link or the store."""
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    transient = isinstance(e, (OSError, TimeoutError, ConnectionError))
    return not (transient or type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs"))


def retrying(what: str, fn: Callable[[], T], budget: float | None = None) -> T:
    """``fn()``, tried again with backoff on errors that may pass (a cut connection, throttling,
    a 5xx) for up to ``budget`` seconds (DEEPE_STORAGE_RETRY_SECONDS); then StorageError."""
    if budget is None:
        from deepe_tasks.core.settings import get_settings

        budget = get_settings().storage_retry_seconds
    deadline = time.monotonic() + budget
    tries = 0
    while True:
        tries += 1
        try:
            return fn()
        except Exception as e:
            if _final(e):
                raise
            pause = min(BACKOFF * 2 ** (tries - 1), BACKOFF_MAX)
            if time.monotonic() + pause > deadline:
                raise StorageError(f"{what} failed after {tries} tries over {budget:g} s "
                                   f"(DEEPE_STORAGE_RETRY_SECONDS): {type(e).__name__}: {e}") from e
            log.warning("%s failed (%s: %s); trying again in %.1f s", what, type(e).__name__, e, pause)
            time.sleep(pause)


class ObjectStore:
    """The store at ``url`` (``s3://bucket/prefix``); paths given to it are relative to the prefix."""

    budget: float | None = None  # seconds each call is tried for; None: DEEPE_STORAGE_RETRY_SECONDS

    def __init__(self, url: str, budget: float | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.budget = budget
        self.protocol = self.url.split("://", 1)[0]
        options: dict[str, Any] = {"skip_instance_cache": True}
        if self.protocol in ("s3", "s3a"):
            options["use_listings_cache"] = False  # another worker may have written since
            # deepe's own retries (``retrying``) bound how long a failing store is tried; the
            # client's stay few and quick, so that they do not multiply with them.
            options["config_kwargs"] = {"connect_timeout": 10, "read_timeout": 120,
                                        "retries": {"max_attempts": 2, "mode": "standard"}}
        try:
            self.fs = fsspec.filesystem(self.protocol, **options)
        except ImportError as e:
            raise StorageError(f"DEEPE_STORAGE={self.url} needs the {self.protocol}:// file system, which is not "
                               f"installed here ({e}). Install it: pip install 'deepe-tasks[s3]' (s3fs).") from e
        if hasattr(self.fs, "retries"):
            self.fs.retries = 2  # s3fs's own, on top of the client's
        self.root = self.url.split("://", 1)[1].rstrip("/")
        self.bucket = self.root.split("/", 1)[0]

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        return retrying(what, fn, self.budget)

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel.strip('/')}" if rel.strip("/") else self.root

    def url_of(self, rel: str) -> str:
        return f"{self.protocol}://{self.key(rel)}"

    def rel_of(self, url: str) -> str | None:
        """The path inside this store of ``url``; None if it is elsewhere."""
        return self.relative(self.url, url)

    @staticmethod
    def relative(store_url: str, url: str) -> str | None:
        """The path of ``url`` inside the store at ``store_url``; None if it is elsewhere."""
        base = store_url.rstrip("/")
        if url.rstrip("/") == base:
            return ""
        head = f"{base}/"
        if not url.startswith(head):
            return None
        rel = url[len(head):].rstrip("/")
        if any(part in ("", ".", "..") for part in rel.split("/")):
            return None  # never a way out of the prefix
        return rel

    # Reading ----------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self._retrying(f"looking for {self.url_of(rel)}", lambda: bool(self.fs.exists(self.key(rel))))

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self._retrying(f"reading {self.url_of(rel)}", lambda: bytes(self.fs.cat_file(self.key(rel))))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> dict[str, Any] | None:
        data = self.read_bytes(rel)
        with contextlib.suppress(ValueError):
            value = json.loads(data) if data is not None else None
            if isinstance(value, dict):
                return value
        return None

    def glob(self, pattern: str) -> list[str]:
        """The paths (relative) that match ``pattern`` (relative, fsspec glob)."""
        found = self._retrying(f"listing {self.url_of(pattern)}", lambda: self.fs.glob(self.key(pattern)))
        return [str(k)[len(self.root) + 1:] for k in found]

    def files(self, rel: str) -> dict[str, dict[str, Any]]:
        """Every object under ``rel``: its path relative to ``rel``, and its details (ETag, size)."""
        key = self.key(rel)
        try:
            found = self._retrying(f"listing {self.url_of(rel)}", lambda: self.fs.find(key, detail=True))
        except FileNotFoundError:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for name, info in dict(found).items():
            name = str(name)
            if info.get("type") == "directory":
                continue
            out["" if name == key else name[len(key) + 1:]] = info
        return out

    def get(self, rel: str, local: Path) -> None:
        """Fetch the object or the folder at ``rel`` to ``local``."""
        files = self.files(rel)
        if not files:
            raise FileNotFoundError(f"{self.url_of(rel)} does not exist")
        for name in files:
            dest = local / name if name else local
            dest.parent.mkdir(parents=True, exist_ok=True)
            key = f"{self.key(rel)}/{name}" if name else self.key(rel)
            self._retrying(f"fetching {self.protocol}://{key}", functools.partial(self.fs.get_file, key, str(dest)))

    # Writing ----------------------------------------------------------------------------------

    def put_file(self, local: Path, rel: str) -> None:
        self._retrying(f"uploading {local} to {self.url_of(rel)}", lambda: self.fs.put_file(str(local), self.key(rel)))

    def put_tree(self, local: Path, rel: str, skip: Iterable[str] = (), last: Iterable[str] = ()) -> None:
        """Upload every file under ``local`` to ``rel``; the names in ``last`` after all others
        (the markers that say the rest is complete), ``skip`` not at all."""
        skipped, final = set(skip), list(last)
        paths = sorted(p for p in local.rglob("*") if p.is_file())
        rest = [p for p in paths if p.name not in skipped and p.name not in final]
        for path in [*rest, *(local / name for name in final if (local / name).is_file())]:
            self.put_file(path, f"{rel}/{path.relative_to(local).as_posix()}")

    def put_bytes(self, rel: str, data: bytes) -> None:
        self._retrying(f"writing {self.url_of(rel)}", lambda: self.fs.pipe_file(self.key(rel), data))

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if no object is there (If-None-Match: *); False if one was."""
        try:
            self._retrying(f"creating {self.url_of(rel)}", lambda: self.fs.pipe_file(self.key(rel), data, mode="create"))
        except FileExistsError:
            return False
        return True

    def remove(self, rel: str) -> None:
        """Delete the object or every object under the folder ``rel`` (nothing there is no error)."""
        key = self.key(rel)
        with contextlib.suppress(FileNotFoundError):
            self._retrying(f"deleting {self.url_of(rel)}", lambda: self.fs.rm(key, recursive=True))

    def check(self) -> None:
        """Refuse a store deepe cannot use, naming the bucket and what is missing."""
        probe = f".deepe-probe/{uuid.uuid4().hex}"
        step = "write an object to"
        try:
            self.put_bytes(probe, b"deepe")
            step = "read an object of"
            self.read_bytes(probe)
            step = "create an object only where none is (If-None-Match: *) in"
            if self.create(probe, b"again"):
                raise StorageError("the store wrote over an object that a conditional write must have left alone")
            step = "list"
            self.glob(".deepe-probe/*")
            step = "delete an object of"
            self.remove(probe)
        except Exception as e:
            why = _why(e)
            raise StorageError(
                f"DEEPE_STORAGE={self.url}: could not {step} bucket {self.bucket!r} ({why}). Create the bucket, or "
                "give this machine's credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) s3:PutObject, s3:GetObject, "
                "s3:ListBucket and s3:DeleteObject on it (docs/operations.md, \"Object storage\"); for an "
                "S3-compatible server set AWS_ENDPOINT_URL_S3.") from e


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in text or "does not exist" in text:
        return "the bucket does not exist"
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"access denied: {text}"
    if isinstance(e, StorageError) and "conditional write" in text:
        return (f"{text}: deepe publishes a model by a conditional create, which this server does not honour; "
                "use AWS S3 or a server that supports If-None-Match on PUT")
    return f"{type(e).__name__}: {text}"


def check_storage(storage_url: str | None) -> None:
    """What a worker checks before it starts: an object store it can write (ConfigError, with the fix)."""
    if storage_url is None:
        return
    from deepe_tasks.core.errors import ConfigError

    try:
        ObjectStore(storage_url).check()
    except StorageError as e:
        raise ConfigError(str(e)) from e


_checked: dict[str, float] = {}


def check_once(url: str) -> None:
    """``ObjectStore(url).check()``, at most once a minute per process (submit calls it each time)."""
    if time.monotonic() - _checked.get(url, -1e9) < 60:
        return
    ObjectStore(url).check()
    _checked[url] = time.monotonic()
