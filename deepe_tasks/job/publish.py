"""The one way a job process publishes a model: stage, check, publish, clean up.

Used by the runner (a trained model) and the merge (a merged one). The folder is checked
before anything is staged beside it and again just before the rename (`storage.foreign_owner`:
inside the storage once symbolic links are followed, no other job's model there, above or
around it); the rename comes only after the fenced check that this attempt still owns the job
and then the last stop check (a merge's cancel), both after the staged files reached the disk.

On an object store (`job/remote.py`) the model is staged here the same way, then uploaded and
published by creating its ``deepe.json`` there (no rename); the local staging folder goes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from deepe_tasks.core.errors import AttemptFenced
from deepe_tasks.core.records import JobSpec
from deepe_tasks.core.storage import (
    RETRY_ELSEWHERE,
    fsync_tree,
    publish,
    refuse_foreign,
    remove_staging,
    staging_dir,
)
from deepe_tasks.job import remote


def publish_model(spec: JobSpec, target: Path, write: Callable[[Path], None],
                  may_publish: Callable[[], bool] | None = None, *, what: str = "model", fix: str = RETRY_ELSEWHERE,
                  before_publish: Callable[[], None] | None = None, merged_from: str | None = None) -> Path:
    """Write the model with ``write(staging)`` and publish it at ``target``; return ``target``.

    Raises InvalidParams when ``target`` is refused (nothing is staged or touched then),
    AttemptFenced when the attempt lost its job, AlreadyPublished when another claim of the
    job published there (`core.fences`), and whatever ``write`` or ``before_publish``
    raise; in every case nothing of this attempt stays beside ``target``.
    """
    root = Path(spec.storage_root)
    store = remote.active()
    on_store = store is not None and store.output_url is not None
    # Before the staging folder too, which is written beside the target.
    if on_store:
        assert store is not None
        store.refuse_foreign(what=what, fix=fix, merged_from=merged_from)
    else:
        refuse_foreign(target, root, spec.job_id, merged_from, what=what, fix=fix)
    staging = staging_dir(target, spec.job_id, spec.attempt)
    try:
        write(staging)
        fsync_tree(staging)  # the slow part of the publish, before the checks that must be last
        if may_publish is not None and not may_publish():
            raise AttemptFenced(f"attempt {spec.attempt} no longer owns job {spec.job_id} (its lease was lost); its "
                                f"{what} was not published")
        if before_publish is not None:
            before_publish()
        if on_store:
            assert store is not None
            store.publish(staging, what=what, fix=fix, merged_from=merged_from)
            shutil.rmtree(staging, ignore_errors=True)
            return target
        publish(staging, target, job_id=spec.job_id, storage_root=root, merged_from=merged_from, what=what,
                fix=fix, claim=spec.claim, submitted_at=spec.submitted_at)
    except BaseException:
        # A full disk, a fenced attempt, a cancel: nothing half-written stays beside OUTPUT_DIR.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # What earlier attempts of this job staged is stale: they were fenced off or lost.
    remove_staging(target, spec.job_id, range(1, spec.attempt))
    return target
