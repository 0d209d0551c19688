"""Job event streams: a batching publisher and a reader that replays, then tails."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from deepe_tasks.core import jobstore, keys
from deepe_tasks.core.errors import NotReplicated
from deepe_tasks.core.records import FINAL_STATES, Event, EventKind
from deepe_tasks.core.scripts import read_replicated
from deepe_tasks.core.settings import get_settings

log = logging.getLogger(__name__)

BATCH = 500
QUIET = 1.0  # seconds without events after which the publisher's thread sleeps
FINAL_VALUES = {s.value for s in FINAL_STATES}


def append_jsonl(path: Path | None, lines: list[str]) -> None:
    """Append JSON lines to a job's events.jsonl (the copy of its events on shared storage)."""
    if path is None or not lines:
        return
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    except OSError as e:
        log.warning("could not append to %s: %s", path, e)


class EventPublisher:
    """Appends one attempt's events to its job's Redis stream from a background thread, in batches.

    ``emit`` never touches the network, so a training step never waits on Redis. The thread
    wakes every ``interval`` seconds and sends what gathered in one fenced command
    (`jobstore.append`); after a quiet second it sleeps until the next event, so an idle
    publisher costs nothing. While Redis is unreachable, events wait in memory (up to
    ``max_buffer``; beyond that the oldest are kept in ``events.jsonl`` only) and are sent in
    order once it is back. Each event has a sequence number, so a batch sent again after a
    timeout is appended once. Once Redis says the attempt is fenced off (another attempt owns
    the job), every buffered and later event is dropped and ``on_fenced`` is called.
    """

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        attempt: int,
        jsonl: Path | None = None,
        max_buffer: int = 100_000,
        interval: float = 0.05,
        on_fenced: Callable[[], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.fenced = False
        self._redis = client
        self._jsonl = jsonl
        self._interval = interval
        self._on_fenced = on_fenced
        self._seq = 0
        self._incoming: deque[Event] = deque()
        self._unsent: deque[tuple[int, str]] = deque(maxlen=max_buffer)  # (seq, JSON), oldest first
        self._cond = threading.Condition()
        self._closed = False
        self._sleeping = False  # quiet for a while: the next event must wake the thread
        self._idle = threading.Event()
        self._idle.set()
        if jsonl is not None:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"deepe-events-{job_id}", daemon=True)
        self._thread.start()

    def emit(self, event: Event) -> None:
        event.attempt = self.attempt
        with self._cond:
            self._idle.clear()
            self._incoming.append(event)
            if self._sleeping or len(self._incoming) >= BATCH:
                self._cond.notify()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event so far is in Redis (or dropped, if fenced off); False if Redis
        stayed away past ``timeout``."""
        with self._cond:
            self._cond.notify()
        return self._idle.wait(timeout)

    def close(self, timeout: float = 30.0) -> bool:
        sent = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)
        return sent and not self.fenced

    def _run(self) -> None:
        backoff = self._interval
        last_event = time.monotonic()
        while True:
            with self._cond:
                if not self._incoming and not self._unsent:
                    self._idle.set()
                    if self._closed:
                        return
                    if time.monotonic() - last_event > QUIET:
                        self._sleeping = True
                        self._cond.wait()  # until an event, a flush or a close
                        self._sleeping = False
                    else:
                        self._cond.wait(self._interval)  # while events come, batch them
                batch = list(self._incoming)
                self._incoming.clear()
            if batch:
                last_event = time.monotonic()
                lines = [e.to_json() for e in batch]
                append_jsonl(self._jsonl, lines)
                if not self.fenced:
                    first = self._seq + 1
                    self._seq += len(lines)
                    self._unsent.extend(enumerate(lines, start=first))
            if not self._unsent:
                continue
            try:
                self._send()
                backoff = self._interval
            except redis.RedisError as e:
                log.warning("events for %s wait for Redis (%d buffered): %s", self.job_id, len(self._unsent), e)
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _send(self) -> None:
        while self._unsent:
            chunk = [self._unsent[i] for i in range(min(BATCH, len(self._unsent)))]
            # All or none of them (a script is atomic), and none already there.
            if jobstore.append(self._redis, self.job_id, self.attempt, chunk) < 0:
                self._fence()
                return
            for _ in chunk:
                self._unsent.popleft()

    def _fence(self) -> None:
        log.error("job %s: attempt %d was replaced by another; its events are dropped", self.job_id, self.attempt)
        self.fenced = True
        self._unsent.clear()
        if self._on_fenced is not None:
            self._on_fenced()


def decode(entries: list[Any]) -> Iterator[tuple[str, Event | None]]:
    """Stream entries as (id, event); None for an entry that is not a deepe event (a method may
    append to its own job's stream: such entries are skipped by every reader)."""
    for entry_id, fields in entries:
        try:
            yield entry_id, Event.from_json(fields["data"], id=entry_id)
        except (KeyError, ValueError):
            yield entry_id, None


def read_events(
    client: redis.Redis,
    job_id: str,
    since: str = "0",
    follow: bool = False,
    block_ms: int = 1000,
) -> Iterator[Event]:
    """Replay a job's events after stream id ``since``; with ``follow``, tail until a final event."""
    for event in tail_events(client, job_id, since=since, follow=follow, block_ms=block_ms):
        if event is not None:
            yield event


def tail_events(
    client: redis.Redis,
    job_id: str,
    since: str = "0",
    follow: bool = False,
    block_ms: int = 1000,
    idle: float | None = None,
) -> Iterator[Event | None]:
    """`read_events`, and, with ``idle``, a None each time ``idle`` seconds pass without an event
    while it follows: the tick of a keepalive (an SSE comment) on a quiet job's stream.

    A follower serves an event only once DEEPE_REDIS_MIN_REPLICAS replicas have it (`read_replicated`):
    one served from a primary that is then lost with it would be sent again by its publisher,
    under a new id, and the follower would show it twice. A one-shot read shows what the
    primary holds (docs/reliability.md)."""
    stream = keys.events(job_id)
    last = "0" if since == "-" else since
    start = "-" if since in ("0", "0-0", "-") else f"({since}"
    entries: Any = []  # none yet, where they are not replicated: the tail reads them again
    if not follow:
        entries = client.xrange(stream, min=start)
    else:
        with contextlib.suppress(NotReplicated):
            entries = read_replicated(client, job_id, events_of(job_id), "xrange", stream, min=start)
    for entry_id, event in decode(entries):
        last = entry_id
        if event is None:
            continue
        yield event
        if follow and event.kind.is_final:
            return
    if follow:
        yield from _tail(client, job_id, last, block_ms, idle)


def _tail(client: redis.Redis, job_id: str, last: str, block_ms: int, idle: float | None) -> Iterator[Event | None]:
    """`tail_events` after the stored events: new ones as they come, once replicated."""
    stream = keys.events(job_id)
    quiet_since = time.monotonic()
    outage: float | None = None  # since when Redis has not answered, or not replicated
    while True:
        wait_ms = block_ms
        if idle is not None:
            left = quiet_since + idle - time.monotonic()
            if left <= 0:
                yield None
                quiet_since, left = time.monotonic(), idle
            wait_ms = max(1, min(block_ms, math.ceil(left * 1000)))  # 0 would block for ever
        try:
            reply: Any = client.xread({stream: last}, block=wait_ms, count=BATCH)
            if not reply:
                # A reader that resumed after the final event (an SSE reconnect) ends here.
                status = client.hget(keys.job(job_id), "status")
                if status in FINAL_VALUES and not client.xread({stream: last}, count=1):
                    return
                outage = None
                continue
            if get_settings().min_replicas > 0:  # read again, with the barrier, on one connection
                reply = read_replicated(client, job_id, events_of(job_id), "xread", {stream: last}, count=BATCH)
                if not reply:
                    continue
            outage = None
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, NotReplicated):
            # A failover or a restart (or no replica acknowledging): read on from `last` once
            # Redis answers (a sentinel client asks for the new primary; a plain URL's connection
            # to a demoted primary drops itself, `connection.FollowsTheName`), for as long as a
            # running job rides it out.
            outage = outage or time.monotonic()
            if time.monotonic() - outage > get_settings().lease_ttl:
                raise
            time.sleep(0.5)
            continue
        for entry_id, event in decode(reply[0][1]):
            last = entry_id
            if event is None:
                continue
            yield event
            quiet_since = time.monotonic()
            if event.kind.is_final:
                return


def events_of(job_id: str) -> str:
    """How a follower's NotReplicated names what was not replicated."""
    return f"An event of job {job_id}"


# The latest `log` event is among a job's last this many events.
PROGRESS_WINDOW = 50


def progress_of(client: redis.Redis, job_ids: list[str]) -> dict[str, Event | None]:
    """Each job's latest `log` event, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.xrevrange(keys.events(job_id), count=PROGRESS_WINDOW)
    found: dict[str, Event | None] = {}
    for job_id, recent in zip(job_ids, pipe.execute(), strict=True):
        found[job_id] = next((e for _, e in decode(recent) if e is not None and e.kind is EventKind.LOG), None)
    return found
