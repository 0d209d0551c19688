"""The Celery app, configured for long training jobs (each setting with its reason)."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from deepe_tasks.core.settings import Settings, get_settings, redis_ssl_options


def make_app(settings: Settings) -> Celery:
    app = Celery("deepe", broker=settings.redis_url, backend=settings.redis_url, include=["deepe_tasks.worker.tasks"])
    app.conf.update(
        # Pickle from a broker is remote code execution: JSON only, both ways.
        accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        result_accept_content=["json"],
        # A job is not lost when its worker dies, and an idle worker never hoards one.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # Recovery comes from leases; broker redelivery must not race a running job.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
            **({"polling_interval": LARGE_FLEET_POLL} if settings.fleet == "large" else {}),
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        # Flower sees every state, and the args of each task. The task records STARTED itself,
        # once it owns the job: a duplicate delivery never touches the result backend.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=False,
        result_extended=True,
        task_default_queue=settings.queue,
        broker_use_ssl=redis_ssl_options(settings),
        redis_backend_use_ssl=redis_ssl_options(settings),
        result_expires=int(settings.job_retention),  # Celery's result of a job goes with its record
    )
    return app


# DEEPE_FLEET=large: what a worker costs one Redis shared by hundreds (bench/fleet.py).
LARGE_FLEET_HEARTBEAT = 10  # seconds between worker heartbeats; Flower's expiry is twice this
LARGE_FLEET_POLL = 10  # seconds an idle worker's BRPOP waits (a job still starts at once)


def worker_flags(settings: Settings) -> list[str]:
    """Extra `celery worker` command-line flags for this deployment (`deepe worker` adds them)."""
    if settings.fleet == "large":
        return ["--without-gossip", "--without-mingle", "--heartbeat-interval", str(LARGE_FLEET_HEARTBEAT)]
    return []


@lru_cache(maxsize=8)
def app_for(redis_url: str) -> Celery:
    """The app for a Redis URL: a process that changes DEEPE_REDIS_URL gets a matching one."""
    return make_app(get_settings().model_copy(update={"redis_url": redis_url}))


app = app_for(get_settings().redis_url)
