"""The broker: the Celery app, configured for long training jobs (each setting with its reason),
and what the other sides do with it (send a job's message, revoke one, ask the workers).

It lives in core so that a submitter sends a message without importing the worker: the app
names its task module by string (``include``), which only a worker imports.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from deepe_tasks.core.records import JobRecord, mask_secrets
from deepe_tasks.core.settings import Settings, get_settings, redis_ssl_options

TASK_NAME = "deepe.train"
DEFAULT_PRIORITY = 5  # a job's without one: 0 is the highest, 9 the lowest

if TYPE_CHECKING:
    from celery import Celery


def make_app(settings: Settings) -> Celery:
    from celery import Celery  # here: a command that sends no message does not import Celery

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
            # kombu drops a consumer's BRPOP connection whose reply is overdue by this much (a
            # half-open socket: its Redis end closed while the link was down) and reconnects;
            # 25 s by default, so an idle worker was deaf for about 51 s. Every 5 s: about 11 s.
            "health_check_interval": LARGE_FLEET_HEALTH_CHECK if settings.fleet == "large" else HEALTH_CHECK,
            **_sentinel_options(settings),
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout,
                                          **_sentinel_options(settings)},
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


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    """Under Sentinel (a ``sentinel://`` DEEPE_REDIS_URL), what kombu's transport and Celery's
    result backend need to find the primary: its name, and the sentinels' password."""
    if not settings.sentinel:
        return {}
    from deepe_tasks.core.connection import master_name

    options: dict[str, Any] = {"master_name": master_name(settings)}
    if settings.redis_sentinel_password:
        options["sentinel_kwargs"] = {"password": settings.redis_sentinel_password}
    return options


# Celery's Redis transport keeps one list per priority step: "gpu" for 0 (the highest), then
# "gpu:1" … "gpu:9" (make_app sets sep=":" and priority steps 0-9).
PRIORITIES = range(10)


def priority_lists(queue: str) -> list[tuple[int, str]]:
    """The Redis lists that hold a queue's messages, with the priority of each."""
    return [(p, queue if p == 0 else f"{queue}:{p}") for p in PRIORITIES]


def poll_interval(settings: Settings) -> float:
    """Seconds an idle worker's BRPOP waits for a message (kombu's polling_interval)."""
    return LARGE_FLEET_POLL if settings.fleet == "large" else 1.0


# DEEPE_FLEET=large: what a worker costs one Redis shared by hundreds (bench/fleet.py).
HEALTH_CHECK = 5  # seconds: kombu's checks of its long-lived connections (see make_app)
LARGE_FLEET_HEALTH_CHECK = 25  # kombu's default: a PING per idle connection per 25 s, on a fleet of hundreds
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


# Flower's task list: the job id (the task id is the job's), its method, devices and parameters
# (kwargs), not only `deepe.train`. Flower reads FLOWER_* after `celery -A deepe_tasks` made the
# app, so setting the default here configures every Flower started on it; an operator's own
# FLOWER_TASKS_COLUMNS (or --tasks_columns) wins.
FLOWER_TASKS_COLUMNS = "name,uuid,state,kwargs,received,started,runtime,worker"


def __getattr__(name: str) -> Any:
    # `app`, the app of this process's DEEPE_REDIS_URL: made when first asked for (the worker's
    # task module, `celery -A deepe_tasks`), not when the module is imported.
    if name == "app":
        os.environ.setdefault("FLOWER_TASKS_COLUMNS", FLOWER_TASKS_COLUMNS)
        return app_for(get_settings().redis_url)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enqueue(record: JobRecord) -> None:
    """Send the job's one Celery message (JSON); the job id is the task id."""
    app_for(get_settings().redis_url).send_task(
        TASK_NAME, args=[record.id], kwargs={"method": record.method, "gpus": record.gpus}, task_id=record.id,
        queue=record.route or record.queue, priority=DEFAULT_PRIORITY if record.priority is None else record.priority,
        # What Flower shows: the method and its parameters, secrets masked. The worker reads
        # the parameters from the job record, never from the message.
        argsrepr=repr([record.id]),
        kwargsrepr=repr({"method": record.method, "gpus": record.gpus, "params": mask_secrets(record.params)}),
    )


def revoke(job_id: str) -> None:
    """Drop a queued job's message unread (a worker that gets it skips it)."""
    app_for(get_settings().redis_url).control.revoke(job_id)


def active_queues(timeout: float = 1.0) -> Any:
    """What each live worker consumes (Celery's inspect), or None when no worker answered."""
    return app_for(get_settings().redis_url).control.inspect(timeout=timeout).active_queues()
