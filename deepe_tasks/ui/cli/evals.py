"""`deepe eval`: score a job's model, or a base model, on a dataset (a job of its own)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from deepe_tasks.ui.cli.common import EXIT_FAILED, JsonOpt, app, console, print_json


@app.command("eval")
def eval_(
    target: Annotated[str, typer.Argument(help="A job id (its published model) or a model folder (a base model).")],
    dataset: Annotated[str | None, typer.Option("--dataset", help="A dataset with the prompt and answer columns.")] = None,
    lm_eval: Annotated[str | None, typer.Option(
        "--lm-eval", help="An lm-evaluation-harness task YAML with its local dataset (data_files beside it).")] = None,
    max_samples: Annotated[int | None, typer.Option(help="Evaluate at most this many rows.")] = None,
    samples: Annotated[int, typer.Option(help="How many prompts to show with both answers.")] = 5,
    input_column: Annotated[str | None, typer.Option(help="The prompt column; default instruction.")] = None,
    output_column: Annotated[str | None, typer.Option(help="The answer column; default output.")] = None,
    queue: Annotated[str | None, typer.Option(help="The queue; default the job's own, or DEEPE_QUEUE.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the results and print them.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a model: loss and perplexity of the answers, greedy answers scored by exact match
    and ROUGE-L, and a few samples side by side; or an lm-eval task (--lm-eval); published as eval.json."""
    from deepe_tasks.core.records import JobStatus
    from deepe_tasks.queue.evals import evaluate, results

    job = evaluate(target, dataset, max_samples=max_samples, samples=samples, input_column=input_column,
                   output_column=output_column, queue=queue, lm_eval=lm_eval)
    if not wait:
        print_json({"id": job.id, "status": job.status().value}) if as_json else print(job.id)
        return
    # As `deepe submit --wait` and `merge --wait` follow theirs: until the job ends, which its
    # lease bounds once a worker took it (a queue no worker consumes waits, as the job does).
    status = job.wait()
    found = results(job)
    if as_json:
        print_json(found)
    else:
        _show(found)
    if status is not JobStatus.SUCCEEDED:
        if not as_json:
            console.print(f"the evaluation {job.id} {status.value}: {job.info().get('error') or ''}")
        raise typer.Exit(EXIT_FAILED)


def _show(found: dict[str, object]) -> None:
    table = Table(title=f"evaluation {found['job']} of {found.get('evaluated') or '?'}")
    for name in ("metric", "value"):
        table.add_column(name)
    only_lm_eval = isinstance(found.get("lm_eval"), dict) and not found.get("dataset")
    for key in ("loss", "perplexity", "exact_match", "rouge_l", "rows") if not only_lm_eval else ():
        value = found.get(key)
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    block = found.get("lm_eval")
    for task, values in (block.get("results") or {}).items() if isinstance(block, dict) else ():
        for key, value in values.items():
            table.add_row(f"{task} {key}", _num(value))
    console.print(table)
    shown = found.get("samples")
    if isinstance(shown, list) and shown:
        side = Table(title="samples")
        for name in ("prompt", "expected", "generated"):
            side.add_column(name, overflow="fold")
        for s in shown:
            side.add_row(str(s.get("prompt")), str(s.get("expected")), str(s.get("generated")))
        console.print(side)
    console.print(f"results: {found.get('output_dir')}")


@app.command()
def compare(
    jobs: Annotated[list[str], typer.Argument(help="Two jobs or more: ids, or unique starts of ids.")],
    as_json: JsonOpt = False,
) -> None:
    """Jobs side by side: the parameters that differ, final train and eval loss, and the metrics
    of every evaluation (`deepe eval`) run on the same dataset."""
    from deepe_tasks.queue.compare import SHOWN_EVAL_METRICS
    from deepe_tasks.queue.compare import compare as compare_jobs

    found = compare_jobs(jobs)
    if as_json:
        print_json(found)
        return
    table = Table(title="jobs")
    for name in ("job", "method", "status", *found["differing_params"], "train loss", "eval loss"):
        table.add_column(name, overflow="fold")
    for row in found["jobs"]:
        last = row["eval"]
        table.add_row(row["id"][:12], row["method"], row["status"], *(str(row["params"].get(k))
                      for k in found["differing_params"]), _num(row["train_loss"]),
                      f"{_num(last['eval_loss'])} (step {last['step']})" if last else "-")
    console.print(table)
    for group in found["evaluations"]:
        evals = Table(title=f"evaluations on {group['dataset']}")
        lm_eval = sorted({k for metrics in group["results"].values() for k in metrics if k.startswith("lm_eval/")})
        shown = [*SHOWN_EVAL_METRICS, *lm_eval]
        for name in ("job", *shown):
            evals.add_column(name, overflow="fold")
        for job_id, metrics in group["results"].items():
            evals.add_row(job_id[:12], *(_num(metrics.get(k)) for k in shown))
        console.print(evals)


def _num(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))


@app.command()
def webhooks(
    show_failed: Annotated[bool, typer.Option("--failed", help="List the deliveries given up instead.")] = False,
    resend: Annotated[str | None, typer.Option(help="Send a failed delivery again (its id from --failed).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The webhook deliveries not sent yet (with their retries), or those given up; re-send one."""
    from deepe_tasks.core import webhooks as hooks
    from deepe_tasks.core.connection import get_redis

    client = get_redis()
    if resend is not None:
        print(hooks.resend(client, resend))
        return
    rows = hooks.failed(client) if show_failed else hooks.pending(client)
    if as_json:
        print_json(rows)
        return
    table = Table(title="failed deliveries" if show_failed else "pending deliveries")
    for name in ("id", "job", "type", "tries", "error"):
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(row["id"], str(row.get("job")), str(row.get("type")), str(row.get("tries", 0)),
                      str(row.get("error", "")))
    console.print(table)
