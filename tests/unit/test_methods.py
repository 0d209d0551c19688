"""The method store: names, templates, pinning and the static contract check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deepe_tasks.contract.check import check_source
from deepe_tasks.contract.methods import (
    BEGIN_MARKER,
    BUILTIN,
    END_MARKER,
    list_methods,
    load_method,
    new_method,
)
from deepe_tasks.core.errors import MethodExists, MethodNotFound

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
