"""Events per second one publisher sustains, and the lag to a follower, against a bare XADD loop."""

from __future__ import annotations

import threading
import time
from typing import Any

from common import environment, percentile, report, running_job

N = 50_000
LAG_EVENTS = 5_000
LAG_RATE = 2_500  # events/s offered while the follower's lag is measured


def publisher_rate(client: Any) -> float:
    from deepe_tasks.core.events import EventPublisher
    from deepe_tasks.core.records import Event, EventKind

    publisher = EventPublisher(client, "bench-rate", running_job(client, "bench-rate"))
    events = [Event(kind=EventKind.LOG, job="bench-rate", step=i, max_steps=N, metrics={"loss": 1.0 / (i + 1)})
              for i in range(N)]
    t0 = time.perf_counter()
    for e in events:
        publisher.emit(e)
    publisher.close(timeout=120)
    elapsed = time.perf_counter() - t0
    assert client.xlen("deepe:events:bench-rate") == N + 2  # with `queued` and `started`
    return N / elapsed


def bare_xadd_rate(client: Any) -> float:
    from deepe_tasks.core.records import Event, EventKind

    payloads = [Event(kind=EventKind.LOG, job="bench-bare", step=i, metrics={"loss": 1.0}).to_json() for i in range(N)]
    t0 = time.perf_counter()
    for p in payloads:
        client.xadd("deepe:events:bench-bare", {"data": p})
    return N / (time.perf_counter() - t0)


def follower_lag(client: Any) -> list[float]:
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
    for i in range(LAG_EVENTS):
        publisher.emit(Event(kind=EventKind.LOG, job="bench-lag", step=i))
        time.sleep(1 / LAG_RATE)
    publisher.emit(Event(kind=EventKind.SUCCEEDED, job="bench-lag"))
    publisher.close()
    reader.join(timeout=60)
    return lags


def main() -> None:
    import redis

    with environment() as ctx:
        client = redis.Redis.from_url(ctx["url"], decode_responses=True)
        ours = publisher_rate(client)
        bare = bare_xadd_rate(client)
        lags = follower_lag(client)
        report("events", {
            "ours_events_per_s": round(ours), "baseline_xadd_per_s": round(bare), "ratio": round(ours / bare, 2),
            "goal": ">= 20000 events/s", "follower_lag_p50_ms": round(percentile(lags, 50) * 1000, 2),
            "follower_lag_p99_ms": round(percentile(lags, 99) * 1000, 2), "lag_goal": "p99 <= 100 ms",
            "events": N,
        })


if __name__ == "__main__":
    main()
