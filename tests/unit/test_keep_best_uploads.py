"""KEEP_BEST's best checkpoint on an object store: never skipped by the uploads, found again on any
worker's disk, and said to be gone when a resume cannot find it."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from deepe_tasks.core.records import JobSpec
from deepe_tasks.core.storage import CHECKPOINT_DONE
from deepe_tasks.job import evaluation
from deepe_tasks.job.uploads import Uploader


class SlowStore:
    """Records what goes up; the first upload waits until the test lets it go on."""

    def __init__(self) -> None:
        self.uploaded: list[str] = []
        self.busy, self.go_on = threading.Event(), threading.Event()

    def put_tree(self, local: Path, rel: str, **_: Any) -> None:
        self.busy.set()
        if not self.uploaded:
            assert self.go_on.wait(10)
        self.uploaded.append(rel.rsplit("/", 1)[-1])

    def glob(self, pattern: str) -> list[str]:
        return []

    def put_file(self, local: Path, rel: str) -> None:
        pass


def checkpoint(folder: Path, step: int, best: int) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / CHECKPOINT_DONE).write_text("{}")
    (path / evaluation.TRAINER_STATE).write_text(json.dumps({"best_model_checkpoint": str(folder / f"checkpoint-{best}")}))
    return path


def test_a_best_checkpoint_waiting_behind_a_newer_one_is_uploaded_before_it(tmp_path: Path) -> None:
    store = SlowStore()
    spec = JobSpec(job_id="j", method="m", method_sha256="0" * 64, source="", params={}, storage_root=str(tmp_path))
    uploads = Uploader(store, spec)  # type: ignore[arg-type]
    folder = tmp_path / "jobs" / "j" / "attempts" / "1" / "checkpoints"
    uploads.checkpoint(checkpoint(folder, 1, best=1))
    assert store.busy.wait(10)  # checkpoint-1 going up; meanwhile three more wait
    for step in (2, 3, 4):
        uploads.checkpoint(checkpoint(folder, step, best=2))
    store.go_on.set()
    assert uploads.drain(10)
    # checkpoint-3 is skipped (checkpoint-4 supersedes it), the best one is not
    assert store.uploaded == ["checkpoint-1", "checkpoint-2", "checkpoint-4"]


def test_a_checkpoint_is_found_under_any_worker_s_storage_root() -> None:
    assert evaluation.in_job(Path("/disk-a/mirror/x/jobs/j/attempts/1/checkpoints/checkpoint-4"), "j") == \
        "jobs/j/attempts/1/checkpoints/checkpoint-4"
    assert evaluation.in_job(Path("/disk-a/jobs/other/attempts/1/checkpoints/checkpoint-4"), "j") is None
    assert evaluation.in_job(Path("checkpoint-4"), "j") is None


def test_a_best_checkpoint_that_is_gone_is_not_claimed_and_the_user_is_told(tmp_path: Path) -> None:
    state = SimpleNamespace(best_model_checkpoint=str(tmp_path / "checkpoint-2"), best_metric=1.5, global_step=6)
    best, note = evaluation.keep_best(SimpleNamespace(state=state))
    assert best is None and state.best_model_checkpoint is None
    assert note is not None and "eval_loss 1.5) is gone" in note and "step 6's" in note
