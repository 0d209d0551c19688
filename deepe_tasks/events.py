"""Job event streams: a batching publisher and a reader that replays, then tails."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from . import keys
from .records import FINAL_STATES, Event

log = logging.getLogger(__name__)

BATCH = 500
QUIET = 1.0  # seconds without events after which the publisher's thread sleeps
FINAL_VALUES = {s.value for s in FINAL_STATES}
# A batch of events in one command: redis-py spends more time packing and parsing a pipeline
# of XADDs than Redis spends running them.
_XADD_MANY = "for i = 1, #ARGV do redis.call('xadd', KEYS[1], '*', 'data', ARGV[i]) end return #ARGV"


class EventPublisher:
    """Appends events to a job's Redis stream from a background thread, in batches.

    ``emit`` never touches the network, so a training step never waits on Redis. The thread
    wakes every ``interval`` seconds and sends what gathered in one command; after a quiet
    second it sleeps until the next event, so an idle publisher costs nothing. While Redis is
    unreachable, events wait in memory (up to ``max_buffer``; beyond that the oldest are kept in
    ``events.jsonl`` only) and are sent in order once it is back.
    """

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        jsonl: Path | None = None,
        max_buffer: int = 100_000,
        interval: float = 0.05,
    ) -> None:
        self.job_id = job_id
        self.published = 0
        self.dropped = 0
        self._redis = client
        self._jsonl = jsonl
        self._interval = interval
        self._incoming: deque[Event] = deque()
        self._unsent: deque[str] = deque(maxlen=max_buffer)  # events as JSON, oldest first
        self._xadd_many = client.register_script(_XADD_MANY)
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
        with self._cond:
            self._idle.clear()
            self._incoming.append(event)
            if self._sleeping or len(self._incoming) >= BATCH:
                self._cond.notify()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event so far is in Redis; False if Redis stayed away past ``timeout``."""
        with self._cond:
            self._cond.notify()
        return self._idle.wait(timeout)

    def close(self, timeout: float = 30.0) -> bool:
        sent = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)
        return sent

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
                self._append_jsonl(lines)
                overflow = len(self._unsent) + len(lines) - (self._unsent.maxlen or 0)
                if overflow > 0:
                    self.dropped += overflow
                self._unsent.extend(lines)
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
        stream = keys.events(self.job_id)
        while self._unsent:
            chunk = [self._unsent[i] for i in range(min(BATCH, len(self._unsent)))]
            self._xadd_many(keys=[stream], args=chunk)  # all or none of them: a script is atomic
            for _ in chunk:
                self._unsent.popleft()
            self.published += len(chunk)

    def write_jsonl(self, batch: list[Event]) -> None:
        """Append events to the job's events.jsonl only (the stream got them another way)."""
        self._append_jsonl([e.to_json() for e in batch])

    def _append_jsonl(self, lines: list[str]) -> None:
        if self._jsonl is None:
            return
        try:
            with self._jsonl.open("a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
        except OSError as e:
            log.warning("could not append to %s: %s", self._jsonl, e)


def _decode(entries: list[Any]) -> list[Event]:
    return [Event.from_json(fields["data"], id=entry_id) for entry_id, fields in entries]


def read_events(
    client: redis.Redis,
    job_id: str,
    since: str = "0",
    follow: bool = False,
    block_ms: int = 1000,
) -> Iterator[Event]:
    """Replay a job's events after stream id ``since``; with ``follow``, tail until a final event."""
    stream = keys.events(job_id)
    last = since
    start = "-" if since in ("0", "0-0", "-") else f"({since}"
    for event in _decode(client.xrange(stream, min=start)):  # type: ignore[arg-type]
        last = event.id or last
        yield event
        if follow and event.kind.is_final:
            return
    if not follow:
        return
    while True:
        reply: Any = client.xread({stream: last or "0"}, block=block_ms, count=BATCH)
        if not reply:
            # A reader that resumed after the final event (an SSE reconnect) ends here.
            status = client.hget(keys.job(job_id), "status")
            if status in FINAL_VALUES and not client.xread({stream: last or "0"}, count=1):
                return
            continue
        for event in _decode(reply[0][1]):
            last = event.id or last
            yield event
            if event.kind.is_final:
                return
