"""A worker's life around its jobs: the reaper of lost jobs, requeues, and shutdown.

Every live worker runs the reaper, and one of them at a time does each round: a running job
whose lease expired lost its worker (SIGKILL, a node gone), and is put back on its queue to
resume from its last checkpoint. A worker may also be told to exit after one job, or after a
while without one (`--one-job`, `--idle-exit`: for a KEDA ScaledJob).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from typing import Any

import redis
from celery.signals import worker_init, worker_ready, worker_shutting_down
from celery.worker import state as worker_state

from deepe_tasks.contract.hardware import has_cuda
from deepe_tasks.core import broker, devices, jobstore, keys, webhooks
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.errors import InvalidParams, JobNotFound
from deepe_tasks.core.records import JobRecord, JobStatus
from deepe_tasks.core.settings import get_settings
from deepe_tasks.worker import credentials, lost, watchdog

log = logging.getLogger(__name__)


# Set by the worker's main process when it begins a warm shutdown; its pool processes are
# forked after this module is imported (Celery imports the task modules first), so they share
# it. Shared memory of this worker alone: nothing on disk to leak after a SIGKILL, and nothing
# that a later worker with the same PID could mistake for its own.
_stopping = multiprocessing.get_context("fork").Event()


def worker_stopping() -> bool:
    """True inside a worker (its main process or a pool process) that is shutting down."""
    return _stopping.is_set()


# A queued job whose message was not sent this long after it was queued: its sender died or
# could not reach the broker, and the reaper sends it.
UNSENT_GRACE = 60.0


def send_again(client: redis.Redis, record: JobRecord) -> None:
    """Send a requeued job's message. If that fails, the job stays in the unsent set, and a
    reaper sends it later."""

    broker.enqueue(record)
    jobstore.sent(client, record.id)


def reap_once(client: redis.Redis) -> list[str]:
    """Requeue every running job whose lease has expired, and send the messages of queued jobs
    that never got one, or whose message was lost (worker/lost.py); return the ids of the jobs sent. Also drops expired jobs from the indexes."""
    requeued = reap_lost(client) + send_unsent(client) + send_unclaimed(client) + lost.send_lost(client)
    jobstore.prune(client)
    return requeued


def my_round(client: redis.Redis, holder: str, interval: float) -> bool:
    """Whether this worker does this reaper round: one worker per interval, whoever asks first,
    so that a fleet's reapers cost Redis one round per interval, not one per worker."""
    return bool(client.set(keys.REAPER, holder, nx=True, px=max(1, int(interval * 1000))))


def reap_lost(client: redis.Redis) -> list[str]:
    """Requeue every running job whose lease has expired; return their ids."""
    max_resumes = get_settings().max_resumes
    running = [str(j) for j in client.smembers(keys.RUNNING)]
    pipe = client.pipeline(transaction=False)
    for job_id in running:
        pipe.exists(keys.lease(job_id))
    requeued = []
    for job_id, leased in zip(running, pipe.execute(), strict=True):
        if leased:
            continue
        try:
            if _reap(client, job_id, max_resumes):
                requeued.append(job_id)
        except Exception as e:  # one job's trouble must not stop the round
            log.warning("reaper: job %s: %s", job_id, e)
    return requeued


def send_unsent(client: redis.Redis) -> list[str]:
    """Send the message of every job queued a while ago without one; return their ids."""
    requeued = []
    for job_id in jobstore.unsent(client, before=time.time() - UNSENT_GRACE):
        try:
            record = jobstore.get(client, job_id)
            if record.status is JobStatus.QUEUED:
                log.warning("job %s was queued without a message; sending it", job_id)
                send_again(client, record)
                requeued.append(job_id)
            else:
                jobstore.sent(client, job_id)
        except JobNotFound:
            jobstore.sent(client, job_id)
        except Exception as e:
            log.warning("reaper: job %s: %s", job_id, e)
    return requeued


def unclaimed_after() -> float:
    """How long after its delivery a message whose job is still queued counts as lost: a live
    worker claims within seconds (it waits at most for its zygote's spare first)."""
    return 2 * get_settings().lease_ttl + 30


def send_unclaimed(client: redis.Redis, now: float | None = None) -> list[str]:
    """Send again the job of every message delivered to a worker that never claimed it.

    A worker lost between taking a message and claiming its job (killed while it waited for a
    job process, say) leaves the message in kombu's unacknowledged set until
    DEEPE_VISIBILITY_TIMEOUT, days later, and the job has no lease for the reaper to find. Each
    delivery is looked at once, when it is ``unclaimed_after()`` old: if its job is still queued,
    the dead delivery is dropped and the job sent again. A worker that was only slow then finds
    the job taken (or takes it first, and the new message is dropped): nothing runs twice.
    """
    upto = (time.time() if now is None else now) - unclaimed_after()
    since: Any = client.get(keys.UNACKED_CHECKED)
    tags = [str(t) for t in client.zrangebyscore(keys.KOMBU_UNACKED_INDEX, f"({since}" if since else "-inf", upto)]
    sent: list[str] = []
    for tag, raw in zip(tags, client.hmget(keys.KOMBU_UNACKED, tags) if tags else [], strict=True):
        try:
            job_id = str(json.loads(raw or "")[0]["headers"]["id"])
            record = jobstore.get(client, job_id)
        except (TypeError, ValueError, KeyError, IndexError, JobNotFound):
            continue  # acknowledged meanwhile, not a deepe task, or a job that expired
        if record.status is JobStatus.QUEUED:
            log.warning("job %s: its message was delivered to a worker that never claimed it (lost); sending it "
                        "again", job_id)
            pipe = client.pipeline()
            pipe.zrem(keys.KOMBU_UNACKED_INDEX, tag)
            pipe.hdel(keys.KOMBU_UNACKED, tag)
            pipe.execute()
            send_again(client, record)
            sent.append(job_id)
    if since is None or upto > float(since):  # never back: workers of another lease TTL look less far
        client.set(keys.UNACKED_CHECKED, repr(upto))
    return sent


def _reap(client: redis.Redis, job_id: str, max_resumes: int) -> bool:
    """Requeue one running job if its lease expired; True if it was queued again."""
    if client.exists(keys.lease(job_id)):
        return False
    try:
        record = jobstore.get(client, job_id)
    except JobNotFound:
        jobstore.forget_running(client, job_id)
        return False
    if record.status is not JobStatus.RUNNING:
        jobstore.forget_running(client, job_id)
        return False
    # The lease check is repeated atomically with the change: a worker that just took the job
    # over, or renewed its lease, keeps it.
    outcome = jobstore.requeue(client, record, f"its worker {record.worker} was lost", max_resumes,
                               lease_must_be_gone=True)
    if outcome in (jobstore.RequeueOutcome.STALE, jobstore.RequeueOutcome.LEASED):
        return False
    log.warning("job %s: its worker %s was lost; %s", job_id, record.worker, outcome.value)
    try:
        if outcome is jobstore.RequeueOutcome.QUEUED:
            send_again(client, record)
            return True
        return False
    finally:
        # The lost attempt is fenced off now: its Redis user goes too, with its connections.
        credentials.revoke(client, job_id, record.attempts)


def _reaper_loop(stop: threading.Event, entry: str, queues: list[str]) -> None:
    interval = max(0.5, get_settings().lease_ttl / 3)
    holder = f"{os.uname().nodename}:{os.getpid()}"
    cuda = has_cuda()
    try:
        owned: int | None = len(devices.device_list(get_settings().gpus))
    except InvalidParams as e:  # `celery worker` with a bad DEEPE_GPUS: its jobs go back (tasks.py)
        log.error("%s", e)
        owned = None
    while True:
        try:
            if owned is not None:
                # what submit reads to refuse a job too large, or to warn of settings that need a GPU
                devices.register(get_redis(), entry, owned, queues, cuda=cuda)
        except Exception as e:
            log.warning("could not record this worker's devices: %s", e)
        if stop.wait(interval):
            break
        try:
            # A little under the interval: the next round is free when this worker asks again.
            if my_round(get_redis(), holder, interval * 0.9):
                reap_once(get_redis())
        except Exception as e:  # never let the reaper die: it is every worker's safety net
            log.warning("reaper: %s", e)


_reaper_stop = threading.Event()


_main_pid = 0  # the worker's main process: its pool processes ask it to stop


@worker_init.connect
def _remember_main(**_: Any) -> None:
    global _main_pid
    _main_pid = os.getpid()


def stop_worker() -> None:
    """Begin this worker's warm shutdown: it takes no new job, and exits once its job ended."""
    if _main_pid:
        os.kill(_main_pid, signal.SIGTERM)


def _idle_loop(stop: threading.Event, idle_exit: float) -> None:
    last_busy = time.monotonic()
    while not stop.wait(min(1.0, idle_exit / 4)):
        if worker_state.active_requests or worker_state.reserved_requests:
            last_busy = time.monotonic()
        elif time.monotonic() - last_busy >= idle_exit:
            log.warning("no job for %.0f s (--idle-exit); the worker stops", idle_exit)
            stop_worker()
            return


_worker_name = ""
_entry_key = ""  # this process's entry in deepe:workers (devices.entry_key)


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    global _worker_name, _entry_key
    _worker_name = str(getattr(sender, "hostname", "") or f"{os.uname().nodename}:{os.getpid()}")
    _entry_key = devices.entry_key(_worker_name, uuid.uuid4().hex[:12])
    queues = sorted({devices.unroute(q)[0] for q in watchdog.consumed_queues(sender)})
    threading.Thread(target=_reaper_loop, args=(_reaper_stop, _entry_key, queues), name="deepe-reaper",
                     daemon=True).start()
    # Every worker with webhooks set up may send the outbox; one at a time does (core/webhooks.py).
    if get_settings().mlflow_uri:  # every job an MLflow run, fed by one worker at a time (tracking.py)
        from deepe_tasks.worker import tracking

        threading.Thread(target=tracking.run_tracker, name="deepe-mlflow", daemon=True,
                         args=(_reaper_stop, get_redis, get_settings(), f"{_worker_name}:{os.getpid()}")).start()
    if webhooks.configured(get_settings()):
        threading.Thread(target=webhooks.run_dispatcher, name="deepe-webhooks", daemon=True,
                         args=(_reaper_stop, get_redis, get_settings(), f"{_worker_name}:{os.getpid()}")).start()
    idle_exit = get_settings().idle_exit
    if idle_exit is not None:
        threading.Thread(target=_idle_loop, args=(_reaper_stop, idle_exit), name="deepe-idle-exit",
                         daemon=True).start()


@worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    # The running job (in a pool process) sees this, checkpoints, and is requeued.
    _stopping.set()
    _reaper_stop.set()
    if _entry_key:  # on a thread: a partitioned worker must not wait on Redis to shut down
        threading.Thread(target=_unregister, args=(_entry_key,), name="deepe-unregister", daemon=True).start()


def _unregister(entry: str) -> None:
    try:
        devices.unregister(get_redis(), entry)
    except Exception as e:  # its entry goes stale on its own
        log.warning("could not remove this worker's devices entry: %s", e)
