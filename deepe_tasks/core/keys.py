"""Redis key names: the only place they are spelled out."""

from __future__ import annotations

PREFIX = "deepe"
JOBS_INDEX = f"{PREFIX}:jobs"  # sorted set: job id -> submit time
RUNNING = f"{PREFIX}:running"  # set: ids of the jobs that a worker has started
UNSENT = f"{PREFIX}:unsent"  # sorted set: queued job id -> when; its Celery message is not sent yet
# sorted set: "<id> <method>" of an ended job -> when its keys expire; the indexes drop it then
EXPIRING = f"{PREFIX}:expiring"
STATS = f"{PREFIX}:stats"  # hash: counters kept at each transition, for /metrics
# Webhooks (core/webhooks.py): the outbox that every transition appends to (while WEBHOOKS_ON
# exists, or the job has a URL of its own), the state of the deliveries being retried, the
# deliveries given up, and the lock of the dispatcher that sends them.
WEBHOOKS_ON = f"{PREFIX}:webhooks:on"  # string: some submitter or worker has DEEPE_WEBHOOK_URLS
WEBHOOK_OUTBOX = f"{PREFIX}:webhooks:outbox"  # stream: job, type; deleted once delivered or given up
WEBHOOK_RETRIES = f"{PREFIX}:webhooks:retries"  # hash: outbox entry id -> JSON {tries, next_at, error}
WEBHOOK_FAILED = f"{PREFIX}:webhooks:failed"  # stream (capped): deliveries given up, to list and re-send
WEBHOOK_LOCK = f"{PREFIX}:webhooks:lock"  # string with TTL: the worker whose dispatcher sends now
QUEUES = f"{PREFIX}:queues"  # set: every queue a job was submitted to
METHOD_USERS = f"{PREFIX}:method-users"  # hash: method sha256 -> jobs not ended that run it
IDS = f"{PREFIX}:ids"  # sorted set, all scores 0: job ids in lexical order, for a lookup by prefix
REAPER = f"{PREFIX}:reaper"  # string with TTL: the worker whose reaper does this round
# string: the newest delivery time (kombu's unacked index) the reaper has looked at (lifecycle.send_unclaimed)
UNACKED_CHECKED = f"{PREFIX}:unacked-checked"
# kombu's Redis transport: delivered, unacknowledged messages (hash: tag -> message) and their
# delivery times (sorted set). deepe sets no global_keyprefix, so these are kombu's defaults.
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
# Queued jobs whose message is in no queue and was delivered to no worker (worker/lost.py): the
# time of the look that first found each one missing; and the lock that spaces the looks out.
LOST_SEEN = f"{PREFIX}:lost-seen"  # hash: job id -> when a look first found its message missing
LOST_LOOK = f"{PREFIX}:lost-look"  # string with TTL (one lease): a look was made
WORKERS = f"{PREFIX}:workers"  # hash: worker -> "<devices it owns> <when it said so>" (devices.py)


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


def by_status(status: str) -> str:
    return f"{JOBS_INDEX}:{status}"  # sorted set: the ids of the jobs in this state -> submit time


def by_method(method: str) -> str:
    return f"{JOBS_INDEX}:method:{method}"  # sorted set: the ids of this method's jobs -> submit time


def sync(job_id: str) -> str:
    # string with TTL: written just before a WAIT, so that the WAIT covers every write the
    # primary made until then (jobstore.barrier); a job process may write its own job's.
    return f"{PREFIX}:sync:{job_id}"
