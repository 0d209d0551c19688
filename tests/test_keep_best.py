"""KEEP_BEST where a job is not one plain attempt: resumed on another worker after a SIGKILL (on
a shared folder and on an object store), and trained by two ranks. The held-out answers are words
the training data never uses, so that a high learning rate makes the late steps worse."""

from __future__ import annotations

import json
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load, load_file

from deepe_tasks import EventKind, Job, JobStatus, submit
from deepe_tasks.contract.methods import BUILTIN
from deepe_tasks.core.objects import ObjectStore
from deepe_tasks.fixtures import tiny
from tests.helpers import Worker, process_gone, wait_for, write_method
from tests.s3 import MotoServer
from tests.test_s3 import BUCKET, bucket_url, moto, on_store, worker_on_store  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e

ADAPTER = "adapter_model.safetensors"
HANG_AT = 3  # attempt 1 hangs once its checkpoint of this step is complete; the test kills it there
# SFT-Demo, with a checkpoint at every step (so that the trainer's rotation has something to
# delete) and a hang in attempt 1 right after the checkpoint of step HANG_AT.
SAVE_THEN_HANG = (BUILTIN / "sft-demo.py").read_text().replace("trainer = SFTTrainer(", '''
import time
from transformers import TrainerCallback


class SaveThenHang(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(params.get("HANG_AT", 0)):
            time.sleep(3600)


trainer = SFTTrainer(''').replace("callbacks=[callback],", "callbacks=[callback, SaveThenHang()],")


@pytest.fixture(scope="module")
def files(storage: Path) -> tuple[Path, Path]:
    folder = storage / "data" / "keep-best"
    rows = tiny.sft_rows(32)
    held_out = [{"instruction": r["instruction"], "output": "I do not know that at all."} for r in rows[:8]]
    return tiny.write_jsonl(rows, folder / "d.jsonl"), tiny.write_jsonl(held_out, folder / "held-out.jsonl")


def params(model: str, data: str, held_out: str, **extra: Any) -> dict[str, Any]:
    return {"MODEL_PATH": model, "DATASET_PATH": data, "EVAL_DATASET_PATH": held_out, "MAX_STEPS": 6,
            "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 0.05, "EVAL_STEPS": 1,
            "KEEP_BEST": True, **extra}


def best_eval(job: Job) -> tuple[int, float]:
    """The step with the lowest eval_loss of any attempt, and that loss."""
    losses = {e.step or 0: e.metrics["eval_loss"] for e in job.events() if e.kind is EventKind.EVAL}
    step = min(losses, key=lambda s: losses[s])
    return step, losses[step]


def kill(worker: Worker, job: Job) -> None:
    pid = job.info()["pid"]
    worker.process.signal(signal.SIGKILL, group=True)
    worker.process.proc.wait()  # type: ignore[union-attr]
    wait_for(lambda: process_gone(pid), timeout=10)


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def assert_resumed_with_the_best_in_attempt_1(job: Job) -> tuple[int, dict[str, Any]]:
    """The job ended after a resume and published attempt 1's best step; the best and deepe.json."""
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()
    assert job.info()["attempts"] == 2
    resumed = [e for e in job.events() if e.kind is EventKind.RESUMED]
    assert [e.step for e in resumed] == [HANG_AT]
    step, loss = best_eval(job)
    assert step < HANG_AT, f"the best step is not in attempt 1 here: {best_eval(job)}"
    return step, {"step": step, "eval_loss": pytest.approx(loss)}


def test_keep_best_on_a_folder_publishes_attempt_1_s_best_after_a_resume(
        workers: list[Worker], tmp_path: Path, store: Path, storage: Path, tiny_model: Path,
        files: tuple[Path, Path]) -> None:
    method = write_method(store, "save_then_hang", SAVE_THEN_HANG)
    env = {"DEEPE_LEASE_TTL": "3", "DEEPE_KEEP_CHECKPOINTS": "always"}
    first = Worker("kb-q", tmp_path / "w1.log", env=env).start()
    workers.append(first)
    job = submit(method, params(str(tiny_model), str(files[0]), str(files[1]), HANG_AT=HANG_AT), queue="kb-q")
    wait_for(lambda: any(e.kind is EventKind.CHECKPOINT and e.step == HANG_AT for e in job.events()), timeout=180)
    kill(first, job)
    workers.append(Worker("kb-q", tmp_path / "w2.log", env=env).start())

    step, best = assert_resumed_with_the_best_in_attempt_1(job)
    out = Path(job.info()["output_dir"])
    assert json.loads((out / "deepe.json").read_text())["best"] == best
    attempts = storage / "jobs" / job.id / "attempts"
    kept = load_file(attempts / "1" / "checkpoints" / f"checkpoint-{step}" / ADAPTER)
    assert same(load_file(out / ADAPTER), kept)
    # The trainer's rotation (the last two, and the best) ran in both attempts and spared the best
    assert sorted(p.name for p in (attempts / "1" / "checkpoints").glob("checkpoint-*")) == \
        sorted({f"checkpoint-{step}", f"checkpoint-{HANG_AT}"})
    assert sorted(p.name for p in (attempts / "2" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-5",
                                                                                              "checkpoint-6"]


def test_keep_best_on_an_object_store_fetches_the_best_checkpoint_on_resume(
        workers: list[Worker], tmp_path: Path, store: Path, moto: MotoServer, bucket_url: str,  # noqa: F811 (fixtures)
        on_store: ObjectStore, files: tuple[Path, Path]) -> None:  # noqa: F811
    method = write_method(store, "s3_save_then_hang", SAVE_THEN_HANG)
    data, held_out = (f"data/kb-{uuid.uuid4().hex[:6]}-{p.name}" for p in files)
    on_store.put_file(files[0], data)
    on_store.put_file(files[1], held_out)
    env = {"DEEPE_KEEP_CHECKPOINTS": "always"}
    first = worker_on_store(workers, "kb-s3-q", tmp_path / "disk-a", moto, bucket_url, **env)
    job = submit(method, params("base/tiny-llama", f"{bucket_url}/{data}", f"{bucket_url}/{held_out}",
                                HANG_AT=HANG_AT), queue="kb-s3-q")
    marker = f"jobs/{job.id}/attempts/1/checkpoints/checkpoint-{HANG_AT}/deepe-checkpoint.json"
    wait_for(lambda: on_store.exists(marker) or job.status().is_final, timeout=180)
    kill(first, job)
    shutil.rmtree(tmp_path / "disk-a")  # as if on another machine: none of its paths is there
    # The second worker's disk holds nothing of the job: what it resumes with comes from the store
    worker_on_store(workers, "kb-s3-q", tmp_path / "disk-b", moto, bucket_url, **env)

    step, best = assert_resumed_with_the_best_in_attempt_1(job)
    rel = on_store.rel_of(job.info()["output_dir"])
    manifest = on_store.read_json(f"{rel}/deepe.json")
    assert manifest is not None and manifest["best"] == best
    published = load(on_store.read_bytes(f"{rel}/{manifest['files']}/{ADAPTER}") or b"")
    kept = load(on_store.read_bytes(f"jobs/{job.id}/attempts/1/checkpoints/checkpoint-{step}/{ADAPTER}") or b"")
    assert same(published, kept)


def test_keep_best_with_two_ranks_publishes_the_best_step_s_weights(
        workers: list[Worker], tmp_path: Path, storage: Path, tiny_model: Path, files: tuple[Path, Path]) -> None:
    workers.append(Worker("kb-ddp", tmp_path / "w.log", extra_args=["--gpus", "0,1"],
                          env={"DEEPE_KEEP_CHECKPOINTS": "always"}).start())
    # Two ranks of two rows each: the batch of the tests above
    job = submit("sft-demo", params(str(tiny_model), str(files[0]), str(files[1]), BATCH_SIZE=2), queue="kb-ddp",
                 gpus=2)
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()["error"]
    assert [e.step for e in job.events() if e.kind is EventKind.EVAL] == [1, 2, 3, 4, 5, 6]  # one voice
    step, loss = best_eval(job)
    assert step < 6, f"late steps did not get worse here: {best_eval(job)}"
    out = Path(job.info()["output_dir"])
    assert json.loads((out / "deepe.json").read_text())["best"] == {"step": step, "eval_loss": pytest.approx(loss)}
    kept = storage / "jobs" / job.id / "attempts" / "1" / "checkpoints" / f"checkpoint-{step}" / ADAPTER
    assert same(load_file(out / ADAPTER), load_file(kept))
