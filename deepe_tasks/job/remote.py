"""A job process on an object store (``DEEPE_STORAGE=s3://…``): what it reads is fetched into
the worker's cache, what it writes goes up without a rename.

- Inputs (``MODEL_PATH``, ``DATASET_PATH``, a merge's adapter, any parameter holding a URL of the
  store) are fetched into ``DEEPE_CACHE_DIR`` keyed by their ETags (`core.objects.InputCache`),
  and the method sees local paths.
- The job's newest complete checkpoint (any attempt's, any worker's) is fetched before training,
  and with KEEP_BEST the best one its trainer state names, which may be an earlier attempt's.
- Each complete checkpoint is uploaded on a thread of its own while training goes on, its
  ``deepe-checkpoint.json`` last: a resume takes only checkpoints whose marker is there.
- The model is uploaded under ``OUTPUT_DIR/<attempt-key>/`` and published by creating
  ``OUTPUT_DIR/deepe.json`` (naming that key) with If-None-Match: *: of every attempt that ever
  tries, exactly one publishes, whatever Redis says. A model exists when and only when its
  ``deepe.json`` does.
- ``events.jsonl`` and ``output.log`` go up with each checkpoint and at the attempt's end.

One process runs one attempt, so the attempt's `Remote` is this module's (``active()``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from deepe_tasks.core.cache import InputCache
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.fences import MANIFEST, AlreadyPublished
from deepe_tasks.core.objects import ObjectStore
from deepe_tasks.core.records import JobKind, JobSpec
from deepe_tasks.core.settings import is_remote
from deepe_tasks.core.storage import CHECKPOINT_DONE
from deepe_tasks.job import evaluation
from deepe_tasks.job.uploads import DRAIN_TIMEOUT, Uploader

log = logging.getLogger(__name__)

# Parameters that name what a job reads; a merge's adapter is a published model.
INPUTS = ("MODEL_PATH", "DATASET_PATH", "ADAPTER_PATH")


def model_rel(store: ObjectStore, rel: str) -> str:
    """Where the files of the model at ``rel`` are: under the key its ``deepe.json`` names for a
    model deepe published there, else ``rel`` itself (a base model uploaded as a folder)."""
    manifest = store.read_json(f"{rel}/{MANIFEST}")
    files = manifest.get("files") if manifest else None
    return f"{rel}/{files}" if isinstance(files, str) and files else rel


class Remote:
    """The attempt's side of the object store."""

    def __init__(self, spec: JobSpec) -> None:
        assert spec.storage_url is not None
        self.spec = spec
        self.store = ObjectStore(spec.storage_url)
        self.local = Path(spec.storage_root)
        cache_root = Path(spec.cache_dir or self.local.parent.parent) / "inputs"
        self.cache = InputCache(cache_root, int(spec.cache_gb * 2**30))
        self.uploads = Uploader(self.store, spec)
        self.output_url: str | None = None

    def _store_for(self, url: str) -> tuple[ObjectStore, str]:
        rel = self.store.rel_of(url)
        if rel is not None:
            return self.store, rel
        bucket_url = "/".join(url.split("/", 3)[:3])  # s3://bucket
        other = ObjectStore(bucket_url)
        return other, other.rel_of(url) or ""

    def localize(self) -> JobSpec:
        """The spec with local paths for what the job reads and writes (fetched where needed)."""
        params = dict(self.spec.params)
        for name, value in list(params.items()):
            if not (isinstance(value, str) and is_remote(value)):
                continue
            if name == "OUTPUT_DIR":
                rel = self.store.rel_of(value)
                if rel is None:
                    raise InvalidParams(f"OUTPUT_DIR={value} is outside DEEPE_STORAGE={self.store.url}; give a path "
                                        "inside it, such as 'models/my-run'.")
                self.output_url = value
                params[name] = str(self.local / rel)
                continue
            store, rel = self._store_for(value)
            if name in INPUTS and name != "DATASET_PATH":
                rel = model_rel(store, rel)
            started, misses = time.monotonic(), self.cache.misses
            path = self.cache.fetch(store, rel)
            log.info("%s=%s: %s in %.2f s (%s)", name, value,
                     "fetched" if self.cache.misses > misses else "from the worker's cache", time.monotonic() - started,
                     path)
            params[name] = str(path)
        roots = None if self.spec.input_roots is None else [*self.spec.input_roots, str(self.cache.root)]
        return self.spec.model_copy(update={"params": params, "input_roots": roots})

    def fetch_checkpoint(self) -> str | None:
        """Fetch the job's newest complete checkpoint on the store into the local copy, and the best
        one its trainer state names (KEEP_BEST), which may be older; the newest's path inside the
        store, or None without one."""
        pattern = f"jobs/{self.spec.job_id}/attempts/*/checkpoints/checkpoint-*/{CHECKPOINT_DONE}"
        found = []
        for marker in self.store.glob(pattern):
            folder = marker.rsplit("/", 1)[0]
            parts = folder.split("/")
            step, attempt = parts[-1].split("-")[-1], parts[-3]
            if step.isdigit() and attempt.isdigit():
                found.append((int(step), int(attempt), folder))
        if not found:
            return None
        rel = max(found)[2]
        self._fetch(rel)
        self._fetch_best(rel, {folder for _, _, folder in found})
        return rel

    def _fetch(self, rel: str) -> None:
        local = self.local / rel
        if (local / CHECKPOINT_DONE).exists():
            return
        staging = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}")
        try:
            self.store.get(rel, staging)
            if local.exists():
                shutil.rmtree(local)
            staging.rename(local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch_best(self, rel: str, complete: set[str]) -> None:
        """The best checkpoint that the checkpoint at ``rel`` names, fetched too, and named by its
        local path here: the trainer drops a best checkpoint it cannot find when it resumes."""
        named = evaluation.best_named(self.local / rel)
        best = None if named is None else evaluation.in_job(named, self.spec.job_id)
        if named is None or best is None:
            return
        if best not in complete:
            log.warning("the best checkpoint %s that %s names is not on the store; KEEP_BEST cannot publish it",
                        named, self.store.url_of(rel))
            return
        self._fetch(best)
        evaluation.relocate_best(self.local / rel, self.local / best)
        log.info("the best checkpoint so far (KEEP_BEST) is %s", self.store.url_of(best))

    def published(self) -> dict[str, Any] | None:
        """The manifest at OUTPUT_DIR on the store, if a model is published there."""
        if self.output_url is None:
            return None
        rel = self.store.rel_of(self.output_url)
        return None if rel is None else self.store.read_json(f"{rel}/{MANIFEST}")

    def publish(self, staging: Path, *, what: str, fix: str, merged_from: str | None = None) -> str:
        """Upload the staged model under OUTPUT_DIR/<attempt-key>/ and publish it by creating its
        deepe.json; return OUTPUT_DIR's URL. Raises AlreadyPublished (another claim of this job
        published) or InvalidParams (another job's model is there); this attempt's uploads are
        removed then."""
        assert self.output_url is not None
        rel = self.store.rel_of(self.output_url) or ""
        self.refuse_foreign(what=what, fix=fix, merged_from=merged_from)
        key = f"a{self.spec.attempt}-{uuid.uuid4().hex[:8]}"
        manifest = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))
        manifest["files"] = key
        body = (json.dumps(manifest, indent=2, default=str) + "\n").encode()
        try:
            self.store.put_tree(staging, f"{rel}/{key}", skip=[MANIFEST])
            if not self.store.create(f"{rel}/{MANIFEST}", body):
                existing = self.store.read_json(f"{rel}/{MANIFEST}") or {}
                if existing.get("files") == key:
                    pass  # our own create, whose answer was lost and retried
                elif merged_from is not None and existing.get("merged_from") == merged_from:
                    old = existing.get("files")
                    self.store.put_bytes(f"{rel}/{MANIFEST}", body)  # a merge again of the same job
                    if isinstance(old, str) and old:
                        self.store.remove(f"{rel}/{old}")
                else:
                    raise self._taken(existing, what=what, fix=fix)
        except BaseException:
            try:  # best effort: a stale attempt's uploads are removed by the attempt that publishes
                self.store.remove(f"{rel}/{key}")
            except Exception as e:
                log.warning("this attempt's uploads at %s could not be removed: %s", self.store.url_of(f"{rel}/{key}"), e)
            raise
        # What earlier attempts of this job uploaded and never published is stale.
        for other in self.store.glob(f"{rel}/a*-*"):
            name = other.rsplit("/", 1)[-1]
            if name != key and name.split("-")[0][1:].isdigit():
                self.store.remove(other)
        return self.output_url

    def refuse_foreign(self, *, what: str, fix: str, merged_from: str | None = None) -> None:
        existing = self.published()
        if existing is None:
            return
        if existing.get("job") == self.spec.job_id and existing.get("claim") == self.spec.claim:
            return
        if merged_from is not None and existing.get("merged_from") == merged_from:
            return
        raise self._taken(existing, what=what, fix=fix)

    def _taken(self, existing: dict[str, Any], *, what: str, fix: str) -> Exception:
        same_job = existing.get("job") == self.spec.job_id and _same(existing.get("submitted_at"),
                                                                       self.spec.submitted_at)
        if same_job and existing.get("claim"):
            return AlreadyPublished(
                f"attempt {existing.get('attempt')} of this job (claim {existing['claim']}) already published its "
                f"{what} at {self.output_url}; this attempt does not publish it again", existing)
        return InvalidParams(f"{self.output_url} holds the model of job {existing.get('job')}: the {what} of job "
                             f"{self.spec.job_id} was not published there, and nothing there was touched. {fix}")

    def end(self) -> None:
        """At the attempt's end: its uploads finished, its logs sent."""
        if not self.uploads.drain():
            log.warning("checkpoint uploads did not finish within %.0f s", DRAIN_TIMEOUT)
        try:
            self.uploads.logs()
        except Exception as e:
            log.warning("the job's logs could not be uploaded: %s", e)


def _same(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


_active: Remote | None = None


def start(spec: JobSpec) -> JobSpec:
    """For a job on an object store: make this process's Remote and return the spec with local
    paths; a job on a folder is returned as it is."""
    global _active
    _active = None  # a run on a folder after one on a store (run-local, in one process) uses no store
    if not spec.storage_url:
        return spec
    _active = Remote(spec)
    local = _active.localize()
    if spec.kind is JobKind.TRAIN:
        found = _active.fetch_checkpoint()
        if found is not None:
            log.info("the job's newest complete checkpoint on the store is %s", _active.store.url_of(found))
    return local


def active() -> Remote | None:
    return _active


def forget() -> None:
    """This process's runs after now use no store until ``start`` makes one (run-local's runs)."""
    global _active
    _active = None
