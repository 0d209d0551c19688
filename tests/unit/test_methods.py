"""The method store: names, templates, pinning and the static contract check."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from deepe_tasks.contract import deepext
from deepe_tasks.contract.check import Problem, check_source
from deepe_tasks.contract.hardware import params_need_gpu
from deepe_tasks.contract.methods import (
    BEGIN_MARKER,
    BUILTIN,
    END_MARKER,
    list_methods,
    load_method,
    new_method,
)
from deepe_tasks.contract.params import TrainParams
from deepe_tasks.core.errors import InvalidParams, MethodExists, MethodNotFound
from deepe_tasks.ui.local import PLACEHOLDERS, refuse_placeholders

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "method_store"


def test_template_carries_the_exact_marker_lines_and_every_parameter() -> None:
    lines = (STORE / "custom-template.py").read_text().splitlines()
    assert BEGIN_MARKER in lines and END_MARKER in lines
    assert lines.index(BEGIN_MARKER) < lines.index(END_MARKER)
    head = "\n".join(lines[: lines.index(BEGIN_MARKER)])
    for name in ("MODEL_PATH", "MAX_SEQ_LENGTH", "LORA_RANK", "LOAD_IN_4BIT", "DATASET_PATH",
                 "MAX_INPUT_LENGTH", "MAX_CONTENT_LENGTH", "MAX_SAMPLES", "NUM_GENERATIONS",
                 "MAX_GRAD_NORM", "OUTPUT_DIR", "MAX_STEPS", "BATCH_SIZE", "GRAD_ACCUM_STEPS",
                 "LEARNING_RATE", "WARMUP_STEPS", "PromptInputColumn", "PromptOutputColumn"):
        assert f"\n{name} = params." in head, name
    assert "callbacks=[callback]" in head and "trainer.train()" in head


def test_local_test_template_has_the_placeholders() -> None:
    text = (STORE / "run_local_train_test_template.py").read_text()
    for placeholder in ("'your-model_path'", "'your-dataset_path'", "'your-output_dir'", "'your-custom-file.py'"):
        assert placeholder in text


def test_templates_are_not_listed_as_methods() -> None:
    names = [m.name for m in list_methods(STORE)]
    assert "sft-demo" in names
    assert not [n for n in names if "template" in n]


@pytest.mark.parametrize("name", ["../etc/passwd", "sft-demo/../x", "/abs", "UPPER", "", "a" * 65,
                                  "custom-template", ".hidden"])
def test_names_outside_the_rules_are_refused(name: str) -> None:
    with pytest.raises(MethodNotFound):
        load_method(STORE, name)


def test_an_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(MethodNotFound, match="sft-demo"):
        load_method(STORE, "nope")


def test_new_copies_the_template_and_refuses_to_overwrite(tmp_path: Path) -> None:
    shutil.copy(STORE / "custom-template.py", tmp_path)
    path = new_method(tmp_path, "custom01")
    assert path.read_text() == (STORE / "custom-template.py").read_text()
    with pytest.raises(MethodExists):
        new_method(tmp_path, "custom01")
    with pytest.raises(MethodExists, match="'sft-demo' is a built-in method; pick another name"):
        new_method(tmp_path, "sft-demo")


def test_a_method_is_pinned_by_the_sha256_of_its_source(tmp_path: Path) -> None:
    (tmp_path / "m1.py").write_text("x = 1\n")
    first = load_method(tmp_path, "m1").sha256
    (tmp_path / "m1.py").write_text("x = 2\n")
    assert load_method(tmp_path, "m1").sha256 != first and len(first) == 64


def test_check_reports_a_syntax_error_with_its_line() -> None:
    report = check_source("model = 1\ntokenizer = (\n")
    assert not report.ok and "line 2" in report.errors[0]


def test_check_reports_missing_names_and_forbidden_calls() -> None:
    source = "model = load()\ntrainer = SFTTrainer(model)\ntrainer.train()\nmodel.save_pretrained('x')\n"
    report = check_source(source)
    text = " ".join(report.errors)
    assert "`tokenizer`" in text and "`model`" not in text.split("never defines")[0]
    assert "Line 3 calls `trainer.train()`" in text
    assert "Line 4 calls `save_pretrained()`" in text
    assert any("without `callbacks=[callback]`" in w for w in report.warnings)


def test_check_accepts_the_builtin_method_and_model_train_mode() -> None:
    report = check_source((BUILTIN / "sft-demo.py").read_text())
    assert report.ok and not report.warnings
    assert check_source("model = m\nmodel.train()\ntokenizer = t\ntrainer = T(callbacks=[callback])\n").ok


def test_description_is_the_first_docstring_line() -> None:
    assert load_method(STORE, "sft-demo").description.startswith("SFT-Demo:")


# ---- DeepExtension flags, GPU settings and the local template (issue 29) ----------------------

@pytest.mark.parametrize("names, key", [
    (["--model_path"], "MODEL_PATH"), (["--MODEL_PATH"], "MODEL_PATH"), (["--model-path"], "MODEL_PATH"),
    (["--ModelPath"], "MODEL_PATH"), (["--input_train_name"], "PromptInputColumn"),
    (["--PromptInputColumn"], "PromptInputColumn"), (["--train_id"], "train_id"), (["--seq"], "seq"),
    (["--lr", "max_steps"], "MAX_STEPS"),  # by its dest when no option string names a parameter
    (["--prompt-suffix"], "prompt_suffix"), (["--nothing"], None), (["--eval_split"], None),  # None: not given
])
def test_a_flag_takes_the_parameter_it_spells_whatever_its_case_and_separators(names: list[str],
                                                                                key: str | None) -> None:
    params = {"MODEL_PATH": "/m", "MAX_STEPS": 3, "PromptInputColumn": "q", "prompt_suffix": "x", "EVAL_SPLIT": None}
    assert deepext.param_for(names, deepext.values(params, job_id="j", attempt=2)) == key


def test_submit_maps_upper_case_required_flags_and_names_a_missing_one() -> None:
    # Given a file whose required flags are in upper case
    source = ("import argparse\nfrom train_callback import TrainCallback\np = argparse.ArgumentParser()\n"
              "p.add_argument('--MODEL_PATH', required=True)\np.add_argument('--Input-Train-Name', required=True)\n")
    # When submit reads them, then the upper-case one is filled, and the renamed one named by its parameter
    with pytest.raises(InvalidParams, match=r"requires --Input-Train-Name; give PromptInputColumn \(-p "):
        deepext.arguments(source, {"MODEL_PATH": "/m"}, job_id="j", attempt=1)
    assert deepext.arguments(source, {"MODEL_PATH": "/m", "PromptInputColumn": "q"}, job_id="j", attempt=1) == [
        "--MODEL_PATH=/m", "--Input-Train-Name=q"]


def test_what_counts_as_given_and_as_read_without_a_flag() -> None:
    params = TrainParams.model_validate({"MODEL_PATH": "/m", "DATASET_PATH": "/d", "MAX_STEPS": 3, "LORA_RANK": 16,
                                         "OUTPUT_DIR": "/s/models/x", "KEEP_BEST": True, "note": "n"}).as_dict()
    # the defaults (LORA_RANK=16) and what the platform does itself (OUTPUT_DIR, KEEP_BEST) are not asked of the file
    assert set(deepext.given(params, "")) == {"MODEL_PATH", "DATASET_PATH", "MAX_STEPS", "note"}
    assert "MAX_STEPS" in deepext.read_directly("steps = MAX_STEPS\n")
    assert "MAX_STEPS" not in deepext.read_directly("MAX_STEPS = args.max_steps\nprint(MAX_STEPS)\n")
    assert "note" in deepext.read_directly("x = params['note']\n") and "note" not in deepext.read_directly("x = 1\n")


BASE = "model = tokenizer = 1\ntrainer = T(callbacks=[callback])\n"


@pytest.mark.parametrize("code, warned", [
    ("c = SFTConfig(output_dir='o')", True), ("c = trl.GRPOConfig(max_steps=1)", True),
    ("from trl import SFTConfig as C\nc = C()", True), ("c = SFTConfig(use_cpu=False)", True),
    ("c = SFTConfig(use_cpu=True)", False), ("c = SFTConfig(bf16=False)", False),
    ("c = SFTConfig(use_cpu=not torch.cuda.is_available())", False), ("c = SFTConfig(**kwargs)", False),
    ("c = LoraConfig(r=8)", False), ("c = TrainingArguments(output_dir='o')", False),
    ("if torch.cuda.is_available():\n    c = SFTConfig()", False),
])
def test_a_trl_config_left_to_its_bf16_default_is_a_warning_without_cuda(code: str, warned: bool) -> None:
    report = check_source(BASE + code + "\n", gpu=False)
    found = report.of(Problem.NEEDS_GPU)
    assert bool(found) is warned, report.findings
    assert not warned or ("without bf16= or use_cpu=" in found[0].message and "bf16=torch.cuda.is_available()" in
                          found[0].message and report.ok)  # a warning, not a refusal
    assert check_source(BASE + code + "\n", gpu=True).of(Problem.NEEDS_GPU) == []


def test_load_in_4bit_without_cuda_is_a_warning() -> None:
    assert "LOAD_IN_4BIT=false" in params_need_gpu({"LOAD_IN_4BIT": True}, gpu=False)[0]
    assert params_need_gpu({"LOAD_IN_4BIT": True}, gpu=True) == params_need_gpu({"LOAD_IN_4BIT": False}, gpu=False) == []


def test_every_placeholder_of_the_local_template_is_refused() -> None:
    text = (STORE / "run_local_train_test_template.py").read_text()
    assert set(re.findall(r"'(your-\w[^']*)'", text)) == set(PLACEHOLDERS)
    with pytest.raises(InvalidParams, match=r"OUTPUT_DIR='your-output_dir' is still the template's placeholder"):
        refuse_placeholders({"MODEL_PATH": "/m", "OUTPUT_DIR": "your-output_dir"}, "custom01")
    refuse_placeholders({"MODEL_PATH": "/m", "OUTPUT_DIR": "models/mine"}, "custom01")
