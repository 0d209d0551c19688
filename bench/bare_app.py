"""The baseline for dispatch: a bare Celery task on the same Redis, same JSON settings."""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("bare", broker=os.environ["DEEPE_REDIS_URL"], backend=os.environ["DEEPE_REDIS_URL"])
app.conf.update(accept_content=["json"], task_serializer="json", result_serializer="json",
                worker_prefetch_multiplier=1, task_acks_late=True)


@app.task(name="bare.started")
def started() -> float:
    return time.time()
