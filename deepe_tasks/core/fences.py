"""Fences on the storage side, for what Redis alone cannot promise.

Redis replicates asynchronously: a failover can promote a replica that lacks a claim, so the
same attempt number could be handed out twice, or an attempt that already published a model
could be run again. Each attempt carries its claim's unique id (the worker's lease holder), and
the storage refuses what a second claim would do: an attempt's folder belongs to the first
claim that marked it (an exclusive create), and a job's model, once published by one claim,
is never replaced by another claim of the same job: that attempt adopts it instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepe_tasks.core.errors import DeepeError

if TYPE_CHECKING:
    from deepe_tasks.core.objects import ObjectStore

CLAIM_MARKER = "deepe-claim.json"  # in an attempt's folder: the claim that owns it
MANIFEST = "deepe.json"  # written beside every published model


class AlreadyPublished(DeepeError):
    """Raised when another claim of the same job already published its model at OUTPUT_DIR."""

    def __init__(self, message: str, manifest: dict[str, Any]) -> None:
        super().__init__(message)
        self.manifest = manifest


def mark_attempt(folder: Path, claim: str) -> str | None:
    """Make ``folder`` (an attempt's) this claim's; return the claim that already owns it, or
    None if it is ours. The marker is written whole to a private file first and then hard-linked
    into place, which fails if the name exists: of two claims of one attempt number exactly one
    wins, whatever Redis says, and the loser always reads a complete marker."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM_MARKER
    staged = folder / f".{CLAIM_MARKER}.{os.getpid()}.{uuid.uuid4().hex}"
    with open(staged, "w", encoding="utf-8") as f:
        f.write(json.dumps({"claim": claim, "at": time.time()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(staged, path)
    except FileExistsError:
        owner = _claim_in(path)
        return None if owner == claim else owner
    finally:
        staged.unlink(missing_ok=True)
    return None


def mark_attempt_on(store: ObjectStore, folder: str, claim: str) -> str | None:
    """``mark_attempt`` on an object store: a create with If-None-Match: *, which one writer wins."""
    body = (json.dumps({"claim": claim, "at": time.time()}) + "\n").encode()
    if store.create(f"{folder}/{CLAIM_MARKER}", body):
        return None
    owner = (store.read_json(f"{folder}/{CLAIM_MARKER}") or {}).get("claim")
    owner = str(owner) if owner else "(unreadable claim marker)"
    return None if owner == claim else owner


def _claim_in(path: Path) -> str:
    # Linked into place only once written whole; unreadable (damaged by hand) counts as another's.
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["claim"])
    except (OSError, ValueError, KeyError, TypeError):
        return "(unreadable claim marker)"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return None


def published_by_another(target: Path, job_id: str, submitted_at: float | None, claim: str) -> dict[str, Any] | None:
    """The manifest of the model at ``target`` if another claim of this same job (the same id
    and submit time) published it; None otherwise (nothing there, another job's, an earlier job
    of the id, or a model from before claims were recorded)."""
    if not claim or submitted_at is None:
        return None
    manifest = read_manifest(target)
    if manifest is None or manifest.get("job") != job_id or not manifest.get("claim"):
        return None
    try:
        same_job = float(manifest.get("submitted_at")) == float(submitted_at)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return manifest if same_job and manifest["claim"] != claim else None


def refuse_second_publish(target: Path, job_id: str, submitted_at: float | None, claim: str) -> None:
    """Raise AlreadyPublished where another claim of the job published at ``target``."""
    manifest = published_by_another(target, job_id, submitted_at, claim)
    if manifest is not None:
        raise AlreadyPublished(
            f"attempt {manifest.get('attempt')} of job {job_id} (claim {manifest['claim']}) already published its "
            f"model at {target}; this attempt does not publish a second one", manifest)
