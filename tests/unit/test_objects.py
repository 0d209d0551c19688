"""Object storage, the parts that need no store (tests/test_s3.py runs the rest against a real
S3 endpoint): which DEEPE_STORAGE is a store, paths that cannot leave its prefix, the retry
policy, and the worker's cache bounded by least recent use."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from deepe_tasks.core.cache import COMPLETE, InputCache
from deepe_tasks.core.objects import ObjectStore, StorageError, retrying
from deepe_tasks.core.settings import Settings, is_remote


def test_an_object_store_url_is_told_from_a_folder_and_gets_a_local_copy_of_its_own(tmp_path: Path) -> None:
    assert is_remote("s3://bucket/prefix") and is_remote("gs://b")
    assert not is_remote("./deepe-data") and not is_remote("/srv/deepe") and not is_remote("file:///srv/deepe")
    folder = Settings(storage=str(tmp_path))
    assert folder.storage_url is None and folder.storage_root == tmp_path.resolve()
    one = Settings(storage="s3://bucket/a/", cache_dir=tmp_path / "cache")
    other = Settings(storage="s3://bucket/b", cache_dir=tmp_path / "cache")
    assert one.storage_url == "s3://bucket/a"
    assert one.storage_root.parent == (tmp_path / "cache" / "mirror").resolve()
    assert one.storage_root != other.storage_root  # two stores never share a local copy


def test_a_url_is_inside_the_store_only_below_its_prefix_and_never_through_dot_dot() -> None:
    assert ObjectStore.relative("s3://b/p", "s3://b/p/models/x") == "models/x"
    assert ObjectStore.relative("s3://b/p", "s3://b/p") == ""
    assert ObjectStore.relative("s3://b/p", "s3://b/prefix/x") is None  # a sibling, not a child
    assert ObjectStore.relative("s3://b/p", "s3://other/p/x") is None
    assert ObjectStore.relative("s3://b/p", "s3://b/p/models/../../secrets") is None
    assert ObjectStore.relative("s3://b/p", "s3://b/p//x") is None


def test_errors_that_may_pass_are_tried_again_within_the_budget_and_answers_are_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("cut")
        return "ok"

    assert retrying("uploading x", flaky, budget=60) == "ok" and len(calls) == 3
    with pytest.raises(StorageError, match=r"uploading x failed after \d+ tries over 2 s.*ConnectionResetError"):
        retrying("uploading x", lambda: (_ for _ in ()).throw(ConnectionResetError("down")), budget=2)
    for answer in (FileNotFoundError("no such key"), PermissionError("AccessDenied"), FileExistsError("exists"),
                   TypeError("a bug of ours")):
        calls.clear()

        def once(e: Exception = answer) -> None:
            calls.append(1)
            raise e

        with pytest.raises(type(answer)):
            retrying("reading x", once, budget=60)
        assert len(calls) == 1


def _entry(root: Path, name: str, size: int, used: float) -> Path:
    entry = root / name
    entry.mkdir(parents=True)
    (entry / "weights.bin").write_bytes(b"x" * size)
    (entry / COMPLETE).write_text("s3://b/p/x\n")
    os.utime(entry / COMPLETE, (used, used))
    return entry


def test_the_cache_evicts_the_least_recently_used_entries_beyond_its_bound(tmp_path: Path) -> None:
    old = _entry(tmp_path, "old", 400, used=1000)
    mid = _entry(tmp_path, "mid", 400, used=2000)
    new = _entry(tmp_path, "new", 400, used=3000)
    partial = tmp_path / ".fetching"  # a fetch under way is never evicted
    partial.mkdir()
    (partial / "weights.bin").write_bytes(b"x" * 400)
    removed = InputCache(tmp_path, max_bytes=900).evict(keep=new)
    assert removed == [old] and mid.exists() and new.exists() and partial.exists()
    # the entry just fetched stays even where it alone is over the bound
    assert InputCache(tmp_path, max_bytes=100).evict(keep=new) == [mid] and new.exists()


class _ForgetfulFs:
    """A store that ignores If-None-Match (some S3-compatible servers): every write lands."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def pipe_file(self, key: str, data: bytes, mode: str = "overwrite") -> None:
        self.objects[key] = data

    def cat_file(self, key: str) -> bytes:
        return self.objects[key]

    def glob(self, pattern: str) -> list[str]:
        return list(self.objects)

    def rm(self, key: str, recursive: bool = False) -> None:
        self.objects.pop(key, None)


def test_a_store_that_ignores_conditional_writes_is_refused_with_the_reason() -> None:
    # (tests/test_s3.py runs the same check against moto, which honours them)
    store = ObjectStore.__new__(ObjectStore)
    store.url, store.protocol, store.root, store.bucket = "s3://b/p", "s3", "b/p", "b"
    store.fs = _ForgetfulFs()
    with pytest.raises(StorageError, match="bucket 'b' .*does not honour.*If-None-Match"):
        store.check()
