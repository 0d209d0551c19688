"""The job folder and the publish target, on a folder of the test's own: a job id submitted again
moves the earlier job's folder aside, and no model is published over another job's
(tests/test_storage_fences.py has the end-to-end tier of the same guarantees)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks.core import storage as shared
from deepe_tasks.core.storage import MANIFEST, latest_checkpoint


def _event(job: str, ts: float, kind: str = "log", attempt: int = 1) -> str:
    return json.dumps({"kind": kind, "job": job, "ts": ts, "attempt": attempt})


def _model(folder: Path, job: str, **manifest: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights of " + job.encode())
    (folder / MANIFEST).write_text(json.dumps({"job": job, **manifest}))
    return folder


def test_an_earlier_job_s_folder_is_moved_aside_whole_and_this_job_s_lines_are_kept(tmp_path: Path) -> None:
    # Given the folder of a job "reused" that ended long ago: a checkpoint, a result, its events
    old, new = 1_000.0, 2_000.0
    folder = tmp_path / "jobs" / "reused"
    checkpoint = folder / "attempts" / "1" / "checkpoints" / "checkpoint-16"
    checkpoint.mkdir(parents=True)
    (checkpoint / "deepe-checkpoint.json").write_text('{"step": 16}')
    (folder / "attempts" / "1" / "result.json").write_text('{"status": "cancelled"}')
    (folder / "output.log").write_text("the old job's output\n")
    old_lines = [_event("reused", old, "started"), _event("reused", old + 5, "cancelled")]
    # and the `started` line a worker of the new job (submitted at `new`) appended before its job process ran
    ours = _event("reused", new + 1, "started")
    (folder / "events.jsonl").write_text("\n".join([*old_lines, ours]) + "\n")

    # When the new job's job process takes the folder
    moved = shared.own_job_dir(tmp_path, "reused", repr(new))

    # Then the earlier job's folder is whole beside it, and the job folder has only the new job's line
    assert moved is not None and moved.name.startswith("reused.expired-")
    assert (moved / "attempts" / "1" / "checkpoints" / "checkpoint-16" / "deepe-checkpoint.json").exists()
    assert (moved / "output.log").read_text() == "the old job's output\n"
    assert (folder / "events.jsonl").read_text().splitlines() == [ours]
    assert latest_checkpoint(tmp_path, "reused") is None
    assert not (folder / "output.log").exists() and not (folder / "attempts").exists()
    # And the job's later attempts find the folder theirs: nothing moves again
    assert shared.own_job_dir(tmp_path, "reused", repr(new)) is None
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == sorted(["reused", moved.name])
    # While a third job of that id moves the second one's folder aside in turn
    assert shared.own_job_dir(tmp_path, "reused", repr(new + 1_000)) is not None


def test_a_folder_with_only_this_job_s_events_is_kept_with_its_checkpoints(tmp_path: Path) -> None:
    # Given a job folder without a marker (written before the marker existed, or whose first job
    # process never ran), holding only this job's events and a checkpoint
    submitted = 5_000.0
    folder = tmp_path / "jobs" / "mine"
    checkpoint = folder / "attempts" / "1" / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "deepe-checkpoint.json").write_text('{"step": 3}')
    (folder / "events.jsonl").write_text(_event("mine", submitted + 1, "started") + "\n")
    # When attempt 2 takes it, Then it is kept, and resumed from
    assert shared.own_job_dir(tmp_path, "mine", repr(submitted)) is None
    assert latest_checkpoint(tmp_path, "mine") == checkpoint
    assert json.loads((folder / "deepe-job.json").read_text())["submitted_at"] == repr(submitted)


def test_a_worker_clock_behind_the_submitter_s_does_not_move_the_job_s_own_folder(tmp_path: Path) -> None:
    # Given a job folder without a marker whose first event a worker wrote with its clock a
    # minute behind the submitter's
    submitted = 5_000.0
    folder = tmp_path / "jobs" / "skewed"
    (folder / "attempts" / "1").mkdir(parents=True)
    (folder / "events.jsonl").write_text(_event("skewed", submitted - 60, "started") + "\n")
    # When the job takes it, Then it stays where it is
    assert shared.own_job_dir(tmp_path, "skewed", repr(submitted)) is None
    assert (folder / "attempts" / "1").is_dir()


def test_a_marker_that_cannot_be_read_hands_the_job_back_and_moves_nothing(tmp_path: Path) -> None:
    # Given a job folder whose marker cannot be read now (an I/O error; here, a folder in its place)
    folder = tmp_path / "jobs" / "unread"
    (folder / "deepe-job.json").mkdir(parents=True)
    # When the job takes it, Then it raises (the caller hands the job back) and nothing moved
    with pytest.raises(OSError):
        shared.own_job_dir(tmp_path, "unread", repr(5_000.0))
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["unread"]


def test_what_a_job_may_not_publish_over_names_the_job_that_owns_it(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    models = root / "models"
    # Given the model of job A, a merge of it, and a folder outside the storage
    _model(models / "a", "job-a")
    _model(models / "a-merged", "merge-1", merged_from="job-a")
    outside = tmp_path / "outside"
    outside.mkdir()
    (models / "link").symlink_to(outside)
    (models / "team").mkdir()
    _model(models / "team" / "inner", "job-c")
    _model(models / "held", "job-d")
    _model(models / "held" / "nested", "job-e")

    def problem(target: Path, job: str, merged_from: str | None = None) -> str | None:
        return shared.foreign_owner(target, root, job, merged_from)

    # Then another job may not take A's folder, its -merged folder, or a folder inside either
    assert "holds the model of job job-a" in (problem(models / "a", "job-b") or "")
    assert "holds the model of job merge-1" in (problem(models / "a-merged", "job-b") or "")
    assert f"inside {models / 'a'}, the model of job job-a" in (problem(models / "a" / "sub", "job-b") or "")
    # (with no merge there yet, -merged is where A's merge would go)
    shutil.rmtree(models / "a-merged")
    assert "where a merge of job job-a publishes" in (problem(models / "a-merged", "job-b") or "")
    # nor a folder above another job's model, nor one reached through a link that leaves the storage
    assert "holds the model of job job-c in" in (problem(models / "team", "job-b") or "")
    assert "job-e" in (problem(models / "held", "job-d") or "")
    assert "outside the storage" in (problem(models / "link" / "out", "job-b") or "")
    assert "symbolic link" in (problem(models / "link", "job-b") or "")
    # While the same job publishes again over its own model, and a merge of A again over A's merge
    assert problem(models / "a", "job-a") is None
    _model(models / "a-merged", "merge-1", merged_from="job-a")
    assert problem(models / "a-merged", "merge-2", merged_from="job-a") is None
    assert problem(models / "a-merged", "merge-2", merged_from="job-z") is not None
    assert problem(models / "new", "job-b") is None
