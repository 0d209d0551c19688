"""The one owner of the job state machine: every write of a job's record, lease or stream.

Each transition is one Lua step that checks the job's current state and, for the writes of
an attempt, its *fencing token* (the attempt number, counted up by each claim), then writes
the record, the running set, the lease and the event together. A write whose token is no
longer the job's current one is refused, so an attempt that was cut off and replaced can
never speak again. docs/reliability.md has the states and transitions as a table.

Stream entries carry ``data`` (the event as JSON), ``a`` (the attempt that wrote it, 0 for
the platform's own events before a claim) and ``s`` (the attempt's sequence number, 0 for
the platform's events): a batch sent again after a timeout is never appended twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis

from deepe_tasks.core import keys, lua, validate
from deepe_tasks.core.errors import InvalidJobState, JobExists, JobNotFound
from deepe_tasks.core.records import Event, EventKind, JobRecord, JobStatus
from deepe_tasks.core.scripts import JOB_SCRIPTS, barrier, run_durable
from deepe_tasks.core.scripts import run as _run
from deepe_tasks.core.settings import get_settings

CANCEL_FLAG_TTL = 30 * 24 * 3600
ATTEMPT_PLACEHOLDER = lua.ATTEMPT_PLACEHOLDER
__all__ = ["JOB_SCRIPTS", "barrier"]  # the scripts a worker loads for its job process; a durable sync

def _flat(mapping: dict[str, str]) -> list[str]:
    """A mapping as Redis script arguments: key, value, key, value…"""
    return [item for pair in mapping.items() for item in pair]


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {
        k: JobRecord.to_redis_value(k, v.value if isinstance(v, Enum) else v)
        for k, v in fields.items()
        if v is not None
    }


def not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"There is no job {job_id!r}: the id is unknown, or the job ended more than "
                       f"DEEPE_JOB_RETENTION ({validate.duration(get_settings().job_retention)}) ago and expired. "
                       "`deepe jobs` lists the jobs that are kept.")


def _retention() -> int:
    return int(get_settings().job_retention)


# -- reading ---------------------------------------------------------------------------------

def get(client: redis.Redis, job_id: str) -> JobRecord:
    raw: dict[str, str] = client.hgetall(keys.job(job_id))  # type: ignore[assignment]
    if not raw:
        raise not_found(job_id)
    return JobRecord.from_redis(raw)


def status(client: redis.Redis, job_id: str) -> JobStatus:
    value = client.hget(keys.job(job_id), "status")
    if value is None:
        raise not_found(job_id)
    return JobStatus(value)


# -- the transitions ---------------------------------------------------------------------------

def create(client: redis.Redis, record: JobRecord, source: str, first_event: Event) -> None:
    """queued: write a new record, with its method's source pinned and its first event; refuse an
    id that is already taken."""
    names = [keys.job(record.id), keys.JOBS_INDEX, keys.method_source(record.method_sha256), keys.events(record.id),
             keys.UNSENT, keys.by_method(record.method)]
    if not _run(client, "CREATE", names, source, record.submitted_at, record.id, first_event.to_json(),
                *_flat(record.to_redis())):
        raise JobExists(f"A job with id {record.id!r} already exists; submit without an id, or pick a new one.")


class ClaimOutcome(str, Enum):
    OK = "ok"
    MISSING = "missing"  # no record
    ENDED = "ended"  # detail: its final status
    LEASED = "leased"  # detail: the lease's holder
    CORRUPT = "corrupt"  # detail: which key has the wrong type (nothing was written)


@dataclass
class Claim:
    """What a worker got when it tried to take a job: ``ok``, or why not, and the detail."""

    outcome: ClaimOutcome
    detail: str = ""
    record: JobRecord | None = None
    source: str | None = None  # None if the pinned source is gone from Redis


def claim(client: redis.Redis, job_id: str, holder: str, ttl_ms: int, started: Event, *,
          worker: str, started_at: float, pid: int) -> Claim:
    """queued (or running, lease expired) → running: a new attempt with the next fencing token."""
    data = started.model_dump(mode="json", exclude={"id"})
    data["attempt"] = data["metrics"]["attempt"] = ATTEMPT_PLACEHOLDER
    names = [keys.job(job_id), keys.lease(job_id), keys.RUNNING, keys.events(job_id), keys.UNSENT]
    reply: Any = run_durable(client, "CLAIM", names, holder, ttl_ms, job_id, worker, started_at, pid,
                      json.dumps(data, separators=(",", ":")))
    if reply[0] != ClaimOutcome.OK.value:
        return Claim(outcome=ClaimOutcome(reply[0]), detail=reply[1])
    flat = reply[1]
    record = JobRecord.from_redis(dict(zip(flat[::2], flat[1::2], strict=True)))
    return Claim(outcome=ClaimOutcome.OK, record=record, source=reply[2])


class Renewal(int, Enum):
    FENCED = 0  # another attempt owns the job now, or it ended
    RENEWED = 1
    RETAKEN = 2  # the lease had expired, and nobody had replaced this attempt


def renew(client: redis.Redis, job_id: str, attempt: int, holder: str, ttl_ms: int) -> Renewal:
    """running → running: the current attempt keeps (or takes back) its lease."""
    value = lease_value(attempt, holder)
    return Renewal(int(run_durable(client, "RENEW", [keys.job(job_id), keys.lease(job_id)], attempt, value, ttl_ms)))


def lease_value(attempt: int, holder: str) -> str:
    return f"{attempt}:{holder}"


def append(client: redis.Redis, job_id: str, attempt: int, events: list[tuple[int, str]]) -> int:
    """Append the current attempt's events, given as (sequence number, JSON) with rising numbers,
    each once; -1 if the attempt is fenced off (then nothing was appended)."""
    flat = [item for pair in events for item in pair]
    return int(run_durable(client, "APPEND", [keys.events(job_id)], keys.job(job_id), attempt, *flat))


class PublishCheck(int, Enum):
    LEASE_SHORT = -1  # the lease is about to expire (or gone): wait for the next renewal
    FENCED = 0
    OK = 1


def check_current(client: redis.Redis, job_id: str, attempt: int, min_ttl_ms: int) -> PublishCheck:
    """Whether ``attempt`` is the job's current one with at least ``min_ttl_ms`` of lease left."""
    return PublishCheck(int(_run(client, "CHECK", [], keys.job(job_id), keys.lease(job_id), attempt, min_ttl_ms)))


def finish(client: redis.Redis, job_id: str, attempt: int, final: Event, *, status: JobStatus,
           error: str | None, metrics: dict[str, Any], output_dir: str | None) -> bool:
    """running → succeeded, failed or cancelled, by the current attempt; False if fenced off."""
    fields = _encode({"error": error, "metrics": metrics, "output_dir": output_dir})
    names = [keys.job(job_id), keys.RUNNING, keys.lease(job_id), keys.events(job_id), keys.cancel(job_id)]
    return bool(_run(client, "FINISH", names, attempt, job_id, final.to_json(), status.value, _retention(),
                     time.time(), *_flat(fields)))


class RequeueOutcome(str, Enum):
    QUEUED = "queued"
    CANCELLED = "cancelled"  # a plain cancel was waiting
    FAILED = "failed"  # past DEEPE_MAX_RESUMES
    STALE = "stale"  # another attempt owns the job, or it is not running
    LEASED = "leased"  # (reaper) the attempt still holds its lease


def requeue(client: redis.Redis, record: JobRecord, why: str, max_resumes: int, *,
            lease_must_be_gone: bool, preempted: bool = False) -> RequeueOutcome:
    """running → queued (or cancelled, or failed past ``max_resumes`` losses) for attempt
    ``record.attempts``; with ``lease_must_be_gone`` (the reaper), only once its lease expired.
    A ``preempted`` attempt (its worker was told to stop, and it checkpointed) is no loss: it
    does not count toward ``max_resumes``."""
    job_id, attempt = record.id, record.attempts
    losses = record.losses + (0 if preempted else 1)
    cancelled = f"cancelled; its worker stopped ({why}) before the job reached a step boundary"
    failed = (f"The job lost its worker {losses} times (last: {why}) and DEEPE_MAX_RESUMES is {max_resumes}; "
              "its last checkpoint is in the job folder. Find out why its workers are lost (memory, crashes, "
              "Redis cut off), then submit it again. Preemptions announced by SIGTERM do not count.")
    requeued = Event(kind=EventKind.REQUEUED, job=job_id, attempt=attempt, message=f"requeued: {why}",
                     metrics={"attempt": attempt})
    names = [keys.job(job_id), keys.RUNNING, keys.lease(job_id), keys.events(job_id), keys.cancel(job_id),
             keys.UNSENT]
    reply = _run(
        client, "REQUEUE", names, attempt, job_id, int(lease_must_be_gone), max_resumes, time.time(),
        cancelled, Event(kind=EventKind.CANCELLED, job=job_id, attempt=attempt, message=cancelled).to_json(),
        failed, Event(kind=EventKind.FAILED, job=job_id, attempt=attempt, message=failed).to_json(), requeued.to_json(),
        0 if preempted else 1, _retention())
    return RequeueOutcome(reply)


def sent(client: redis.Redis, job_id: str) -> None:
    """The queued job's message is on its way: the reaper need not send it."""
    client.zrem(keys.UNSENT, job_id)


def unsent(client: redis.Redis, before: float) -> list[str]:
    """Jobs queued (or requeued) before ``before`` whose message was never sent."""
    return [str(j) for j in client.zrangebyscore(keys.UNSENT, 0, before)]


def cancel(client: redis.Redis, job_id: str, save: bool) -> JobStatus:
    """Leave the cancel flag for a running job (it stops at its next step), or cancel a queued one
    (queued → cancelled). Returns the job's status after it."""
    message = "cancelled before it started"
    event = Event(kind=EventKind.CANCELLED, job=job_id, message=message)
    names = [keys.job(job_id), keys.cancel(job_id), keys.events(job_id), keys.UNSENT]
    reply = str(_run(client, "CANCEL", names, "save" if save else "cancel", CANCEL_FLAG_TTL, time.time(), message,
                     event.to_json(), _retention()))
    if reply == "missing":
        raise not_found(job_id)
    if reply.startswith("ended:"):
        raise InvalidJobState(f"Job {job_id} is already {reply[6:]}; only queued or running jobs can be cancelled.")
    return JobStatus(reply)


def fail_queued(client: redis.Redis, job_id: str, error: str) -> bool:
    """queued → failed: the job's message could not be sent."""
    event = Event(kind=EventKind.FAILED, job=job_id, message=error)
    names = [keys.job(job_id), keys.events(job_id), keys.UNSENT, keys.cancel(job_id)]
    return bool(_run(client, "FAIL_QUEUED", names, time.time(), error, event.to_json(), _retention()))


def set_pid(client: redis.Redis, job_id: str, attempt: int, pid: int) -> bool:
    return bool(_run(client, "SET_PID", [keys.job(job_id)], attempt, pid))


def forget_running(client: redis.Redis, job_id: str) -> bool:
    """Take a job that is not running (or has no record) out of the running set."""
    return bool(_run(client, "FORGET_RUNNING", [keys.job(job_id), keys.RUNNING], job_id))


# -- the indexes -------------------------------------------------------------------------------

def prune(client: redis.Redis, limit: int = 1000) -> int:
    """Drop from the indexes up to ``limit`` jobs whose keys have expired (every transition that
    ends a job also drops a few); returns how many it looked at."""
    return int(_run(client, "PRUNE", [], limit))


# A page looks at no more than this many index entries (a filter that few jobs match returns a
# short page with a cursor to go on from).
PAGE_BUDGET = 5000


def page(client: redis.Redis, status: JobStatus | None, method: str | None, rank: int,
         limit: int) -> tuple[list[str], int | None]:
    """Job ids, newest first, from rank ``rank`` of the narrowest index that the filters name; the
    rank to go on from, or None at the end. One round trip, whatever the history's size."""
    if status is not None:
        names = [keys.by_status(status.value)] + ([keys.by_method(method)] if method is not None else [])
    else:
        names = [keys.by_method(method) if method is not None else keys.JOBS_INDEX]
    reply: Any = _run(client, "PAGE", names, rank, limit, PAGE_BUDGET)
    next_rank = int(reply[0])
    return [str(i) for i in reply[1:]], (None if next_rank < 0 else next_rank)
