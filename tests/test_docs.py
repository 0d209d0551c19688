"""The documentation's worked example runs, so it cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepe_tasks.contract.check import check_source
from deepe_tasks.contract.methods import BUILTIN
from deepe_tasks.core.records import Event, EventKind, JobStatus
from deepe_tasks.fixtures import tiny
from deepe_tasks.ui.local import check_output, run_method_file
from tests.helpers import copy_shipped_store, paste_into_template

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
    shutil.copy(BUILTIN / "custom-template.py", method)
    paste_into_template(method, worked_example())
    report = check_source(method.read_text())
    assert report.ok and not report.warnings, report
    data = tiny.write_jsonl([{"question": f"What colour is the {k}?", "reply": f"It is {v}."}
                             for k, v in tiny.COLORS.items()], tmp_path / "support.jsonl")
    # When it runs with the parameters from the docs' commands
    events: list[Event] = []
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


def first_run() -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- first-run -->\n```bash\n(.*?)```\n<!-- /first-run -->", text, flags=re.DOTALL)
    assert match, "the README lost its first-run block"
    return [line for line in match.group(1).splitlines() if line.strip()]


@pytest.mark.e2e
def test_the_readme_first_run_works_as_written(tmp_path: Path) -> None:
    """In a folder like a fresh clone (its method_store/), with the settings' defaults: the demo,
    then each line of the README's first-run block, the comments done as a user would."""
    copy_shipped_store(tmp_path / "method_store")
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPE_STORAGE", "DEEPE_METHOD_STORE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's deepe and python3

    def run(command: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        return done

    run("deepe demo --steps 5")  # the set-up command's demo, shorter
    assert (tmp_path / "deepe-data/demo/tiny-llama/config.json").is_file()
    outputs = []
    for line in first_run():
        if line.startswith("# paste"):
            paste_into_template(tmp_path / "method_store/custom01.py", worked_example())
        elif line.startswith("# set METHOD_FILE"):
            script = tmp_path / "run_local_train_test.py"
            text = script.read_text()
            for old, new in {"'your-custom-file.py'": "'custom01'", "'your-model_path'": "'demo/tiny-llama'",
                             "'your-dataset_path'": "'demo/colors.jsonl'", "'your-output_dir'": "'models/first-run'",
                             '"MAX_STEPS": 5': '"MAX_STEPS": 2'}.items():
                assert old in text, old
                text = text.replace(old, new)
            script.write_text(text)
        elif not line.startswith("#"):
            outputs.append(run(line).stdout)
    assert "custom01: OK" in outputs[1]
    assert "step 5/5" in outputs[2] and "OK:" in outputs[2]
    assert "OK:" in outputs[-1] and (tmp_path / "deepe-data/models/first-run/deepe.json").is_file()


def test_every_install_command_in_the_docs_installs_from_this_repository() -> None:
    # deepe-tasks is not on PyPI: `pip install deepe-tasks` (or an extra of it) fails for a user.
    texts = {p.name: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    for name, text in texts.items():
        for command in re.findall(r"pip install [^`\n]*", text):
            assert not re.search(r"['\"]?deepe[-_]tasks(\[|['\"]|\s|$)", command), f"{name}: {command}"
    assert "pip install -e ." in texts["README.md"]
