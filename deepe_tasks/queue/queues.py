"""What waits in each queue, and who consumes it (`deepe queues`); what submit says or refuses
about the workers of a queue."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis

from deepe_tasks.contract.check import check_source
from deepe_tasks.contract.hardware import params_need_gpu
from deepe_tasks.contract.methods import Method
from deepe_tasks.core import devices, jobstore, keys
from deepe_tasks.core.broker import priority_lists
from deepe_tasks.core.connection import unreachable
from deepe_tasks.core.errors import InvalidParams, JobNotFound
from deepe_tasks.core.records import JobStatus
from deepe_tasks.core.settings import Settings


@dataclass
class QueueInfo:
    name: str
    length: int = 0
    gpus: int = 1  # the devices each of its jobs trains on (a QUEUE.<N>gpus queue: N)
    waiting: list[dict[str, Any]] = field(default_factory=list)  # in the order they will start
    running: list[str] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gpus = devices.unroute(self.name)[1]


def _waiting(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The jobs that wait in ``queue``, in start order. A message whose job has ended (cancelled
    while queued, or expired) stays in the list until a worker takes and drops it: not shown."""
    out = []
    for priority, name in priority_lists(queue):
        raw: Any = client.lrange(name, 0, -1)
        for message in reversed(raw):  # LPUSH in, BRPOP out: the oldest is at the end
            try:
                headers = json.loads(message).get("headers", {})
            except (ValueError, AttributeError):
                continue
            out.append({"id": headers.get("id"), "priority": priority})
    with client.pipeline(transaction=False) as pipe:
        for entry in out:
            pipe.hget(keys.job(str(entry["id"])), "status")
        states = pipe.execute()
    return [e for e, state in zip(out, states, strict=True) if state == JobStatus.QUEUED.value]


def overview(client: redis.Redis, active_queues: dict[str, list[dict[str, Any]]] | None) -> list[QueueInfo]:
    """Every queue that jobs were sent to or a worker consumes (a queue of 4-device jobs that no
    worker consumes shows, with its waiting jobs and no worker)."""
    infos: dict[str, QueueInfo] = {str(q): QueueInfo(str(q)) for q in client.smembers(keys.QUEUES)}
    for worker, queues in (active_queues or {}).items():
        for q in queues:
            infos.setdefault(q["name"], QueueInfo(q["name"])).workers.append(worker)
    running: Any = client.smembers(keys.RUNNING)
    for job_id in running:
        try:
            record = jobstore.get(client, str(job_id))
        except JobNotFound:  # its record is gone (expired since SMEMBERS); any other error is real
            continue
        name = record.route or record.queue
        infos.setdefault(name, QueueInfo(name)).running.append(record.id)
    for name, info in list(infos.items()):
        info.waiting = _waiting(client, name)
        info.length = len(info.waiting)
    return sorted(infos.values(), key=lambda i: i.name)


def waiting_in(client: redis.Redis, queue: str) -> QueueInfo:
    info = QueueInfo(queue, waiting=_waiting(client, queue))
    info.length = len(info.waiting)
    return info


def consumer_notice(up: list[devices.WorkerEntry], queue: str, gpus: int) -> str | None:
    """One line for the submitter when no worker up now (``up``) would take a job of ``gpus``
    devices on ``queue`` (None when one would): the job is queued all the same, for a fleet that
    starts workers on demand, but a person waiting on it should know."""
    if any(queue in w.queues and w.devices >= gpus for w in up):
        return None
    others = sorted({q for w in up for q in w.queues})
    size = "" if gpus == 1 else f" with {gpus} devices or more"
    now = (f"workers are up for {', '.join(others)}" if others else "no worker is up at all")
    start = f"deepe worker --queues {queue}" + ("" if gpus == 1 else " --gpus " + ",".join(map(str, range(gpus))))
    return (f"No worker{size} consumes queue {queue!r} now ({now}): the job waits there until one starts "
            f"(`{start}`).")


def submit_notices(client: redis.Redis, queue: str, gpus: int, stale_after: float, warnings: list[str],
                   params: dict[str, Any], method: Method) -> list[str]:
    """What `deepe submit` says beside the job id, after the job was sent (one read of the worker
    registry): the static check's warnings; settings that need a GPU when every worker of the
    queue up now that said has none (not when none is up or none said: a fleet that starts GPU
    workers on demand is not warned); and a queue that no worker consumes now."""
    notices = [f"warning: {w}" for w in warnings]
    try:
        up = devices.workers(client, stale_after)
    except redis.RedisError:
        return notices  # the job is queued; these lines are a courtesy, not worth failing the submit
    said = [w.cuda for w in up if queue in w.queues and w.cuda is not None]
    if said and not any(said):
        unsaid = check_source(method.source, method.path.name, gpu=False).warnings
        notices += [f"warning: {w}".replace("this machine has none", f"no worker of queue {queue!r} up now has one")
                    for w in unsaid if w not in warnings]
        notices += [f"warning: no worker of queue {queue!r} up now has CUDA: {w}"
                    for w in params_need_gpu(params, gpu=False)]
    notice = consumer_notice(up, queue, gpus)
    return notices + ([notice] if notice else [])


def fits(client: redis.Redis, gpus: int, queue: str, settings: Settings) -> None:
    """Refuse a job of ``gpus`` devices on ``queue`` that no worker up now could run."""
    if settings.max_job_gpus is not None:
        if gpus > settings.max_job_gpus:
            raise InvalidParams(f"This job asks for {gpus} devices (gpus={gpus}), but DEEPE_MAX_JOB_GPUS="
                                f"{settings.max_job_gpus} is the most any worker of this cluster owns. Submit with "
                                f"gpus={settings.max_job_gpus} or fewer, or raise DEEPE_MAX_JOB_GPUS once workers "
                                "that large exist.")
        return
    try:
        largest = devices.largest(client, stale_after=devices.STALE_AFTER_TTLS * settings.lease_ttl, queue=queue)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise unreachable(client, e) from e
    if largest is not None and gpus > largest[0]:
        count, worker = largest
        raise InvalidParams(
            f"This job asks for {gpus} devices (gpus={gpus}), but the largest worker of queue {queue!r} up now "
            f"({worker}) owns {count}, and a job runs on one worker. Submit with gpus={count} or fewer, or start a "
            f"worker that owns {gpus} devices (`deepe worker --queues {queue} --gpus "
            + ",".join(str(i) for i in range(gpus)) + "`); a fleet that starts such workers on demand sets "
            f"DEEPE_MAX_JOB_GPUS={gpus} on the submitting side.")
