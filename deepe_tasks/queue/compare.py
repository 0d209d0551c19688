"""Jobs side by side (`deepe compare`, `GET /compare`): which parameters differ, the final train
and eval loss of each, and the metrics of every evaluation (`deepe eval`) run on the same dataset."""

from __future__ import annotations

from typing import Any

from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.records import EVAL_METHOD, EventKind, JobRecord, JobStatus, mask_secrets
from deepe_tasks.queue.client import Job, find_job, list_jobs

EVALS_LOOKED_AT = 500  # the newest evaluation jobs searched for ones of the jobs compared
SHOWN_EVAL_METRICS = ("loss", "perplexity", "exact_match", "rouge_l")
NOT_COMPARED = {"OUTPUT_DIR"}  # differs by construction


def _last_eval(job: Job) -> dict[str, Any] | None:
    found = None
    for event in job.events():
        if event.kind is EventKind.EVAL and event.step is not None and "eval_loss" in event.metrics:
            found = {"step": event.step, "eval_loss": event.metrics["eval_loss"]}
    return found


def _curve(job: Job) -> dict[str, list[list[float]]]:
    """The job's loss curves, [step, value] pairs: train (its log events) and eval."""
    train: dict[int, float] = {}
    evaluated: dict[int, float] = {}
    for event in job.events():
        if event.step is None:
            continue
        value = event.metrics.get("eval_loss" if event.kind is EventKind.EVAL else "loss")
        if isinstance(value, (int, float)) and event.kind in (EventKind.LOG, EventKind.EVAL):
            (evaluated if event.kind is EventKind.EVAL else train)[event.step] = float(value)
    return {"train": [[s, v] for s, v in sorted(train.items())], "eval": [[s, v] for s, v in sorted(evaluated.items())]}


def compare(refs: list[str], curves: bool = False) -> dict[str, Any]:
    """The comparison of the jobs ``refs`` (ids or unique starts of ids, at least two)."""
    if len(refs) < 2:
        raise InvalidParams("compare needs at least two jobs; give their ids (`deepe jobs` lists them).")
    jobs = [find_job(ref) for ref in refs]
    records = [job.record() for job in jobs]
    params = [mask_secrets(r.params) for r in records]
    keys = sorted({k for p in params for k in p} - NOT_COMPARED)
    differing = [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]
    rows = []
    for job, record, p in zip(jobs, records, params, strict=True):
        row: dict[str, Any] = {
            "id": record.id, "method": record.method, "status": record.status.value,
            "params": {k: p.get(k) for k in differing},
            "train_loss": record.metrics.get("loss") if record.metrics else None,
            "eval": _last_eval(job), "output_dir": record.output_dir if record.status is JobStatus.SUCCEEDED else None,
        }
        if curves:
            row["curves"] = _curve(job)
        rows.append(row)
    return {"jobs": rows, "differing_params": differing, "evaluations": _evaluations(records, samples=curves)}


def _evaluations(records: list[JobRecord], samples: bool = False) -> list[dict[str, Any]]:
    """Every succeeded evaluation of these jobs, grouped by dataset (newest of each job's kept);
    with ``samples``, each one's samples from its eval.json (the prompts, both answers)."""
    wanted = {r.id for r in records}
    evals, _ = list_jobs(status=JobStatus.SUCCEEDED, method=EVAL_METHOD, limit=EVALS_LOOKED_AT)
    by_dataset: dict[str, dict[str, Any]] = {}
    for e in evals:  # newest first: the first one seen of a job on a dataset stays
        target = e.params.get("EVALUATED")
        if target not in wanted:
            continue
        dataset = e.params.get("DATASET_PATH")  # or an lm-eval task file alone
        on = str(dataset) if dataset else f"lm-eval task {e.params.get('LM_EVAL_DIR')}/{e.params.get('LM_EVAL_TASK')}"
        results = by_dataset.setdefault(on, {})
        if target not in results:
            results[str(target)] = {"eval_job": e.id, "output_dir": e.output_dir,
                                    **{k: e.metrics.get(k) for k in SHOWN_EVAL_METRICS},
                                    **{k: v for k, v in e.metrics.items() if k.startswith("lm_eval/")}}
            if samples:
                from deepe_tasks.queue.evals import results as eval_results

                results[str(target)]["samples"] = eval_results(Job(e.id)).get("samples") or []
    return [{"dataset": dataset, "results": results} for dataset, results in sorted(by_dataset.items())]
