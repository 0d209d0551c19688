"""Local test runs: `deepe run-local` and the local-test template, through the worker's runner."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepe_tasks.core.errors import MethodContractError
from deepe_tasks.core.records import Event, EventKind, JobStatus
from tests.helpers import TRL_SNIPPET, paste_into_template, run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def custom_method(store: Path) -> Path:
    path = store / "custom-local.py"
    shutil.copy(store / "custom-template.py", path)
    paste_into_template(path, TRL_SNIPPET)
    return path


@pytest.mark.e2e
def test_run_local_trains_prints_events_and_checks_the_output(
        custom_method: Path, sft_params: dict[str, object], storage: Path) -> None:
    args = sum((["-p", f"{k}={v}"] for k, v in {**sft_params, "OUTPUT_DIR": "models/run-local"}.items()), [])
    result = run_cli("run-local", "custom-local", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in range(1, 5):
        assert f"step {step}/4" in out
    assert "loss=" in out and "OK: the model, the tokenizer and deepe.json" in out
    # one line per step: not also transformers' own dict of the same numbers, nor its bar
    assert "{'loss'" not in out + result.stderr and "it/s]" not in result.stderr and "examples/s]" not in result.stderr
    assert len([line for line in out.splitlines() if "step 4/4" in line]) == 1
    assert len([line for line in out.splitlines() if " trained " in line and "train_runtime=" in line]) == 1
    manifest = json.loads((storage / "models/run-local/deepe.json").read_text())
    assert manifest["method"] == "custom-local" and manifest["worker"] == "local"


@pytest.mark.e2e
def test_the_local_test_template_runs_the_method_as_a_worker_would(
        custom_method: Path, sft_params: dict[str, object], storage: Path, tmp_path: Path) -> None:
    # Given a copy of the template with its placeholders filled in, beside the method file
    script = (ROOT / "method_store/run_local_train_test_template.py").read_text()
    for placeholder, value in {"'your-model_path'": repr(sft_params["MODEL_PATH"]),
                               "'your-dataset_path'": repr(sft_params["DATASET_PATH"]),
                               "'your-output_dir'": "'models/from-template'",
                               "'your-custom-file.py'": "'custom01.py'"}.items():
        script = script.replace(placeholder, value)
    script = script.replace('"MAX_STEPS": 5', '"MAX_STEPS": 3').replace('"MAX_SEQ_LENGTH": 512', '"MAX_SEQ_LENGTH": 64')
    (tmp_path / "run_local_train_test.py").write_text(script)
    shutil.copy(custom_method, tmp_path / "custom01.py")
    # When the user runs it
    result = subprocess.run([sys.executable, "run_local_train_test.py"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    # Then it trained, printed readable events and found the output complete
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 3/3" in result.stdout and "OK:" in result.stdout
    assert (storage / "models/from-template/deepe.json").is_file()


@pytest.mark.e2e
def test_the_runner_attaches_the_callback_when_the_method_forgot_it(
        tmp_path: Path, sft_params: dict[str, object]) -> None:
    from deepe_tasks.ui.local import run_method_file

    method = tmp_path / "forgot.py"
    method.write_text(TRL_SNIPPET.replace("    callbacks=[callback],\n", ""))
    events: list[Event] = []
    result = run_method_file(method, {**sft_params, "MAX_STEPS": 2, "PromptInputColumn": "instruction",
                                      "PromptOutputColumn": "output"}, events.append)
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert [e.step for e in events if e.kind is EventKind.LOG and "loss" in e.metrics] == [1, 2]


def test_a_trainer_train_left_in_the_method_is_refused_before_anything_runs(
        tmp_path: Path, sft_params: dict[str, object]) -> None:
    from deepe_tasks.ui.local import run_method_file

    method = tmp_path / "trains.py"
    method.write_text(TRL_SNIPPET + "trainer.train()\n")
    events: list[object] = []
    with pytest.raises(MethodContractError, match=r"calls `trainer.train\(\)`; remove it"):
        run_method_file(method, sft_params, events.append)
    assert not events


def test_run_local_refuses_an_unknown_method_with_exit_code_2() -> None:
    result = run_cli("run-local", "nope", "-p", "MODEL_PATH=m", "-p", "DATASET_PATH=d")
    assert result.returncode == 2 and "There is no method 'nope'" in result.stderr


@pytest.mark.e2e
def test_a_failed_local_run_is_one_line_and_its_traceback_comes_with_verbose(
        custom_method: Path, sft_params: dict[str, object]) -> None:
    args = sum((["-p", f"{k}={v}"] for k, v in {**sft_params, "PromptOutputColumn": "nope"}.items()), [])
    quiet = run_cli("run-local", "custom-local", *args)
    assert quiet.returncode == 1 and "FAILED: Failed while loading the dataset" in quiet.stdout
    assert "no column 'nope' (PromptOutputColumn)" in quiet.stdout
    assert "Traceback" not in quiet.stdout + quiet.stderr
    verbose = run_cli("run-local", "custom-local", "--verbose", *args)
    assert verbose.returncode == 1 and "Traceback" in verbose.stdout + verbose.stderr


def test_the_local_test_template_names_a_missing_method_without_a_traceback(tmp_path: Path) -> None:
    script = (ROOT / "method_store/run_local_train_test_template.py").read_text()
    (tmp_path / "run_local_train_test.py").write_text(script.replace("'your-custom-file.py'", "'custom99.py'"))
    result = subprocess.run([sys.executable, "run_local_train_test.py"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert "FAILED: There is no method file 'custom99.py' (looked at" in result.stdout


@pytest.mark.e2e
def test_a_save_that_writes_no_weights_fails_and_publishes_nothing(tmp_path: Path, sft_params: dict[str, object],
                                                                   storage: Path) -> None:
    # What FSDP with a sharded state dict does to the final save: everything but the weights
    from deepe_tasks.ui.local import run_method_file

    method = tmp_path / "weightless.py"
    method.write_text(TRL_SNIPPET + 'setattr(trainer.model, "save_" + "pretrained", lambda *args, **kwargs: None)\n')
    params = {**sft_params, "MAX_STEPS": 1, "PromptInputColumn": "instruction", "PromptOutputColumn": "output",
              "OUTPUT_DIR": "models/weightless"}
    result = run_method_file(method, params, lambda event: None)
    assert result.status is JobStatus.FAILED and result.phase == "saving"
    assert result.error is not None and "saving wrote no weights" in result.error and "FULL_STATE_DICT" in result.error
    assert not (storage / "models" / "weightless").exists()
    assert not [p for p in (storage / "models").iterdir() if p.name.startswith(".weightless.staging-")]
