"""What replication acknowledgement costs: DEEPE_REDIS_MIN_REPLICAS=1 against 0, on one primary
with one replica (tests/sentinel.py's Topology, reached by a plain redis:// URL to the primary).

Three figures, each for both settings: dispatch p50/p99 (submit to the job's `started` event, a
trivial method, one warm worker, as dispatch.py measures it), the events per second one
EventPublisher sustains (as events.py's publisher_rate measures it), and how long a follower
(`job.events(follow=True)`'s reader, which shows an event only once it is replicated) takes to
show an event after it was emitted, at one event per 20 ms. A worker reads its settings
when it starts, so each setting has a worker of its own, on a queue of its own; this process's
settings (submit's barrier, the publisher's appends) are switched between rounds. The rounds
alternate which setting goes first, so that drift on a shared machine hits both alike.

The `started` event's time is taken before the claim's WAIT (the worker stamps it, then claims),
so dispatch sees the submit's barrier only where the worker is faster than it; `submit_p50_ms`
(submit's return, after its barrier) and `end_p50_ms` (submit to the job's end: the claim's,
the events' and the end's WAITs) show the rest. `wait_calls` is how many WAITs the primary ran
during each setting's measurements (INFO commandstats): none asked for, none (or a straggling
end of the other worker's last job) should run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# common puts the repository root on sys.path: tests.sentinel is importable after it.
from common import median, percentile, report, running_job, sft_params, smoke_flag, write_method
from dispatch import TRIVIAL
from events import publisher_rate

SETTINGS = {"none": 0, "replicated": 1}  # name: DEEPE_REDIS_MIN_REPLICAS
ROUNDS, JOBS, EVENTS = 10, 20, 20_000  # per round and setting: jobs dispatched, events published
SMOKE_ROUNDS, SMOKE_JOBS, SMOKE_EVENTS = 2, 2, 1_000
FOLLOWED, SMOKE_FOLLOWED = 100, 5  # per round and setting: events a follower is timed on
FOLLOW_GAP = 0.02  # seconds between them


def queue_of(name: str) -> str:
    return f"bench-{name}"


@contextlib.contextmanager
def replicated_environment() -> Iterator[dict[str, Any]]:
    """A primary with one replica (and the Topology's 3 idle sentinels), storage, a tiny model and
    dataset, and one warm worker per setting, each on its own queue with its own
    DEEPE_REDIS_MIN_REPLICAS."""
    from deepe_tasks.fixtures.embedded import WorkerProcess
    from tests.sentinel import Topology

    work = Path(tempfile.mkdtemp(prefix="deepe-bench-"))
    # No failover wanted: a primary slow to answer on a busy 2-core machine must not be voted down.
    with Topology(work / "redis", replicas=1, down_after_ms=60_000, failover_timeout_ms=120_000) as topo:
        primary = topo.primary_port()
        url = f"redis://127.0.0.1:{primary}/0"
        settings = {"DEEPE_REDIS_URL": url, "DEEPE_STORAGE": str(work / "storage"),
                    "DEEPE_METHOD_STORE": str(work / "methods"), "TOKENIZERS_PARALLELISM": "false"}
        os.environ.update(settings)
        use("none")
        from deepe_tasks.fixtures import tiny

        (work / "methods").mkdir()
        model = tiny.build_model(work / "storage" / "base")
        data = tiny.write_jsonl(tiny.sft_rows(64), work / "storage" / "data.jsonl")
        procs = [WorkerProcess({**settings, "DEEPE_QUEUE": queue_of(name), "DEEPE_REDIS_MIN_REPLICAS": str(wanted)},
                               queues=queue_of(name), log_file=work / f"worker-{name}.log").start()
                 for name, wanted in SETTINGS.items()]
        try:
            for p in procs:
                p.wait_ready()
            yield {"work": work, "model": model, "data": data, "url": url, "primary": topo.client(primary)}
        finally:
            for p in procs:
                p.stop()


def use(name: str) -> None:
    """This process's DEEPE_REDIS_MIN_REPLICAS from now on (settings are cached: read them again)."""
    from deepe_tasks.core.settings import get_settings

    os.environ["DEEPE_REDIS_MIN_REPLICAS"] = str(SETTINGS[name])
    get_settings.cache_clear()
    assert get_settings().min_replicas == SETTINGS[name]


def wait_calls(primary: Any) -> int:
    """How many WAITs the primary has run since it started."""
    return int(primary.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def dispatch(ctx: dict[str, Any], name: str, jobs: int, figures: dict[str, list[float]]) -> None:
    """``jobs`` trivial jobs on that setting's worker, one after the other."""
    from deepe_tasks import EventKind, submit

    for _ in range(jobs):
        t0 = time.time()
        job = submit("trivial", sft_params(ctx), queue=queue_of(name))
        figures["submit"].append(time.time() - t0)
        event = next(e for e in job.events(follow=True) if e.kind is EventKind.STARTED)
        figures["started"].append(event.ts - t0)
        job.wait(timeout=120)
        figures["end"].append(time.time() - t0)


def follow_delays(client: Any, n: int, job_id: str) -> list[float]:
    """Seconds from each of ``n`` events' emit (one per FOLLOW_GAP) to a follower showing it."""
    from deepe_tasks.core.events import EventPublisher, read_events
    from deepe_tasks.core.records import Event, EventKind

    attempt = running_job(client, job_id)
    delays: list[float] = []

    def follow() -> None:
        for event in read_events(client, job_id, follow=True):
            if event.kind is EventKind.LOG:
                delays.append(time.time() - event.ts)
                if len(delays) == n:
                    return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    publisher = EventPublisher(client, job_id, attempt)
    for i in range(n):
        publisher.emit(Event(kind=EventKind.LOG, job=job_id, step=i + 1, metrics={"loss": 1.0}))
        time.sleep(FOLLOW_GAP)
    assert publisher.close(timeout=60), "the publisher did not hand over every event"
    follower.join(timeout=60)
    assert len(delays) == n, f"the follower showed {len(delays)} of {n} events"
    return delays


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def main() -> None:
    import redis

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--jobs", type=int, default=JOBS, help="jobs per round and setting")
    parser.add_argument("--events", type=int, default=EVENTS, help="events per round and setting")
    smoke_flag(parser, f"{SMOKE_ROUNDS} rounds of {SMOKE_JOBS} jobs and {SMOKE_EVENTS} events per setting")
    args = parser.parse_args()
    rounds, jobs, n = (SMOKE_ROUNDS, SMOKE_JOBS, SMOKE_EVENTS) if args.smoke else (args.rounds, args.jobs, args.events)
    followed = SMOKE_FOLLOWED if args.smoke else FOLLOWED
    with replicated_environment() as ctx:
        client = redis.Redis.from_url(ctx["url"], decode_responses=True)
        write_method(ctx, "trivial", TRIVIAL)
        from deepe_tasks import submit

        for name in SETTINGS:  # warm up each worker (its zygote imports the training stack)
            use(name)
            submit("trivial", sft_params(ctx), queue=queue_of(name)).wait(timeout=180)

        times: dict[str, dict[str, list[float]]] = {name: {"submit": [], "started": [], "end": [], "follow": []}
                                                     for name in SETTINGS}
        rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
        waits = dict.fromkeys(SETTINGS, 0)
        for r in range(rounds):
            order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                use(name)
                before = wait_calls(ctx["primary"])
                dispatch(ctx, name, jobs, times[name])
                rates[name].append(publisher_rate(client, n, f"bench-rate-{r}-{name}"))
                times[name]["follow"] += follow_delays(client, followed, f"bench-follow-{r}-{name}")
                waits[name] += wait_calls(ctx["primary"]) - before
        assert waits["replicated"] > 0, "no WAIT ran with DEEPE_REDIS_MIN_REPLICAS=1"

        figures: dict[str, Any] = {}
        for name in SETTINGS:
            t = times[name]
            figures[name] = {
                "min_replicas": SETTINGS[name],
                "dispatch_p50_ms": ms(percentile(t["started"], 50)), "dispatch_p99_ms": ms(percentile(t["started"], 99)),
                "submit_p50_ms": ms(percentile(t["submit"], 50)), "end_p50_ms": ms(percentile(t["end"], 50)),
                "follow_p50_ms": ms(percentile(t["follow"], 50)), "follow_p99_ms": ms(percentile(t["follow"], 99)),
                "events_per_s": round(median(rates[name])), "events_per_s_each_round": [round(x) for x in rates[name]],
                "wait_calls": waits[name],
            }
        none, replicated = figures["none"], figures["replicated"]
        report("replication", {
            **figures,
            "ratio_dispatch_p50": round(replicated["dispatch_p50_ms"] / none["dispatch_p50_ms"], 2),
            "ratio_dispatch_p99": round(replicated["dispatch_p99_ms"] / none["dispatch_p99_ms"], 2),
            "ratio_submit_p50": round(replicated["submit_p50_ms"] / none["submit_p50_ms"], 2),
            "ratio_end_p50": round(replicated["end_p50_ms"] / none["end_p50_ms"], 2),
            "ratio_events_per_s": round(replicated["events_per_s"] / none["events_per_s"], 2),
            "ratio_follow_p50": round(replicated["follow_p50_ms"] / none["follow_p50_ms"], 2),
            "ratios": "replicated / none", "replicas": 1, "rounds": rounds, "jobs": rounds * jobs,
            "events": n, "followed": rounds * followed,
        }, smoke=args.smoke)


if __name__ == "__main__":
    main()
