"""Shared storage layout, the job folder of one job (not of an earlier job of the same id),
and atomic publication of a folder that belongs to no other job."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.events import append_jsonl
from deepe_tasks.core.fences import MANIFEST, published_by_another, refuse_second_publish

__all__ = ["MANIFEST"]

JOB_MARKER = "deepe-job.json"  # in the job folder: which job of that id (its submit time) owns it
EVENTS_FILE = "events.jsonl"
MERGED_SUFFIX = "-merged"  # a merge of the model at NAME publishes to NAME-merged


def job_dir(storage_root: Path, job_id: str) -> Path:
    return storage_root / "jobs" / job_id


def own_job_dir(storage_root: Path, job_id: str, incarnation: str) -> Path | None:
    """Make ``jobs/<job>`` the folder of this job, ``incarnation`` being its record's submit time.

    A job id may be submitted again once its record expired: the earlier job's folder (its
    checkpoints, results, events) is then moved aside to ``jobs/<job>.expired-<time>-<hex>``
    whole, and the lines this job's workers already appended to ``events.jsonl`` are carried
    back. Returns where the earlier folder went, or None. Safe to call from every attempt: the
    marker written here makes it a no-op for the job's later attempts.
    """
    folder = job_dir(storage_root, job_id)
    owner = _marker(folder)
    if owner is not None and _same(owner, incarnation):
        return None
    since = float(incarnation)
    moved = None
    if owner is not None or _older(folder, since):
        moved = folder.with_name(f"{job_id}.expired-{int(time.time())}-{uuid.uuid4().hex[:6]}")
        try:
            os.rename(folder, moved)
        except FileNotFoundError:
            moved = None  # another attempt of this job moved it a moment ago
        else:
            if _same(_marker(moved) or "", incarnation):
                # That attempt also made the new folder already: it was this job's, give it back.
                with contextlib.suppress(OSError):
                    os.rename(moved, folder)
                    return None
            folder.mkdir(parents=True, exist_ok=True)
            append_jsonl(folder / EVENTS_FILE, [line for line, ts in _lines(moved / EVENTS_FILE) if ts >= since])
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{JOB_MARKER}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"job": job_id, "submitted_at": incarnation}) + "\n")
    os.replace(tmp, folder / JOB_MARKER)
    return moved


def _marker(folder: Path) -> str | None:
    """The submit time the job folder's marker names; None without one, "" if it is no marker
    deepe wrote (those are written whole). A marker that cannot be read now (an I/O error)
    raises OSError: the caller hands the job back rather than move a folder that may be its own."""
    try:
        text = (folder / JOB_MARKER).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    try:
        return str(json.loads(text).get("submitted_at", ""))
    except (ValueError, AttributeError):
        return ""


def _same(owner: str, incarnation: str) -> bool:
    """Whether two submit times are the same (as numbers: one may have been written by repr)."""
    try:
        return float(owner) == float(incarnation)
    except ValueError:
        return False


# The job folder's first event was written by a worker, the submit time by the submitter: their
# clocks may differ by this much without a job's own folder being taken for an earlier job's.
CLOCK_SKEW = 300.0


def _older(folder: Path, since: float) -> bool:
    """Whether a job folder without a marker holds what a job submitted before ``since`` wrote.

    Since the worker marks the folder before it writes anything there, such a folder is an
    earlier job's, or one left by a version of deepe that wrote no marker. Events are appended
    in time order, so the first line says (allowing for clock skew); without events, any file
    of an attempt or the job's log is an earlier job's.
    """
    events = folder / EVENTS_FILE
    if not events.exists():
        return (folder / "output.log").exists() or any((folder / "attempts").glob("*/*"))
    return next((ts < since - CLOCK_SKEW for _, ts in _lines(events)), False)


def _lines(path: Path) -> Iterable[tuple[str, float]]:
    """Each readable line of an events.jsonl with its event's time."""
    with contextlib.suppress(FileNotFoundError), path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                ts = float(json.loads(line)["ts"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
            yield line.rstrip("\n"), ts


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


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def foreign_owner(target: Path, storage_root: Path, job_id: str, merged_from: str | None = None) -> str | None:
    """Why job ``job_id`` may not publish its model at ``target``, naming whose it is; None if it may.

    Refused: a folder outside the storage once its symbolic links are followed; one that holds
    another job's model (a merge may replace an earlier merge of the same job, ``merged_from``),
    or files that are no deepe model; one inside or above another job's model; and NAME-merged
    where NAME is another job's model (a merge of that job publishes there).
    """
    root = Path(os.path.realpath(storage_root))
    parent = Path(os.path.realpath(target.parent))
    if not parent.is_relative_to(root):
        return f"{target.parent} leads to {parent}, outside the storage {root} (through a symbolic link)"
    here = parent / target.name
    if here.is_symlink():
        return f"{here} is a symbolic link (to {os.readlink(here)}), not a folder of its own"
    for folder in [parent, *parent.parents]:
        if folder == root or not folder.is_relative_to(root):
            break
        if (owner := model_owner(folder)) is not None:
            return f"{here} is inside {folder}, the model of job {owner[0]}"
    owner = model_owner(here)
    if owner is not None and owner[0] != job_id and (merged_from is None or owner[1] != merged_from):
        return f"{here} holds the model of job {owner[0]}"
    if here.is_dir():  # a model further down: this folder is above another job's model
        for marker in here.rglob(f"*/{MANIFEST}"):
            inner = model_owner(marker.parent)
            if inner is not None and inner[0] != job_id:
                return f"{here} holds the model of job {inner[0]} in {marker.parent}"
    if owner is None and here.is_dir() and any(here.iterdir()):
        return f"{here} holds files that are not a deepe model"
    if here.name.endswith(MERGED_SUFFIX):
        source = model_owner(here.with_name(here.name[: -len(MERGED_SUFFIX)]))
        if source is not None and source[0] not in (job_id, merged_from):
            return f"{here} is where a merge of job {source[0]} publishes"
    return None


def model_owner(folder: Path) -> tuple[str, str | None] | None:
    """(job, the job it was merged from) that the model in ``folder`` names; None if it has no manifest."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return str(data["job"]), (None if data.get("merged_from") is None else str(data["merged_from"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "(unreadable deepe.json)", None


RETRY_ELSEWHERE = "Submit the job again with another OUTPUT_DIR, or move that folder away first."


def refuse_foreign(target: Path, storage_root: Path, job_id: str, merged_from: str | None = None, *,
                   what: str = "model", fix: str = RETRY_ELSEWHERE) -> None:
    """Raise InvalidParams, naming the owner and ``fix``, where ``foreign_owner`` refuses ``target``."""
    problem = foreign_owner(target, storage_root, job_id, merged_from)
    if problem is not None:
        raise InvalidParams(f"{problem}: the {what} of job {job_id} was not published there, and nothing there was "
                            f"touched. {fix}")


def publish(staging: Path, target: Path, *, job_id: str, storage_root: Path, merged_from: str | None = None,
            what: str = "model", fix: str = RETRY_ELSEWHERE, claim: str = "",
            submitted_at: float | None = None) -> None:
    """Move a complete staging folder into place; a reader never sees a half-written one.

    An existing model of the same job at ``target`` is moved aside first and removed after the
    swap, unless another claim of the job published it (AlreadyPublished: `fences`); anything
    else ``foreign_owner`` refuses raises InvalidParams, with nothing touched.
    """
    fsync_tree(staging)
    refuse_foreign(target, storage_root, job_id, merged_from, what=what, fix=fix)
    refuse_second_publish(target, job_id, submitted_at, claim)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        if published_by_another(old, job_id, submitted_at, claim) is not None:
            os.rename(old, target)  # another claim of this job published a moment ago: it stands
            refuse_second_publish(target, job_id, submitted_at, claim)
        # Another job may have published there since the check: what was moved aside says.
        owner = model_owner(old)
        if owner is not None and owner[0] != job_id and (merged_from is None or owner[1] != merged_from):
            os.rename(old, target)
            raise InvalidParams(f"{target} holds the model of job {owner[0]} (published there a moment ago): the "
                                f"{what} of job {job_id} was not published there, and nothing there was touched. {fix}")
    os.rename(staging, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
