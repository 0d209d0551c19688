"""DeepExtension custom methods run unchanged: an SFT file and a GRPO-style file, written for these
tests to DeepExtension's interface (argparse flags, `train_callback`, `training()` behind the
main guard), recognised, checked, given their arguments, run by the platform and saved by it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import EventKind, JobStatus, submit
from deepe_tasks.contract.check import check_source
from deepe_tasks.contract.deepext import arguments, is_deepextension
from deepe_tasks.contract.methods import file_kind
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.fixtures import tiny
from tests.helpers import Worker, cli_here

HERE = Path(__file__).resolve().parent / "deepext"
SFT_DE = HERE / "sft_de.py"
GRPO_DE = HERE / "grpo_de.py"


@pytest.fixture
def de_params(sft_params: dict[str, Any]) -> dict[str, Any]:
    return {**sft_params, "MAX_STEPS": 2, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}


def test_a_deepextension_file_is_recognised_and_passes_the_check() -> None:
    source = SFT_DE.read_text()
    assert is_deepextension(source) and file_kind(source) == "DeepExtension"
    assert not is_deepextension((HERE.parent.parent / "deepe_tasks/builtin/sft-demo.py").read_text())
    report = check_source(source, gpu=True)
    assert report.ok, report.errors  # trainer.train() and the saves are in training(), never called
    # the same calls at the top level would be refused
    assert not check_source(source.replace("def training():", "if True:"), gpu=True).ok


def test_its_arguments_are_the_flags_it_declares_with_false_as_an_empty_string() -> None:
    params = {"MODEL_PATH": "/m", "DATASET_PATH": "/d.jsonl", "MAX_STEPS": 3, "LOAD_IN_4BIT": False,
              "PromptInputColumn": "q", "PromptOutputColumn": "a", "OUTPUT_DIR": "/s/models/run7", "MAX_SEQ_LENGTH": 64,
              "LORA_RANK": 4, "MAX_INPUT_LENGTH": 8, "MAX_CONTENT_LENGTH": 8, "MAX_SAMPLES": 0, "NUM_GENERATIONS": 2,
              "MAX_GRAD_NORM": 1.0, "BATCH_SIZE": 2, "GRAD_ACCUM_STEPS": 1, "LEARNING_RATE": 0.1, "WARMUP_STEPS": 0,
              "NUM_EPOCHS": 1.0, "prompt_suffix": "x"}
    argv = arguments(SFT_DE.read_text(), params, job_id="job-1", attempt=2)
    assert "--model_path=/m" in argv and "--max_steps=3" in argv and "--load_in_4bit=" in argv
    assert "--input_train_name=q" in argv and "--output_train_name=a" in argv
    assert {"--train_id=job-1", "--seq=2", "--model_name=run7"} <= set(argv)
    assert not any(a.startswith(("--num_epochs", "--prompt_suffix")) for a in argv)  # not declared by the file


def test_a_required_flag_without_a_value_is_refused_at_submit(store: Path, de_params: dict[str, Any]) -> None:
    shutil.copy(SFT_DE, store / "de-sft-missing.py")
    with pytest.raises(InvalidParams, match="requires --input_train_name; give PromptInputColumn"):
        submit("de-sft-missing", {k: v for k, v in de_params.items() if k != "PromptInputColumn"})


def test_methods_check_says_which_kind_of_file_it_found(store: Path) -> None:
    shutil.copy(SFT_DE, store / "de-sft-check.py")
    result = cli_here("methods", "check", "de-sft-check")
    assert result.returncode == 0, result.stdout
    assert "a DeepExtension method file" in result.stdout and "OK" in result.stdout


@pytest.mark.e2e
def test_an_sft_deepextension_file_trains_locally_and_its_logs_become_deepe_events(
        de_params: dict[str, Any], storage: Path) -> None:
    from deepe_tasks.ui.local import check_output, run_method_file

    events: list[Any] = []
    result = run_method_file(SFT_DE, {**de_params, "OUTPUT_DIR": "models/de-sft-local"}, events.append)
    assert result.status is JobStatus.SUCCEEDED, result.error
    kinds = [e.kind for e in events]
    assert EventKind.LOADING_MODEL in kinds and EventKind.LOADING_DATASET in kinds and EventKind.TRAINING in kinds
    logged = [e for e in events if e.kind is EventKind.LOG]
    assert any(e.message.startswith("ActualParams: steps=2 seq=1") and e.metrics == {"max_steps": 2} for e in logged)
    assert [e.step for e in logged if "loss" in e.metrics] == [1, 2]
    assert check_output(storage / "models/de-sft-local") == []  # saved by the platform, training() never ran


@pytest.mark.e2e
def test_an_sft_deepextension_file_runs_on_a_worker_unchanged(worker: Worker, store: Path,
                                                              de_params: dict[str, Any]) -> None:
    shutil.copy(SFT_DE, store / "de-sft.py")
    job = submit("de-sft", de_params)
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    assert (Path(job.info()["output_dir"]) / "deepe.json").is_file()


@pytest.mark.e2e
def test_a_grpo_style_deepextension_file_trains(tiny_model: Path, storage: Path) -> None:
    from deepe_tasks.ui.local import run_method_file

    data = tiny.write_jsonl(tiny.gsm_rows(4), storage / "data" / "gsm-de.jsonl")
    events: list[Any] = []
    result = run_method_file(GRPO_DE, {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(data), "MAX_STEPS": 1,
                                       "PromptInputColumn": "question", "PromptOutputColumn": "answer",
                                       "OUTPUT_DIR": "models/de-grpo"}, events.append)
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert any("reward" in e.metrics for e in events if e.kind is EventKind.LOG)
    assert (storage / "models/de-grpo" / "deepe.json").is_file()


@pytest.mark.e2e
def test_the_local_test_template_runs_a_deepextension_file(de_params: dict[str, Any], tmp_path: Path) -> None:
    script = (HERE.parent.parent / "method_store/run_local_train_test_template.py").read_text()
    for old, new in {"'your-custom-file.py'": "'sft_de.py'", "'your-model_path'": repr(de_params["MODEL_PATH"]),
                     "'your-dataset_path'": repr(de_params["DATASET_PATH"]), "'your-output_dir'": "'models/de-template'",
                     '"MAX_STEPS": 5': '"MAX_STEPS": 2', '"MAX_SEQ_LENGTH": 512': '"MAX_SEQ_LENGTH": 64'}.items():
        script = script.replace(old, new)
    (tmp_path / "run_local_train_test.py").write_text(script)
    shutil.copy(SFT_DE, tmp_path / "sft_de.py")
    result = subprocess.run([sys.executable, "run_local_train_test.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "step 2/2" in result.stdout and "OK:" in result.stdout
