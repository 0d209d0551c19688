"""`deepe merge`: a finished job's LoRA adapter folded into its base model, as a job of its own."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deepe_tasks import EventKind, Job, JobStatus, merge, submit
from deepe_tasks.core.errors import InvalidJobState
from tests.helpers import Worker, cli_here, process_gone, wait_for, write_method

pytestmark = pytest.mark.e2e

FAST = {"DEEPE_LEASE_TTL": "3", "DEEPE_CANCEL_GRACE": "5"}


@pytest.fixture(scope="module")
def trained(worker: Worker, sft_params: dict[str, Any]) -> Job:
    """A succeeded SFT job with a LoRA adapter worth merging (a high learning rate moves it)."""
    job = submit("sft-demo", {**sft_params, "MAX_STEPS": 6, "LEARNING_RATE": 5e-2})
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    return job


@pytest.fixture(scope="module")
def sft_params(tiny_model: Path, colors_data: Path) -> dict[str, object]:  # module scope for `trained`
    return {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data), "MAX_STEPS": 4,
            "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 5e-3}


def logits(model: Any, tokenizer: Any) -> Any:
    import torch

    batch = tokenizer(["What colour is the sky?", "The grass is green."], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_a_merged_model_gives_the_adapter_model_s_logits(trained: Job, tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(trained.info()["output_dir"])
    merged_job = merge(trained.id)
    assert merged_job.wait(timeout=120) is JobStatus.SUCCEEDED, merged_job.info()["error"]
    out = Path(merged_job.info()["output_dir"])
    assert out == adapter.parent / f"{adapter.name}-merged"
    # A complete model: loadable alone, with no adapter beside it
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    manifest = json.loads((out / "deepe.json").read_text())
    assert manifest["merged_from"] == trained.id and manifest["method"] == "merge"
    assert len(manifest["base_sha256"]) == 64 and len(manifest["adapter_sha256"]) == 64
    assert manifest["base_sha256"] != manifest["adapter_sha256"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    alone = AutoModelForCausalLM.from_pretrained(out).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    import torch

    assert torch.allclose(logits(alone, tokenizer), logits(with_adapter, tokenizer), atol=1e-4)
    assert not torch.allclose(logits(alone, tokenizer), logits(base, tokenizer), atol=1e-4)  # the adapter did something
    # The merge is a job like any other: its events, its record
    kinds = [e.kind for e in merged_job.events()]
    assert kinds[0] is EventKind.QUEUED and EventKind.SAVING in kinds and kinds[-1] is EventKind.SUCCEEDED


def test_the_cli_merge_waits_and_prints_the_folder_last(trained: Job) -> None:
    done = cli_here("merge", trained.id[:8], "--wait", "--force")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith(f"{Path(trained.info()['output_dir']).name}-merged")


def test_merging_a_job_again_is_refused_unless_forced(trained: Job) -> None:
    # Given a job whose adapter was merged
    first = merge(trained.id, force=True)
    assert first.wait(timeout=120) is JobStatus.SUCCEEDED, first.info()["error"]
    out = Path(first.info()["output_dir"])
    before = (out / "deepe.json").read_text()
    # When it is merged again without --force, it is refused, naming where the merged model is
    again = cli_here("merge", trained.id)
    assert again.returncode == 2, again.stdout
    assert f"Job {trained.id} was merged already: its merged model is at {out}" in again.stderr.replace("\n", "")
    assert "--force" in again.stderr
    with pytest.raises(InvalidJobState, match="was merged already"):
        merge(trained.id)
    assert (out / "deepe.json").read_text() == before  # nothing queued, nothing replaced
    # And --force replaces it with a new merge
    forced = merge(trained.id, force=True)
    assert forced.wait(timeout=120) is JobStatus.SUCCEEDED, forced.info()["error"]
    assert json.loads((out / "deepe.json").read_text())["job"] == forced.id


def test_merging_a_failed_job_or_a_complete_model_is_refused(worker: Worker, trained: Job, store: Path,
                                                               sft_params: dict[str, Any]) -> None:
    write_method(store, "broken", "raise ValueError('this method fails on purpose')\n"
                 "model = tokenizer = trainer = None\n")
    failed = submit("broken", sft_params, check=False)
    assert failed.wait(timeout=120) is JobStatus.FAILED
    with pytest.raises(InvalidJobState, match=r"is failed: only a job that succeeded"):
        merge(failed.id)
    refused = cli_here("merge", failed.id)
    assert refused.returncode == 2 and "only a job that succeeded" in refused.stderr
    merged = merge(trained.id, force=True)
    assert merged.wait(timeout=120) is JobStatus.SUCCEEDED
    with pytest.raises(InvalidJobState, match="already a complete model"):
        merge(merged.id)


def test_the_api_merges_and_refuses_as_the_cli_does(http: TestClient, worker: Worker, trained: Job,
                                                      store: Path, sft_params: dict[str, Any]) -> None:
    merge(trained.id, force=True).wait(timeout=120)  # merged once: a second merge needs force
    refused = http.post(f"/jobs/{trained.id}/merge")
    assert refused.status_code == 409 and "was merged already" in refused.json()["detail"]
    queued = http.post(f"/jobs/{trained.id}/merge", params={"force": "true"})
    assert queued.status_code == 201, queued.text
    job = Job(queued.json()["id"])
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED
    again = http.post(f"/jobs/{job.id}/merge")
    assert again.status_code == 409 and "already a complete model" in again.json()["detail"]
    assert http.post("/jobs/no-such-job/merge").status_code == 404
    assert http.post(f"/jobs/{trained.id}/merge", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_a_merge_survives_a_worker_kill(workers: list[Worker], tmp_path: Path, trained: Job,
                                        tiny_model: Path) -> None:
    # Given a merge that is busy hashing its base model (a sparse 8 GB file in the base's folder
    # takes it many seconds to read; transformers refuses a FIFO in place of the weights at once)
    padding = tiny_model / "padding.bin"
    first = Worker("merge-kill", tmp_path / "w1.log", env=FAST).start()
    workers.append(first)
    try:
        with padding.open("wb") as f:
            f.truncate(8 << 30)
        job = merge(trained.id, queue="merge-kill", force=True)
        wait_for(lambda: job.status() is JobStatus.RUNNING or job.status().is_final, timeout=60)
        assert job.status() is JobStatus.RUNNING, job.info()
        wait_for(lambda: job.info().get("pid"), timeout=30)
        pid = job.info()["pid"]
        # When its worker is killed, with its job process
        first.process.signal(signal.SIGKILL, group=True)
        first.process.proc.wait()  # type: ignore[union-attr]
        wait_for(lambda: process_gone(pid), timeout=10)
        assert not job.status().is_final, job.info()  # it was still merging (or queued again by now)
    finally:
        padding.unlink(missing_ok=True)
    # Then another worker takes it over and publishes the merged model, once
    workers.append(Worker("merge-kill", tmp_path / "w2.log", env=FAST).start())
    assert job.wait(timeout=120) is JobStatus.SUCCEEDED, job.info()["error"]
    assert job.info()["attempts"] == 2
    out = Path(job.info()["output_dir"])
    assert json.loads((out / "deepe.json").read_text())["attempt"] == 2
    assert not [p for p in out.parent.iterdir() if job.id in p.name and p != out]
