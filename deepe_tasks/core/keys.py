"""Redis key names: the only place they are spelled out."""

from __future__ import annotations

PREFIX = "deepe"
JOBS_INDEX = f"{PREFIX}:jobs"  # sorted set: job id -> submit time
RUNNING = f"{PREFIX}:running"  # set: ids of the jobs that a worker has started
UNSENT = f"{PREFIX}:unsent"  # sorted set: queued job id -> when; its Celery message is not sent yet


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"  # hash: the job record


def events(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"  # stream: one JSON event per entry, field "data"


def method_source(sha256: str) -> str:
    return f"{PREFIX}:method:{sha256}"  # string: a pinned method source


def lease(job_id: str) -> str:
    return f"{PREFIX}:lease:{job_id}"  # string with TTL: the worker running the job


def cancel(job_id: str) -> str:
    return f"{PREFIX}:cancel:{job_id}"  # string: "cancel" or "save", set when a cancel was asked for
