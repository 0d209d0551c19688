"""`deepe submit`, `status`, `logs`, `jobs`, `queues` and `cancel`: jobs on the queue."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table
from rich.text import Text

from deepe_tasks.core.settings import get_settings
from deepe_tasks.ui.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    JsonOpt,
    ParamOpt,
    app,
    console,
    err,
    parse_kv,
    print_json,
)


@app.command()
def submit(
    method: str,
    param: ParamOpt = None,
    params_file: Annotated[Path | None, typer.Option(help="A JSON file of parameters.")] = None,
    queue: Annotated[str | None, typer.Option(help="The queue; default DEEPE_QUEUE.")] = None,
    priority: Annotated[int | None, typer.Option(help="0 (highest) to 9; default 5.")] = None,
    time_limit: Annotated[float | None, typer.Option(help="Seconds of training before the job stops.")] = None,
    gpus: Annotated[int, typer.Option(help="Devices the job trains on, one rank each (DDP).")] = 1,
    job_id: Annotated[str | None, typer.Option(help="An id of your own; refused if taken.")] = None,
    webhook: Annotated[str | None, typer.Option(help="A URL this job's state changes are posted to.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    check: Annotated[bool, typer.Option("--check/--no-check", help=(
        "Run `deepe methods check` first and refuse a method it rejects; --no-check for code it misreads."))] = True,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job and print its id."""
    from deepe_tasks.queue.client import submit as submit_job

    job = submit_job(method, parse_kv(param, params_file), queue=queue, priority=priority,
                     time_limit=time_limit, job_id=job_id, check=check, gpus=gpus, webhook=webhook)
    if as_json:
        print_json({"id": job.id, "status": job.status().value, "custom_params": job.custom_params,
                    "notices": job.notices})
    else:
        print(job.id)
        if job.custom_params:
            err.print("Passed to the method as custom parameters (no platform parameter has these names): "
                      + ", ".join(job.custom_params), highlight=False)
        for notice in job.notices:
            err.print(notice, highlight=False, markup=False)
    if wait:
        _follow(job.id)


@app.command()
def status(job_id: str, as_json: JsonOpt = False) -> None:
    """Show one job's state and record, and the files of the model it published."""
    from deepe_tasks.queue.client import find_job, masked
    from deepe_tasks.ui.display import model_of

    record = find_job(job_id).record()
    info = masked(record)
    info["model"] = model_of(record, get_settings().storage_url)
    failed = info.get("status") == "failed"
    if as_json:
        print_json(info)
        raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)
    table = Table(show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    # As Text, never markup: an error message or a metric's name may hold "[/]".
    for key in ("id", "status", "method", "method_sha256", "queue", "worker", "output_dir", "error", "attempts"):
        if info.get(key) not in (None, ""):
            table.add_row(key, Text(str(info[key])))
    for key, value in info.get("metrics", {}).items():
        table.add_row(Text(f"metric {key}"), Text(str(value)))
    console.print(table)
    _print_model(info["model"])
    if failed:
        raise typer.Exit(EXIT_FAILED)


def _print_model(model: dict[str, Any]) -> None:
    """The published model's files, name and size, and their total; or why there is none."""
    from deepe_tasks.ui.display import fmt_bytes

    if not model["published"]:
        console.print(Text(model["note"] or "No model is published."))
        return
    files = model["files"]
    title = f"model at {model['url']}" + (" (partial)" if model["partial"] else "")
    table = Table(Column("file", overflow="fold", footer=f"{len(files)} files"),
                  Column("size", justify="right", no_wrap=True, footer=fmt_bytes(model["total_bytes"])),
                  title=Text(title), title_justify="left", show_footer=True)
    for f in files:
        table.add_row(Text(f["name"]), fmt_bytes(f["size"]))
    console.print(table)


def _follow(job_id: str, since: str = "0", ids: bool = False) -> None:
    from deepe_tasks.core.records import EventKind
    from deepe_tasks.queue.client import find_job
    from deepe_tasks.ui.display import follow

    last = follow(find_job(job_id).events(since=since, follow=True), console, ids=ids)
    if last is not None and last.kind is EventKind.FAILED:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def merge(
    job_id: str,
    queue: Annotated[str | None, typer.Option(help="The queue; default the job's own.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the merge; its last line is the merged model's folder.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Merge again, replacing a merged model of this job.")] = False,
) -> None:
    """Merge a succeeded job's LoRA adapter into its base model, as a complete model (a job of its own)."""
    from deepe_tasks.queue.client import find_job
    from deepe_tasks.queue.client import merge as merge_job

    job = merge_job(find_job(job_id).id, queue=queue, force=force)
    print(job.id)
    if wait:
        _follow(job.id)
        print(job.info()["output_dir"])


@app.command()
def logs(
    job_id: str,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Tail until the job ends.")] = False,
    since: Annotated[str, typer.Option(help="Replay after this event id (see --ids).")] = "0",
    ids: Annotated[bool, typer.Option("--ids", help="Start each line with its event id, for --since.")] = False,
) -> None:
    """Show a job's events: a line per phase and step (a progress bar with --follow)."""
    from deepe_tasks.queue.client import find_job
    from deepe_tasks.ui.display import format_event

    if follow_:
        _follow(job_id, since, ids)
        return
    for event in find_job(job_id).events(since=since):
        console.print(f"{event.id}  {format_event(event)}" if ids else format_event(event),
                      highlight=False, markup=False)


@app.command()
def jobs(limit: Annotated[int, typer.Option(help="How many.", min=1, max=500)] = 20, as_json: JsonOpt = False) -> None:
    """List recent jobs, newest first."""
    import time

    from deepe_tasks.queue.client import list_jobs

    records, _ = list_jobs(limit=limit)
    if as_json:
        print_json([{"id": r.id, "method": r.method, "status": r.status.value, "queue": r.queue,
                     "submitted_at": r.submitted_at, "worker": r.worker} for r in records])
        return
    width = max((len(r.id) for r in records), default=2)  # whole ids, however narrow the terminal
    table = Table(Column("id", no_wrap=True, min_width=width), "method", "status", "queue", "submitted", "worker")
    for r in records:
        table.add_row(r.id, r.method, r.status.value, r.queue,
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.submitted_at)), r.worker or "")
    console.print(table)


@app.command()
def queues(
    queue: Annotated[list[str] | None, typer.Option("--queue", "-q", help="Also show this queue.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show each queue: its length, the jobs waiting in it (in start order) and its workers."""
    from dataclasses import asdict

    from deepe_tasks.core import validate
    from deepe_tasks.core.broker import active_queues
    from deepe_tasks.core.connection import get_redis
    from deepe_tasks.queue.queues import overview, waiting_in

    extra = [validate.queue_name(q) for q in queue or []]
    client = get_redis()
    active = active_queues()
    infos = {i.name: i for i in overview(client, active)}
    for name in [get_settings().queue, *extra]:
        infos.setdefault(name, waiting_in(client, name))
    rows = sorted(infos.values(), key=lambda i: i.name)
    if as_json:
        print_json([asdict(i) for i in rows])
        return
    table = Table("queue", "devices", "waiting", "running", "workers", "next up")
    for i in rows:
        table.add_row(i.name, str(i.gpus), str(i.length), str(len(i.running)),
                      ", ".join(i.workers) or ("[red]none[/red]" if i.length else "-"),
                      ", ".join(f"{w['id']} (p{w['priority']})" for w in i.waiting[:3]) or "-")
    console.print(table)


@app.command()
def cancel(
    job_id: str,
    save: Annotated[bool, typer.Option("--save", help="Publish the model trained so far (marked partial).")] = False,
) -> None:
    """Cancel a job: a queued one never starts; a running one stops at its next step."""
    from deepe_tasks.queue.client import find_job

    state = find_job(job_id).cancel(save=save)
    console.print(f"{job_id}: {'cancelled' if state.value == 'cancelled' else 'cancel requested'}")
