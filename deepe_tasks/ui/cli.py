"""The `deepe` command line. Exit codes: 0 success, 1 the job failed, 2 bad usage or input."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deepe_tasks.core.errors import DeepeError
from deepe_tasks.core.settings import get_settings, safe_url

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="deepe: queue LLM fine-tuning jobs on GPU workers and follow them.")
methods_app = typer.Typer(no_args_is_help=True, help="List, create and check training methods.")
app.add_typer(methods_app, name="methods")
console = Console()
err = Console(stderr=True, soft_wrap=True)

ParamOpt = Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE, repeatable.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def show_error(message: str) -> None:
    err.print(Text("error: ", style="red") + Text(message))


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    show_error(message)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def parse_kv(pairs: list[str] | None, params_file: Path | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_file is not None:
        try:
            params.update(json.loads(params_file.read_text()))
        except (OSError, ValueError) as e:
            fail(f"Could not read the parameters file {params_file}: {e}; give a JSON object of KEY: value.")
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"-p {pair!r} is not KEY=VALUE; write it as -p MAX_STEPS=100.")
        params[key.strip()] = value
    return params


# ---- methods ---------------------------------------------------------------------------------

@methods_app.command("list")
def methods_list(as_json: JsonOpt = False) -> None:
    """Show the methods in the store, each with its one-line description."""
    from deepe_tasks.queue.methods import list_methods

    found = list_methods(get_settings().method_root)
    if as_json:
        print_json([{"name": m.name, "description": m.description, "sha256": m.sha256} for m in found])
        return
    table = Table("method", "description", "sha256")
    for m in found:
        table.add_row(m.name, m.description, m.sha256[:12])
    console.print(table)


@methods_app.command("new")
def methods_new(name: str) -> None:
    """Copy the custom template to NAME.py in the method store (never overwrites)."""
    from deepe_tasks.queue.methods import new_method

    path = new_method(get_settings().method_root, name)
    console.print(Text(f"Created {path}. Paste your training code between the marker lines, then "
                       f"`deepe methods check {name}`."), soft_wrap=True)


@methods_app.command("check")
def methods_check(name: str) -> None:
    """Check a method against the contract without running it."""
    from deepe_tasks.queue.methods import check_source, load_method

    method = load_method(get_settings().method_root, name)
    report = check_source(method.source, method.path.name)
    for line in report.errors:
        console.print(Text("error: ", style="red") + Text(line), soft_wrap=True)
    for line in report.warnings:
        console.print(Text("warning: ", style="yellow") + Text(line), soft_wrap=True)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
    console.print(f"{name}: OK ({method.sha256[:12]})")


# ---- jobs ------------------------------------------------------------------------------------

@app.command()
def submit(
    method: str,
    param: ParamOpt = None,
    params_file: Annotated[Path | None, typer.Option(help="A JSON file of parameters.")] = None,
    queue: Annotated[str | None, typer.Option(help="The queue; default DEEPE_QUEUE.")] = None,
    priority: Annotated[int | None, typer.Option(help="0 (highest) to 9; default 5.")] = None,
    time_limit: Annotated[float | None, typer.Option(help="Seconds of training before the job stops.")] = None,
    job_id: Annotated[str | None, typer.Option(help="An id of your own; refused if taken.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job and print its id."""
    from deepe_tasks.queue.client import submit as submit_job

    job = submit_job(method, parse_kv(param, params_file), queue=queue, priority=priority,
                     time_limit=time_limit, job_id=job_id)
    if as_json:
        print_json({"id": job.id, "status": job.status().value})
    else:
        print(job.id)
    if wait:
        _follow(job.id)


@app.command()
def status(job_id: str, as_json: JsonOpt = False) -> None:
    """Show one job's state and record."""
    from deepe_tasks.queue.client import Job

    info = Job(job_id).info()
    if as_json:
        print_json(info)
        return
    table = Table(show_header=False)
    for key in ("id", "status", "method", "method_sha256", "queue", "worker", "output_dir", "error", "attempts"):
        if info.get(key) not in (None, ""):
            table.add_row(key, str(info[key]))
    for key, value in info.get("metrics", {}).items():
        table.add_row(f"metric {key}", str(value))
    console.print(table)


def _follow(job_id: str, since: str = "0") -> None:
    from deepe_tasks.core.records import EventKind
    from deepe_tasks.queue.client import Job
    from deepe_tasks.ui.display import follow

    last = follow(Job(job_id).events(since=since, follow=True), console)
    if last is not None and last.kind is EventKind.FAILED:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def logs(
    job_id: str,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Tail until the job ends.")] = False,
    since: Annotated[str, typer.Option(help="Replay after this event id.")] = "0",
) -> None:
    """Show a job's events: a line per phase, a progress bar while training."""
    from deepe_tasks.queue.client import Job
    from deepe_tasks.ui.display import format_event

    if follow_:
        _follow(job_id, since)
        return
    for event in Job(job_id).events(since=since):
        console.print(f"{event.id}  {format_event(event)}", highlight=False, markup=False)


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
    table = Table("id", "method", "status", "queue", "submitted", "worker")
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
    from deepe_tasks.core.connection import get_redis
    from deepe_tasks.queue.queues import overview, waiting_in
    from deepe_tasks.worker.celery_app import app_for

    extra = [validate.queue_name(q) for q in queue or []]
    client = get_redis()
    active = app_for(get_settings().redis_url).control.inspect(timeout=1.0).active_queues()
    infos = {i.name: i for i in overview(client, active)}
    for name in [get_settings().queue, *extra]:
        infos.setdefault(name, waiting_in(client, name))
    rows = sorted(infos.values(), key=lambda i: i.name)
    if as_json:
        print_json([asdict(i) for i in rows])
        return
    table = Table("queue", "waiting", "running", "workers", "next up")
    for i in rows:
        table.add_row(i.name, str(i.length), str(len(i.running)), ", ".join(i.workers) or "-",
                      ", ".join(f"{w['id']} (p{w['priority']})" for w in i.waiting[:3]) or "-")
    console.print(table)


@app.command()
def cancel(
    job_id: str,
    save: Annotated[bool, typer.Option("--save", help="Publish the model trained so far (marked partial).")] = False,
) -> None:
    """Cancel a job: a queued one never starts; a running one stops at its next step."""
    from deepe_tasks.queue.client import Job

    state = Job(job_id).cancel(save=save)
    console.print(f"{job_id}: {'cancelled' if state.value == 'cancelled' else 'cancel requested'}")


@app.command("run-local")
def run_local_cmd(
    method: Annotated[str, typer.Argument(help="A method name in the store, or a path to a .py file.")],
    param: ParamOpt = None,
    params_file: Annotated[Path | None, typer.Option(help="A JSON file of parameters.")] = None,
) -> None:
    """Run a method in this process through the worker's runner: no queue, no Redis."""
    from deepe_tasks.queue.methods import load_method
    from deepe_tasks.ui.local import run_local

    path = Path(method)
    if path.suffix != ".py":
        path = load_method(get_settings().method_root, method).path
    elif not path.is_file():
        fail(f"There is no method file {path}; give a method name or the path of a .py file.")
    code = run_local(path, parse_kv(param, params_file),
                     echo=lambda line: console.print(line, highlight=False, markup=False))
    raise typer.Exit(code)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = "",
    gpus: Annotated[str | None, typer.Option(help="CUDA_VISIBLE_DEVICES for this worker's jobs.")] = None,
    name: Annotated[str | None, typer.Option(help="Celery node name, e.g. gpu0@%h.")] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    warm: Annotated[bool, typer.Option(
        "--warm/--no-warm", help="Fork job processes from a warm zygote (--no-warm: start each cold).")] = True,
) -> None:
    """Start a worker: one job at a time, each in a fresh process."""
    if gpus is not None:
        os.environ["DEEPE_GPUS"] = gpus
    if not warm:
        os.environ["DEEPE_WARM"] = "false"
    get_settings.cache_clear()
    from deepe_tasks.core import validate
    from deepe_tasks.worker.celery_app import app as celery_app

    consumed = ",".join(validate.queue_names(queues or get_settings().queue))
    argv = ["worker", "--loglevel", loglevel, "--concurrency", "1", "-Q", consumed]
    if name:
        argv += ["--hostname", name]
    celery_app.worker_main(argv)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve without DEEPE_API_TOKENS.")] = False,
) -> None:
    """Serve the HTTP API (needs the `api` extra: FastAPI and uvicorn)."""
    import uvicorn

    from deepe_tasks.ui.api import create_app

    uvicorn.run(create_app(get_settings().api_token_list, insecure=insecure), host=host, port=port)


@app.command()
def demo(
    steps: Annotated[int, typer.Option(help="Training steps.")] = 30,
) -> None:
    """Run SFT-Demo end to end on a private Redis, a worker and a tiny local model."""
    from deepe_tasks.ui.demo import run_demo

    raise typer.Exit(run_demo(console, steps=steps))


def main() -> None:
    import redis

    try:
        app()
    except DeepeError as e:
        show_error(str(e))
        sys.exit(EXIT_USAGE)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        show_error(f"Redis at {safe_url(get_settings().redis_url)} cannot be reached ({e}); start it, "
                   "or point DEEPE_REDIS_URL at a running one.")
        sys.exit(EXIT_USAGE)
    except redis.RedisError as e:
        show_error(f"Redis at {safe_url(get_settings().redis_url)} refused the request ({e}); "
                   "check that DEEPE_REDIS_URL names deepe's Redis and that its user may run it.")
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
