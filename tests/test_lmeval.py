"""`deepe eval TARGET --lm-eval TASK_YAML`: an lm-evaluation-harness task of a local file and
dataset, run offline by a real worker on the tiny model as an evaluation job; the task files
that cannot run offline refused at submit, and on the worker when the file changed since."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from deepe_tasks import EventKind, InvalidParams, Job, JobStatus, evaluate
from deepe_tasks.fixtures import tiny
from deepe_tasks.queue.evals import results
from tests.helpers import Worker, cli_here

pytestmark = pytest.mark.e2e

ROWS = [
    {"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "label": 0},
    {"question": "What colour is the grass?", "choices": ["blue", "green", "red"], "label": 1},
    {"question": "What colour is blood?", "choices": ["blue", "green", "red"], "label": 2},
    {"question": "What colour is snow?", "choices": ["white", "black"], "label": 0},
    {"question": "What colour is coal?", "choices": ["white", "black"], "label": 1},
]
TASK = """\
task: colors_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: colors_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def task_dir(storage: Path) -> Path:
    """A task file and its dataset in a folder of their own under the storage."""
    folder = storage / "lmeval" / uuid.uuid4().hex[:8]
    tiny.write_jsonl(ROWS, folder / "colors_mc.jsonl")
    (folder / "task.yaml").write_text(TASK)
    return folder


def test_an_lm_eval_task_runs_offline_as_an_evaluation_job(worker: Worker, tiny_model: Path, task_dir: Path) -> None:
    # When the base model is evaluated on a local multiple-choice task, from the command line
    done = cli_here("eval", str(tiny_model), "--lm-eval", str(task_dir / "task.yaml"), "--wait", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    # Then lm-eval's accuracy over every row is reported, in eval.json, the record and the event
    scored = found["lm_eval"]["results"]["colors_mc"]
    assert 0 <= scored["acc"] <= 1 and scored["samples"] == len(ROWS)
    assert found["lm_eval"]["task"] == "colors_mc" and found["lm_eval"]["lm_eval_version"]
    assert found["lm_eval/colors_mc/acc"] == scored["acc"]  # the record's metrics, flat
    assert found["dataset"] is None and "loss" not in found
    on_disk = json.loads((Path(found["output_dir"]) / "eval.json").read_text())
    assert on_disk["lm_eval"]["results"]["colors_mc"] == scored
    events = [e for e in Job(found["job"]).events() if e.kind is EventKind.EVAL]
    assert len(events) == 1 and events[0].metrics["lm_eval/colors_mc/acc"] == pytest.approx(scored["acc"])
    # And the Python API takes it too, with --max-samples as lm-eval's limit
    job = evaluate(str(tiny_model), lm_eval=str(task_dir / "task.yaml"), max_samples=3)
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()["error"]
    assert results(job)["lm_eval"]["results"]["colors_mc"]["samples"] == 3


@pytest.mark.parametrize(("text", "refused"), [
    ("task: [a, b]\n", "is a group of tasks"),
    ("dataset_path: json\n", "names no task; add `task: my_task`"),
    ("task: t\ndataset_path: [unclosed\n", "is not valid YAML"),
    ("task: t\ndataset_path: hellaswag\n", "dataset_path 'hellaswag' is not a local file format"),
    ("task: t\ndataset_path: json\n", "needs its files; add `dataset_kwargs"),
    ("task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: nowhere.jsonl}}\n",
     "its data file 'nowhere.jsonl' resolves to .*, which does not exist"),
    (TASK.replace("metric: acc", "metric: bertscore"), "the metric 'bertscore' is not one lm-eval computes itself"),
    (TASK.replace("aggregation: mean", "hf_evaluate: true"), "the metric 'acc' is not one lm-eval computes itself"),
])
def test_task_files_that_cannot_run_offline_are_refused_at_submit(
        tiny_model: Path, task_dir: Path, text: str, refused: str) -> None:
    (task_dir / "task.yaml").write_text(text)
    with pytest.raises(InvalidParams, match=refused):
        evaluate(str(tiny_model), lm_eval=str(task_dir / "task.yaml"))


def test_a_missing_task_file_or_nothing_to_evaluate_is_refused(tiny_model: Path, task_dir: Path) -> None:
    with pytest.raises(InvalidParams, match=r"missing\.yaml does not exist; give the path of a task YAML"):
        evaluate(str(tiny_model), lm_eval=str(task_dir / "missing.yaml"))
    with pytest.raises(InvalidParams, match=r"give the task's YAML file \(\.yaml or \.yml\)"):
        evaluate(str(tiny_model), lm_eval=str(task_dir / "colors_mc.jsonl"))
    with pytest.raises(InvalidParams, match="Nothing to evaluate on"):
        evaluate(str(tiny_model))


def test_a_hub_metric_written_after_submit_fails_on_the_worker_naming_it(
        workers: list[Worker], tiny_model: Path, task_dir: Path, tmp_path: Path) -> None:
    # Given an evaluation queued where no worker listens yet, and its task file changed meanwhile
    job = evaluate(str(tiny_model), lm_eval=str(task_dir / "task.yaml"), queue="lmeval-late")
    (task_dir / "task.yaml").write_text(TASK.replace("metric: acc", "metric: bertscore"))
    # When a worker takes it, then it fails before lm-eval would download the metric, naming it
    workers.append(Worker("lmeval-late", tmp_path / "worker.log").start())
    assert job.wait(timeout=180) is JobStatus.FAILED
    assert "the metric 'bertscore' is not one lm-eval computes itself" in job.info()["error"]
