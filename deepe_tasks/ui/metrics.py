"""Prometheus metrics of the whole system, computed from Redis at scrape time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from deepe_tasks.core import keys
from deepe_tasks.core.connection import get_redis
from deepe_tasks.core.records import JobRecord, JobStatus
from deepe_tasks.queue.queues import priority_lists

DURATION_BUCKETS = (60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 48 * 3600.0, float("inf"))


class DeepeCollector(Collector):
    def collect(self) -> Iterator[Any]:
        client = get_redis()
        ids: Any = client.zrange(keys.JOBS_INDEX, 0, -1)
        pipe = client.pipeline()
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
            pipe.xlen(keys.events(job_id))
        replies = pipe.execute()
        records = [JobRecord.from_redis(raw) for raw in replies[0::2] if raw]
        events = sum(int(n) for n in replies[1::2])

        by_state = GaugeMetricFamily("deepe_jobs", "Jobs by state.", labels=["state"])
        counts = Counter(r.status for r in records)
        for state in JobStatus:
            by_state.add_metric([state.value], counts.get(state, 0))
        yield by_state

        running: Any = client.scard(keys.RUNNING)
        yield GaugeMetricFamily("deepe_running_jobs", "Jobs that a worker is running.", value=running)

        lengths = GaugeMetricFamily("deepe_queue_length", "Jobs waiting in each queue.", labels=["queue"])
        for queue in sorted({r.queue for r in records}):
            pipe = client.pipeline()
            for _, name in priority_lists(queue):
                pipe.llen(name)
            lengths.add_metric([queue], sum(pipe.execute()))
        yield lengths

        yield CounterMetricFamily("deepe_events_published", "Events in the job streams.", value=events)

        durations = [r.finished_at - r.started_at for r in records
                     if r.status.is_final and r.started_at and r.finished_at]
        buckets = [(str(b) if b != float("inf") else "+Inf", sum(1 for d in durations if d <= b))
                   for b in DURATION_BUCKETS]
        histogram = HistogramMetricFamily("deepe_job_duration_seconds", "Run time of finished jobs (last attempt).")
        histogram.add_metric([], buckets, sum_value=sum(durations))
        yield histogram
