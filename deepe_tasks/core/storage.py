"""Shared storage layout and atomic publication of a folder."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

MANIFEST = "deepe.json"  # written beside every published model


def job_dir(storage_root: Path, job_id: str) -> Path:
    return storage_root / "jobs" / job_id


def attempt_dir(storage_root: Path, job_id: str, attempt: int) -> Path:
    """What one attempt writes: its checkpoints and its result. No two attempts share a file."""
    return job_dir(storage_root, job_id) / "attempts" / str(attempt)


CHECKPOINT_DONE = "deepe-checkpoint.json"  # written into a checkpoint once it is complete


def latest_checkpoint(storage_root: Path, job_id: str) -> Path | None:
    """The newest complete checkpoint of any attempt of the job (the highest step; on a tie, the
    latest attempt's)."""
    found = []
    for marker in (job_dir(storage_root, job_id) / "attempts").glob(f"*/checkpoints/checkpoint-*/{CHECKPOINT_DONE}"):
        folder = marker.parent
        step, attempt = folder.name.split("-")[-1], folder.parent.parent.name
        if step.isdigit() and attempt.isdigit():
            found.append((int(step), int(attempt), folder))
    return max(found, default=(0, 0, None))[2]


def _staging_prefix(target: Path, job_id: str, attempt: int) -> str:
    return f".{target.name}.staging-{job_id}-a{attempt}-"


def staging_dir(target: Path, job_id: str, attempt: int) -> Path:
    """A fresh folder of the attempt's beside ``target``, on the same file system, so the final
    rename is atomic."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f"{_staging_prefix(target, job_id, attempt)}{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def remove_checkpoints(storage_root: Path, job_id: str) -> None:
    """Delete the checkpoints of every attempt of an ended job (DEEPE_KEEP_CHECKPOINTS)."""
    for folder in (job_dir(storage_root, job_id) / "attempts").glob("*/checkpoints"):
        shutil.rmtree(folder, ignore_errors=True)


def remove_staging(target: Path, job_id: str, attempts: Iterable[int]) -> None:
    """Remove what these attempts of the job staged beside ``target`` and never published (an
    attempt killed or fenced off in its final save)."""
    for attempt in attempts:
        for folder in target.parent.glob(f"{_staging_prefix(target, job_id, attempt)}*"):
            shutil.rmtree(folder, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def publish(staging: Path, target: Path) -> None:
    """Move a complete staging folder into place; a reader never sees a half-written one.

    An existing deepe model at ``target`` is moved aside first and removed after the swap;
    any other non-empty folder there is refused.
    """
    _fsync_tree(staging)
    old = None
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST).exists():
        raise FileExistsError(f"{target} holds files that are not a deepe model; it was left as it is")
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(staging, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
