"""deepe: a distributed queue for LLM fine-tuning jobs."""

from __future__ import annotations

from typing import Any

from deepe_tasks.core.errors import (
    BrokerUnavailable,
    DeepeError,
    InvalidJobState,
    InvalidParams,
    JobExists,
    JobFailed,
    JobNotFound,
    MethodContractError,
    MethodExists,
    MethodNotFound,
)
from deepe_tasks.core.records import Event, EventKind, JobStatus
from deepe_tasks.queue.client import Job, merge, submit
from deepe_tasks.queue.evals import evaluate

__all__ = [
    "submit",
    "merge",
    "evaluate",
    "Job",
    "JobStatus",
    "Event",
    "EventKind",
    "DeepeError",
    "InvalidParams",
    "MethodNotFound",
    "MethodExists",
    "JobNotFound",
    "JobExists",
    "InvalidJobState",
    "MethodContractError",
    "JobFailed",
    "BrokerUnavailable",
]


def __getattr__(name: str) -> Any:
    # `celery -A deepe_tasks worker` looks for `deepe_tasks.app`; load it only when asked.
    if name == "app":
        from deepe_tasks.core.broker import app

        return app
    raise AttributeError(f"module 'deepe_tasks' has no attribute {name!r}")
