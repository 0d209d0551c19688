"""An evaluation job's lm-evaluation-harness task (`deepe eval TARGET --lm-eval TASK_YAML`): the
task file and its local data, run by lm-eval's Python API on the model the job already loaded
(an adapter on its base, as the rest of the evaluation), with no hub access.

The task file is checked again here (`contract.lmeval_task`: it may have changed since it was
submitted), its metrics against the installed lm-eval's own registry: a metric lm-eval does not
compute itself would be fetched with ``evaluate.load``, and is refused, naming it. The data files
are named by absolute paths before lm-eval reads the task, so relative ones mean "beside the task
file" whatever the job's working folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepe_tasks.contract import lmeval_task as task_file
from deepe_tasks.core.errors import InvalidParams

BATCH_SIZE = 8
CHECK_EVERY = 4  # model calls between two looks at the stop flags


def offline() -> None:
    """No hub access from this process: the variables, and the flags the libraries read at import."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


def task_config(folder: Path, name: str, storage_root: Path, input_roots: list[str] | None) -> tuple[str, dict[str, Any]]:
    """(the task's name, its config as lm-eval loads it, data files made absolute); checked."""
    from lm_eval.api.registry import get_metric_aggregation, metric_registry
    from lm_eval.tasks._yaml_loader import load_yaml

    shown = str(folder / name)

    def read(rel: str) -> str | None:
        path = folder / rel
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    parsed = task_file.parse(name, read, shown)
    task, _ = task_file.check(parsed, shown)
    get_metric_aggregation("acc")  # fills the registry
    for metric in parsed.get("metric_list") or []:
        metric_name = metric["metric"]
        if not metric_name.startswith(task_file.FUNCTION) and metric_name not in metric_registry:
            raise InvalidParams(f"--lm-eval {shown}: the metric {metric_name!r} is not one this lm-eval computes "
                                "itself, so it would be downloaded from the Hugging Face hub (evaluate.load), which "
                                "workers cannot reach; use a metric lm-eval registers (acc, acc_norm, perplexity, "
                                "exact_match, ...).")

    def resolve(file: str) -> str:  # the input-path rule again: a link swapped in after submit
        roots = None if input_roots is None else [Path(r) for r in input_roots]
        return str(task_file.data_file(folder, file, shown, storage_root, roots).resolve())

    return task, task_file.with_files(load_yaml(folder / name), resolve)


def run(model: Any, tokenizer: Any, params: dict[str, Any], storage_root: Path, input_roots: list[str] | None,
        go_on: Callable[[], None]) -> dict[str, Any]:
    """The task's results: ``{"task", "file", "task_sha256", "results": {task: {metric: value,
    "samples": n}}, "lm_eval_version"}``."""
    offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from deepe_tasks.job.evaljob import file_sha256

    folder, name = Path(params["LM_EVAL_DIR"]), str(params["LM_EVAL_TASK"])
    task, config = task_config(folder, name, storage_root, input_roots)
    limit = int(params.get("MAX_SAMPLES") or 0) or None

    class Checked(HFLM):  # type: ignore[misc]
        """HFLM that looks at the job's stop flags now and then (a cancel does not wait for the end)."""

        calls = 0

        def _model_call(self, *args: Any, **kwargs: Any) -> Any:
            Checked.calls += 1
            if Checked.calls % CHECK_EVERY == 0:
                go_on()
            return super()._model_call(*args, **kwargs)

        def _model_generate(self, *args: Any, **kwargs: Any) -> Any:
            go_on()
            return super()._model_generate(*args, **kwargs)

    lm = Checked(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE)
    found = lm_eval.simple_evaluate(model=lm, tasks=[config], task_manager=TaskManager(include_defaults=False),
                                    limit=limit, log_samples=False)
    if found is None:
        raise RuntimeError("lm-eval returned no results")
    counts = found.get("n-samples") or {}
    results = {}
    for name_, values in found["results"].items():
        metrics: dict[str, Any] = {}
        for key, value in values.items():
            metric, _, applied = key.partition(",")
            if applied and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[metric if applied == "none" else f"{metric}/{applied}"] = float(value)
        metrics["samples"] = int((counts.get(name_) or {}).get("effective") or values.get("sample_len") or 0)
        results[name_] = metrics
    return {"task": task, "file": str(folder / name), "task_sha256": file_sha256(folder / name),
            "results": results, "lm_eval_version": found.get("lm_eval_version")}


def flat(block: dict[str, Any]) -> dict[str, float]:
    """The record's and the event's numbers of an lm-eval block: ``lm_eval/<task>/<metric>``."""
    return {f"lm_eval/{task}/{metric}": value for task, values in block["results"].items()
            for metric, value in values.items() if isinstance(value, (int, float))}
