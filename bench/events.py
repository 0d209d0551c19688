"""Events per second one publisher sustains, and the lag to a follower, against a bare XADD loop."""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

from common import environment, percentile, report, running_job, smoke_flag

N = 50_000
LAG_EVENTS = 5_000
SMOKE_N, SMOKE_LAG_EVENTS = 2_000, 250
LAG_RATE = 2_500  # events/s offered while the follower's lag is measured


def publisher_rate(client: Any, n: int, job_id: str = "bench-rate") -> float:
    """Events/s one EventPublisher sustains on job ``job_id`` (a job's stream takes one run)."""
    from deepe_tasks.core.events import EventPublisher
    from deepe_tasks.core.records import Event, EventKind

    attempt = running_job(client, job_id)
    publisher = EventPublisher(client, job_id, attempt)
    events = [Event(kind=EventKind.LOG, job=job_id, step=i, max_steps=n, metrics={"loss": 1.0 / (i + 1)})
              for i in range(n)]
    t0 = time.perf_counter()
    for e in events:
        publisher.emit(e)
    assert publisher.close(timeout=120), "the publisher did not hand over every event"
    elapsed = time.perf_counter() - t0
    all_appended(client, job_id, attempt, n)
    return n / elapsed


def all_appended(client: Any, job_id: str, attempt: int, n: int) -> None:
    """Every one of the publisher's ``n`` events reached the stream, once and in order.

    A job's stream is capped (XADD MAXLEN ~ lua.STREAM_MAXLEN), so its length says nothing past
    the cap. The append script writes an event only after every earlier one of its attempt
    (each carries its sequence number, `s`), so the last entry being the n-th says all n
    were appended; Redis's own count of entries ever added (XINFO STREAM, Redis 7) says none
    twice: `queued`, `started` and the n."""
    from deepe_tasks.core import keys

    stream = keys.events(job_id)
    (_, last), = client.xrevrange(stream, count=1)
    assert (last["a"], last["s"]) == (str(attempt), str(n)), f"the stream ends at {last}, not event {n}"
    assert json.loads(last["data"])["step"] == n - 1, last["data"]
    added = client.xinfo_stream(stream).get("entries-added")
    assert added is None or added == n + 2, f"{added} entries were added, not {n + 2}"


def bare_xadd_rate(client: Any, n: int) -> float:
    from deepe_tasks.core.records import Event, EventKind

    payloads = [Event(kind=EventKind.LOG, job="bench-bare", step=i, metrics={"loss": 1.0}).to_json() for i in range(n)]
    t0 = time.perf_counter()
    for p in payloads:
        client.xadd("deepe:events:bench-bare", {"data": p})
    return n / (time.perf_counter() - t0)


def follower_lag(client: Any, n: int) -> list[float]:
    from deepe_tasks.core.events import EventPublisher, read_events
    from deepe_tasks.core.records import Event, EventKind

    lags: list[float] = []
    ready = threading.Event()

    def follow() -> None:
        ready.set()
        for event in read_events(client, "bench-lag", since="0", follow=True, block_ms=100):
            lags.append(time.time() - event.ts)
            if event.kind is EventKind.SUCCEEDED:
                return

    reader = threading.Thread(target=follow)
    reader.start()
    ready.wait()
    publisher = EventPublisher(client, "bench-lag", running_job(client, "bench-lag"))
    for i in range(n):
        publisher.emit(Event(kind=EventKind.LOG, job="bench-lag", step=i))
        time.sleep(1 / LAG_RATE)
    publisher.emit(Event(kind=EventKind.SUCCEEDED, job="bench-lag"))
    publisher.close()
    reader.join(timeout=60)
    return lags


def main() -> None:
    import redis

    parser = argparse.ArgumentParser(description=__doc__)
    smoke_flag(parser, f"{SMOKE_N} events, {SMOKE_LAG_EVENTS} to the follower")
    smoke = parser.parse_args().smoke
    n, lag_events = (SMOKE_N, SMOKE_LAG_EVENTS) if smoke else (N, LAG_EVENTS)
    with environment() as ctx:
        client = redis.Redis.from_url(ctx["url"], decode_responses=True)
        ours = publisher_rate(client, n)
        bare = bare_xadd_rate(client, n)
        lags = follower_lag(client, lag_events)
        report("events", {
            "ours_events_per_s": round(ours), "baseline_xadd_per_s": round(bare), "ratio": round(ours / bare, 2),
            "goal": ">= 20000 events/s", "follower_lag_p50_ms": round(percentile(lags, 50) * 1000, 2),
            "follower_lag_p99_ms": round(percentile(lags, 99) * 1000, 2), "lag_goal": "p99 <= 100 ms",
            "events": n,
        }, smoke=smoke)


if __name__ == "__main__":
    main()
