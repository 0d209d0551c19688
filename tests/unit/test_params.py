"""The parameter schema: conversion, aliases, custom keys, ranges and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepe_tasks.contract.params import parse_params, resolve_params
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.records import mask_secrets

BASE = {"MODEL_PATH": "models/base", "DATASET_PATH": "data/train.jsonl"}


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("YES", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("No", False),
])
def test_booleans_from_strings(text: str, expected: bool) -> None:
    assert parse_params({**BASE, "LOAD_IN_4BIT": text}).LOAD_IN_4BIT is expected


def test_strings_are_converted_and_snake_case_aliases_accepted() -> None:
    # Given values as a UI sends them, under both spellings
    raw = {"model_path": "m", "dataset_path": "d", "max_steps": "25", "LEARNING_RATE": "1e-4",
           "prompt_input_column": "question", "PromptOutputColumn": "answer"}
    # When they are parsed
    p = parse_params(raw)
    # Then each lands on its canonical name with its type
    assert (p.MODEL_PATH, p.DATASET_PATH, p.MAX_STEPS, p.LEARNING_RATE) == ("m", "d", 25, 1e-4)
    assert (p.PromptInputColumn, p.PromptOutputColumn) == ("question", "answer")
    assert p.custom == {}


def test_unknown_keys_are_kept_as_custom_parameters() -> None:
    p = parse_params({**BASE, "my_temperature": 0.7, "Style": "terse"})
    assert p.custom == {"my_temperature": 0.7, "Style": "terse"}
    assert p["my_temperature"] == 0.7 and p.get("Style") == "terse" and p.get("nope", 3) == 3


def test_defaults_are_sensible() -> None:
    p = parse_params(BASE)
    assert p.MAX_STEPS == -1 and p.LORA_RANK == 16 and p.LOAD_IN_4BIT is False
    assert p.BATCH_SIZE >= 1 and 0 < p.LEARNING_RATE < 1 and p.OUTPUT_DIR is None


@pytest.mark.parametrize("key, value, words", [
    ("MAX_STEPS", "ten", ["MAX_STEPS", "'ten'", "integer"]),
    ("MAX_STEPS", 0, ["MAX_STEPS", "0", "-1"]),
    ("LEARNING_RATE", -0.1, ["LEARNING_RATE", "-0.1", "> 0"]),
    ("LORA_RANK", 5000, ["LORA_RANK", "5000", "1 to 1024"]),
    ("LOAD_IN_4BIT", "maybe", ["LOAD_IN_4BIT", "'maybe'", "true or false"]),
    ("BATCH_SIZE", "2.5", ["BATCH_SIZE", "'2.5'"]),
])
def test_a_wrong_value_names_the_parameter_the_value_and_what_is_allowed(key: str, value: object,
                                                                          words: list[str]) -> None:
    with pytest.raises(InvalidParams) as info:
        parse_params({**BASE, key: value})
    for word in words:
        assert word in str(info.value)


def test_model_and_dataset_paths_are_required() -> None:
    with pytest.raises(InvalidParams, match="MODEL_PATH is required"):
        parse_params({"DATASET_PATH": "d"})
    with pytest.raises(InvalidParams, match="DATASET_PATH is required"):
        parse_params({"MODEL_PATH": "m"})


def test_parameters_over_one_megabyte_are_refused() -> None:
    with pytest.raises(InvalidParams, match="over the limit"):
        parse_params({**BASE, "blob": "x" * 1_100_000})


def test_relative_paths_resolve_under_storage(tmp_path: Path) -> None:
    p = resolve_params(parse_params(BASE), tmp_path, "job1")
    assert str(tmp_path / "models/base") == p.MODEL_PATH
    assert str(tmp_path / "data/train.jsonl") == p.DATASET_PATH
    assert str(tmp_path / "models/job1") == p.OUTPUT_DIR


def test_absolute_input_paths_are_kept(tmp_path: Path) -> None:
    p = resolve_params(parse_params({**BASE, "MODEL_PATH": "/opt/models/x"}), tmp_path, "j")
    assert p.MODEL_PATH == "/opt/models/x"


@pytest.mark.parametrize("output", ["../escape", "/etc/deepe", "models/../../x", "."])
def test_output_dir_must_stay_inside_storage(tmp_path: Path, output: str) -> None:
    with pytest.raises(InvalidParams, match="outside the storage root"):
        resolve_params(parse_params({**BASE, "OUTPUT_DIR": output}), tmp_path / "root", "j")


@pytest.mark.parametrize("output", ["models", "jobs", "jobs/abc", "."])
def test_output_dir_cannot_replace_the_platforms_folders(tmp_path: Path, output: str) -> None:
    with pytest.raises(InvalidParams, match="OUTPUT_DIR"):
        resolve_params(parse_params({**BASE, "OUTPUT_DIR": output}), tmp_path, "j")


def test_output_dir_that_holds_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "runs/mine").mkdir(parents=True)
    (tmp_path / "runs/mine/notes.txt").write_text("keep me")
    with pytest.raises(InvalidParams, match="already holds files that are not a deepe model"):
        resolve_params(parse_params({**BASE, "OUTPUT_DIR": "runs/mine"}), tmp_path, "j")
    (tmp_path / "runs/mine/deepe.json").write_text("{}")  # a previous model: replaced on publish
    assert resolve_params(parse_params({**BASE, "OUTPUT_DIR": "runs/mine"}), tmp_path, "j").OUTPUT_DIR


def test_output_dir_inside_storage_is_accepted(tmp_path: Path) -> None:
    p = resolve_params(parse_params({**BASE, "OUTPUT_DIR": str(tmp_path / "runs/a")}), tmp_path, "j")
    assert str(tmp_path / "runs/a") == p.OUTPUT_DIR


def test_secrets_are_masked() -> None:
    masked = mask_secrets({"HF_TOKEN": "hf_abc", "api_key": "k", "db_password": "p", "LORA_RANK": 8,
                           "nested": {"client_secret": "s"}, "empty_token": "", "hubs": [{"token": "t"}, 3]})
    assert masked == {"HF_TOKEN": "***", "api_key": "***", "db_password": "***", "LORA_RANK": 8,
                      "nested": {"client_secret": "***"}, "empty_token": "", "hubs": [{"token": "***"}, 3]}
