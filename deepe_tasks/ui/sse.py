"""A job's events as Server-Sent Events, read with an async Redis client.

A follower waits in the event loop, never in a thread: a quiet job's stream costs one idle
Redis connection and no worker thread, so followers cannot starve the other routes (45 idle
followers of the sync generators this replaces made `/healthz` take 12-15 s).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import redis
import redis.asyncio as aredis
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from deepe_tasks.core import keys
from deepe_tasks.core.connection import connect_async
from deepe_tasks.core.errors import NotReplicated
from deepe_tasks.core.events import BATCH, FINAL_VALUES, decode, events_of, read_events
from deepe_tasks.core.records import Event
from deepe_tasks.core.scripts import read_replicated_async
from deepe_tasks.core.settings import get_settings
from deepe_tasks.core.validate import MAX_U64

log = logging.getLogger(__name__)

EVENT_STREAM = "text/event-stream"
KEEPALIVE = ": keepalive\n\n"
LAST_ID = f"{MAX_U64}-{MAX_U64}"  # the largest stream id: no event can follow it
BLOCK_MS = 1000  # one XREAD's wait: how soon a follower sees its job's record expire
READ_TIMEOUT = 10.0  # seconds a Redis reply may take (past BLOCK_MS) before the stream ends


def message(event: Event) -> str:
    return f"id: {event.id}\nevent: {event.kind.value}\ndata: {json.dumps(event.model_dump(mode='json'))}\n\n"


def replay(client: redis.Redis, job_id: str, since: str) -> Iterator[Event]:
    """The events after ``since`` (`follow=false`); none after the largest id, which Redis
    refuses as the start of a range."""
    return iter(()) if since == LAST_ID else read_events(client, job_id, since=since)


async def follow(client: aredis.Redis, job_id: str, since: str, idle: float) -> AsyncIterator[str]:
    """Replay a job's events after ``since``, then tail them; a keepalive comment after each
    ``idle`` seconds without one. It ends with the job's final event, or once the job has ended
    (or its record is gone: expired) and every event was sent. An event is sent only once
    DEEPE_REDIS_MIN_REPLICAS replicas have it, as `tail_events` does."""
    stream = keys.events(job_id)
    last = since
    start = "-" if since in ("0", "0-0") else f"({since}"
    while since != LAST_ID:  # the stored events, a page at a time (a long job has tens of thousands)
        try:
            entries: Any = await read_replicated_async(client, job_id, events_of(job_id), "xrange", stream, min=start,
                                                       count=BATCH)
        except NotReplicated:
            break  # the tail below reads them again, once replicated
        for entry_id, event in decode(entries):
            last, start = entry_id, f"({entry_id}"
            if event is None:
                continue
            yield message(event)
            if event.kind.is_final:
                return
        if len(entries) < BATCH:
            break
    quiet_since = time.monotonic()
    while True:
        left = quiet_since + idle - time.monotonic()
        if left <= 0:
            yield KEEPALIVE
            quiet_since, left = time.monotonic(), idle
        wait_ms = max(1, min(BLOCK_MS, math.ceil(left * 1000)))  # 0 would block for ever
        reply: Any = await client.xread({stream: last}, block=wait_ms, count=BATCH)
        if not reply:
            if await _over(client, job_id, stream, last):
                return
            continue
        if get_settings().min_replicas > 0:  # read again, with the barrier, on one connection
            try:
                reply = await read_replicated_async(client, job_id, events_of(job_id), "xread", {stream: last},
                                                    count=BATCH)
            except NotReplicated:
                await anyio.sleep(0.2)  # while no replica acknowledges (the WAIT took its timeout)
                continue
            if not reply:
                continue
        for entry_id, maybe in decode(reply[0][1]):
            last = entry_id
            if maybe is None:
                continue
            yield message(maybe)
            quiet_since = time.monotonic()
            if maybe.kind.is_final:
                return


async def _over(client: aredis.Redis, job_id: str, stream: str, last: str) -> bool:
    """Whether nothing more can come: the job's record is gone (expired), or the job has ended
    and no event follows ``last`` (a client that resumed after the final event)."""
    status = await client.hget(keys.job(job_id), "status")
    if status is None:
        return True
    return status in FINAL_VALUES and not await client.xread({stream: last}, count=1)


class EventStream(StreamingResponse):
    """`follow` as an SSE response, on a Redis connection of its own that is closed, and the
    stream's slot given back, when the stream ends or its client goes away."""

    def __init__(self, url: str, job_id: str, since: str, idle: float, give_back: Callable[[], None]) -> None:
        self._url = url
        self._give_back = give_back
        self._events = self._run(job_id, since, idle)
        super().__init__(self._events, media_type=EVENT_STREAM, headers={"Cache-Control": "no-cache"})

    async def _run(self, job_id: str, since: str, idle: float) -> AsyncGenerator[str, None]:
        client = connect_async(self._url, decode_responses=True, socket_timeout=BLOCK_MS / 1000 + READ_TIMEOUT,
                               socket_connect_timeout=5)
        try:
            async for chunk in follow(client, job_id, since, idle):
                yield chunk
        except (redis.RedisError, OSError) as e:
            # The 200 is sent: the stream can only end. A client resumes with Last-Event-ID.
            log.warning("the event stream of %s ends early: Redis did not answer (%s)", job_id, e)
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._give_back()
            with anyio.CancelScope(shield=True):
                await self._events.aclose()  # runs _run's finally when the client left mid-stream
