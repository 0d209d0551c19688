"""Multi-device jobs: how many devices a worker owns, which queues it consumes, where a job goes.

A job that trains on N devices (``gpus=N``) is sent to the queue ``<queue>.<N>gpus``; a
1-device job to ``<queue>`` itself, as before. A worker that owns G devices consumes, for each
of its queues, the queues of every size it can run, the largest first: ``gpu.4gpus``,
``gpu.3gpus``, ``gpu.2gpus``, ``gpu``. So a job never reaches a worker that owns fewer devices
than it asks for, and a large job, which only a large worker can run, is the one that worker
takes first.

Each worker records how many devices it owns in ``deepe:workers`` (refreshed by its reaper
thread); submit reads it to refuse a job that no worker could run. An entry is keyed by the
worker's name and a token of its process (``NAME#TOKEN``), so two workers that share a name
(two ``celery@host`` on one host) never overwrite each other's entry.
"""

from __future__ import annotations

import re
import time
from typing import NamedTuple

import redis

from deepe_tasks.core import keys
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.validate import MAX_GPUS

ROUTE_RE = re.compile(r"(.*)\.(\d+)gpus")  # a routed queue: its base queue, and its jobs' devices
# A worker's entry in deepe:workers is current for this many lease TTLs after it was written.
STALE_AFTER_TTLS = 3


def route(queue: str, gpus: int) -> str:
    """The Celery queue of a job on ``queue`` that trains on ``gpus`` devices."""
    return queue if gpus == 1 else f"{queue}.{gpus}gpus"


def unroute(name: str) -> tuple[str, int]:
    """The queue a job was submitted to, and its devices, from the Celery queue it waits on."""
    routed = ROUTE_RE.fullmatch(name)
    return (routed.group(1), int(routed.group(2))) if routed else (name, 1)


def consumed(queues: list[str], devices: int) -> list[str]:
    """What a worker that owns ``devices`` devices consumes for ``queues``, in the order it
    prefers: per queue, the largest jobs first."""
    return [route(q, n) for q in queues for n in range(devices, 0, -1)]


def device_list(gpus: str | None) -> list[str]:
    """The devices a worker owns (``deepe worker --gpus 0,1``, DEEPE_GPUS); one when unset.

    On a host without CUDA the list names CPU ranks, which train with the gloo backend.
    """
    if gpus is None:
        return ["0"]
    devices = [g.strip() for g in gpus.split(",") if g.strip()]
    if not devices or len(set(devices)) != len(devices) or not all(d.isdigit() for d in devices):
        raise InvalidParams(f"DEEPE_GPUS={gpus!r} is not a list of distinct device indexes; give e.g. "
                            "`deepe worker --gpus 0,1,2,3` (the CUDA_VISIBLE_DEVICES of its jobs).")
    if len(devices) > MAX_GPUS:
        raise InvalidParams(f"DEEPE_GPUS lists {len(devices)} devices; a worker may own at most {MAX_GPUS}.")
    return devices


def entry_key(worker: str, token: str) -> str:
    """The key of one worker process's entry: its name, and a token only that process holds."""
    return f"{worker}#{token}"


def register(client: redis.Redis, key: str, devices: int, queues: list[str], cuda: bool | None = None) -> None:
    """Record (again) that the worker of ``key`` is up, owns ``devices`` devices, takes jobs of
    ``queues`` and has CUDA (``cuda``; None: not said)."""
    value = f"{devices} {time.time():.0f} {','.join(sorted(set(queues)))}"
    client.hset(keys.WORKERS, key, value if cuda is None else f"{value} {'cuda' if cuda else 'cpu'}")


def unregister(client: redis.Redis, key: str) -> None:
    client.hdel(keys.WORKERS, key)


class WorkerEntry(NamedTuple):
    """A worker process seen lately in the registry."""

    name: str
    devices: int
    seen: float  # when it last said it is up (epoch seconds)
    queues: list[str]
    cuda: bool | None  # whether it has CUDA; None: not said


def workers(client: redis.Redis, stale_after: float) -> list[WorkerEntry]:
    """The workers seen within ``stale_after`` seconds, by name. Entries of workers gone longer
    (or unreadable) are deleted."""
    entries: dict[str, str] = client.hgetall(keys.WORKERS)  # type: ignore[assignment]
    now = time.time()
    found, gone = [], []
    for key, value in entries.items():
        count_text, seen_text, queues, said = (value.split(" ", 3) + ["", ""])[:4]
        try:
            count, seen = int(count_text), float(seen_text)
        except ValueError:
            gone.append(key)
            continue
        if now - seen > stale_after:
            gone.append(key)
        else:
            cuda = {"cuda": True, "cpu": False}.get(said)
            found.append(WorkerEntry(key.split("#", 1)[0], count, seen, [q for q in queues.split(",") if q], cuda))
    if gone:
        client.hdel(keys.WORKERS, *gone)
    return sorted(found, key=lambda w: w[:4])


def live(client: redis.Redis, stale_after: float) -> list[tuple[str, int, float, list[str]]]:
    """The workers seen within ``stale_after`` seconds, as (worker, devices, last seen, queues),
    by name. Entries of workers gone longer (or unreadable) are deleted."""
    return [(w.name, w.devices, w.seen, w.queues) for w in workers(client, stale_after)]


def largest(client: redis.Redis, stale_after: float, queue: str | None = None) -> tuple[int, str] | None:
    """The most devices a worker seen within ``stale_after`` seconds owns (of those taking jobs of
    ``queue``, when given), and that worker; None when no such worker was seen."""
    return max(((count, worker) for worker, count, _, queues in live(client, stale_after)
                if queue is None or queue in queues), default=None)
