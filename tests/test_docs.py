"""The documentation's worked example runs, so it cannot rot."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from deepe_tasks.core.records import EventKind, JobStatus
from deepe_tasks.fixtures import tiny
from deepe_tasks.queue.check import check_source
from deepe_tasks.ui.local import check_output, run_method_file
from tests.conftest import paste_into_template

ROOT = Path(__file__).resolve().parent.parent


def worked_example() -> str:
    text = (ROOT / "docs" / "methods.md").read_text()
    match = re.search(r"<!-- worked-example -->\n```python\n(.*?)```", text, flags=re.DOTALL)
    assert match, "docs/methods.md lost its worked example"
    return match.group(1)


@pytest.mark.e2e
def test_the_worked_example_in_docs_methods_runs_as_a_method(tiny_model: Path, tmp_path: Path) -> None:
    # Given the template with the documented snippet pasted in
    method = tmp_path / "support01.py"
    shutil.copy(ROOT / "method_store" / "custom-template.py", method)
    paste_into_template(method, worked_example())
    report = check_source(method.read_text())
    assert report.ok and not report.warnings, report
    data = tiny.write_jsonl([{"question": f"What colour is the {k}?", "reply": f"It is {v}."}
                             for k, v in tiny.COLORS.items()], tmp_path / "support.jsonl")
    # When it runs with the parameters from the docs' commands
    events = []
    result = run_method_file(method, {
        "MODEL_PATH": str(tiny_model), "DATASET_PATH": str(data), "PromptInputColumn": "question",
        "PromptOutputColumn": "reply", "MAX_STEPS": 3, "BATCH_SIZE": 2, "MAX_SEQ_LENGTH": 64,
        "LORA_RANK": 4, "prompt_suffix": "\nReply:", "OUTPUT_DIR": "models/support01",
    }, events.append)
    # Then it trains, reports a loss each step and publishes a complete model
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert [e.step for e in events if e.kind is EventKind.LOG and "loss" in e.metrics] == [1, 2, 3]
    assert check_output(Path(result.output_dir or "")) == []


def test_the_bad_input_table_in_docs_reliability_is_the_one_the_tests_check() -> None:
    from tests.test_hostile_input import table

    text = (ROOT / "docs" / "reliability.md").read_text()
    match = re.search(r"<!-- bad-input-table -->\n(.*?)\n<!-- /bad-input-table -->", text, flags=re.DOTALL)
    assert match, "docs/reliability.md lost its bad-input table"
    assert match.group(1) == table(), "regenerate it: python -m tests.test_hostile_input"
