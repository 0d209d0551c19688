"""deepe: a distributed queue for LLM fine-tuning jobs."""

from __future__ import annotations

from typing import Any

from .client import Job, submit
from .errors import (
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
from .records import Event, EventKind, JobStatus

__all__ = [
    "submit",
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
        from .celery_app import app

        return app
    raise AttributeError(f"module 'deepe_tasks' has no attribute {name!r}")
