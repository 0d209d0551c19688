"""`deepe worker`, `deepe api` and `deepe demo`: the long-running processes."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from deepe_tasks.core.settings import get_settings
from deepe_tasks.ui.cli.common import (
    app,
    console,
)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = "",
    gpus: Annotated[str | None, typer.Option(help=(
        "The devices this worker owns, e.g. 0,1,2,3: its jobs' CUDA_VISIBLE_DEVICES; it runs jobs of up to that "
        "many devices. DEEPE_GPUS."))] = None,
    name: Annotated[str | None, typer.Option(help=(
        "Celery node name, e.g. gpu0@%h (%h: this host's name). Default deepe-PID@%h, unique on a host, so that "
        "several workers of one host are each listed and inspected."))] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    warm: Annotated[bool, typer.Option(
        "--warm/--no-warm", help="Fork job processes from a warm zygote (--no-warm: start each cold).")] = True,
    one_job: Annotated[bool, typer.Option(
        "--one-job", help="Exit after one job (a KEDA ScaledJob's pod). DEEPE_ONE_JOB.")] = False,
    idle_exit: Annotated[float | None, typer.Option(
        min=1, help="Exit after this many seconds without a job. DEEPE_IDLE_EXIT.")] = None,
) -> None:
    """Start a worker: one job at a time, each in a fresh process (one per rank for a multi-device job).

    It consumes, for each queue, the queues of every job size it can run, the largest first.
    """
    from deepe_tasks.core import devices, validate

    if gpus is not None:
        devices.device_list(gpus)  # refused before anything is set
        os.environ["DEEPE_GPUS"] = gpus
    if not warm:
        os.environ["DEEPE_WARM"] = "false"
    if one_job:
        os.environ["DEEPE_ONE_JOB"] = "true"
    if idle_exit is not None:
        os.environ["DEEPE_IDLE_EXIT"] = str(idle_exit)
    get_settings.cache_clear()
    from deepe_tasks.core.broker import app as celery_app
    from deepe_tasks.core.broker import worker_flags

    owned = len(devices.device_list(get_settings().gpus))
    consumed = ",".join(devices.consumed(validate.queue_names(queues or get_settings().queue), owned))
    # Celery names every worker celery@HOST: two on one host would answer inspect and ping as one.
    argv = ["worker", "--loglevel", loglevel, "--concurrency", "1", "-Q", consumed,
            "--hostname", name or f"deepe-{os.getpid()}@%h"]
    from deepe_tasks.core.connection import check_redis

    check_redis(get_settings())  # a wrong sentinel setup or too few replicas: said now, not per job
    from deepe_tasks.core.objects import check_storage

    check_storage(get_settings().storage_url)  # a bucket that is not there or not writable: said now too
    celery_app.worker_main(argv + worker_flags(get_settings()))


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve without DEEPE_API_TOKENS.")] = False,
) -> None:
    """Serve the HTTP API (needs the `api` extra: FastAPI and uvicorn).

    Its limits come from the settings: DEEPE_API_MAX_BODY_BYTES (413), DEEPE_API_MAX_STREAMS_PER_TOKEN
    (429), and DEEPE_API_HEADER_TIMEOUT, the seconds a connection may take to send a request's
    headers or stay idle between requests before it is closed."""
    from deepe_tasks.ui.api import create_app
    from deepe_tasks.ui.server import serve

    settings = get_settings()
    serve(create_app(settings.api_token_list, insecure=insecure), host=host, port=port,
          header_timeout=settings.api_header_timeout)


@app.command()
def demo(
    steps: Annotated[int, typer.Option(help="Training steps.")] = 30,
) -> None:
    """Run SFT-Demo end to end on a private Redis, a worker and a tiny local model."""
    from deepe_tasks.ui.demo import run_demo

    raise typer.Exit(run_demo(console, steps=steps))
