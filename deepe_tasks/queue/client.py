"""The Python client: submit jobs and follow them. Imports neither torch nor the worker side."""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis

from deepe_tasks.contract import stored
from deepe_tasks.contract.admission import admit
from deepe_tasks.contract.methods import NAME_RE, load_method
from deepe_tasks.core import broker, devices, jobstore, keys, validate, webhooks
from deepe_tasks.core.connection import get_redis, unreachable
from deepe_tasks.core.errors import BrokerUnavailable, InvalidJobState, InvalidParams, JobNotFound
from deepe_tasks.core.events import progress_of
from deepe_tasks.core.records import (
    MERGE_METHOD,
    Event,
    EventKind,
    JobKind,
    JobRecord,
    JobStatus,
    mask_secrets,
)
from deepe_tasks.core.settings import get_settings
from deepe_tasks.queue.queues import fits, submit_notices


def submit(
    method: str,
    params: dict[str, Any],
    *,
    queue: str | None = None,
    priority: int | None = None,
    job_id: str | None = None,
    time_limit: float | None = None,
    check: bool = True,
    gpus: int = 1,
    webhook: str | None = None,
) -> Job:
    """Validate, pin the method's source, record the job and queue it. Returns the new ``Job``.

    Raises ``InvalidParams``, ``MethodNotFound`` or ``MethodContractError`` before anything is
    queued. ``check=False`` skips the static check of the method (for code it misreads); the
    worker still refuses a method that trains or saves itself. ``gpus`` is how many devices the
    job trains on, one rank each (DDP); it is refused when no worker could run it. ``webhook``:
    a URL the job's state changes are posted to, besides DEEPE_WEBHOOK_URLS (`core/webhooks.py`).
    """
    settings = get_settings()
    found = load_method(settings.method_root, method)
    job_id = validate.job_id(job_id) if job_id is not None else uuid.uuid4().hex
    if priority is not None and not (isinstance(priority, int) and not isinstance(priority, bool)
                                     and 0 <= priority <= 9):
        raise InvalidParams(f"priority={priority!r} is not valid; allowed: an integer from 0 (highest) to 9.")
    time_limit = validate.time_limit(time_limit)
    queue = validate.queue_name(queue or settings.queue)
    gpus = validate.gpus(gpus)
    if webhook is not None:
        webhooks.check_url(webhook, settings.webhook_allow_private)
    client = get_redis()
    webhooks.enable(client, settings)
    if gpus > 1:
        fits(client, gpus, queue, settings)
    if settings.storage_url and settings.check_paths:
        stored.check_store(settings.storage_url)  # a bucket that is not there, or not writable
    # Checked as for a GPU fleet; what needs a GPU is said after the send, if the queue's workers have none.
    admitted = admit(found, params, settings.storage_root, job_id, check_paths=settings.check_paths, gpu=True,
                     input_roots=settings.input_root_list, check_method=check, storage_url=settings.storage_url)
    resolved = admitted.params
    if settings.check_paths:  # else the worker refuses it when it publishes
        stored.refuse_taken(str(resolved.OUTPUT_DIR), settings.storage_root, job_id, settings.storage_url)
    record = JobRecord(
        id=job_id, method=found.name, method_sha256=found.sha256, params=resolved.as_dict(),
        output_dir=str(resolved.OUTPUT_DIR), queue=queue, priority=priority, time_limit=time_limit,
        gpus=gpus, route=devices.route(queue, gpus), webhook=webhook,
    )
    on = queue if gpus == 1 else f"{queue} for {gpus} devices ({record.route})"
    # The worker runs this exact source, whatever happens to the file afterwards.
    _create_and_send(client, record, found.source, f"{found.name} queued on {on}")
    notices = submit_notices(client, queue, gpus, devices.STALE_AFTER_TTLS * settings.lease_ttl, admitted.warnings,
                             resolved.as_dict(), found)
    return Job(job_id, custom_params=admitted.custom, notices=notices)


def _create_and_send(client: redis.Redis, record: JobRecord, source: str, message: str) -> None:
    """Record a new job with its pinned source and `queued` event, then send its one message."""
    queued = Event(kind=EventKind.QUEUED, job=record.id, message=message)
    try:
        jobstore.create(client, record, source=source, first_event=queued)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise unreachable(client, e) from e
    try:
        broker.enqueue(record)
        jobstore.sent(client, record.id)
    except Exception as e:
        # No message means no worker will ever take it: say so in the record, not just here.
        error = f"The job could not be queued: {e}; submit it again."
        jobstore.fail_queued(client, record.id, error)
        raise BrokerUnavailable(error) from e
    try:
        # Acknowledged means durable: the record, the message and `sent` are on the replicas
        # (DEEPE_REDIS_MIN_REPLICAS), or the job is ended here and the submit fails.
        jobstore.barrier(client, record.id, f"The submit of job {record.id}")
    except redis.RedisError as e:
        error = (f"The job could not be queued durably: {e} It was failed rather than left to run unacknowledged; "
                 "submit it again once the replicas are back.")
        with contextlib.suppress(redis.RedisError):
            jobstore.fail_queued(client, record.id, error)
        raise BrokerUnavailable(error) from e


def merge(job_id: str, *, queue: str | None = None, force: bool = False) -> Job:
    """Queue a merge of a succeeded job's LoRA adapter into its base model; returns the merge job.

    The merge runs on a worker like any job and publishes a complete model to the adapter's
    OUTPUT_DIR with ``-merged`` appended. Raises ``InvalidJobState`` for a job that did not
    succeed, whose model is complete already, or that was merged already (``force`` replaces
    that merged model).
    """
    source = find_job(job_id)
    record = source.record()
    if record.kind is JobKind.MERGE:
        raise InvalidJobState(f"Job {record.id} is a merge: its model at {record.output_dir} is already a complete "
                              "model, with nothing to merge into it. Use that folder as it is.")
    if record.status is not JobStatus.SUCCEEDED:
        raise InvalidJobState(f"Job {record.id} is {record.status.value}: only a job that succeeded has a model to "
                              "merge. Merge a job that succeeded, or submit this one again.")
    settings = get_settings()
    if settings.storage_url is not None:
        target_text = stored.merge_target(settings.storage_url, record.id, record.output_dir,
                                          check=settings.check_paths, force=force)
    else:
        target_text = str(stored.folder_merge_target(record.id, record.output_dir, settings.storage_root,
                                                     check=settings.check_paths, force=force))
    queue = validate.queue_name(queue or record.queue)
    new_id = uuid.uuid4().hex
    merged = JobRecord(
        id=new_id, method=MERGE_METHOD, method_sha256=hashlib.sha256(b"").hexdigest(), kind=JobKind.MERGE, queue=queue,
        params={"MODEL_PATH": record.params["MODEL_PATH"], "ADAPTER_PATH": record.output_dir, "OUTPUT_DIR": target_text,
                "MERGED_FROM": record.id},
        output_dir=target_text, route=queue,
    )
    _create_and_send(get_redis(), merged, "", f"merge of job {record.id} queued on {queue}")
    return Job(new_id)


MIN_PREFIX = 4


def find_job(ref: str) -> Job:
    """A job by its id, or by a prefix of its id that only one job has (at least 4 characters)."""
    ref = validate.job_id(ref)
    client = get_redis()
    if client.exists(keys.job(ref)):
        return Job(ref)
    if len(ref) < MIN_PREFIX:
        raise JobNotFound(f"There is no job {ref!r}, and a prefix of a job id needs at least {MIN_PREFIX} "
                          "characters; give more of the id (`deepe jobs` lists the jobs).")
    # The ids in lexical order: those that start with ref, found in O(log n). Ids hold only
    # letters, digits, "_", "." and "-" (validate.JOB_ID_RE), all below "~".
    matches: Any = client.zrangebylex(keys.IDS, f"[{ref}", f"[{ref}~", start=0, num=6)
    if len(matches) == 1:
        return Job(str(matches[0]))
    if len(matches) > 1:
        shown = ", ".join(sorted(str(m) for m in matches[:5])) + (", …" if len(matches) > 5 else "")
        raise InvalidParams(f"{ref!r} is the start of several job ids ({shown}); give more of the id.")
    return Job(ref)  # an unknown full id fails where it is used, with "There is no job …"


class Job:
    """A handle on a submitted job."""

    def __init__(self, job_id: str, custom_params: list[str] | None = None, notices: list[str] | None = None) -> None:
        self.id = job_id
        # At submit: the keys that are no parameter of the platform or the method, passed on as they are.
        self.custom_params = custom_params or []
        # At submit: what the submitter should know, e.g. that no worker consumes the job's queue now.
        self.notices = notices or []

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def record(self) -> JobRecord:
        return jobstore.get(get_redis(), self.id)

    def status(self) -> JobStatus:
        return jobstore.status(get_redis(), self.id)

    def info(self) -> dict[str, Any]:
        """The job record as a dict, with secret-looking parameters masked."""
        return masked(self.record())

    def progress(self) -> Event | None:
        """The job's latest `log` event: step, max_steps, ETA and metrics."""
        return progress_of(get_redis(), [self.id])[self.id]

    def wait(self, timeout: float | None = None, poll: float = 1.0) -> JobStatus:
        """Block until the job ends; raise ``TimeoutError`` if it has not after ``timeout`` seconds.

        It wakes at the job's final event, and reads the record at least every ``poll`` seconds
        (a job can end without an event, when it could not be queued).
        """
        client = get_redis()
        stream = keys.events(self.id)
        newest: Any = client.xrevrange(stream, count=1)
        last = newest[0][0] if newest else "0"  # read before the status: no event slips between
        deadline = None if timeout is None else time.monotonic() + timeout
        outage: float | None = None  # since when Redis has not answered
        while True:
            try:
                status = self.status()
                if status.is_final:
                    return status
                # Never block near the client's socket timeout (10 s), whatever `poll` says.
                block = min(poll, 5.0) if deadline is None else min(poll, 5.0, deadline - time.monotonic())
                if block <= 0:
                    raise TimeoutError(f"job {self.id} is still {status.value} after {timeout} s")
                reply: Any = client.xread({stream: last}, block=max(1, int(block * 1000)), count=100)
                outage = None
            except (redis.ConnectionError, redis.TimeoutError):
                # A failover, or a Redis restart: ask again (a sentinel client finds the new
                # primary), for as long as a running job would ride it out.
                outage = outage or time.monotonic()
                if time.monotonic() - outage > get_settings().lease_ttl or (
                        deadline is not None and time.monotonic() > deadline):
                    raise
                time.sleep(0.5)
                continue
            if reply:
                last = reply[0][1][-1][0]

    def events(self, since: str = "0", follow: bool = False) -> Iterator[Event]:
        """Replay events after stream id ``since``; with ``follow``, tail them until the job ends."""
        from deepe_tasks.core.events import read_events

        since = validate.stream_id(since)  # before the first event: a stream must not break after a 200
        jobstore.status(get_redis(), self.id)  # a clear error for an unknown job
        return read_events(get_redis(), self.id, since=since, follow=follow)

    def cancel(self, save: bool = False) -> JobStatus:
        """Cancel the job. A queued job never starts. A running one stops at its next step with a
        checkpoint; with ``save``, its model is also published, marked partial in deepe.json."""
        status = jobstore.cancel(get_redis(), self.id, save)
        if status is JobStatus.CANCELLED:  # it was queued: its message is dropped unread
            broker.revoke(self.id)
        # Running: the job process reads the flag at its next step and stops there.
        return status


def masked(record: JobRecord) -> dict[str, Any]:
    """A job record as a dict, with secret-looking parameters masked."""
    data = record.model_dump(mode="json")
    data["params"] = mask_secrets(data["params"])
    return data


def list_jobs(status: JobStatus | None = None, method: str | None = None, limit: int = 20,
              cursor: str | None = None) -> tuple[list[JobRecord], str | None]:
    """Jobs newest first, filtered; ``cursor`` continues a previous page (None when done).

    Two round trips, whatever the history's size: a page of ids from the index the filters name
    (`jobstore.page`), then their records. A page may be short (a job that expired meanwhile, a
    rare filter); the cursor goes on from where it stopped."""
    if method is not None and not NAME_RE.match(method):
        raise InvalidParams(f"method={method!r} is not a method name (lower-case letters, digits, '-' and '_'); "
                            "`deepe methods` lists them.")
    client = get_redis()
    ids, rank = jobstore.page(client, status, method, validate.cursor(cursor or 0), limit)
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(keys.job(job_id))
    records = [JobRecord.from_redis(raw) for raw in pipe.execute() if raw]
    return records, (None if rank is None else str(rank))
