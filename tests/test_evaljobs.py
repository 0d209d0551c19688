"""Evaluation jobs: `deepe eval` on a base model and on a trained job, against a real worker; a
lost evaluation started again; the refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from deepe_tasks import EventKind, InvalidJobState, InvalidParams, Job, JobStatus, evaluate, submit
from deepe_tasks.fixtures import tiny
from deepe_tasks.queue.compare import compare
from deepe_tasks.queue.evals import results
from tests.helpers import Worker, cli_here, process_gone, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sft_params(tiny_model: Path, colors_data: Path) -> dict[str, object]:  # module scope for `trained`
    return {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data), "MAX_STEPS": 24,
            "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 2e-2}


@pytest.fixture(scope="module")
def trained(worker: Worker, sft_params: dict[str, Any]) -> Job:
    """A succeeded SFT job trained long enough to answer its own data better than its base."""
    job = submit("sft-demo", sft_params)
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()["error"]
    return job


def test_the_trained_model_beats_its_base_on_its_own_data_and_answers_are_shown(
        worker: Worker, trained: Job, tiny_model: Path, colors_data: Path) -> None:
    # When the base model and the trained job are evaluated on the training data
    base = evaluate(str(tiny_model), str(colors_data), max_samples=16, samples=3)
    done = cli_here("eval", trained.id, "--dataset", str(colors_data), "--max-samples", "16", "--samples", "3",
                    "--wait", "--json")
    assert done.returncode == 0, done.stderr
    ours = json.loads(done.stdout)
    assert base.wait(timeout=180) is JobStatus.SUCCEEDED, base.info()
    theirs = results(base)
    # Then each reports every metric, and the trained model's loss is lower
    for found in (ours, theirs):
        assert {"loss", "perplexity", "exact_match", "rouge_l"} <= found.keys()
        assert found["perplexity"] == pytest.approx(2.718281828 ** found["loss"], rel=1e-6)
        assert 0 <= found["exact_match"] <= 1 and 0 <= found["rouge_l"] <= 1 and found["rows"] == 16
        assert len(found["samples"]) == 3 and all(isinstance(s["generated"], str) for s in found["samples"])
        assert found["samples"][0]["expected"] == "The sky is blue."  # the dataset's first answer
    assert ours["loss"] < theirs["loss"], (ours["loss"], theirs["loss"])
    assert ours["evaluated"] == trained.id and ours["adapter"] == trained.info()["output_dir"]
    assert theirs["evaluated"] == str(tiny_model) and theirs["adapter"] is None
    # eval.json lies beside the job's model, and the evaluation's events carry the metrics
    assert Path(ours["output_dir"]).parent == Path(trained.info()["output_dir"] + "-eval")
    assert json.loads((Path(ours["output_dir"]) / "eval.json").read_text())["dataset_sha256"]
    evaluated = [e for e in Job(ours["job"]).events() if e.kind is EventKind.EVAL]
    assert len(evaluated) == 1 and evaluated[0].metrics["loss"] == pytest.approx(ours["loss"])


def test_evaluations_that_cannot_work_are_refused_with_the_fix(
        trained: Job, tiny_model: Path, colors_data: Path, tmp_path: Path, storage: Path) -> None:
    with pytest.raises(InvalidParams, match="neither a job id nor a model folder"):
        evaluate(str(storage / "base" / "no-such-model"), str(colors_data))
    other = tiny.write_jsonl([{"question": "q", "answer": "a"}], storage / "data" / "qa.jsonl")
    with pytest.raises(InvalidParams, match=r"no column 'instruction'; its columns are \['answer', 'question'\]"):
        evaluate(trained.id, str(other))
    with pytest.raises(InvalidParams, match="does not exist"):
        evaluate(trained.id, "data/missing.jsonl")
    queued = submit("sft-demo", {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data)},
                    queue="nobody-consumes-this")
    with pytest.raises(InvalidJobState, match="has no published model"):
        evaluate(queued.id, str(colors_data))
    queued.cancel()


def test_a_ten_megabyte_prompt_is_cut_to_its_last_tokens_not_a_failure(
        worker: Worker, tiny_model: Path, storage: Path) -> None:
    data = tiny.write_jsonl([{"instruction": "word " * (2 << 20), "output": "The sky is blue."},
                             {"instruction": "What colour is the sky?", "output": "The sky is blue."}],
                            storage / "data" / "huge-prompt.jsonl")
    assert data.stat().st_size > 10 << 20
    job = evaluate(str(tiny_model), str(data))
    assert job.wait(timeout=240) is JobStatus.SUCCEEDED, job.info()
    found = results(job)
    assert found["rows"] == 2 and found["truncated_prompts"] == 1
    assert len(found["samples"][0]["prompt"]) == 2000  # eval.json keeps the start of each prompt


def test_a_lost_evaluation_is_started_again_and_publishes_one_eval_json(
        workers: list[Worker], tmp_path: Path, tiny_model: Path, colors_data: Path, storage: Path) -> None:
    # Given an evaluation stuck reading its model's weights: an index names one shard, a FIFO,
    # whose open blocks (transformers skips a single weights file that is not a regular file,
    # and fails at once, but opens the shards an index names)
    model = storage / "base" / f"stuck-{tmp_path.name}"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        tensors = list(f.keys())
    index, shard = model / "model.safetensors.index.json", model / "model-00001-of-00001.safetensors"
    aside = tmp_path / weights.name
    first = Worker("eval-kill", tmp_path / "w1.log", env={"DEEPE_LEASE_TTL": "3"}).start()
    workers.append(first)
    os.rename(weights, aside)
    try:
        index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(tensors, shard.name)}))
        os.mkfifo(shard)
        job = evaluate(str(model), str(colors_data), max_samples=4, queue="eval-kill")
        wait_for(lambda: job.status() is JobStatus.RUNNING or job.status().is_final, timeout=60)
        assert job.status() is JobStatus.RUNNING, job.info()
        pid = job.info()["pid"]
        # When its worker is killed, with its job process
        first.process.signal(signal.SIGKILL, group=True)
        first.process.proc.wait()  # type: ignore[union-attr]
        wait_for(lambda: process_gone(pid), timeout=10)
        assert job.status() is JobStatus.RUNNING, job.info()  # still stuck, not failed: the kill found it running
    finally:
        index.unlink(missing_ok=True)
        shard.unlink(missing_ok=True)
        os.rename(aside, weights)
    # Then another worker runs it again, and one eval.json is published
    workers.append(Worker("eval-kill", tmp_path / "w2.log", env={"DEEPE_LEASE_TTL": "3"}).start())
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    assert job.info()["attempts"] == 2
    out = Path(job.info()["output_dir"])
    assert json.loads((out / "deepe.json").read_text())["attempt"] == 2
    assert (out / "eval.json").exists()
    assert not [p for p in out.parent.iterdir() if job.id in p.name and p != out]


def test_the_api_queues_an_evaluation_and_refuses_as_the_cli_does(
        http: Any, worker: Worker, trained: Job, colors_data: Path) -> None:
    answer = http.post(f"/jobs/{trained.id}/eval", json={"dataset": str(colors_data), "max_samples": 4})
    assert answer.status_code == 201, answer.text
    job = Job(answer.json()["id"])
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()
    assert results(job)["rows"] == 4
    missing = http.post(f"/jobs/{trained.id}/eval", json={"dataset": "data/missing.jsonl"})
    assert missing.status_code == 422 and "does not exist" in missing.json()["detail"]
    assert http.post(f"/jobs/{job.id}/eval", json={"dataset": str(colors_data)}).status_code == 409
    assert http.post("/jobs/no-such-job/eval", json={"dataset": str(colors_data)}).status_code == 404
    nothing = http.post(f"/jobs/{trained.id}/eval", json={})
    assert nothing.status_code == 422 and "Nothing to evaluate on" in nothing.json()["detail"]


def test_compare_shows_differing_params_losses_and_evaluations_of_three_jobs(
        worker: Worker, trained: Job, sft_params: dict[str, Any], colors_data: Path, http: Any) -> None:
    # Given two more jobs that differ from the first in their learning rate and steps, one with
    # validation during training, and an evaluation of two of them on the same dataset
    other = submit("sft-demo", {**sft_params, "LEARNING_RATE": 5e-3, "MAX_STEPS": 8, "EVAL_SPLIT": 0.25,
                                "EVAL_STEPS": 4})
    third = submit("sft-demo", {**sft_params, "LEARNING_RATE": 1e-3, "MAX_STEPS": 8})
    for job in (other, third):
        assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()
    for job in (trained, other):
        assert evaluate(job.id, str(colors_data), max_samples=4, samples=2).wait(timeout=180) is JobStatus.SUCCEEDED
    # When they are compared, on the command line and over HTTP
    done = cli_here("compare", trained.id, other.id[:10], third.id, "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    # Then the parameters that differ are named, and each job's losses and evaluations are there
    assert {"LEARNING_RATE", "MAX_STEPS", "EVAL_SPLIT"} <= set(found["differing_params"])
    assert "MODEL_PATH" not in found["differing_params"] and "OUTPUT_DIR" not in found["differing_params"]
    rows = {r["id"]: r for r in found["jobs"]}
    assert [r["id"] for r in found["jobs"]] == [trained.id, other.id, third.id]
    assert rows[other.id]["eval"]["step"] == 8 and rows[trained.id]["eval"] is None
    assert all(isinstance(r["train_loss"], float) for r in found["jobs"])
    group = next(g for g in found["evaluations"] if g["dataset"] == str(colors_data))
    assert set(group["results"]) == {trained.id, other.id}
    assert {"loss", "perplexity", "exact_match", "rouge_l"} <= set(group["results"][other.id])
    over_http = http.get("/compare", params={"jobs": f"{trained.id},{other.id}", "curves": "true"})
    assert over_http.status_code == 200, over_http.text
    page = over_http.json()
    evals = [e for e in other.events() if e.kind is EventKind.EVAL]
    assert page["jobs"][1]["curves"]["eval"] == [[e.step, pytest.approx(e.metrics["eval_loss"])] for e in evals]
    assert [p[0] for p in page["jobs"][1]["curves"]["eval"]] == [4, 8]
    assert len(page["jobs"][0]["curves"]["train"]) == 24
    assert len(page["evaluations"][0]["results"][trained.id]["samples"]) == 2
    assert http.get("/compare", params={"jobs": trained.id}).status_code == 422
    assert http.get("/compare", params={"jobs": f"{trained.id},no-such-job"}).status_code == 404


def test_an_lm_eval_task_scores_a_trained_job_as_its_adapter_on_its_base(
        http: Any, worker: Worker, trained: Job, storage: Path) -> None:
    # A multiple-choice task on the colours the job was trained on (tests/test_lmeval.py has the rest)
    folder = storage / "lmeval" / f"trained-{trained.id[:8]}"
    tiny.write_jsonl([{"q": f"What colour is the {thing}?", "choices": [f"The {thing} is {c}." for c in ("blue", color)],
                       "label": 1} for thing, color in list(tiny.COLORS.items())[1:5]], folder / "mc.jsonl")
    (folder / "task.yaml").write_text("task: trained_mc\ndataset_path: json\ndataset_kwargs: {data_files: mc.jsonl}\n"
                                      "test_split: train\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
                                      "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n")
    # (over HTTP: the Python API and the CLI take it in tests/test_lmeval.py)
    answer = http.post(f"/jobs/{trained.id}/eval", json={"lm_eval": str(folder / "task.yaml")})
    assert answer.status_code == 201, answer.text
    job = Job(answer.json()["id"])
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    found = results(job)
    assert found["adapter"] == trained.info()["output_dir"] and found["evaluated"] == trained.id
    scored = found["lm_eval"]["results"]["trained_mc"]
    assert scored["samples"] == 4 and 0 <= scored["acc"] <= 1 and 0 <= scored["acc_norm"] <= 1  # the defaults
    # And compare shows it under its task file (it has no dataset), with lm-eval's metrics
    [group] = [g for g in compare([trained.id, trained.id])["evaluations"] if g["dataset"].startswith("lm-eval task")]
    assert group["dataset"].endswith("/task.yaml") and f"trained-{trained.id[:8]}" in group["dataset"]
    assert group["results"][trained.id]["lm_eval/trained_mc/acc"] == scored["acc"]
    shown = cli_here("compare", trained.id, trained.id)
    assert shown.returncode == 0 and "lm_eval/trained_mc/acc" in shown.stdout, shown.stdout
