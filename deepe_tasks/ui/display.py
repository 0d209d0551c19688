"""Events as readable lines, for the CLI and local runs; a job's published model, for its readers."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.text import Text

from deepe_tasks.core.records import Event, EventKind, JobRecord, JobStatus

SHOWN_METRICS = ("loss", "learning_rate", "grad_norm", "reward", "epoch")


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_metric(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_event(event: Event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
    if event.kind is EventKind.LOG:
        shown = [f"{k}={fmt_metric(event.metrics[k])}" for k in SHOWN_METRICS if k in event.metrics]
        rest = [f"{k}={fmt_metric(v)}" for k, v in event.metrics.items() if k not in SHOWN_METRICS]
        if event.step is None or "train_runtime" in event.metrics:
            # a method's own log line, or the trainer's summary at the end: not another step
            head = event.message or ("trained" if "train_runtime" in event.metrics else "log")
            return f"{stamp} {head} " + " ".join(shown + rest)
        step = f"step {event.step}/{event.max_steps}" if event.max_steps else f"step {event.step}"
        eta = f" eta {fmt_seconds(event.eta_s)}" if event.eta_s is not None else ""
        return f"{stamp} {step}{eta} " + " ".join(shown + rest)
    if event.kind is EventKind.EVAL:
        shown = [f"{k}={fmt_metric(v)}" for k, v in event.metrics.items()
                 if k in ("eval_loss", "loss", "perplexity") or k.startswith("eval_") and "runtime" not in k
                 and "per_second" not in k]
        where = f"eval at step {event.step}" if event.step is not None else f"eval: {event.message or 'evaluated'}"
        shown += [f"{k}={fmt_metric(v)}" for k, v in event.metrics.items() if k in ("exact_match", "rouge_l")]
        return f"{stamp} {where} " + " ".join(shown)
    text = f"{stamp} {event.kind.value}"
    if event.message and event.message != event.kind.value:
        text += f": {event.message}"
    return text


def follow(events: Iterable[Event], console: Console, ids: bool = False) -> Event | None:
    """Show events live: a line per phase and outcome, a progress bar for the steps; ``ids``
    starts each line with its event id, as `deepe logs --ids` does.

    Returns the last event seen (the final one when the job ended).
    """
    last: Event | None = None
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("eta {task.fields[eta]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("training", total=None, loss="-", eta="?", visible=False)
        for event in events:
            last = event
            line = f"{event.id}  {format_event(event)}" if ids else format_event(event)
            if event.kind is EventKind.LOG and event.step is None:  # a method's own log line
                progress.console.print(Text(line))
            elif event.kind is EventKind.LOG:
                fields: dict[str, Any] = {"eta": fmt_seconds(event.eta_s)}
                if "loss" in event.metrics:
                    fields["loss"] = fmt_metric(event.metrics["loss"])
                progress.update(bar, completed=event.step or 0, total=event.max_steps or None,
                                visible=True, **fields)
            else:
                style = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(event.kind.value, "cyan")
                progress.console.print(Text(line, style=style))
    return last


READ_BUDGET = 5.0  # seconds a reader tries the store for each call: a page must not hang on it


def model_of(record: JobRecord, storage_url: str | None) -> dict[str, Any]:
    """What job ``record`` published at its output_dir (`schemas.PublishedModel`), for `deepe
    status`, GET /jobs/{id} and the job page. Looked for only once the job ended with a model
    (succeeded, or cancelled: with --save it published one): one read and one listing."""
    from deepe_tasks.contract.stored import published_files

    out: dict[str, Any] = {"published": False, "url": record.output_dir or None, "files": [], "total_bytes": 0,
                           "partial": False, "note": None}
    if record.status not in (JobStatus.SUCCEEDED, JobStatus.CANCELLED) or not record.output_dir:
        why = "it failed, and a failed job publishes nothing" if record.status is JobStatus.FAILED \
            else f"it is {record.status.value}"
        return {**out, "note": f"No model is published: {why}."}
    try:
        found = published_files(record.output_dir, storage_url, budget=READ_BUDGET)
    except Exception as e:  # the store or folder unreadable from here: said, never a failed request
        return {**out, "note": f"The model at {record.output_dir} could not be read from this machine "
                               f"({type(e).__name__}: {e}); give it read access to DEEPE_STORAGE (a mount, or "
                               "s3:GetObject and s3:ListBucket) and ask again."}
    if found is None:
        how = " (it was cancelled without --save)" if record.status is JobStatus.CANCELLED else \
            " (it was removed, or this machine does not see DEEPE_STORAGE)"
        return {**out, "note": f"No model is published: there is no deepe.json at {record.output_dir}{how}."}
    manifest, files = found
    return {**out, "published": True, "files": [{"name": n, "size": b} for n, b in sorted(files.items())],
            "total_bytes": sum(files.values()), "partial": bool(manifest.get("partial"))}


def fmt_bytes(n: int) -> str:
    """``n`` bytes for people: 512 B, 4.2 MiB, 1.3 GiB."""
    size, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
