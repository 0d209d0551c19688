"""Events as readable lines, for the CLI and local runs."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.text import Text

from deepe_tasks.core.records import Event, EventKind

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
