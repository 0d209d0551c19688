"""Evaluation jobs, the submit side: `deepe eval`, `POST /jobs/{id}/eval`, `deepe_tasks.evaluate`.

The target is a job (its published model: an adapter on its base, or a merged model) or a model
folder (a base model, for the baseline). What cannot work is refused here, with the fix: a job
with no published model, a model path with no model, a dataset that is not there or lacks the
prompt and answer columns (named, with the columns it has, where this machine can read it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from deepe_tasks.contract import stored
from deepe_tasks.core import validate
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.errors import InvalidJobState, InvalidParams, JobNotFound
from deepe_tasks.core.objects import ObjectStore
from deepe_tasks.core.records import EVAL_METHOD, JobKind, JobRecord, JobStatus
from deepe_tasks.core.settings import Settings, get_settings, is_remote
from deepe_tasks.queue.client import Job, _create_and_send, find_job
from deepe_tasks.queue.lmeval import lmeval_task

EVAL_FOLDER = "evals"  # where the evaluation of a model path (not a job's) publishes


def evaluate(target: str, dataset: str | None = None, *, max_samples: int | None = None, samples: int = 5,
             input_column: str | None = None, output_column: str | None = None, max_new_tokens: int = 64,
             queue: str | None = None, lm_eval: str | None = None) -> Job:
    """Queue an evaluation of ``target`` (a job id, or a model folder) on ``dataset``, or on the
    lm-evaluation-harness task file ``lm_eval`` (a local task and dataset), or both; returns its job.

    It publishes ``eval.json`` (loss, perplexity, exact_match, rouge_l, samples; under ``lm_eval``
    the task's metrics) beside the job's model (``<OUTPUT_DIR>-eval/<eval id>/``), or under
    ``evals/<eval id>/`` for a model folder.
    """
    settings = get_settings()
    for name, value in (("max_samples", max_samples), ("samples", samples), ("max_new_tokens", max_new_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9):
            raise InvalidParams(f"{name}={value!r} is not valid; allowed: an integer from 0 to 10**9.")
    new_id = uuid.uuid4().hex
    params, output, default_queue = _target(target, settings, new_id)
    if dataset is None and lm_eval is None:
        raise InvalidParams("Nothing to evaluate on: give a dataset (--dataset) or an lm-eval task file (--lm-eval).")
    if dataset is not None:
        params["DATASET_PATH"] = _dataset(dataset, settings, input_column or "instruction", output_column or "output")
    if lm_eval is not None:
        params.update(lmeval_task(lm_eval, _resolved(lm_eval, settings, "--lm-eval"), settings))
    params.update({"OUTPUT_DIR": output, "MAX_SAMPLES": max_samples or 0, "SAMPLES": samples,
                   "MAX_NEW_TOKENS": max_new_tokens, "PromptInputColumn": input_column,
                   "PromptOutputColumn": output_column})
    validate.params(params)
    queue = validate.queue_name(queue or default_queue or settings.queue)
    record = JobRecord(id=new_id, method=EVAL_METHOD, method_sha256=hashlib.sha256(b"").hexdigest(),
                       kind=JobKind.EVAL, queue=queue, params=params, output_dir=output, route=queue)
    _create_and_send(get_redis(), record, "", f"evaluation of {params['EVALUATED']} queued on {queue}")
    return Job(new_id)


def _target(target: str, settings: Settings, new_id: str) -> tuple[dict[str, Any], str, str | None]:
    """(the parameters that name the model, where the results go, the job's queue) for ``target``."""
    validate.path_text(target, "TARGET")
    record = None
    if "/" not in target and not is_remote(target):
        try:
            record = find_job(target).record()
        except (JobNotFound, InvalidParams):
            record = None
    if record is None:
        model = _model_path(target, settings)
        root = settings.storage_url or str(settings.storage_root)
        return {"MODEL_PATH": model, "EVALUATED": model}, f"{root}/{EVAL_FOLDER}/{new_id}", None
    if record.kind is JobKind.EVAL:
        raise InvalidJobState(f"Job {record.id} is an evaluation: it has no model to evaluate. Evaluate the job it "
                              f"evaluated ({record.params.get('EVALUATED')}).")
    if record.status is not JobStatus.SUCCEEDED:
        raise InvalidJobState(f"Job {record.id} is {record.status.value}: it has no published model to evaluate. "
                              "Evaluate a job that succeeded, or a model folder.")
    model = record.output_dir
    output = f"{model.rstrip('/')}-eval/{new_id}"
    if record.kind is JobKind.TRAIN and _is_adapter(model, settings):
        return {"MODEL_PATH": record.params["MODEL_PATH"], "ADAPTER_PATH": model, "EVALUATED": record.id}, output, \
            record.queue
    return {"MODEL_PATH": model, "EVALUATED": record.id}, output, record.queue


def _is_adapter(model: str, settings: Settings) -> bool:
    if settings.storage_url is None:
        return (Path(model) / "adapter_config.json").exists()
    store = ObjectStore(settings.storage_url)
    rel = store.rel_of(model) or ""
    manifest = store.read_json(f"{rel}/deepe.json") or {}
    return store.exists(f"{rel}/{manifest.get('files', '')}/adapter_config.json")


def _resolved(value: str, settings: Settings, name: str) -> str:
    """A path parameter as the record keeps it: absolute on a folder, a URL on an object store."""
    validate.path_text(value, name)
    if settings.storage_url is not None:
        rel = stored.to_relative({name: value}, [name], settings.storage_url)[name]
        return value if is_remote(rel) else f"{settings.storage_url}/{Path(rel).as_posix().strip('/')}"
    problem = validate.input_path_allowed(value, settings.storage_root, settings.input_root_list, name=name)
    if problem:
        raise InvalidParams(problem)
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else settings.storage_root / path).resolve())


def _model_path(value: str, settings: Settings) -> str:
    model = _resolved(value, settings, "TARGET")
    if not settings.check_paths:
        return model
    if settings.storage_url is not None:
        stored.inputs_on_store({"MODEL_PATH": value}, {"MODEL_PATH": model}, settings.storage_url)
    elif not (Path(model) / "config.json").is_file():
        raise InvalidParams(f"{value!r} is neither a job id nor a model folder here ({model} has no config.json). Give "
                            "a job id (`deepe list`) or the folder that save_pretrained wrote.")
    return model


def _dataset(value: str, settings: Settings, input_column: str, output_column: str) -> str:
    data = _resolved(value, settings, "DATASET_PATH")
    if not settings.check_paths:
        return data
    if settings.storage_url is not None:
        stored.inputs_on_store({"DATASET_PATH": value}, {"DATASET_PATH": data}, settings.storage_url)
        return data
    path = Path(data)
    if not path.exists():
        raise InvalidParams(f"DATASET_PATH={value!r} resolves to {path}, which does not exist; give a dataset file or "
                            "folder (JSON, JSONL, CSV, Parquet or save_to_disk).")
    columns = _columns(path)
    missing = [c for c in (input_column, output_column) if columns is not None and c not in columns]
    if missing:
        raise InvalidParams(f"the dataset at {path} has no column {missing[0]!r}; its columns are {sorted(columns or [])}. "
                            "Set the prompt and answer columns to match (--input-column / --output-column).")
    return data


def _columns(path: Path) -> set[str] | None:
    """The columns of a JSONL, JSON or CSV file from its first row; None where it cannot say cheaply."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            if path.suffix == ".jsonl":
                first = json.loads(f.readline(1 << 24) or "{}")
            elif path.suffix == ".csv":
                return set(next(csv.reader(f), []))
            elif path.suffix == ".json":
                data = json.load(f)
                first = data[0] if isinstance(data, list) and data else data
            else:
                return None
    except (OSError, ValueError, IsADirectoryError):
        return None
    return set(first) if isinstance(first, dict) else None


def results(job: Job) -> dict[str, Any]:
    """An evaluation job's results: its ``eval.json`` (metrics, samples, checksums) where this
    machine can read it, else the metrics its record keeps."""
    info = job.info()
    out: dict[str, Any] = {"job": job.id, "status": info["status"], "output_dir": info.get("output_dir"),
                           **(info.get("metrics") or {})}
    folder = str(info.get("output_dir") or "")
    data: dict[str, Any] | None = None
    settings = get_settings()
    try:
        if settings.storage_url is not None and is_remote(folder):
            store = ObjectStore(settings.storage_url)
            rel = store.rel_of(folder) or ""
            manifest = store.read_json(f"{rel}/deepe.json") or {}
            data = store.read_json(f"{rel}/{manifest.get('files', '')}/eval.json")
        elif folder:
            data = json.loads((Path(folder) / "eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict):
        out.update(data.get("metrics") or {})
        out.update({k: data.get(k) for k in ("evaluated", "model", "adapter", "dataset", "dataset_sha256",
                                             "model_sha256", "rows", "truncated_prompts", "samples", "lm_eval")})
    return out
