"""Local test runs: `deepe run-local` and the local-test template, through the worker's runner."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepe_tasks.contract.hardware import has_cuda
from deepe_tasks.core.errors import MethodContractError
from deepe_tasks.core.records import Event, EventKind, JobStatus
from tests.helpers import TRL_SNIPPET, cli_here, paste_into_template, run_cli, write_method

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


def test_run_local_refuses_a_wrong_method_or_parameter_in_one_failed_line_with_exit_code_2(
        custom_method: Path, sft_params: dict[str, object]) -> None:
    # As docs/methods.md says: one `FAILED:` line, the same as run_local_train_test.py prints
    unknown = run_cli("run-local", "nope", "-p", "MODEL_PATH=m", "-p", "DATASET_PATH=d")
    assert unknown.returncode == 2 and unknown.stderr.startswith("FAILED: There is no method file 'nope'")
    args = sum((["-p", f"{k}={v}"] for k, v in {**sft_params, "MAX_STEPS": "abc"}.items()), [])
    wrong = run_cli("run-local", "custom-local", *args)
    assert wrong.returncode == 2 and wrong.stderr.startswith("FAILED: MAX_STEPS='abc' is not valid")
    malformed = run_cli("run-local", "custom-local", "-p", "MAX_STEPS")
    assert malformed.returncode == 2 and malformed.stderr.startswith("FAILED: -p 'MAX_STEPS' is not KEY=VALUE")
    for done in (unknown, wrong, malformed):
        assert "error:" not in done.stdout + done.stderr and len(done.stderr.strip().splitlines()) == 1


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


def local_script(tmp_path: Path, values: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a copy of the local-test template with ``values`` put in for its placeholders."""
    script = (ROOT / "method_store/run_local_train_test_template.py").read_text()
    for placeholder, value in values.items():
        script = script.replace(placeholder, value)
    (tmp_path / "run_local_train_test.py").write_text(script)
    return subprocess.run([sys.executable, "run_local_train_test.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_the_local_test_template_names_a_missing_method_without_a_traceback(
        tmp_path: Path, sft_params: dict[str, object]) -> None:
    result = local_script(tmp_path, {"'your-custom-file.py'": "'custom99.py'",
                                     "'your-model_path'": repr(sft_params["MODEL_PATH"]),
                                     "'your-dataset_path'": repr(sft_params["DATASET_PATH"]),
                                     "'your-output_dir'": "'models/custom99'"})
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert "FAILED: There is no method file 'custom99.py' (looked at" in result.stderr


def test_a_placeholder_left_in_the_local_test_template_is_refused(
        custom_method: Path, tmp_path: Path, sft_params: dict[str, object], storage: Path) -> None:
    # Given a copy of the template where the user filled in all but OUTPUT_DIR
    shutil.copy(custom_method, tmp_path / "custom01.py")
    result = local_script(tmp_path, {"'your-custom-file.py'": "'custom01.py'",
                                     "'your-model_path'": repr(sft_params["MODEL_PATH"]),
                                     "'your-dataset_path'": repr(sft_params["DATASET_PATH"])})
    # Then it is one FAILED line that names it and what to put there, and nothing ran
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.startswith("FAILED: OUTPUT_DIR='your-output_dir' is still the template's placeholder; ")
    assert "'models/custom01-test'" in result.stderr and not result.stdout
    assert not (storage / "your-output_dir").exists()


@pytest.mark.e2e
def test_a_trainer_output_dir_in_the_method_leaves_no_folder_where_run_local_runs(
        store: Path, sft_params: dict[str, object], storage: Path, tmp_path: Path) -> None:
    # Given a method whose config says output_dir="out", as most scripts' do
    write_method(store, "writes-out", TRL_SNIPPET.replace('output_dir="outputs"', 'output_dir="out"'))
    args = sum((["-p", f"{k}={v}"] for k, v in {**sft_params, "MAX_STEPS": 1, "PromptInputColumn": "instruction",
                                                 "PromptOutputColumn": "output"}.items()), [])
    # When the user runs it locally
    result = run_cli("run-local", "writes-out", *args, cwd=tmp_path)
    # Then the trainer's scratch went to the job folder, and no out/ appeared where the user is
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not (tmp_path / "out").exists(), sorted(p.name for p in tmp_path.iterdir())
    job = Path(result.stdout.rsplit("are in ", 1)[1].strip()).name  # the model is in models/<job id>
    assert (storage / "jobs" / job / "attempts" / "1" / "checkpoints" / "checkpoint-1").is_dir()


@pytest.mark.skipif(has_cuda(), reason="what a machine without CUDA sees")
def test_a_bf16_default_and_load_in_4bit_are_warned_and_the_failure_names_the_fix(
        store: Path, sft_params: dict[str, object], tmp_path: Path) -> None:
    # Given a method whose TRL config leaves bf16 to TRL's default (on), on a machine without CUDA
    write_method(store, "bf16-default", TRL_SNIPPET.replace(", use_cpu=True", ""))
    # When the user checks it, then the check warns (it still passes)
    checked = cli_here("methods", "check", "bf16-default")
    assert checked.returncode == 0, checked.stdout
    assert re.search(r"warning: Line \d+ builds SFTConfig\(…\) without bf16= or use_cpu=, so TRL turns bf16 on",
                     checked.stdout), checked.stdout
    # When the user runs it locally with LOAD_IN_4BIT=true too
    args = sum((["-p", f"{k}={v}"] for k, v in {**sft_params, "LOAD_IN_4BIT": "true", "PromptInputColumn": "instruction",
                                                 "PromptOutputColumn": "output"}.items()), [])
    result = run_cli("run-local", "bf16-default", *args, cwd=tmp_path)
    # Then both are warned before anything loads, and the failure names the fix
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert out.index("builds SFTConfig(…) without bf16= or use_cpu=") < out.index("loading_model")
    assert out.index("warning: LOAD_IN_4BIT=true asks for a 4-bit base model") < out.index("loading_model")
    failed = out[out.index("FAILED: "):]
    assert "Your setup doesn't support bf16/gpu" in failed
    assert "Pass bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported() to the config" in failed


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
