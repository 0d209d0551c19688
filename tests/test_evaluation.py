"""Validation during training: EVAL_SPLIT / EVAL_DATASET_PATH / EVAL_STEPS on SFT-Demo, the
platform's schedule on any trainer with an eval_dataset, `eval` events, deepe.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import EventKind, JobStatus, submit
from deepe_tasks.contract.methods import BUILTIN
from deepe_tasks.core.records import Event
from deepe_tasks.fixtures import tiny
from deepe_tasks.ui.display import format_event
from deepe_tasks.ui.local import local_runner
from tests.helpers import Worker

SFT = BUILTIN / "sft-demo.py"


def params(model: Path, data: Path, **extra: Any) -> dict[str, Any]:
    return {"MODEL_PATH": str(model), "DATASET_PATH": str(data), "MAX_STEPS": 4, "BATCH_SIZE": 2,
            "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 5e-3, **extra}


@pytest.mark.e2e
def test_eval_split_gives_eval_events_at_eval_steps_equal_to_evaluate_on_the_same_split(
        tiny_model: Path, tmp_path: Path) -> None:
    data = tiny.write_jsonl(tiny.sft_rows(16), tmp_path / "d.jsonl")
    events: list[Event] = []
    runner = local_runner(SFT, params(tiny_model, data, EVAL_SPLIT=0.25, EVAL_STEPS=2), events.append)
    trainer = runner.build()
    # The seeded split holds a quarter of the rows out, and the platform set the schedule
    assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (12, 4)
    assert (str(trainer.args.eval_strategy), trainer.args.eval_steps) in {("steps", 2), ("IntervalStrategy.STEPS", 2)}
    trainer.train()
    evals = [e for e in events if e.kind is EventKind.EVAL]
    assert [e.step for e in evals] == [2, 4]
    last = evals[-1].metrics
    assert last["perplexity"] == pytest.approx(math.exp(last["eval_loss"]))
    # The last evaluation is what evaluate() gives on the same split, by hand, after training
    assert trainer.evaluate()["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    # and eval lines read as such (deepe logs)
    assert format_event(evals[0]).split(" ", 1)[1].startswith("eval at step 2 eval_loss=")
    assert not any("eval_loss" in e.metrics for e in events if e.kind is EventKind.LOG)


@pytest.mark.e2e
def test_without_eval_steps_a_run_is_evaluated_ten_times_and_a_held_out_file_works_too(
        tiny_model: Path, tmp_path: Path) -> None:
    data = tiny.write_jsonl(tiny.sft_rows(16), tmp_path / "d.jsonl")
    held_out = tiny.write_jsonl(tiny.sft_rows(6), tmp_path / "held-out.jsonl")
    runner = local_runner(SFT, params(tiny_model, data, EVAL_DATASET_PATH=str(held_out), MAX_STEPS=20),
                          lambda e: None)
    trainer = runner.build()
    assert len(trainer.eval_dataset) == 6 and len(trainer.train_dataset) == 16
    assert trainer.args.eval_steps == 2  # 20 steps, 10 evaluations


def test_eval_params_are_checked_at_submit(tiny_model: Path, colors_data: Path, store: Path) -> None:
    from deepe_tasks.core.errors import InvalidParams

    with pytest.raises(InvalidParams, match="EVAL_SPLIT.*above 0 and below 1"):
        submit("sft-demo", params(tiny_model, colors_data, EVAL_SPLIT=1.5))
    with pytest.raises(InvalidParams, match="EVAL_DATASET_PATH='no/such.jsonl' resolves to .*does not exist"):
        submit("sft-demo", params(tiny_model, colors_data, EVAL_DATASET_PATH="no/such.jsonl"))


@pytest.mark.e2e
def test_a_job_with_eval_split_records_its_last_evaluation_in_deepe_json(
        worker: Worker, tiny_model: Path, colors_data: Path) -> None:
    job = submit("sft-demo", params(tiny_model, colors_data, EVAL_SPLIT=0.25, EVAL_STEPS=2,
                                    PromptInputColumn="instruction", PromptOutputColumn="output"))
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()
    evals = [e for e in job.events() if e.kind is EventKind.EVAL]
    assert [e.step for e in evals] == [2, 4]
    manifest = json.loads((Path(job.info()["output_dir"]) / "deepe.json").read_text())
    assert manifest["eval"]["step"] == 4
    assert manifest["eval"]["eval_loss"] == pytest.approx(evals[-1].metrics["eval_loss"])


@pytest.mark.e2e
def test_keep_best_publishes_the_checkpoint_with_the_lowest_eval_loss(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from deepe_tasks.ui.local import run_method_file

    # Given held-out data that the training data makes worse to predict after a few steps (the
    # same questions, answered in words the training data never uses)
    rows = tiny.sft_rows(32)
    data = tiny.write_jsonl(rows, tmp_path / "d.jsonl")
    held_out = tiny.write_jsonl([{"instruction": r["instruction"], "output": "I do not know that at all."}
                                 for r in rows[:8]], tmp_path / "held-out.jsonl")
    events: list[Event] = []
    result = run_method_file(SFT, params(tiny_model, data, MAX_STEPS=16, BATCH_SIZE=4, LEARNING_RATE=0.01,
                                         EVAL_DATASET_PATH=str(held_out), EVAL_STEPS=2, KEEP_BEST=True),
                             events.append)
    assert result.status is JobStatus.SUCCEEDED, result.error
    losses = {e.step or 0: e.metrics["eval_loss"] for e in events if e.kind is EventKind.EVAL}
    best = min(losses, key=lambda s: losses[s])
    assert best < 16, f"late steps did not get worse here: {losses}"
    # Then the model published is that step's, and deepe.json says so
    out = Path(str(result.output_dir))
    manifest = json.loads((out / "deepe.json").read_text())
    assert manifest["best"] == {"step": best, "eval_loss": pytest.approx(losses[best])}
    assert manifest["steps"] == 16 and manifest["eval"]["step"] == 16
    job_id = out.name  # OUTPUT_DIR defaults to models/<job id>
    checkpoint = get_storage() / "jobs" / job_id / "attempts" / "1" / "checkpoints" / f"checkpoint-{best}"
    published, kept = load_file(out / "adapter_model.safetensors"), load_file(checkpoint / "adapter_model.safetensors")
    assert published.keys() == kept.keys() and all(bool((published[k] == kept[k]).all()) for k in kept)
    assert any(e.kind is EventKind.LOG and f"publishing the checkpoint of step {best}" in (e.message or "")
               for e in events)


def get_storage() -> Path:
    from deepe_tasks.core.settings import get_settings

    return get_settings().storage_root


@pytest.mark.e2e
def test_grpo_demo_honours_eval_split_with_eval_rewards(tiny_model: Path, tmp_path: Path) -> None:
    from deepe_tasks.ui.local import run_method_file

    data = tiny.write_jsonl(tiny.gsm_rows(16), tmp_path / "g.jsonl")
    events: list[Event] = []
    result = run_method_file(BUILTIN / "grpo-demo.py", {
        "MODEL_PATH": str(tiny_model), "DATASET_PATH": str(data), "MAX_STEPS": 2, "BATCH_SIZE": 2,
        "NUM_GENERATIONS": 2, "MAX_CONTENT_LENGTH": 8, "LORA_RANK": 4, "EVAL_SPLIT": 0.25, "EVAL_STEPS": 1},
        events.append)
    assert result.status is JobStatus.SUCCEEDED, result.error
    evals = [e for e in events if e.kind is EventKind.EVAL]
    assert [e.step for e in evals] == [1, 2]
    assert all("eval_reward" in e.metrics and "eval_loss" in e.metrics for e in evals)
