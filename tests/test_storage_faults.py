"""Storage faults, on real mounts: a read-only storage root, a full disk, and a resume from a
checkpoint taken at the very last step."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepe_tasks import Event, EventKind, JobStatus, submit
from deepe_tasks.ui.local import run_method_file
from tests.helpers import TRL_SNIPPET, Worker

pytestmark = pytest.mark.e2e


def tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"the kernel refused a tmpfs mount ({done.stderr.strip()}); these tests need root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def read_only_storage(tmp_path: Path) -> Iterator[Path]:
    yield from tmpfs(tmp_path / "ro-storage", "ro,size=1m")


@pytest.fixture
def small_disk(storage: Path) -> Iterator[Path]:
    # Inside the storage root, where OUTPUT_DIR must be: 16 KiB, less than a model needs.
    yield from tmpfs(storage / "models" / f"small-{uuid.uuid4().hex[:8]}", "size=16k")


def test_a_read_only_storage_fails_the_job_at_once_naming_the_storage(
        tmp_path: Path, read_only_storage: Path, sft_params: dict[str, object]) -> None:
    # Given a worker whose DEEPE_STORAGE is mounted read-only
    w = Worker("ro-q", tmp_path / "worker.log", env={"DEEPE_STORAGE": str(read_only_storage),
                                                      "DEEPE_LEASE_TTL": "3"}).start()
    try:
        # When it takes a job
        job = submit("sft-demo", sft_params, queue="ro-q")
        # Then the job fails at once, naming the storage and the fix, and is never requeued
        assert job.wait(timeout=60) is JobStatus.FAILED
        info = job.info()
        assert str(read_only_storage) in info["error"] and "Read-only file system" in info["error"]
        assert "writable shared mount" in info["error"] and info["attempts"] == 1
        assert EventKind.REQUEUED not in [e.kind for e in job.events()]
        # and the worker goes on
        assert w.alive()
    finally:
        w.stop()


def test_a_full_disk_in_the_final_save_fails_the_job_and_leaves_nothing_behind(
        worker: Worker, small_disk: Path, sft_params: dict[str, object], storage: Path) -> None:
    # Given an OUTPUT_DIR on a disk too small for the model
    output = small_disk / "model"
    job = submit("sft-demo", {**sft_params, "OUTPUT_DIR": str(output.relative_to(storage))})
    # When the job saves, Then it fails naming the save and the disk
    assert job.wait(timeout=180) is JobStatus.FAILED
    error = job.info()["error"]
    assert "Failed while saving" in error and "No space left on device" in error
    # and no staging folder, half a model, or empty manifest stays on that disk
    assert list(small_disk.iterdir()) == []


def test_a_resume_from_a_checkpoint_at_the_last_step_trains_no_more_steps(
        tmp_path: Path, sft_params: dict[str, object], storage: Path) -> None:
    # Given a job whose last checkpoint was taken at its very last step (then its worker was lost)
    method = tmp_path / "every2.py"
    method.write_text(TRL_SNIPPET.replace("logging_steps=1,", "logging_steps=1, save_steps=2,"))
    job_id = f"last-step-{uuid.uuid4().hex[:8]}"
    params = {**sft_params, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}
    first = run_method_file(method, params, lambda e: None, job_id=job_id)
    assert first.status is JobStatus.SUCCEEDED
    assert (storage / "jobs" / job_id / "attempts" / "1" / "checkpoints" / "checkpoint-4" / "deepe-checkpoint.json").exists()
    # When the job runs again, from that checkpoint
    events: list[Event] = []
    again = run_method_file(method, params, events.append, job_id=job_id)
    # Then it trains no step more than MAX_STEPS, and publishes the checkpoint's model
    assert again.status is JobStatus.SUCCEEDED, again.error
    assert [e.step for e in events if e.kind is EventKind.RESUMED] == [4]
    assert not [e for e in events if e.kind is EventKind.LOG and "loss" in e.metrics]
    manifest = json.loads((Path(again.output_dir or "") / "deepe.json").read_text())
    assert manifest["steps"] == 4 == manifest["max_steps"]
