"""The shared storage is fenced between jobs, not only between the attempts of one job.

A job id submitted again after its record expired gets a folder of its own (the earlier job's
is moved aside); a model is never published over another job's model, inside or above one, or
outside the storage through a symbolic link swapped in after submit; and a merge that is
cancelled while it runs publishes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from deepe_tasks import EventKind, Job, JobStatus, merge, submit
from deepe_tasks.core import keys
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.records import JobSpec, RunResult, StopReason
from deepe_tasks.core.storage import MANIFEST, latest_checkpoint
from tests.helpers import Worker, wait_for

# End-to-end tier: real workers, real tiny models.

@pytest.fixture(scope="module")
def published(worker: Worker, tiny_model: Path, colors_data: Path) -> Job:
    """A job that published a real LoRA adapter to a folder of its own."""
    params = {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data), "MAX_STEPS": 2, "BATCH_SIZE": 4,
              "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "OUTPUT_DIR": f"models/fenced-{uuid.uuid4().hex[:8]}"}
    job = submit("sft-demo", params)
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    return job


@pytest.mark.e2e
def test_submit_refuses_an_output_dir_that_holds_or_surrounds_another_job_s_model(
        published: Job, sft_params: dict[str, object], storage: Path, http: TestClient) -> None:
    theirs = Path(published.info()["output_dir"])
    relative = str(theirs.relative_to(storage))
    # When another job names that model's folder, its -merged folder, or a folder inside it
    for output in (relative, f"{relative}-merged", f"{relative}/mine"):
        with pytest.raises(InvalidParams) as refused:
            submit("sft-demo", {**sft_params, "OUTPUT_DIR": output})
        # Then submit refuses it, naming the job that owns it and the fix
        assert published.id in str(refused.value) and "Choose another OUTPUT_DIR" in str(refused.value)
    answer = http.post("/jobs", json={"method": "sft-demo", "params": {**sft_params, "OUTPUT_DIR": relative}})
    assert answer.status_code == 422 and published.id in answer.json()["detail"]
    # And the model it names is as it was
    assert json.loads((theirs / MANIFEST).read_text())["job"] == published.id


@pytest.mark.e2e
def test_two_jobs_with_one_output_dir_publish_one_model_and_the_other_fails_clearly(
        worker: Worker, sft_params: dict[str, object], storage: Path) -> None:
    # Given two jobs submitted with the same new OUTPUT_DIR (nothing is there yet: both are accepted)
    output = f"models/shared-{uuid.uuid4().hex[:8]}"
    jobs = [submit("sft-demo", {**sft_params, "OUTPUT_DIR": output}) for _ in range(2)]
    # When both have ended
    ends = {job.id: job.wait(timeout=240) for job in jobs}
    # Then the first to publish owns the folder, and the other failed without touching it
    winner = next(job for job in jobs if ends[job.id] is JobStatus.SUCCEEDED)
    loser = next(job for job in jobs if job is not winner)
    assert ends[loser.id] is JobStatus.FAILED
    error = loser.info()["error"]
    assert error.startswith("Failed while saving") and f"holds the model of job {winner.id}" in error
    assert "nothing there was touched" in error and "another OUTPUT_DIR" in error
    folder = storage / output
    assert json.loads((folder / MANIFEST).read_text())["job"] == winner.id
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}")] == []


@pytest.mark.e2e
def test_a_symlink_swapped_in_after_submit_cannot_take_a_model_outside_the_storage(
        worker: Worker, sft_params: dict[str, object], storage: Path, tmp_path: Path) -> None:
    # Given a job whose OUTPUT_DIR is in a folder of the storage at submit
    team = storage / "models" / f"team-{uuid.uuid4().hex[:8]}"
    team.mkdir(parents=True)
    job = submit("sft-demo", {**sft_params, "OUTPUT_DIR": str((team / "model").relative_to(storage))})
    # When that folder becomes a link to a folder outside the storage while the job trains
    outside = tmp_path / "outside"
    outside.mkdir()
    team.rmdir()
    team.symlink_to(outside)
    # Then the job fails at saving, naming the link and the storage, and writes nothing outside
    assert job.wait(timeout=180) is JobStatus.FAILED
    error = job.info()["error"]
    assert "Failed while saving" in error and "outside the storage" in error and str(outside) in error
    assert list(outside.iterdir()) == []


@pytest.mark.e2e
def test_a_job_id_submitted_again_after_it_expired_trains_from_scratch(
        workers: list[Worker], tmp_path: Path, sft_params: dict[str, object], storage: Path, r: redis.Redis) -> None:
    # Given a job that kept a checkpoint at its last step, whose record expired (retention: 3 s)
    env = {"DEEPE_JOB_RETENTION": "3", "DEEPE_KEEP_CHECKPOINTS": "always", "DEEPE_CHECKPOINT_MINUTES": "0.001"}
    workers.append(Worker("reuse-q", tmp_path / "worker.log", env=env).start())
    job_id = f"reused-{uuid.uuid4().hex[:8]}"
    first = submit("sft-demo", {**sft_params, "MAX_STEPS": 6}, queue="reuse-q", job_id=job_id)
    assert first.wait(timeout=180) is JobStatus.SUCCEEDED, first.info()["error"]
    folder = storage / "jobs" / job_id
    assert latest_checkpoint(storage, job_id) is not None
    wait_for(lambda: not r.exists(keys.job(job_id)), timeout=30)

    # When the same id is submitted again, with fewer steps
    again = submit("sft-demo", {**sft_params, "MAX_STEPS": 4}, queue="reuse-q", job_id=job_id)
    assert again.wait(timeout=180) is JobStatus.SUCCEEDED, again.info()["error"]

    # Then it resumed from nothing of the earlier job: it trained its own 4 steps from step 1
    events = list(again.events())
    assert EventKind.RESUMED not in [e.kind for e in events]
    assert [e.step for e in events if e.kind is EventKind.LOG and "loss" in e.metrics][0] == 1
    manifest = json.loads((Path(again.info()["output_dir"]) / MANIFEST).read_text())
    assert manifest["steps"] == 4 == manifest["max_steps"] and manifest["attempt"] == 1
    # Its job folder holds its own result and events only; the earlier job's folder is kept aside
    result = RunResult.model_validate_json((folder / "attempts" / "1" / "result.json").read_text())
    assert result.step == 4
    submitted = float(r.hget(keys.job(job_id), "submitted_at") or 0)
    lines = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines].count("started") == 1 and all(line["ts"] >= submitted for line in lines)
    aside = [p for p in folder.parent.iterdir() if p.name.startswith(f"{job_id}.expired-")]
    assert len(aside) == 1 and (aside[0] / "attempts" / "1" / "checkpoints").is_dir()
    # (whole: the worker moved it before the new attempt 1 wrote anything)
    assert RunResult.model_validate_json((aside[0] / "attempts" / "1" / "result.json").read_text()).step == 6


@pytest.mark.e2e
def test_a_merge_cancelled_while_it_runs_publishes_nothing_and_ends_cancelled(published: Job) -> None:
    # Given a merge held while it runs: its adapter carries 512 MiB more to hash, and its job
    # process is stopped (SIGSTOP) as soon as the record names it
    adapter = Path(published.info()["output_dir"])
    padding = adapter / "padding.bin"
    with padding.open("wb") as f:
        f.truncate(512 << 20)  # sparse: no disk used
    try:
        job = merge(published.id)
        pid = wait_for(lambda: job.status() is JobStatus.RUNNING and job.info()["pid"], timeout=60, interval=0.02)
        os.kill(pid, signal.SIGSTOP)
        try:
            # When it is cancelled
            assert job.cancel() is JobStatus.RUNNING
        finally:
            os.kill(pid, signal.SIGCONT)
        # Then it stops before publishing, and ends cancelled
        assert job.wait(timeout=60) is JobStatus.CANCELLED, job.info()
    finally:
        padding.unlink()
    info = job.info()
    assert "cancelled before its merged model was published" in info["error"]
    assert "did not stop within" not in info["error"]  # it stopped itself; it was not killed
    target = Path(info["output_dir"])
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]
    assert [e.kind for e in job.events()][-1] is EventKind.CANCELLED


@pytest.mark.e2e
@pytest.mark.parametrize(("reason", "status"), [(StopReason.CANCEL, JobStatus.CANCELLED),
                                                (StopReason.PREEMPT, JobStatus.QUEUED)])
def test_a_merge_asked_to_stop_right_before_it_publishes_publishes_nothing(
        tiny_model: Path, storage: Path, tmp_path: Path, reason: StopReason, status: JobStatus) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepe_tasks.job.merge import MergeRunner

    # Given a real LoRA adapter of the tiny model
    adapter = storage / "models" / f"adapter-{uuid.uuid4().hex[:8]}"
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    lora.save_pretrained(str(adapter))
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter)
    target = adapter.with_name(f"{adapter.name}-merged")
    spec = JobSpec(job_id=f"m-{uuid.uuid4().hex[:8]}", method="merge", method_sha256="", source="", kind="merge",
                   storage_root=str(storage), params={"MODEL_PATH": str(tiny_model), "ADAPTER_PATH": str(adapter),
                                                      "OUTPUT_DIR": str(target), "MERGED_FROM": "some-job"})
    staged_when_asked: list[bool] = []

    def should_stop() -> StopReason | None:
        staged_when_asked.append(any(p.name.startswith(f".{target.name}.staging-") for p in target.parent.iterdir()))
        return reason if staged_when_asked[-1] else None

    # When the stop comes once the merged model is staged, before the rename
    result = MergeRunner(spec, lambda event: None, should_stop).run()

    # Then nothing is published and nothing staged is left
    assert staged_when_asked == [False, False, False, True]
    assert result.status is status and "nothing was published" in (result.error or "")
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]
