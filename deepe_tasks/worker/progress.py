"""Training progress shown in Flower, read from the job's event stream by its worker."""

from __future__ import annotations

import json
from typing import Any

from deepe_tasks.core import keys
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.events import PROGRESS_WINDOW, decode
from deepe_tasks.core.records import EventKind


class FlowerProgress:
    """Shows training progress in Flower: a PROGRESS state and `task-progress` events.

    The supervisor calls it about once a second, from the worker side, so the job process
    itself does nothing extra.
    """

    def __init__(self, task: Any, job_id: str) -> None:
        self.task = task
        self.job_id = job_id
        self.last_step: int | None = None
        self.eval_loss: Any = None  # the newest evaluation's, shown beside the training loss
        self.seen = "0"  # the newest stream entry read: each report reads only what came after it
        # Celery keeps the task's request per thread, and reports come from the supervisor's
        # progress thread: take what they need from the request here.
        self.task_id: str = task.request.id
        self.hostname: str = task.request.hostname

    def report(self) -> None:
        recent: Any = get_redis().xrevrange(keys.events(self.job_id), min=f"({self.seen}", count=PROGRESS_WINDOW)
        if not recent:
            return
        self.seen = recent[0][0]
        events = [e for _, e in decode(recent) if e is not None]
        evaluated = next((e for e in events if e.kind is EventKind.EVAL), None)
        if evaluated is not None:
            self.eval_loss = evaluated.metrics.get("eval_loss")
        event = next((e for e in events if e.kind is EventKind.LOG), None)
        if event is None or event.step is None or event.step == self.last_step:
            return
        self.last_step = event.step
        meta = {"job": self.job_id, "step": event.step, "max_steps": event.max_steps,
                "loss": event.metrics.get("loss"), "eval_loss": self.eval_loss, "eta_s": event.eta_s}
        self.task.update_state(task_id=self.task_id, state="PROGRESS", meta=meta)
        # Flower keeps the standard task fields only; `result` is one, so the figures show in
        # its task list and its API while the job trains.
        with self.task.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
            dispatcher.send("task-progress", uuid=self.task_id, result=json.dumps(meta), **meta)
