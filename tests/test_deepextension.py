"""DeepExtension custom methods run unchanged: an SFT file and a GRPO-style file, written for these
tests to DeepExtension's interface (argparse flags, `train_callback`, `training()` behind the
main guard), recognised, checked, given their arguments, run by the platform and saved by it."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import EventKind, JobStatus, submit
from deepe_tasks.contract.check import check_source
from deepe_tasks.contract.deepext import arguments, is_deepextension
from deepe_tasks.contract.methods import file_kind
from deepe_tasks.contract.params import TrainParams
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.fixtures import tiny
from tests.helpers import Worker, cli_here, run_cli

HERE = Path(__file__).resolve().parent / "deepext"
SFT_DE = HERE / "sft_de.py"
GRPO_DE = HERE / "grpo_de.py"
LOOP_DE = HERE / "loop_de.py"  # flags made in a loop, in upper case, parsed strictly; SFTConfig(output_dir="out")


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


# ---- flags of any shape, found from the parser itself (issue 29, item 4) ---------------------

def parsed(parser: argparse.ArgumentParser, params: dict[str, Any]) -> argparse.Namespace:
    """What ``parser.parse_args()`` gives a DeepExtension file run with ``params``."""
    from deepe_tasks.job import deepext_shim

    arguments = deepext_shim.Arguments("", TrainParams.model_validate(params).as_dict(), job_id="job-9", attempt=1,
                                       filename="f.py")
    namespace: dict[str, Any] = {"parser": parser}
    with deepext_shim.installed(types.ModuleType("train_callback"), arguments):
        exec(compile("args = parser.parse_args()", "f.py", "exec"), namespace)  # as the method's file does
    args: argparse.Namespace = namespace["args"]
    return args


def test_each_parser_gets_the_flags_it_declares_in_any_spelling_and_style() -> None:
    original = argparse.ArgumentParser.parse_known_args
    # Given flags in every spelling and argparse style a file may use
    parser = argparse.ArgumentParser()
    for name in ("MODEL_PATH", "dataset-path"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--lora_rank", type=int)
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--keep", action=argparse.BooleanOptionalAction, default=True)  # no parameter: its default
    parser.add_argument("--lr", dest="learning_rate", type=float)
    parser.add_argument("model_name")  # a positional
    # When the file parses them, then each gets its parameter
    args = parsed(parser, {"MODEL_PATH": "/m", "DATASET_PATH": "/d.jsonl", "LOAD_IN_4BIT": True, "LEARNING_RATE": 0.1})
    assert vars(args) == {"MODEL_PATH": "/m", "dataset_path": "/d.jsonl", "lora_rank": 16, "load_in_4bit": True,
                          "keep": True, "learning_rate": 0.1, "model_name": "job-9"}
    assert argparse.ArgumentParser.parse_known_args is original  # put back when the file has run
    assert parser.parse_args(["--MODEL_PATH=a", "--dataset-path=b", "x"]).model_name == "x"  # given: as given


def test_a_parser_the_file_does_not_call_reads_sys_argv_as_deepextension_passes_it() -> None:
    from deepe_tasks.job import deepext_shim

    params = TrainParams.model_validate({"MODEL_PATH": "/m", "DATASET_PATH": "/d", "MAX_STEPS": 3}).as_dict()
    arguments = deepext_shim.Arguments("", params, job_id="j", attempt=1, filename="f.py")
    library = argparse.ArgumentParser()
    library.add_argument("--max_steps", type=int)
    with deepext_shim.installed(types.ModuleType("train_callback"), arguments):
        known, rest = library.parse_known_args()  # a library's parser, called from here, not from f.py
    assert known.max_steps == 3 and "--model_path=/m" in rest and "--train_id=j" in rest


def test_a_flag_nothing_fills_a_value_the_parser_refuses_and_a_parameter_no_flag_takes_are_sentences() -> None:
    base = {"MODEL_PATH": "/m", "DATASET_PATH": "/d.jsonl"}
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_path")
    parser.add_argument("--dataset_path")
    parser.add_argument("--temperature", type=float, required=True)
    with pytest.raises(InvalidParams, match=r"requires --temperature; give temperature \(-p temperature=…\)"):
        parsed(parser, base)
    with pytest.raises(InvalidParams, match="parser refused the job's parameters: argument --temperature: invalid "
                                            "float value: 'hot'"):
        parsed(parser, {**base, "temperature": "hot"})
    with pytest.raises(InvalidParams, match=r"MAX_STEPS=3 was given, but f.py declares no flag that takes it \(its "
                                            r"flags: --model_path, --dataset_path, --temperature\), so it would train "
                                            r"without it"):
        parsed(parser, {**base, "temperature": "0.5", "MAX_STEPS": 3})


@pytest.mark.e2e
def test_flags_made_in_a_loop_and_in_upper_case_reach_the_file_in_run_local(
        store: Path, sft_params: dict[str, Any], tmp_path: Path) -> None:
    # Given a file that declares its flags in a loop, in upper case, MAX_STEPS optional, and parses strictly
    shutil.copy(LOOP_DE, store / "de-loop.py")
    # When the user runs it locally with MAX_STEPS=3
    args = sum((["-p", f"{k}={v}"] for k, v in {**sft_params, "MAX_STEPS": 3}.items()), [])
    result = run_cli("run-local", "de-loop", *args, cwd=tmp_path)
    # Then every flag got its parameter, MAX_STEPS too, and it trained 3 steps
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ActualParams: MAX_STEPS=3" in result.stdout and "step 3/3" in result.stdout and "OK:" in result.stdout
    assert not (tmp_path / "out").exists()  # its SFTConfig(output_dir="out") went to the job folder


def test_a_parameter_that_no_flag_takes_is_refused_before_anything_loads(
        store: Path, sft_params: dict[str, Any], tmp_path: Path) -> None:
    shutil.copy(LOOP_DE, store / "de-loop.py")
    args = sum((["-p", f"{k}={v}"] for k, v in {**sft_params, "WARMUP_STEPS": 2}.items()), [])
    result = run_cli("run-local", "de-loop", *args, cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("FAILED: Failed while loading the method: WARMUP_STEPS=2 was given, but de-loop.py declares no flag "
            "that takes it (its flags: --MODEL_PATH, ") in result.stdout
    assert "parser.add_argument('--warmup_steps', ...)" in result.stdout
    assert "loading_model" not in result.stdout and "Traceback" not in result.stdout + result.stderr


@pytest.mark.e2e
def test_flags_of_any_shape_reach_the_file_on_a_worker_and_leave_no_out_folder(
        worker: Worker, store: Path, storage: Path, sft_params: dict[str, Any]) -> None:
    shutil.copy(LOOP_DE, store / "de-loop-w.py")
    job = submit("de-loop-w", {**sft_params, "MAX_STEPS": 2})
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    events = list(job.events())
    assert any(e.message == "ActualParams: MAX_STEPS=2" for e in events if e.kind is EventKind.LOG)
    assert [e.step for e in events if e.kind is EventKind.LOG and "loss" in e.metrics] == [1, 2]
    assert not (storage / "jobs" / job.id / "out").exists()  # the job process works in the job folder
