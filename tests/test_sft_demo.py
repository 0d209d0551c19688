"""SFT-Demo through the real runner and real TRL: data formats, columns, chat templates, labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks.contract.methods import BUILTIN
from deepe_tasks.core.records import Event, EventKind, JobStatus
from deepe_tasks.fixtures import tiny
from deepe_tasks.ui.local import local_runner, run_method_file

ROOT = Path(__file__).resolve().parent.parent
SFT = BUILTIN / "sft-demo.py"


def params(model: Path, data: Path, **extra: Any) -> dict[str, Any]:
    return {"MODEL_PATH": str(model), "DATASET_PATH": str(data), "MAX_STEPS": 2, "BATCH_SIZE": 2,
            "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 5e-3, **extra}


def build(model: Path, data: Path, **extra: Any) -> Any:
    """The runner as a worker builds it, stopped before training: (runner, trainer)."""
    runner = local_runner(SFT, params(model, data, **extra), lambda e: None)
    return runner, runner.build()


def train(model: Path, data: Path, **extra: Any) -> tuple[Any, list[Event]]:
    events: list[Event] = []
    result = run_method_file(SFT, params(model, data, **extra), events.append)
    assert result.status is JobStatus.SUCCEEDED, result.error
    return result, events


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return tiny.sft_rows(16)


@pytest.mark.e2e
def test_jsonl_csv_parquet_and_save_to_disk_all_train(tiny_model: Path, rows: list[dict[str, str]],
                                                      tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(rows)
    inputs = {
        "jsonl": tiny.write_jsonl(rows, tmp_path / "d.jsonl"),
        "json": tmp_path / "d.json",
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
        "folder of parquet": tmp_path / "parts",
        "save_to_disk": tmp_path / "saved",
    }
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds.to_csv(str(inputs["csv"]))
    ds.to_parquet(str(inputs["parquet"]))
    (tmp_path / "parts").mkdir()
    ds.select(range(8)).to_parquet(str(tmp_path / "parts/a.parquet"))
    ds.select(range(8, 16)).to_parquet(str(tmp_path / "parts/b.parquet"))
    ds.save_to_disk(str(inputs["save_to_disk"]))
    for kind, path in inputs.items():
        runner, trainer = build(tiny_model, path)
        assert len(runner.namespace["dataset"]) == 16, kind
    result, events = train(tiny_model, inputs["csv"], OUTPUT_DIR="models/sft-csv")
    assert [e.step for e in events if e.kind is EventKind.LOG and "loss" in e.metrics] == [1, 2]


def test_the_input_column_is_appended_to_the_prompt_when_present(tiny_model: Path, tmp_path: Path) -> None:
    with_input = [{"instruction": "Translate to French.", "input": "the sky", "output": "le ciel"}] * 4
    runner, _ = build(tiny_model, tiny.write_jsonl(with_input, tmp_path / "in.jsonl"))
    assert runner.namespace["dataset"][0]["prompt"] == "Translate to French.\n\nthe sky\n"
    without = [{"instruction": "Translate to French: the sky", "output": "le ciel"}] * 4
    runner, _ = build(tiny_model, tiny.write_jsonl(without, tmp_path / "out.jsonl"))
    assert runner.namespace["dataset"][0]["prompt"] == "Translate to French: the sky\n"


def test_a_custom_column_mapping_and_max_samples(tiny_model: Path, tmp_path: Path) -> None:
    data = tiny.write_jsonl([{"q": f"question {i}", "a": f"answer {i}"} for i in range(10)], tmp_path / "qa.jsonl")
    runner, _ = build(tiny_model, data, PromptInputColumn="q", PromptOutputColumn="a", MAX_SAMPLES=3)
    ds = runner.namespace["dataset"]
    assert len(ds) == 3 and ds[1] == {"prompt": "question 1\n", "completion": "answer 1"}


def test_the_loss_is_on_the_completion_tokens_only(tiny_model: Path, rows: list[dict[str, str]],
                                                   tmp_path: Path) -> None:
    runner, trainer = build(tiny_model, tiny.write_jsonl(rows, tmp_path / "d.jsonl"))
    tokenizer = runner.namespace["tokenizer"]
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        learned = [i for i, label in zip(ids, labels) if label != -100]
        text = tokenizer.decode(learned, skip_special_tokens=True)
        assert text.startswith("The ") and text.endswith(".")  # the answer, not the question
        assert "What colour" not in text
        assert sum(label != -100 for label in labels) < sum(1 for i in ids if i != tokenizer.pad_token_id)


def test_sequences_are_cut_at_max_seq_length(tiny_model: Path, tmp_path: Path) -> None:
    long = [{"instruction": "Say many words.", "output": "word " * 200}] * 4
    _, trainer = build(tiny_model, tiny.write_jsonl(long, tmp_path / "long.jsonl"), MAX_SEQ_LENGTH=32)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == 32


def test_prompts_longer_than_max_seq_length_are_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    long = [{"instruction": "word " * 200, "output": "done"}] * 4
    result = run_method_file(SFT, params(tiny_model, tiny.write_jsonl(long, tmp_path / "long.jsonl"),
                                         MAX_SEQ_LENGTH=32), lambda e: None)
    assert result.status is JobStatus.FAILED
    assert "raise MAX_SEQ_LENGTH" in (result.error or "") and "MAX_SEQ_LENGTH=32" in (result.error or "")


def test_hyperparameters_reach_the_trainer(tiny_model: Path, rows: list[dict[str, str]], tmp_path: Path) -> None:
    _, trainer = build(tiny_model, tiny.write_jsonl(rows, tmp_path / "d.jsonl"), BATCH_SIZE=3,
                       GRAD_ACCUM_STEPS=2, LEARNING_RATE=1e-3, WARMUP_STEPS=1, MAX_STEPS=7,
                       MAX_GRAD_NORM=0.5, LORA_RANK=8)
    a = trainer.args
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps, a.learning_rate) == (3, 2, 1e-3)
    assert (a.warmup_steps, a.max_steps, a.max_grad_norm, a.logging_steps) == (1, 7, 0.5, 1)
    assert trainer.model.peft_config["default"].r == 8


@pytest.mark.e2e
def test_a_chat_template_is_used_when_the_tokenizer_has_one(tiny_model: Path, rows: list[dict[str, str]],
                                                            tmp_path: Path) -> None:
    chat_model = tmp_path / "chat-model"
    shutil.copytree(tiny_model, chat_model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(str(chat_model))
    data = tiny.write_jsonl(rows, tmp_path / "d.jsonl")
    runner, trainer = build(chat_model, data)
    assert runner.namespace["dataset"][0]["prompt"] == [{"role": "user", "content": "What colour is the sky?"}]
    result, _ = train(chat_model, data, OUTPUT_DIR="models/sft-chat")
    assert result.status is JobStatus.SUCCEEDED


@pytest.mark.parametrize("rows_, extra, words", [
    ([], {}, ["has no rows"]),
    ([{"instruction": "x", "output": "y"}], {"PromptOutputColumn": "answer"},
     ["no column 'answer'", "['instruction', 'output']"]),
])
def test_bad_data_is_named_clearly(tiny_model: Path, tmp_path: Path, rows_: list[dict[str, str]],
                                   extra: dict[str, str], words: list[str]) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    result = run_method_file(SFT, params(tiny_model, data, **extra), lambda e: None)
    assert result.status is JobStatus.FAILED and result.phase == "loading the dataset"
    for w in words:
        assert w in (result.error or "")


def test_an_unreadable_dataset_names_the_path(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "x", "output": \n')
    result = run_method_file(SFT, params(tiny_model, data), lambda e: None)
    assert result.status is JobStatus.FAILED and result.phase == "loading the dataset"
    assert "Failed while loading the dataset" in (result.error or "")
    assert f"DATASET_PATH {data} could not be read as json" in (result.error or "")
